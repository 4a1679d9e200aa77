//! A guest's console: kept in memory up to a byte limit (so a crashed
//! guest's output survives it), and optionally streamed to a sink as it
//! arrives.

use std::sync::Mutex;

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
}
