//! spin: computes without any hypercall for the given time (`500ms`, `2s`)
//! or `forever`, reading only the clock page, then exits 0. The host must
//! be able to stop it anyway.
#![no_std]
#![no_main]

use shoal_guest::{boot, println, time};

shoal_guest::entry!(main);

/// Parses `500ms`, `2s` or a bare number of milliseconds.
fn parse_ns(arg: &str) -> Option<u64> {
    if arg == "forever" {
        return Some(u64::MAX);
    }
    let (digits, scale) = match arg.strip_suffix("ms") {
        Some(ms) => (ms, 1_000_000),
        None => match arg.strip_suffix('s') {
            Some(s) => (s, 1_000_000_000),
            None => (arg, 1_000_000),
        },
    };
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

fn main() -> i32 {
    let Some(duration) = boot::args().next().map_or(Some(100_000_000), parse_ns) else {
        println!("usage: spin DURATION (500ms, 2s, forever)");
        return 2;
    };
    println!("spinning");
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
