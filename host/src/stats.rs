//! Per-guest counters, updated by the guest's runner and readable at any
//! time from its handle.

use crate::kvm::GuestRam;
use crate::kvm::memory::resident_bytes;
use crate::observe::{CallLatency, CallStats};
use shoal_abi::HypercallNr;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

const CALLS: usize = HypercallNr::ALL.len();

/// Why the guest's vCPU returned to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(usize)]
pub enum ExitReason {
    /// An `out` to the hypercall port.
    Hypercall,
    /// An `out` to the null-exit port.
    NullExit,
    /// A CPU exception (bounced to the guest's handler or not).
    Exception,
    /// An access to a port outside the ABI (string I/O included).
    BadPort,
    /// A triple fault.
    TripleFault,
    /// A write to the guest's page tables through the trapping window
    /// (the trap-and-emulate experiment, [`crate::GuestConfig::trapped_page_tables`]).
    PageTableWrite,
    /// Anything else KVM reported.
    Other,
}

impl ExitReason {
    /// Every reason, in counter order (the discriminants' order).
    pub const ALL: [ExitReason; 7] = [
        ExitReason::Hypercall,
        ExitReason::NullExit,
        ExitReason::Exception,
        ExitReason::BadPort,
        ExitReason::TripleFault,
        ExitReason::PageTableWrite,
        ExitReason::Other,
    ];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::Hypercall => "hypercall",
            ExitReason::NullExit => "null_exit",
            ExitReason::Exception => "exception",
            ExitReason::BadPort => "bad_port",
            ExitReason::TripleFault => "triple_fault",
            ExitReason::PageTableWrite => "page_table_write",
            ExitReason::Other => "other",
        }
    }
}

/// Live counters of one guest.
#[derive(Debug)]
pub struct GuestStats {
    spawned: Instant,
    first_exit_ns: AtomicU64,
    by_reason: [AtomicU64; ExitReason::ALL.len()],
    kicks: AtomicU64,
    hypercalls: [AtomicU64; CALLS],
    unknown_hypercalls: AtomicU64,
    custom_hypercalls: AtomicU64,
    console_bytes: AtomicU64,
    blocked_ns: AtomicU64,
    throttled_ns: AtomicU64,
    preempted_ns: AtomicU64,
    cpu_ns: AtomicU64,
    preemptions: AtomicU64,
    traps: AtomicU64,
    notifier_calls: AtomicU64,
    slot_moves: AtomicU64,
    notifications: AtomicU64,
    device_requests: AtomicU64,
    frames: [AtomicU64; 4],
    /// Host address and size of the guest's RAM while it exists (0: none).
    ram_addr: AtomicU64,
    ram_len: AtomicU64,
    /// Resident bytes when the RAM was freed.
    resident_at_end: AtomicU64,
    /// Latency histograms, once the guest is watched.
    calls: OnceLock<Arc<CallStats>>,
}

impl Default for GuestStats {
    fn default() -> Self {
        Self {
            spawned: Instant::now(),
            first_exit_ns: AtomicU64::new(0),
            by_reason: Default::default(),
            kicks: AtomicU64::new(0),
            hypercalls: Default::default(),
            unknown_hypercalls: AtomicU64::new(0),
            custom_hypercalls: AtomicU64::new(0),
            console_bytes: AtomicU64::new(0),
            blocked_ns: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
            preempted_ns: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            traps: AtomicU64::new(0),
            notifier_calls: AtomicU64::new(0),
            slot_moves: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
            device_requests: AtomicU64::new(0),
            frames: Default::default(),
            ram_addr: AtomicU64::new(0),
            ram_len: AtomicU64::new(0),
            resident_at_end: AtomicU64::new(0),
            calls: OnceLock::new(),
        }
    }
}

