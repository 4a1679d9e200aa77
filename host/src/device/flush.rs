//! Disk flushes, off the device thread.
//!
//! A flush is an `fdatasync` of the disk's file, which waits for the
//! storage: milliseconds, tens of them beside other writers. The device
//! thread serves every guest's disks and LANs, so it never waits for one:
//! it hands the flush to a small pool of flush threads ([`Flushers`]) and
//! goes on with the other devices (and with the same guest's other
//! requests). A flush thread syncs the file, records the status in the
//! slot, and gives the slot back to the device thread ([`Wakeups`]), which
//! writes the status into guest memory and completes the chain on the
//! slot's next turn.
//!
//! Each slot has at most one sync queued or running: flushes that arrive
//! meanwhile wait for the next one, which covers them all. The pool serves
//! slots first come, first served, so one guest's stream of flushes holds
//! up another guest's flush by one sync at most per flush thread.

use super::Slot;
use crossbeam_channel::{Receiver, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Flush threads in a process, started with its first flush.
pub const FLUSH_THREADS: usize = 4;

/// Slots whose flushes finished, for the device thread to complete.
#[derive(Debug)]
pub struct Wakeups {
    /// Signalled when a slot is added; the device thread waits on it.
    event: EventFd,
    slots: Mutex<Vec<Arc<Slot>>>,
}

impl Wakeups {
    /// An empty list.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            event: EventFd::new(EFD_NONBLOCK)?,
            slots: Mutex::default(),
        })
    }

    /// The eventfd the device thread waits on.
    pub fn eventfd(&self) -> &EventFd {
        &self.event
    }

    /// Gives `slot` back to the device thread.
    fn wake(&self, slot: Arc<Slot>) {
        crate::lock(&self.slots).push(slot);
        // A full counter (2^64 - 2 wakeups unread) cannot happen: the
        // device thread reads it each time it takes the list.
        let _ = self.event.write(1);
    }

    /// The slots given back since the last call.
    pub fn take(&self) -> Vec<Arc<Slot>> {
        let _ = self.event.read();
        std::mem::take(&mut *crate::lock(&self.slots))
    }
}

/// The process's flush threads: a queue of slots with flushes to sync
/// (`None`: a thread is to end).
#[derive(Debug)]
pub struct Flushers {
    jobs: Sender<Option<Weak<Slot>>>,
    queue: Receiver<Option<Weak<Slot>>>,
    /// The threads, once the first flush started them.
    threads: Mutex<Option<Vec<JoinHandle<()>>>>,
    wakeups: Arc<Wakeups>,
}

impl Flushers {
    /// A pool that gives slots back through `wakeups`. No thread runs
    /// until the first flush.
    pub fn new(wakeups: Arc<Wakeups>) -> Self {
        let (jobs, queue) = crossbeam_channel::unbounded();
        Self {
            jobs,
            queue,
            threads: Mutex::new(None),
            wakeups,
        }
    }

    /// Queues a sync for `slot` (which has none queued or running).
    pub fn submit(&self, slot: &Arc<Slot>) {
        let mut threads = crate::lock(&self.threads);
        if threads.is_none() {
            *threads = Some((0..FLUSH_THREADS).filter_map(|n| self.start(n)).collect());
        }
        drop(threads);
        // Fails only once every receiver is gone, which the pool's own
        // copy prevents.
        let _ = self.jobs.send(Some(Arc::downgrade(slot)));
    }

    fn start(&self, n: usize) -> Option<JoinHandle<()>> {
        let (queue, wakeups) = (self.queue.clone(), Arc::clone(&self.wakeups));
        let started = std::thread::Builder::new()
            .name(format!("shoal-flush-{n}"))
            .spawn(move || {
                crate::seccomp::confine_or_warn(crate::seccomp::Kind::Flush);
                while let Ok(Some(slot)) = queue.recv() {
                    if let Some(slot) = slot.upgrade() {
                        slot.sync_flushes();
                        wakeups.wake(slot);
                    }
                }
            });
        started
            .inspect_err(|e| tracing::warn!(error = %e, "cannot start a flush thread"))
            .ok()
    }

    /// Ends the threads once the syncs queued before are done, and waits
    /// for them.
    pub fn stop(&self) {
        let Some(threads) = crate::lock(&self.threads).take() else {
            return;
        };
        for _ in &threads {
            let _ = self.jobs.send(None);
        }
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// A slot's flushes: waiting for a sync, covered by the running one, or
/// synced and waiting for the device thread to complete them.
#[derive(Debug, Default)]
pub struct SlotFlushes {
    /// Arrived since the running sync started.
    pub waiting: Vec<(u16, super::disk::PendingFlush)>,
    /// Covered by the running sync.
    pub syncing: Vec<(u16, super::disk::PendingFlush)>,
    /// Synced, with the status to write.
    pub done: Vec<(u16, super::disk::PendingFlush, u8)>,
    /// A sync is queued or running.
    pub queued: bool,
}
