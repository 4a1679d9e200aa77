//! A worker thread: takes runnable guests and runs their vCPUs.

use super::{Inner, Job, Task};
use crate::control::{GuestState, NO_WORKER};
use crate::guest::Step;
use crossbeam_channel::select_biased;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The worker loop.
pub(super) fn run(inner: &Inner, index: usize) {
    let slot = &inner.workers[index];
    // SAFETY: `pthread_self` has no preconditions.
    let me = unsafe { libc::pthread_self() };
    slot.thread.store(me as u64, Ordering::Release);
    loop {
        let job = select_biased! {
            recv(inner.wake_rx) -> job => job,
            recv(inner.run_rx) -> job => job,
        };
        match job {
            Ok(Job::Run(task)) => run_task(inner, index, task),
            Ok(Job::Stop) | Err(_) => break,
        }
    }
    slot.thread.store(0, Ordering::Release);
}

fn run_task(inner: &Inner, index: usize, mut task: Task) {
    let slot = &inner.workers[index];
    let control = std::sync::Arc::clone(&task.control);
    control.worker.store(index, Ordering::SeqCst);
    slot.preempt.store(false, Ordering::SeqCst);
    control.set_state(GuestState::Running);
    let span = tracing::trace_span!("guest", id = control.id);
    let _entered = span.enter();
    slot.running_since.store(inner.now_ns(), Ordering::Release);
    let started = Instant::now();
    // Kicks sent to this thread interrupt this guest only while it runs.
    task.guest.arm_kick();
    let step = task.guest.run(&control.killed, &slot.preempt);
    task.guest.disarm_kick();
    slot.running_since.store(0, Ordering::Release);
    control
        .stats
        .add_cpu_ns(started.elapsed().as_nanos() as u64);
    control.worker.store(NO_WORKER, Ordering::SeqCst);
    match step {
        Step::Blocked(deadline) => {
            tracing::trace!(deadline, "blocked");
            inner.park(task, deadline);
        }
        Step::Preempted => {
            control.stats.count_preemption();
            inner.push_runnable(task);
        }
        Step::Yielded => inner.push_runnable(task),
        Step::Ended(end) => {
            // Free the VM before anyone can see the end.
            drop(task);
            tracing::info!(id = control.id, %end, "guest ended");
            control.finish(end);
        }
    }
}