/// A guest's frames on its virtual LAN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrameCounts {
    /// Frames it sent that the LAN forwarded.
    pub sent: u64,
    /// Frames put in its receive buffers.
    pub received: u64,
    /// Frames it sent that the LAN dropped: not a frame (bad length,
    /// offloads asked for, device-writable), another source address, over
    /// its frame rate, or for a guest that is gone.
    pub dropped: u64,
    /// Frames for it that were dropped: its backlog was full, or a receive
    /// buffer could not hold one.
    pub missed: u64,
}

/// Which [`FrameCounts`] counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameCount {
    /// [`FrameCounts::sent`].
    Sent,
    /// [`FrameCounts::received`].
    Received,
    /// [`FrameCounts::dropped`].
    Dropped,
    /// [`FrameCounts::missed`].
    Missed,
}

/// A snapshot of [`GuestStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// Nanoseconds from the spawn call to the guest's first exit (its
    /// first hypercall, usually): the guest's start-up latency. 0 until
    /// then.
    pub first_exit_ns: u64,
    /// Exits the guest caused, of every kind.
    pub exits: u64,
    /// Exits by reason (in [`ExitReason::ALL`] order).
    pub exits_by_reason: Vec<(ExitReason, u64)>,
    /// Times the host interrupted the running guest (preemption, kill,
    /// limits): not caused by the guest, not in `exits`.
    pub kicks: u64,
    /// Hypercalls served, by call (in [`HypercallNr::ALL`] order).
    #[serde(with = "by_number")]
    pub hypercalls: Vec<(HypercallNr, u64)>,
    /// Hypercalls with an unknown number.
    pub unknown_hypercalls: u64,
    /// Custom hypercalls (numbers [`shoal_abi::hypercall::CUSTOM_FIRST`]
    /// and up) that a registered handler served.
    pub custom_hypercalls: u64,
    /// Exits through the null-exit port.
    pub null_exits: u64,
    /// Console bytes accepted.
    pub console_bytes: u64,
    /// Nanoseconds spent blocked.
    pub blocked_ns: u64,
    /// Nanoseconds spent waiting for the next period after using up the
    /// guest's CPU share ([`crate::Limits::cpu_share`]).
    pub throttled_ns: u64,
    /// Nanoseconds spent runnable but waiting for a worker after the
    /// scheduler preempted the guest.
    pub preempted_ns: u64,
    /// CPU time in nanoseconds: the guest running and the host serving
    /// its exits, measured on the worker thread's CPU clock (a worker's
    /// waits for a host CPU are not counted).
    pub cpu_ns: u64,
    /// Times the scheduler took the worker away at the end of a slice.
    pub preemptions: u64,
    /// Exceptions bounced to the guest's own handler.
    pub traps: u64,
    /// Runs of frames whose translations (or host memory) the host
    /// dropped through KVM's MMU notifier, one `mprotect` pair or
    /// `madvise` each: cheap alone, but each costs every VM in the process.
    pub notifier_calls: u64,
    /// Times the host dropped every translation of the guest by moving a
    /// memory slot: a batch with many separate old frames, or the
    /// notifier budget spent ([`crate::mmu::Forget`]).
    pub slot_moves: u64,
    /// Device notifications the guest sent (`out` to the notification
    /// port): exits that stay in the kernel, not in `exits`.
    pub notifications: u64,
    /// Device requests (descriptor chains) the host completed.
    pub device_requests: u64,
    /// Frames on the guest's virtual LAN.
    pub frames: FrameCounts,
    /// Guest RAM size, in bytes.
    pub memory_bytes: u64,
    /// Bytes of guest RAM resident in host memory: pages the guest
    /// touched, plus image pages it still shares copy-on-write with other
    /// guests of its image (counted for each of them). After the guest
    /// ended: the figure when its RAM was freed.
    pub resident_bytes: u64,
    /// Latency histograms per hypercall number, in number order, if the
    /// guest's hypercalls are watched ([`crate::Observe::call_stats`]).
    pub calls: Vec<CallLatency>,
}

