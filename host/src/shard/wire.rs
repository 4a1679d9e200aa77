//! What the supervisor and a shard process say to each other over their
//! socket: length-prefixed postcard frames.
//!
//! The supervisor sends [`Request`]s; the shard sends [`Event`]s. A request
//! with a `tag` gets exactly one [`Event::Reply`] with the same tag. Events
//! about one guest arrive in order: its console bytes, then its end.

use crate::console::ConsoleSink;
use crate::control::GuestState;
use crate::device::DiskSpec;
use crate::end::GuestEnd;
use crate::host::GuestConfig;
use crate::limits::Limits;
use crate::loader::{Fingerprint, Image};
use crate::mmu::Forget;
use crate::observe::Observe;
use crate::pool::PoolStatus;
use crate::stats::StatsSnapshot;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::time::Duration;

/// Largest frame either side accepts (an image, with room to spare).
const MAX_FRAME: usize = 256 << 20;

/// Supervisor to shard.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// The first request: start the shard's engine.
    Start {
        tag: u64,
        workers: usize,
        slice: Duration,
        pool: usize,
        shard_size: usize,
    },
    /// Keep `image` under `key` for later spawns.
    Image { key: Fingerprint, image: Image },
    /// Start guest `id` from the image kept under `image`.
    Spawn {
        tag: u64,
        id: u64,
        image: Fingerprint,
        guest: GuestSpec,
    },
    /// Kill guest `id`.
    Kill { id: u64 },
    /// Raise events `bits` for guest `id`.
    Raise { id: u64, bits: u64 },
    /// State and counters of guest `id`.
    Stats { tag: u64, id: u64 },
    /// The pool's status.
    Pool { tag: u64 },
}

/// A [`GuestConfig`] as it travels: without the console sink (the
/// supervisor keeps that), and with its LAN's number on the trunks.
#[derive(Debug, Serialize, Deserialize)]
pub struct GuestSpec {
    mem_size: u64,
    args: Vec<String>,
    console_limit: u64,
    limits: Limits,
    trapped_page_tables: bool,
    console_ring: bool,
    forget: Forget,
    disks: Vec<DiskSpec>,
    observe: Observe,
    /// The LAN's number on the trunks, and its name.
    pub net: Option<(u32, String)>,
}

impl GuestSpec {
    /// `config` to send, its LAN numbered `lan_number`; and its sink.
    pub fn new(config: GuestConfig, lan_number: u32) -> (Self, Option<ConsoleSink>) {
        // Whole, so that a field added to `GuestConfig` cannot be left
        // out here unnoticed.
        let GuestConfig {
            mem_size,
            args,
            console_limit,
            console_sink,
            limits,
            trapped_page_tables,
            console_ring,
            forget,
            disks,
            net,
            observe,
            gdb: _,
        } = config;
        let spec = Self {
            mem_size,
            args,
            console_limit,
            limits,
            trapped_page_tables,
            console_ring,
            forget,
            disks,
            observe,
            net: net.map(|name| (lan_number, name)),
        };
        (spec, console_sink)
    }

    /// The config to spawn with, its console going to `console_sink`.
    pub fn into_config(self, console_sink: Option<ConsoleSink>) -> GuestConfig {
        let Self {
            mem_size,
            args,
            console_limit,
            limits,
            trapped_page_tables,
            console_ring,
            forget,
            disks,
            observe,
            net,
        } = self;
        GuestConfig {
            mem_size,
            args,
            console_limit,
            console_sink,
            limits,
            trapped_page_tables,
            console_ring,
            forget,
            disks,
            net: net.map(|(_, name)| name),
            observe,
            gdb: None,
        }
    }
}

/// Shard to supervisor. Console bytes are borrowed where an event is
/// made (the shard encodes them straight from the guest's write) and owned
/// where it is read.
#[derive(Debug, Serialize, Deserialize)]
pub enum Event<'a> {
    /// The answer to the request with this tag.
    Reply { tag: u64, reply: Reply },
    /// Guest `id` wrote to its console.
    Console { id: u64, bytes: Cow<'a, [u8]> },
    /// Guest `id` ended and everything it held is freed.
    Ended {
        id: u64,
        end: GuestEnd,
        stats: Box<StatsSnapshot>,
    },
}

/// Answers to tagged requests.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// To `Start` and `Spawn`: done, or why not.
    Done(Result<(), String>),
    /// To `Stats`: `None` once the guest ended (its `Ended` came first).
    Stats(Option<Box<(GuestState, StatsSnapshot)>>),
    /// To `Pool`.
    Pool(PoolStatus),
}

/// Appends one frame (length, then body) to `buf`; on an error `buf` is
/// as it was.
pub fn encode<T: Serialize>(buf: &mut Vec<u8>, message: &T) -> io::Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    if let Err(e) = postcard::to_io(message, &mut *buf) {
        buf.truncate(start);
        return Err(io::Error::other(e));
    }
    let len = buf.len() - start - 4;
    if len > MAX_FRAME {
        buf.truncate(start);
        return Err(io::Error::other(format!("frame of {len} bytes")));
    }
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Writes one frame, in one write.
pub fn send<T: Serialize>(out: &mut impl Write, message: &T) -> io::Result<()> {
    let mut frame = Vec::new();
    encode(&mut frame, message)?;
    out.write_all(&frame)
}

/// Reads one frame through `body`, a buffer kept between calls; `None`
/// at a clean end of stream.
pub fn receive<T: DeserializeOwned>(
    input: &mut impl Read,
    body: &mut Vec<u8>,
) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!("frame of {len} bytes")));
    }
    body.clear();
    body.resize(len, 0);
    input.read_exact(body)?;
    postcard::from_bytes(body)
        .map(Some)
        .map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::end::Crash;

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let mut buf = Vec::new();
        let end = GuestEnd::Crashed(Crash::UnexpectedExit("hlt".into()));
        send(
            &mut buf,
            &Event::Ended {
                id: 9,
                end: end.clone(),
                stats: Box::default(),
            },
        )
        .expect("writes");
        send(&mut buf, &Request::Kill { id: 3 }).expect("writes");
        let mut input = buf.as_slice();
        match receive::<Event>(&mut input, &mut Vec::new()).expect("reads") {
            Some(Event::Ended {
                id: 9, end: got, ..
            }) => assert_eq!(got, end),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            receive::<Request>(&mut input, &mut Vec::new()).expect("reads"),
            Some(Request::Kill { id: 3 })
        ));
        assert!(
            receive::<Request>(&mut input, &mut Vec::new())
                .expect("reads")
                .is_none()
        );
    }

    #[test]
    fn oversized_frames_are_refused() {
        let frame = u32::MAX.to_le_bytes();
        assert!(receive::<Request>(&mut frame.as_slice(), &mut Vec::new()).is_err());
    }
}
