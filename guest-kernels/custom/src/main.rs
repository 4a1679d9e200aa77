//! custom: calls the custom hypercalls of `host/examples/custom_hypercall.rs`
//! and of the tests (`tests/tests/custom.rs`), which register them:
//!
//! - `custom add A B`: hypercall 0x1000 with `[A, B]`, prints `sum: S`.
//! - `custom shout TEXT`: hypercall 0x1001 with the address and length of
//!   TEXT in this guest's memory; the host upper-cases it in place. Prints
//!   `shouted: TEXT`.
//! - `custom call NR`: hypercall NR with `[1, 2]`, prints `answer: N` or
//!   the error. A host with no handler for NR answers "unknown hypercall";
//!   a handler that fails stops this guest instead.
//!
//! Exits 0 with an answer, 1 with an error, 2 on bad arguments.
#![no_std]
#![no_main]

use shoal_guest::hypercall::{self, Error};
use shoal_guest::{boot, println};

shoal_guest::entry!(main);

const ADD: u32 = 0x1000;
const SHOUT: u32 = 0x1001;

fn main() -> i32 {
    let mut args = boot::args();
    let (mode, first, second) = (args.next(), args.next(), args.next());
    match (mode, first, second) {
        (Some("add"), Some(a), Some(b)) => match (a.parse(), b.parse()) {
            (Ok(a), Ok(b)) => report("sum", hypercall::custom::<[u64; 2], u64>(ADD, &[a, b])),
            _ => usage(),
        },
        (Some("shout"), Some(text), None) => shout(text),
        (Some("call"), Some(nr), None) => match parse_number(nr) {
            Some(nr) => report("answer", hypercall::custom::<[u64; 2], u64>(nr, &[1, 2])),
            None => usage(),
        },
        _ => usage(),
    }
}

fn shout(text: &str) -> i32 {
    let mut buf = [0u8; 128];
    let Some(buf) = buf.get_mut(..text.len()) else {
        println!("custom: at most 128 bytes");
        return 2;
    };
    buf.copy_from_slice(text.as_bytes());
    let request = [buf.as_ptr() as u64, buf.len() as u64];
    match hypercall::custom::<[u64; 2], u64>(SHOUT, &request) {
        Ok(_) => {
            println!(
                "shouted: {}",
                core::str::from_utf8(buf).unwrap_or("(not UTF-8)")
            );
            0
        }
        Err(e) => report("shouted", Err::<u64, _>(e)),
    }
}

fn report(what: &str, result: Result<u64, Error>) -> i32 {
    match result {
        Ok(value) => {
            println!("{what}: {value}");
            0
        }
        Err(e) => {
            println!("{what}: error: {e:?}");
            1
        }
    }
}

/// A number in decimal or `0x` hexadecimal.
fn parse_number(text: &str) -> Option<u32> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn usage() -> i32 {
    println!("usage: custom add A B | custom shout TEXT | custom call NR");
    2
}
