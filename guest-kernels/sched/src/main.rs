//! sched: measures its own wake-up lateness. Arguments: `ROUNDS PERIOD_US`
//! (default 100 rounds of 2000 us). Each round blocks until a deadline one
//! period ahead and records how late it was running again; prints
//! `lateness_ns p50 P50 p99 P99 max MAX rounds N`.
#![no_std]
#![no_main]

use shoal_guest::{boot, println, time};

shoal_guest::entry!(main);

const MAX_ROUNDS: usize = 1000;

fn main() -> i32 {
    let mut args = boot::args();
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let period_ns: u64 = args
        .next()
        .and_then(|a| a.parse::<u64>().ok())
        .unwrap_or(2000)
        * 1000;
    let rounds = rounds.clamp(1, MAX_ROUNDS);
    let mut lateness = [0u64; MAX_ROUNDS];
    for slot in lateness.iter_mut().take(rounds) {
        let deadline = time::monotonic_ns() + period_ns;
        let mut now = time::monotonic_ns();
        while now < deadline {
            time::block_until(deadline);
            now = time::monotonic_ns();
        }
        *slot = now - deadline;
    }
    let samples = &mut lateness[..rounds];
    samples.sort_unstable();
    let at = |p: usize| samples[(rounds - 1) * p / 100];
    println!(
        "lateness_ns p50 {} p99 {} max {} rounds {rounds}",
        at(50),
        at(99),
        samples[rounds - 1]
    );
    0
}
