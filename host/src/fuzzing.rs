//! Doors for the fuzz targets (`fuzz/`) into what the crate keeps to
//! itself. Compiled only with `--cfg fuzzing`, which `fuzz/run.sh` sets;
//! every target that needs nothing private uses the public API instead.

use crate::shard::wire::{self, Event, Request};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io;

/// What became of one frame read off a shard's socket.
#[derive(Debug)]
pub enum WireFrame {
    /// The stream ended where a frame would start.
    End,
    /// The reader refused the frame (and the stream with it).
    Refused(io::Error),
    /// The frame decoded; here is the message encoded again as a frame,
    /// or why the writer refused it.
    Decoded(io::Result<Vec<u8>>),
}

/// Reads one supervisor-to-shard frame from the front of `input` as the
/// shard does (`wire::receive`), and encodes what it decoded again as the
/// supervisor would (`wire::encode`).
pub fn wire_request(input: &mut &[u8]) -> WireFrame {
    round_trip::<Request>(input)
}

/// [`wire_request`] for a shard-to-supervisor frame, as the supervisor
/// reads it.
pub fn wire_event(input: &mut &[u8]) -> WireFrame {
    round_trip::<Event<'static>>(input)
}

fn round_trip<T: Serialize + DeserializeOwned>(input: &mut &[u8]) -> WireFrame {
    let mut body = Vec::new();
    match wire::receive::<T>(input, &mut body) {
        Ok(None) => WireFrame::End,
        Err(error) => WireFrame::Refused(error),
        Ok(Some(message)) => {
            let mut frame = Vec::new();
            WireFrame::Decoded(wire::encode(&mut frame, &message).map(|()| frame))
        }
    }
}

/// Frames of real messages both ways, as the writer sends them: the
/// seeds of the wire target (`fuzz/src/bin/make_seeds.rs`). Requests
/// first, then events; the flag says which.
pub fn wire_seeds() -> Vec<(bool, Vec<u8>)> {
    use crate::control::GuestState;
    use crate::end::{Crash, GuestEnd};
    use crate::host::GuestConfig;
    use crate::pool::PoolStatus;
    use crate::shard::wire::{GuestSpec, Reply};
    use crate::stats::StatsSnapshot;
    use std::borrow::Cow;
    use std::time::Duration;

    let (spec, _) = GuestSpec::new(
        GuestConfig {
            args: vec!["world".into()],
            ..GuestConfig::default()
        },
        7,
    );
    let image = crate::builtin::image("privileged")
        .expect("built in")
        .expect("valid");
    let requests = [
        Request::Start {
            tag: 1,
            workers: 2,
            slice: Duration::from_millis(10),
            pool: 4,
            shard_size: 1000,
        },
        Request::Image {
            key: image.fingerprint(),
            image: image.clone(),
        },
        Request::Spawn {
            tag: 2,
            id: 5,
            image: image.fingerprint(),
            guest: spec,
        },
        Request::Kill { id: 5 },
        Request::Raise { id: 5, bits: 0b101 },
        Request::Stats { tag: 3, id: 5 },
        Request::Pool { tag: 4 },
    ];
    let events = [
        Event::Reply {
            tag: 1,
            reply: Reply::Done(Ok(())),
        },
        Event::Reply {
            tag: 2,
            reply: Reply::Done(Err("no room".into())),
        },
        Event::Reply {
            tag: 3,
            reply: Reply::Stats(Some(Box::new((
                GuestState::Running,
                StatsSnapshot::default(),
            )))),
        },
        Event::Reply {
            tag: 4,
            reply: Reply::Pool(PoolStatus::default()),
        },
        Event::Console {
            id: 5,
            bytes: Cow::Borrowed(b"hello\n"),
        },
        Event::Ended {
            id: 5,
            end: GuestEnd::Crashed(Crash::BadHypercallMemory { addr: 8, len: 16 }),
            stats: Box::default(),
        },
    ];
    let mut seeds: Vec<(bool, Vec<u8>)> = requests.iter().map(|r| (true, frame(r))).collect();
    seeds.extend(events.iter().map(|e| (false, frame(e))));
    seeds
}

/// `message` as the writer sends it.
fn frame<T: Serialize>(message: &T) -> Vec<u8> {
    let mut frame = Vec::new();
    wire::encode(&mut frame, message).expect("a seed encodes");
    frame
}