impl StatsSnapshot {
    /// Exits for one reason.
    pub fn exits_for(&self, reason: ExitReason) -> u64 {
        self.exits_by_reason
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, c)| *c)
    }

    /// Count of one hypercall.
    pub fn hypercall(&self, nr: HypercallNr) -> u64 {
        self.hypercalls
            .iter()
            .find(|(n, _)| *n == nr)
            .map_or(0, |(_, c)| *c)
    }
}

impl GuestStats {
    /// One exit the guest caused.
    pub fn count_exit(&self, reason: ExitReason) {
        if self.by_reason[reason as usize].fetch_add(1, Relaxed) == 0
            && self.first_exit_ns.load(Relaxed) == 0
        {
            let ns = self.spawned.elapsed().as_nanos() as u64;
            self.first_exit_ns.store(ns.max(1), Relaxed);
        }
    }

    /// One interruption by the host.
    pub fn count_kick(&self) {
        self.kicks.fetch_add(1, Relaxed);
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

    /// One custom hypercall served by its handler.
    pub fn count_custom_hypercall(&self) {
        self.custom_hypercalls.fetch_add(1, Relaxed);
    }

    /// Console bytes.
    pub fn add_console_bytes(&self, n: u64) {
        self.console_bytes.fetch_add(n, Relaxed);
    }

    /// Time blocked.
    pub fn add_blocked_ns(&self, n: u64) {
        self.blocked_ns.fetch_add(n, Relaxed);
    }

    /// Time waiting, runnable, for the next CPU-share period.
    pub fn add_throttled_ns(&self, n: u64) {
        self.throttled_ns.fetch_add(n, Relaxed);
    }

    /// Time waiting for a worker after a preemption.
    pub fn add_preempted_ns(&self, n: u64) {
        self.preempted_ns.fetch_add(n, Relaxed);
    }

    /// The guest's latency histograms, made on first use.
    pub fn call_stats(&self) -> Arc<CallStats> {
        Arc::clone(self.calls.get_or_init(Default::default))
    }

    /// CPU time used on a worker.
    pub fn add_cpu_ns(&self, n: u64) {
        self.cpu_ns.fetch_add(n, Relaxed);
    }

    /// CPU time so far, in nanoseconds.
    pub fn cpu_ns(&self) -> u64 {
        self.cpu_ns.load(Relaxed)
    }

    /// One preemption.
    pub fn count_preemption(&self) {
        self.preemptions.fetch_add(1, Relaxed);
    }

    /// One exception bounced to the guest's handler.
    pub fn count_trap(&self) {
        self.traps.fetch_add(1, Relaxed);
    }

    /// `runs` notifier calls.
    pub fn count_notifier_calls(&self, runs: usize) {
        self.notifier_calls.fetch_add(runs as u64, Relaxed);
    }

    /// One slot move.
    pub fn count_slot_move(&self) {
        self.slot_moves.fetch_add(1, Relaxed);
    }

    /// `n` device notifications.
    pub fn count_notifications(&self, n: u64) {
        if n > 0 {
            self.notifications.fetch_add(n, Relaxed);
        }
    }

    /// `n` device requests completed.
    pub fn count_device_requests(&self, n: u64) {
        if n > 0 {
            self.device_requests.fetch_add(n, Relaxed);
        }
    }

    /// `n` frames of `kind`.
    pub fn count_frames(&self, kind: FrameCount, n: u64) {
        if n > 0 {
            self.frames[kind as usize].fetch_add(n, Relaxed);
        }
    }

    /// Watches the guest's RAM for [`StatsSnapshot::resident_bytes`].
    pub fn watch_memory(&self, ram: &GuestRam) {
        self.ram_len.store(ram.size(), Relaxed);
        self.ram_addr.store(ram.host_base(), Release);
    }

    /// Takes the last resident figure and stops watching, just before the
    /// guest's RAM is freed.
    pub fn release_memory(&self, ram: &GuestRam) {
        self.resident_at_end.store(ram.resident_bytes(), Relaxed);
        self.ram_addr.store(0, Release);
    }

    /// A snapshot.
    pub fn snapshot(&self) -> StatsSnapshot {
        let exits_by_reason = counts(&ExitReason::ALL, &self.by_reason);
        StatsSnapshot {
            first_exit_ns: self.first_exit_ns.load(Relaxed),
            exits: exits_by_reason.iter().map(|(_, c)| c).sum(),
            null_exits: self.by_reason[ExitReason::NullExit as usize].load(Relaxed),
            exits_by_reason,
            kicks: self.kicks.load(Relaxed),
            hypercalls: counts(&HypercallNr::ALL, &self.hypercalls),
            unknown_hypercalls: self.unknown_hypercalls.load(Relaxed),
            custom_hypercalls: self.custom_hypercalls.load(Relaxed),
            console_bytes: self.console_bytes.load(Relaxed),
            blocked_ns: self.blocked_ns.load(Relaxed),
            throttled_ns: self.throttled_ns.load(Relaxed),
            preempted_ns: self.preempted_ns.load(Relaxed),
            cpu_ns: self.cpu_ns.load(Relaxed),
            preemptions: self.preemptions.load(Relaxed),
            traps: self.traps.load(Relaxed),
            notifier_calls: self.notifier_calls.load(Relaxed),
            slot_moves: self.slot_moves.load(Relaxed),
            notifications: self.notifications.load(Relaxed),
            device_requests: self.device_requests.load(Relaxed),
            frames: FrameCounts {
                sent: self.frames[FrameCount::Sent as usize].load(Relaxed),
                received: self.frames[FrameCount::Received as usize].load(Relaxed),
                dropped: self.frames[FrameCount::Dropped as usize].load(Relaxed),
                missed: self.frames[FrameCount::Missed as usize].load(Relaxed),
            },
            memory_bytes: self.ram_len.load(Relaxed),
            resident_bytes: match self.ram_addr.load(Acquire) {
                0 => self.resident_at_end.load(Relaxed),
                addr => resident_bytes(addr as usize, self.ram_len.load(Relaxed) as usize),
            },
            calls: self.calls.get().map_or_else(Vec::new, |c| c.snapshot()),
        }
    }
}

/// Hypercall counters on the wire, keyed by number (the ABI crate stays
/// free of serde).
mod by_number {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use shoal_abi::HypercallNr;

