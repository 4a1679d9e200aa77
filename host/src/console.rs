//! A guest's console: kept in memory up to a byte limit (so a crashed
//! guest's output survives it), and optionally streamed to a sink as it
//! arrives; and the host's end of the guest's console ring.

use crate::end::Crash;
use crate::kvm::memory::GuestRam;
use shoal_abi::event::{CONSOLE_RING_DATA, CONSOLE_RING_OFFSET, CONSOLE_RING_SIZE, ConsoleRing};
use shoal_abi::layout::EVENT_PAGE;
use std::sync::Mutex;
use zerocopy::{FromZeros, IntoBytes};

/// Receives console bytes as the guest writes them: `(guest id, bytes)`.
pub type ConsoleSink = Box<dyn FnMut(u64, &[u8]) + Send>;

/// Default console byte limit per guest.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 1 << 20;

/// The console of one guest.
pub struct Console {
    id: u64,
    limit: u64,
    /// False when only the sink needs the bytes (a shard streams them to
    /// the supervisor, which keeps them).
    keep: bool,
    kept: Mutex<Kept>,
    sink: Mutex<Option<ConsoleSink>>,
}

/// The bytes accepted so far: all of them, or only their count.
#[derive(Default)]
struct Kept {
    bytes: Vec<u8>,
    len: u64,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("id", &self.id)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Console {
    /// A console keeping at most `limit` bytes.
    pub fn new(id: u64, limit: u64, sink: Option<ConsoleSink>) -> Self {
        Self {
            id,
            limit,
            keep: true,
            kept: Mutex::default(),
            sink: Mutex::new(sink),
        }
    }

    /// A console that streams up to `limit` bytes to `sink` and keeps
    /// none: [`Console::snapshot`] is empty.
    pub fn streaming(id: u64, limit: u64, sink: ConsoleSink) -> Self {
        Self {
            keep: false,
            ..Self::new(id, limit, Some(sink))
        }
    }

    /// Appends `bytes`; returns how many fit under the limit.
    pub fn write(&self, bytes: &[u8]) -> usize {
        let accepted = {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            let room = self.limit.saturating_sub(kept.len);
            let n = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            kept.len += n as u64;
            if self.keep {
                kept.bytes.extend_from_slice(&bytes[..n]);
            }
            n
        };
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let (true, Some(sink)) = (accepted > 0, sink.as_mut()) {
            sink(self.id, &bytes[..accepted]);
        }
        accepted
    }

    /// Whether the limit is reached.
    pub fn is_full(&self) -> bool {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).len >= self.limit
    }

    /// A copy of everything kept so far.
    pub fn snapshot(&self) -> Vec<u8> {
        self.kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes
            .clone()
    }
}

/// The host's end of a guest's console ring
/// ([`shoal_abi::event::ConsoleRing`], feature `CONSOLE_RING`): what it has
/// taken so far, kept here because the guest can write the ring's copy.
#[derive(Debug, Default)]
pub struct RingReader {
    tail: u32,
}

