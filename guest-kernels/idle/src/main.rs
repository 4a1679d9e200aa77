//! idle: blocks for the given time (`2s`, `500ms`, a bare number of
//! milliseconds; default 1s) with one `block` hypercall, then exits 0. The
//! unit of concurrency tests: a blocked guest costs the host no CPU.
#![no_std]
#![no_main]

use shoal_guest::{boot, println, time};

shoal_guest::entry!(main);

fn main() -> i32 {
    let Some(duration) = boot::args()
        .next()
        .map_or(Some(1_000_000_000), time::parse_duration_ns)
    else {
        println!("usage: idle DURATION (2s, 500ms)");
        return 2;
    };
    let deadline = time::monotonic_ns().saturating_add(duration);
    while time::monotonic_ns() < deadline {
        time::block_until(deadline);
    }
    0
}