    pub fn serialize<S: Serializer>(
        counts: &[(HypercallNr, u64)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let numbered: Vec<(u32, u64)> = counts.iter().map(|(nr, c)| (*nr as u32, *c)).collect();
        numbered.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(HypercallNr, u64)>, D::Error> {
        let numbered = Vec::<(u32, u64)>::deserialize(d)?;
        numbered
            .into_iter()
            .map(|(nr, c)| {
                HypercallNr::try_from(nr)
                    .map(|nr| (nr, c))
                    .map_err(|_| serde::de::Error::custom(format!("hypercall {nr}")))
            })
            .collect()
    }
}

/// Pairs each key with its counter's value.
fn counts<K: Copy>(keys: &[K], counters: &[AtomicU64]) -> Vec<(K, u64)> {
    keys.iter()
        .zip(counters)
        .map(|(k, c)| (*k, c.load(Relaxed)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_counters_and_exits_are_their_sum() {
        for (i, reason) in ExitReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
        let stats = GuestStats::default();
        stats.count_exit(ExitReason::Hypercall);
        stats.count_exit(ExitReason::NullExit);
        stats.count_exit(ExitReason::NullExit);
        stats.count_kick();
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.exits, 3);
        assert_eq!(snapshot.null_exits, 2);
        assert_eq!(snapshot.exits_for(ExitReason::Hypercall), 1);
        assert_eq!(snapshot.kicks, 1);
        assert!(snapshot.first_exit_ns > 0);
    }
}
