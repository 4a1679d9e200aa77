//! The timer thread: wakes parked guests at their deadlines and preempts
//! workers.

use super::{Inner, WorkerSlot};
use crate::end::Crash;
use crate::limits::Limit;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a guest keeps a worker after a woken guest starts waiting.
const WAKE_GRACE: Duration = Duration::from_micros(50);

/// How often the thread looks at busy workers.
fn check_interval(slice: Duration) -> Duration {
    (slice / 4).clamp(Duration::from_micros(100), Duration::from_millis(1))
}

/// The timer loop.
pub(super) fn run(inner: &Inner) {
    // Wake-up latency is this thread's: ask the kernel not to delay its
    // timers (the default slack is 50 us).
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and only affects
    // this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64);
    }
    run_ahead_of_workers();
    let mut timers = inner.lock_timers();
    while !inner.shutdown.load(Ordering::SeqCst) {
        let now = Instant::now();
        while let Some(std::cmp::Reverse((when, id, generation))) = timers.heap.peek().copied() {
            if when > now {
                break;
            }
            timers.heap.pop();
            let current = timers
                .parked
                .get(&id)
                .is_some_and(|p| p.generation == generation);
            if let Some(parked) = current.then(|| timers.parked.remove(&id)).flatten() {
                inner.unpark(parked);
            }
        }
        while let Some(std::cmp::Reverse((when, id))) = timers.expiries.peek().copied() {
            if when > now {
                break;
            }
            timers.expiries.pop();
            if let Some(control) = timers.limited.remove(&id) {
                let limit = control.limits.run_time.unwrap_or_default();
                inner.stop_for(&control, Crash::LimitExceeded(Limit::RunTime(limit)));
                if let Some(parked) = timers.parked.remove(&id) {
                    inner.unpark(parked);
                }
            }
        }
        let mut busy = preempt(inner);
        if !busy {
            // Tell workers before the last look (see `worker::run_task`).
            inner.timer_idle.store(true, Ordering::SeqCst);
            busy = someone_runs(inner);
        }
        let next = timers
            .next_event()
            .map(|when| when.saturating_duration_since(now));
        let wait = match (next, busy) {
            (Some(next), true) => next.min(check_interval(inner.slice)),
            (Some(next), false) => next,
            (None, true) => check_interval(inner.slice),
            (None, false) => Duration::from_secs(1),
        };
        timers = inner
            .timer_cv
            .wait_timeout(timers, wait)
            .map(|(t, _)| t)
            .unwrap_or_else(|e| e.into_inner().0);
        inner.timer_idle.store(false, Ordering::SeqCst);
    }
}

/// Whether a worker runs a guest or a guest waits for one.
fn someone_runs(inner: &Inner) -> bool {
    inner
        .workers
        .iter()
        .any(|slot| slot.running_since.load(Ordering::SeqCst) != 0)
        || !inner.wake_rx.is_empty()
        || !inner.run_rx.is_empty()
}

/// Asks the kernel to run this thread as soon as it wakes, ahead of the
/// workers: they keep every CPU busy running guests, and a timer thread
/// that waits its turn behind them is late to wake guests and to preempt.
/// The thread sleeps between short bursts of work, so the lowest
/// real-time priority (`SCHED_FIFO` 1, not passed on to anything it
/// starts) costs others little, and the kernel's real-time throttling
/// bounds it regardless. Where real-time is refused, nice -10; where
/// that is refused too, the default.
fn run_ahead_of_workers() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: plain calls on this thread's own scheduling parameters
    // (pid 0 is the calling thread).
    let fifo = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if fifo != 0 {
        // SAFETY: as above; `gettid` names this thread.
        let niced =
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10) };
        tracing::debug!(
            niced = niced == 0,
            "the timer thread runs without real-time priority"
        );
    }
}

/// Kicks workers whose guests should give way. Returns whether a worker is
/// busy or a guest waits for one (so the thread should look again soon).
fn preempt(inner: &Inner) -> bool {
    let now = inner.now_ns();
    let mut running: Vec<(u64, &WorkerSlot)> = inner
        .workers
        .iter()
        .filter_map(|slot| {
            let since = slot.running_since.load(Ordering::Acquire);
            (since != 0).then(|| (now.saturating_sub(since), slot))
        })
        .collect();
    let mut woken = inner.wake_rx.len();
    let waiting = inner.run_rx.len();
    if running.is_empty() {
        // A worker is about to take the waiting guest: look again soon.
        return woken + waiting > 0;
    }
    // Longest-running first.
    running.sort_by_key(|(ran, _)| std::cmp::Reverse(*ran));
    for (ran, slot) in running {
        let ran = Duration::from_nanos(ran);
        let cpu_deadline = slot.cpu_deadline.load(Ordering::Acquire);
        let give_way = if cpu_deadline != 0 && now >= cpu_deadline {
            // Out of CPU time (the worker ends the guest) or out of its CPU
            // share (the worker parks it until the next period).
            true
        } else if woken > 0 && ran >= WAKE_GRACE {
            woken -= 1;
            true
        } else {
            waiting > 0 && ran >= inner.slice
        };
        // Kick once per request; kick again if a request has gone unheard
        // for another slice (belt and braces against a lost signal).
        if give_way && (!slot.preempt.swap(true, Ordering::SeqCst) || ran >= inner.slice * 2) {
            inner.kick(slot);
        }
    }
    true
}