impl RingReader {
    /// Moves the bytes the guest has appended since the last call into
    /// `console`. Called only while the guest's vCPU is stopped, so the
    /// ring holds still. Returns the bytes the console accepted, or the
    /// crash of a guest whose `head` is more than the ring ahead.
    pub fn take(&mut self, ram: &GuestRam, console: &Console) -> Result<u64, Crash> {
        let host = |e: crate::kvm::memory::MemoryError| Crash::Internal(e.to_string());
        let mut ring = ConsoleRing::new_zeroed();
        ram.read_host(EVENT_PAGE + CONSOLE_RING_OFFSET, ring.as_mut_bytes())
            .map_err(host)?;
        let tail_at =
            EVENT_PAGE + CONSOLE_RING_OFFSET + core::mem::offset_of!(ConsoleRing, tail) as u64;
        let len = ring.head.wrapping_sub(self.tail);
        if len == 0 {
            if ring.tail != self.tail {
                // The guest wrote the host's word: put it right, or the
                // guest would find no room again.
                ram.write_host(tail_at, self.tail.as_bytes())
                    .map_err(host)?;
            }
            return Ok(0);
        }
        if len > CONSOLE_RING_SIZE {
            return Err(Crash::ConsoleRing {
                head: ring.head,
                tail: self.tail,
            });
        }
        let mut bytes = [0u8; CONSOLE_RING_SIZE as usize];
        let (len, start) = (len as usize, (self.tail % CONSOLE_RING_SIZE) as usize);
        let first = len.min(CONSOLE_RING_SIZE as usize - start);
        let data = EVENT_PAGE + CONSOLE_RING_DATA;
        ram.read_host(data + start as u64, &mut bytes[..first])
            .map_err(host)?;
        ram.read_host(data, &mut bytes[first..len]).map_err(host)?;
        self.tail = ring.head;
        ram.write_host(tail_at, self.tail.as_bytes())
            .map_err(host)?;
        Ok(console.write(&bytes[..len]) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn console_keeps_up_to_its_limit_and_streams_what_it_keeps() {
        let streamed = Arc::new(Mutex::new(Vec::new()));
        let sink_copy = Arc::clone(&streamed);
        let console = Console::new(
            7,
            5,
            Some(Box::new(move |id, b| {
                assert_eq!(id, 7);
                sink_copy.lock().expect("not poisoned").extend_from_slice(b);
            })),
        );
        assert_eq!(console.write(b"abc"), 3);
        assert_eq!(console.write(b"defg"), 2);
        assert!(console.is_full());
        assert_eq!(console.write(b"h"), 0);
        assert_eq!(console.snapshot(), b"abcde");
        assert_eq!(*streamed.lock().expect("not poisoned"), b"abcde");
    }

    #[test]
    fn a_streaming_console_keeps_nothing_but_counts_to_its_limit() {
        let console = Console::streaming(7, 5, Box::new(|_, _| {}));
        assert_eq!(console.write(b"abcdefg"), 5);
        assert!(console.is_full());
        assert!(console.snapshot().is_empty());
    }

    /// Appends `bytes` to the guest's side of the ring, as a guest would.
    fn put(ram: &GuestRam, bytes: &[u8]) {
        let at = EVENT_PAGE + CONSOLE_RING_OFFSET;
        let mut ring = ConsoleRing::new_zeroed();
        ram.read_host(at, ring.as_mut_bytes()).expect("reads");
        for (i, b) in bytes.iter().enumerate() {
            let pos = (ring.head as usize + i) % CONSOLE_RING_SIZE as usize;
            ram.write_host(EVENT_PAGE + CONSOLE_RING_DATA + pos as u64, &[*b])
                .expect("writes");
        }
        let head = ring.head.wrapping_add(bytes.len() as u32);
        ram.write_host(at, head.as_bytes()).expect("writes");
    }

    #[test]
    fn the_ring_reader_takes_new_bytes_across_the_wrap_and_publishes_its_tail() {
        let ram = GuestRam::new(shoal_abi::layout::MIN_MEMORY).expect("maps");
        let console = Console::new(1, 1 << 20, None);
        let mut reader = RingReader::default();
        assert_eq!(reader.take(&ram, &console), Ok(0));
        let long: Vec<u8> = (0..2000u32).map(|i| b'a' + (i % 26) as u8).collect();
        put(&ram, &long);
        assert_eq!(reader.take(&ram, &console), Ok(2000));
        // The next 100 bytes wrap past the end of the ring.
        put(&ram, &[b'z'; 100]);
        assert_eq!(reader.take(&ram, &console), Ok(100));
        assert_eq!(reader.take(&ram, &console), Ok(0));
        let mut expected = long;
        expected.extend_from_slice(&[b'z'; 100]);
        assert_eq!(console.snapshot(), expected);
        let mut tail = 0u32;
        ram.read_host(EVENT_PAGE + CONSOLE_RING_OFFSET + 4, tail.as_mut_bytes())
            .expect("reads");
        assert_eq!(tail, 2100);
    }

    #[test]
    fn a_full_ring_is_taken_whole_and_a_wrong_tail_is_put_right() {
        let ram = GuestRam::new(shoal_abi::layout::MIN_MEMORY).expect("maps");
        let console = Console::new(1, 1 << 20, None);
        let mut reader = RingReader::default();
        put(&ram, &[b'x'; CONSOLE_RING_SIZE as usize]);
        assert_eq!(
            reader.take(&ram, &console),
            Ok(u64::from(CONSOLE_RING_SIZE))
        );
        let tail_at = EVENT_PAGE + CONSOLE_RING_OFFSET + 4;
        ram.write_host(tail_at, 7u32.as_bytes()).expect("writes");
        assert_eq!(reader.take(&ram, &console), Ok(0));
        let mut tail = 0u32;
        ram.read_host(tail_at, tail.as_mut_bytes()).expect("reads");
        assert_eq!(tail, CONSOLE_RING_SIZE);
    }

    #[test]
    fn a_head_more_than_the_ring_ahead_is_a_crash_and_the_limit_drops_the_rest() {
        let ram = GuestRam::new(shoal_abi::layout::MIN_MEMORY).expect("maps");
        let console = Console::new(1, 3, None);
        let mut reader = RingReader::default();
        put(&ram, b"hello");
        assert_eq!(reader.take(&ram, &console), Ok(3));
        assert_eq!(console.snapshot(), b"hel");
        let head = 5 + CONSOLE_RING_SIZE + 1;
        ram.write_host(EVENT_PAGE + CONSOLE_RING_OFFSET, head.as_bytes())
            .expect("writes");
        assert_eq!(
            reader.take(&ram, &console),
            Err(Crash::ConsoleRing { head, tail: 5 })
        );
    }
}
