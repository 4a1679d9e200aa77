//! A worker thread: takes runnable guests and runs their vCPUs.

use super::{Inner, Job, Task};
use crate::control::{GuestState, NO_WORKER};
use crate::end::{Crash, GuestEnd};
use crate::guest::Step;
use crate::limits::Limit;
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
    let share_left = task.share.as_mut().map(|share| share.left(inner.now_ns()));
    if let (Some(0), Some(used_up)) = (share_left, task.share.as_ref())
        && !control.killed.load(Ordering::SeqCst)
    {
        // Woken from a block with no share left in this period.
        let until = used_up.period_end();
        inner.throttle(task, until);
        return;
    }
    if let Some(since) = task.preempted_at.take() {
        control
            .stats
            .add_preempted_ns(since.elapsed().as_nanos() as u64);
    }
    let span = tracing::trace_span!("guest", id = control.id);
    let _entered = span.enter();
    control.set_state(GuestState::Running);
    // Order matters: arm first, so that any kick from now on interrupts
    // this guest; then forget requests aimed at the previous guest; then
    // let the timer thread see who runs and since when.
    let armed = task.guest.arm_kick();
    slot.preempt.store(false, Ordering::SeqCst);
    control.worker.store(index, Ordering::SeqCst);
    let now = inner.now_ns();
    // The timer thread kicks the guest when its CPU time or its share
    // for this period runs out.
    let cpu_left = control
        .limits
        .cpu_time
        .map(|limit| (limit.as_nanos() as u64).saturating_sub(control.stats.cpu_ns()));
    let cpu_deadline = cpu_left
        .into_iter()
        .chain(share_left)
        .min()
        .map_or(0, |left| now.saturating_add(left).max(1));
    slot.cpu_deadline.store(cpu_deadline, Ordering::Release);
    // Sequentially consistent with the timer thread's `timer_idle` and
    // its look at the workers: either it sees this guest running, or this
    // worker sees it idle and wakes it (else a guest that started just
    // after the timer's look would run unpreempted until its next event).
    slot.running_since.store(now, Ordering::SeqCst);
    if inner.timer_idle.load(Ordering::SeqCst) {
        inner.notify_timer();
    }
    let cpu_before = thread_cpu_ns();
    // A panic here (an embedder's console sink, say) ends this guest, not
    // the worker: the other guests keep running.
    let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        task.guest.run(&control.killed, &slot.preempt)
    }))
    .unwrap_or_else(|_| {
        Step::Ended(GuestEnd::Crashed(Crash::Internal(
            "the host panicked while serving this guest".into(),
        )))
    });
    drop(armed);
    slot.running_since.store(0, Ordering::Release);
    slot.cpu_deadline.store(0, Ordering::Release);
    // CPU time, not time on the worker: when the host's CPUs are
    // oversubscribed, a worker thread waits its turn with the guest
    // still on it, and that wait is not the guest's to pay for.
    let ran = thread_cpu_ns().saturating_sub(cpu_before);
    control.stats.add_cpu_ns(ran);
    let throttled_until = task
        .share
        .as_mut()
        .and_then(|s| s.charge(ran, inner.now_ns()));
    control.worker.store(NO_WORKER, Ordering::SeqCst);
    let step = match (step, control.limits.cpu_time) {
        (Step::Ended(GuestEnd::Killed), _) => Step::Ended(control.killed_end()),
        (step @ Step::Ended(_), _) => step,
        (_, Some(limit)) if control.stats.cpu_ns() >= limit.as_nanos() as u64 => Step::Ended(
            GuestEnd::Crashed(Crash::LimitExceeded(Limit::CpuTime(limit))),
        ),
        (step, _) => step,
    };
    if let (Step::Preempted | Step::Yielded, Some(until)) = (&step, throttled_until) {
        tracing::trace!(until, "used up its CPU share");
        inner.throttle(task, until);
        return;
    }
    match step {
        Step::Blocked(deadline) => {
            tracing::trace!(deadline, "blocked");
            inner.park(task, deadline);
        }
        Step::Preempted => {
            control.stats.count_preemption();
            task.preempted_at = Some(Instant::now());
            inner.push_runnable(task);
        }
        Step::Yielded => inner.push_runnable(task),
        Step::Ended(end) => {
            inner.forget_limit(&control);
            let _ = inner.reap_tx.send(super::Reap::Ended(task, end));
        }
    }
}

/// CPU time the calling thread has used, in nanoseconds; a vCPU's time
/// in guest mode counts (KVM accounts it to the thread in `KVM_RUN`).
pub(crate) fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}
