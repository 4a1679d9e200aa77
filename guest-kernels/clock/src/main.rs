//! clock: shows monotonic time advancing across sleeps and checks that it
//! never goes backwards. Argument: number of sleeps (default 5) of 10 ms.
#![no_std]
#![no_main]

use core::time::Duration;
use shoal_guest::{boot, println, time};

shoal_guest::entry!(main);

fn main() -> i32 {
    let rounds: u32 = boot::args()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let step = Duration::from_millis(10);
    let start = time::monotonic_ns();
    let mut last = start;
    for round in 1..=rounds {
        let before = time::monotonic_ns();
        time::sleep(step);
        let after = time::monotonic_ns();
        // Many reads in a row must never step back.
        for _ in 0..10_000 {
            let now = time::monotonic_ns();
            if now < last {
                println!("clock went backwards: {now} < {last}");
                return 2;
            }
            last = now;
        }
        let slept = after - before;
        if slept < step.as_nanos() as u64 {
            println!("sleep {round} returned early: {slept} ns");
            return 3;
        }
        println!("sleep {round}: slept >= 10 ms, monotonic advancing");
    }
    let total = last - start;
    println!(
        "{rounds} sleeps done, {} ms elapsed, never backwards",
        total / 1_000_000
    );
    0
}
