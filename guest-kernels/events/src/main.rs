//! events: waits for events the host raises.
//!
//! - `events ping [N]` (default 100): N times, waits for event 0 with no
//!   deadline, clears it and prints `pong I`. The host raises the next one
//!   when it sees the line, so raises land anywhere between the print and
//!   the guest's next block: a lost wake-up leaves the guest blocked for
//!   ever. Prints `events ok: B blocks, E early`: the `block` calls it
//!   made and how many of them returned without event 0 (the ABI lets the
//!   host return early), for the host's count to be checked against.
//! - `events mask [MS]` (default 300): waits MS milliseconds for event 0
//!   only; prints what woke it and which events are pending, e.g.
//!   `timed out; pending 0x2` when only event 1 was raised. Then sleeps
//!   MS milliseconds (events do not end a sleep) and prints `slept`.
#![no_std]
#![no_main]

use shoal_guest::{boot, event, println, time};

shoal_guest::entry!(main);

fn ping(rounds: u64) -> i32 {
    // `event::wait_any`'s loop, with the blocks counted.
    event::set_mask(!1);
    let (mut blocks, mut early) = (0u64, 0u64);
    for round in 0..rounds {
        while event::pending() & 1 == 0 {
            blocks += 1;
            if time::block_until(u64::MAX) & 1 == 0 {
                early += 1;
            }
        }
        event::take(1);
        println!("pong {round}");
    }
    println!("events ok: {blocks} blocks, {early} early");
    0
}

fn mask(ms: u64) -> i32 {
    let deadline = time::monotonic_ns() + ms * 1_000_000;
    let got = event::wait_any(1, deadline);
    let late = time::monotonic_ns() >= deadline;
    match (got, late) {
        (0, true) => println!("timed out; pending {:#x}", event::pending()),
        (got, _) => println!("woken by {got:#x}; pending {:#x}", event::pending()),
    }
    let start = time::monotonic_ns();
    time::sleep(core::time::Duration::from_millis(ms));
    if time::monotonic_ns() - start >= ms * 1_000_000 {
        println!("slept");
        0
    } else {
        println!("sleep cut short");
        1
    }
}

fn main() -> i32 {
    let mut args = boot::args();
    let mode = args.next().unwrap_or("ping");
    let number = args.next().and_then(|a| a.parse().ok());
    match mode {
        "ping" => ping(number.unwrap_or(100)),
        "mask" => mask(number.unwrap_or(300)),
        other => {
            println!("usage: events [ping [N] | mask [MS]], not {other}");
            2
        }
    }
}
