//! Per-guest counters, updated by the guest's runner and readable at any
//! time from its handle.

use shoal_abi::HypercallNr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const CALLS: usize = HypercallNr::ALL.len();

/// Live counters of one guest.
#[derive(Debug, Default)]
pub struct GuestStats {
    exits: AtomicU64,
    hypercalls: [AtomicU64; CALLS],
    unknown_hypercalls: AtomicU64,
    null_exits: AtomicU64,
    console_bytes: AtomicU64,
    blocked_ns: AtomicU64,
    cpu_ns: AtomicU64,
    preemptions: AtomicU64,
}

/// A snapshot of [`GuestStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Exits to the host, of every kind.
    pub exits: u64,
    /// Hypercalls served, by call (in [`HypercallNr::ALL`] order).
    pub hypercalls: Vec<(HypercallNr, u64)>,
    /// Hypercalls with an unknown number.
    pub unknown_hypercalls: u64,
    /// Exits through the null-exit port.
    pub null_exits: u64,
    /// Console bytes accepted.
    pub console_bytes: u64,
    /// Nanoseconds spent blocked.
    pub blocked_ns: u64,
    /// Nanoseconds spent on a worker (running, or in a hypercall).
    pub cpu_ns: u64,
    /// Times the scheduler took the worker away at the end of a slice.
    pub preemptions: u64,
}

impl StatsSnapshot {
    /// Count of one hypercall.
    pub fn hypercall(&self, nr: HypercallNr) -> u64 {
        self.hypercalls
            .iter()
            .find(|(n, _)| *n == nr)
            .map_or(0, |(_, c)| *c)
    }
}

impl GuestStats {
    /// One exit.
    pub fn count_exit(&self) {
        self.exits.fetch_add(1, Relaxed);
    }

    /// One served hypercall.
    pub fn count_hypercall(&self, nr: HypercallNr) {
        if let Some(i) = HypercallNr::ALL.iter().position(|n| *n == nr) {
            self.hypercalls[i].fetch_add(1, Relaxed);
        }
    }

    /// One unknown hypercall.
    pub fn count_unknown_hypercall(&self) {
        self.unknown_hypercalls.fetch_add(1, Relaxed);
    }

    /// One null exit.
    pub fn count_null_exit(&self) {
        self.null_exits.fetch_add(1, Relaxed);
    }

    /// Console bytes.
    pub fn add_console_bytes(&self, n: u64) {
        self.console_bytes.fetch_add(n, Relaxed);
    }

    /// Time blocked.
    pub fn add_blocked_ns(&self, n: u64) {
        self.blocked_ns.fetch_add(n, Relaxed);
    }

    /// Time on a worker.
    pub fn add_cpu_ns(&self, n: u64) {
        self.cpu_ns.fetch_add(n, Relaxed);
    }

    /// Time on a worker so far, in nanoseconds.
    pub fn cpu_ns(&self) -> u64 {
        self.cpu_ns.load(Relaxed)
    }

    /// One preemption.
    pub fn count_preemption(&self) {
        self.preemptions.fetch_add(1, Relaxed);
    }

    /// A snapshot.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            exits: self.exits.load(Relaxed),
            hypercalls: HypercallNr::ALL
                .iter()
                .zip(&self.hypercalls)
                .map(|(nr, c)| (*nr, c.load(Relaxed)))
                .collect(),
            unknown_hypercalls: self.unknown_hypercalls.load(Relaxed),
            null_exits: self.null_exits.load(Relaxed),
            console_bytes: self.console_bytes.load(Relaxed),
            blocked_ns: self.blocked_ns.load(Relaxed),
            cpu_ns: self.cpu_ns.load(Relaxed),
            preemptions: self.preemptions.load(Relaxed),
        }
    }
}
