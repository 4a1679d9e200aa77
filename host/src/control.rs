//! The state a guest shares between its handle, the scheduler and the
//! worker running it.

use crate::console::Console;
use crate::end::{Crash, GuestEnd};
use crate::event::Events;
use crate::limits::Limits;
use crate::stats::{GuestStats, StatsSnapshot};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Where a guest is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum GuestState {
    /// Created, waiting for a worker.
    Runnable = 0,
    /// On a worker (executing, or in a hypercall).
    Running = 1,
    /// Blocked until a deadline.
    Blocked = 2,
    /// Over.
    Ended = 3,
}

impl GuestState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Runnable,
            1 => Self::Running,
            2 => Self::Blocked,
            _ => Self::Ended,
        }
    }
}

/// Runs once a guest ended and everything it held is freed, with its end
/// and final counters.
pub type EndHook = Box<dyn FnOnce(&GuestEnd, StatsSnapshot) + Send>;

/// A guest's [`EndHook`], if it has one.
#[derive(Default)]
struct OnEnd(Mutex<Option<EndHook>>);

impl std::fmt::Debug for OnEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnEnd")
    }
}

/// No worker runs the guest.
pub const NO_WORKER: usize = usize::MAX;

/// One guest's shared control block.
#[derive(Debug)]
pub struct GuestControl {
    /// The guest's id.
    pub id: u64,
    /// Set by `kill`; checked before every guest entry.
    pub killed: AtomicBool,
    state: AtomicU8,
    /// Index of the worker running the guest, or [`NO_WORKER`].
    pub worker: AtomicUsize,
    end: Mutex<Option<GuestEnd>>,
    ended: Condvar,
    /// The console.
    pub console: Arc<Console>,
    /// The counters.
    pub stats: Arc<GuestStats>,
    /// The guest's limits.
    pub limits: Limits,
    /// Its events (the guest raises into them while it has RAM).
    pub events: Arc<Events>,
    /// Why the host stopped the guest, when `killed` was set for a limit.
    stop_reason: Mutex<Option<Crash>>,
    on_end: OnEnd,
}

impl GuestControl {
    /// A control block for a guest that has not run yet.
    pub fn new(id: u64, console: Arc<Console>, stats: Arc<GuestStats>, limits: Limits) -> Self {
        Self {
            on_end: OnEnd::default(),
            limits,
            stop_reason: Mutex::new(None),
            id,
            killed: AtomicBool::new(false),
            state: AtomicU8::new(GuestState::Runnable as u8),
            worker: AtomicUsize::new(NO_WORKER),
            end: Mutex::new(None),
            ended: Condvar::new(),
            console,
            stats,
            events: Arc::default(),
        }
    }

    /// Records why the host is about to stop the guest (the first reason
    /// wins); the caller then kills it.
    pub fn set_stop_reason(&self, reason: Crash) {
        self.stop_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
    }

    /// What a kill means for this guest: killed, or stopped for a limit.
    pub fn killed_end(&self) -> GuestEnd {
        match self
            .stop_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            Some(reason) => GuestEnd::Crashed(reason),
            None => GuestEnd::Killed,
        }
    }

    /// The current state.
    pub fn state(&self) -> GuestState {
        GuestState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Records a state change.
    pub fn set_state(&self, state: GuestState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// Sets what runs once the guest ended.
    pub fn set_on_end(&self, hook: EndHook) {
        *self.on_end.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Records the guest's end, wakes every waiter, then runs the end hook
    /// (once, with the first end recorded).
    pub fn finish_and_notify(&self, end: GuestEnd) {
        self.finish(end);
        let hook = self
            .on_end
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let (Some(hook), Some(end)) = (hook, self.end()) {
            hook(&end, self.stats.snapshot());
        }
    }

    /// Records the guest's end and wakes every waiter.
    pub fn finish(&self, end: GuestEnd) {
        let mut slot = self.end.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(end);
        self.set_state(GuestState::Ended);
        self.ended.notify_all();
    }

    /// Waits for the end.
    pub fn wait(&self) -> GuestEnd {
        let mut slot = self.end.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(end) = slot.as_ref() {
                return end.clone();
            }
            slot = self.ended.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The end, if the guest is over.
    pub fn end(&self) -> Option<GuestEnd> {
        self.end.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
