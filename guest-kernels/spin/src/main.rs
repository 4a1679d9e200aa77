//! spin: computes without any hypercall for the given time (`500ms`, `2s`)
//! or `forever`, reading only the clock page, then exits 0. The host must
//! be able to stop it anyway.
#![no_std]
#![no_main]

use shoal_guest::{boot, console, println, time};

shoal_guest::entry!(main);

/// `forever`, or a duration the SDK parses (`500ms`, `2s`).
fn parse_ns(arg: &str) -> Option<u64> {
    if arg == "forever" {
        return Some(u64::MAX);
    }
    time::parse_duration_ns(arg)
}

fn main() -> i32 {
    let Some(duration) = boot::args().next().map_or(Some(100_000_000), parse_ns) else {
        println!("usage: spin DURATION (500ms, 2s, forever)");
        return 2;
    };
    println!("spinning");
    // What follows makes no exit: hand the line over now, not at the end
    // of the time slice.
    console::flush();
    let deadline = time::monotonic_ns().saturating_add(duration);
    let mut x: u64 = 1;
    while time::monotonic_ns() < deadline {
        for _ in 0..1000 {
            x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    println!("spun, {x:#x}");
    0
}
