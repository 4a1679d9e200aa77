//! The shard wire decoder (`host/src/shard/wire.rs`): a stream of
//! length-prefixed postcard frames read as a shard reads the supervisor's
//! requests (byte 0 even) or as the supervisor reads a shard's events
//! (byte 0 odd): a shard that is taken over must not take its supervisor
//! with it.
//!
//! Checks, besides the absence of panics: every message the reader
//! accepts, the writer can send again, and that frame reads back as a
//! message that is sent as the very same bytes (the frame read need not
//! be the writer's: it may carry bytes after its message, or a value in a
//! longer form than the writer's).
//!
//! A frame whose length runs past the end of the input is not read: the
//! reader would only make room for it (up to 256 MiB) before failing to
//! fill it, which costs the fuzzer time and tests nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_host::fuzzing::{WireFrame, wire_event, wire_request};

fuzz_target!(|data: &[u8]| {
    let Some((&direction, mut stream)) = data.split_first() else {
        return;
    };
    let read = if direction % 2 == 0 {
        wire_request
    } else {
        wire_event
    };
    loop {
        let Some(len) = stream.get(..4) else {
            read(&mut stream);
            return;
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        if len > stream.len() - 4 {
            return;
        }
        let first = match read(&mut stream) {
            WireFrame::End | WireFrame::Refused(_) => return,
            WireFrame::Decoded(frame) => frame.expect("a decoded message is sent again"),
        };
        let second = match read(&mut first.as_slice()) {
            WireFrame::Decoded(frame) => frame.expect("sent again"),
            other => panic!("the writer's frame does not read back: {other:?}"),
        };
        assert_eq!(first, second, "the writer's frame changes on a round trip");
    }
});
