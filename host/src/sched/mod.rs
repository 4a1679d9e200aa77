//! The scheduler: a few worker threads multiplex every guest's vCPU, in the
//! manner of Denali's isolation kernel.
//!
//! - Runnable guests wait in two FIFO queues: the **wake queue** (guests a
//!   timer or a kill just woke) is always served before the **run queue**
//!   (guests that were preempted or yielded), so a guest that slept gets the
//!   CPU quickly even when many guests spin.
//! - A worker takes a guest, runs its vCPU until it blocks, yields, ends or
//!   is preempted, and takes the next. A blocked guest is parked with the
//!   timer thread and costs no CPU.
//! - The timer thread wakes guests whose deadline passed and preempts: a
//!   worker whose guest has run longer than the time slice while others
//!   wait, or any busy worker when a woken guest waits, is kicked (a signal
//!   that makes `KVM_RUN` return), and its guest goes to the back of the run
//!   queue.
//! - The reaper thread frees ended guests (their VMs go back to the pool
//!   to be reset, or are torn down: a few hundred microseconds in the
//!   kernel), so that never holds up a worker.

mod timer;
mod worker;

pub(crate) use worker::thread_cpu_ns;

use crate::control::{GuestControl, GuestState};
use crate::end::GuestEnd;
use crate::guest::Guest;
use crate::limits::CpuShare;
use crossbeam_channel::{Receiver, Sender, unbounded};
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default time slice.
pub const DEFAULT_SLICE: Duration = Duration::from_millis(5);

/// A guest and its control block, as the scheduler moves it around.
pub struct Task {
    /// The guest (its vCPU, VM and memory).
    pub guest: Box<Guest>,
    /// Its shared control block.
    pub control: Arc<GuestControl>,
    /// Its CPU use against [`crate::Limits::cpu_share`], if capped.
    pub share: Option<CpuShare>,
    /// When the scheduler last preempted it, until it runs again.
    pub preempted_at: Option<Instant>,
}

enum Job {
    Run(Task),
    Stop,
}

/// A guest parked until a deadline, with the generation of its timer entry.
struct Parked {
    generation: u64,
    since: Instant,
    /// Parked for using up its CPU share, not for blocking.
    throttled: bool,
    task: Task,
}

#[derive(Default)]
struct Timers {
    /// (deadline, guest id, generation), earliest first.
    heap: BinaryHeap<std::cmp::Reverse<(Instant, u64, u64)>>,
    parked: HashMap<u64, Parked>,
    next_generation: u64,
    /// Run-time limits: (when, guest id), earliest first.
    expiries: BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
    /// Guests with a run-time limit that have not ended.
    limited: HashMap<u64, Arc<GuestControl>>,
}

impl Timers {
    /// Forgets the deadlines of guests woken before them, once they
    /// outnumber the parked guests: a guest woken by events again and
    /// again (or blocked with no deadline, `u64::MAX`) would otherwise
    /// grow the heap by an entry each time, for as long as its deadlines
    /// lie ahead. Amortized, this costs O(log n) per park.
    fn drop_stale_deadlines(&mut self) {
        let parked = &self.parked;
        drop_stale(&mut self.heap, parked.len(), |(_, id, generation)| {
            parked.get(id).is_some_and(|p| p.generation == *generation)
        });
    }

    /// The earliest instant the timer thread must act at.
    fn next_event(&self) -> Option<Instant> {
        let deadline = self.heap.peek().map(|r| r.0.0);
        let expiry = self.expiries.peek().map(|r| r.0.0);
        deadline.into_iter().chain(expiry).min()
    }
}

/// Keeps only the entries `current` accepts, once the timer heap holds
/// more than twice the `live` ones (and a margin): entries are never
/// taken out when their guest wakes early or ends, only swept.
fn drop_stale<T: Ord>(
    heap: &mut BinaryHeap<std::cmp::Reverse<T>>,
    live: usize,
    current: impl Fn(&T) -> bool,
) {
    if heap.len() > 2 * live + 1024 {
        heap.retain(|std::cmp::Reverse(entry)| current(entry));
    }
}

/// One worker's slot, written by the worker and read by the timer thread.
#[derive(Default)]
struct WorkerSlot {
    /// The worker thread's `pthread_t`, once started.
    thread: AtomicU64,
    /// When the current guest entered, in ns since the scheduler's epoch
    /// (0: idle).
    running_since: AtomicU64,
    /// Asks the running guest to give up the worker at its next exit.
    preempt: AtomicBool,
    /// When the running guest's CPU-time limit runs out, in ns since the
    /// scheduler's epoch (0: no limit).
    cpu_deadline: AtomicU64,
}

/// Work for the reaper thread.
enum Reap {
    /// Free an ended guest, then make its end visible.
    Ended(Task, GuestEnd),
    Stop,
}

struct Inner {
    reap_tx: Sender<Reap>,
    wake_tx: Sender<Job>,
    wake_rx: Receiver<Job>,
    run_tx: Sender<Job>,
    run_rx: Receiver<Job>,
    timers: Mutex<Timers>,
    timer_cv: Condvar,
    workers: Vec<WorkerSlot>,
    slice: Duration,
    epoch: Instant,
    shutdown: AtomicBool,
    /// The timer thread sleeps without looking at workers (it saw none
    /// busy); a worker that starts a guest then wakes it.
    timer_idle: AtomicBool,
}

impl Inner {
    fn now_ns(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() as u64).max(1)
    }

    fn lock_timers(&self) -> std::sync::MutexGuard<'_, Timers> {
        self.timers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Kicks the worker in `slot`, if it is running.
    fn kick(&self, slot: &WorkerSlot) {
        let thread = slot.thread.load(Ordering::Acquire);
        if thread != 0 {
            // SAFETY: a worker publishes its thread id while it runs and
            // clears it before it returns; workers are joined only in
            // `Scheduler::stop`, after the host has ended every guest, so
            // nobody kicks then.
            unsafe { crate::kvm::Kick::send(thread as libc::pthread_t) };
        }
    }

    /// Wakes the timer thread. Taking its lock first means the notice
    /// cannot slip in between the timer's last look at the queues and its
    /// wait.
    fn notify_timer(&self) {
        drop(self.lock_timers());
        self.timer_cv.notify_one();
    }

    /// Queues a woken guest ahead of preempted ones.
    fn push_woken(&self, task: Task) {
        task.control.set_state(GuestState::Runnable);
        let _ = self.wake_tx.send(Job::Run(task));
    }

    /// Queues a new, preempted or yielding guest at the back of the run
    /// queue, and lets the timer thread know someone waits for a worker.
    fn push_runnable(&self, task: Task) {
        task.control.set_state(GuestState::Runnable);
        let _ = self.run_tx.send(Job::Run(task));
        self.notify_timer();
    }

    /// Parks `task` until guest time `deadline_ns` (or a wake).
    fn park(&self, task: Task, deadline_ns: u64) {
        let when = task.guest.clock().instant_of(deadline_ns);
        task.control.set_state(GuestState::Blocked);
        self.park_until(task, when, false);
    }

    /// Parks a guest that used up its CPU share until scheduler time
    /// `until_ns` (or a kill), runnable all along.
    fn throttle(&self, task: Task, until_ns: u64) {
        let when = self.epoch.checked_add(Duration::from_nanos(until_ns));
        task.control.set_state(GuestState::Runnable);
        self.park_until(task, when, true);
    }

    fn park_until(&self, task: Task, when: Option<Instant>, throttled: bool) {
        let id = task.control.id;
        let mut timers = self.lock_timers();
        let generation = timers.next_generation;
        timers.next_generation += 1;
        if let Some(when) = when {
            timers.heap.push(std::cmp::Reverse((when, id, generation)));
        }
        // Under the timers lock, after the guest's last look: a raise
        // either came before and is seen here, or comes after and finds
        // the guest parked (`raise_events`). A throttled guest waits out
        // its share whatever arrives.
        let woken = task.control.killed.load(Ordering::SeqCst)
            || (!throttled && task.guest.events().unmasked() != 0);
        let parked = Parked {
            generation,
            since: Instant::now(),
            throttled,
            task,
        };
        if woken {
            // A kill or an event raced with parking: it found nothing to
            // wake, so wake now.
            drop(timers);
            self.push_woken(parked.task);
        } else {
            timers.parked.insert(id, parked);
            timers.drop_stale_deadlines();
            drop(timers);
        }
        self.notify_timer();
    }

    /// Stops a guest for exceeding a limit: records the reason, then kills.
    /// (The caller holds the timers and unparks the guest itself.)
    fn stop_for(&self, control: &GuestControl, reason: crate::end::Crash) {
        control.set_stop_reason(reason);
        self.mark_killed(control);
    }

    /// Marks the guest killed and interrupts it if a worker runs it; a
    /// parked guest must be woken as well.
    fn mark_killed(&self, control: &GuestControl) {
        control.killed.store(true, Ordering::SeqCst);
        if let Some(slot) = self.workers.get(control.worker.load(Ordering::SeqCst)) {
            self.kick(slot);
        }
    }

    /// Forgets a guest's run-time limit once it ended; its expiry goes
    /// from the heap in a sweep once such entries outnumber the limited
    /// guests (as for deadlines).
    fn forget_limit(&self, control: &GuestControl) {
        if control.limits.run_time.is_some() {
            let mut timers = self.lock_timers();
            timers.limited.remove(&control.id);
            let Timers {
                expiries, limited, ..
            } = &mut *timers;
            drop_stale(expiries, limited.len(), |(_, id)| limited.contains_key(id));
        }
    }

    /// Wakes guest `id` if it is parked for blocking (not throttled).
    fn wake_blocked(&self, id: u64) {
        let mut timers = self.lock_timers();
        if timers.parked.get(&id).is_some_and(|p| !p.throttled)
            && let Some(parked) = timers.parked.remove(&id)
        {
            drop(timers);
            self.unpark(parked);
            self.notify_timer();
        }
    }

    /// Wakes guest `id` if it is parked.
    fn wake(&self, id: u64) {
        let parked = self.lock_timers().parked.remove(&id);
        if let Some(parked) = parked {
            self.unpark(parked);
            self.notify_timer();
        }
    }

    /// Moves a parked guest to the wake queue.
    fn unpark(&self, parked: Parked) {
        let waited = parked.since.elapsed().as_nanos() as u64;
        let stats = &parked.task.control.stats;
        if parked.throttled {
            stats.add_throttled_ns(waited);
        } else {
            stats.add_blocked_ns(waited);
        }
        self.push_woken(parked.task);
    }
}

/// The scheduler of one host: worker threads, a timer thread, and a
/// reaper thread that tears ended guests down off the workers' path.
pub struct Scheduler {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    reaper: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("workers", &self.inner.workers.len())
            .field("slice", &self.inner.slice)
            .finish()
    }
}

/// A handle to wake or kick guests, held by guest handles.
#[derive(Clone)]
pub struct SchedulerRef(Arc<Inner>);

impl SchedulerRef {
    /// Kills the guest: it ends as killed at its next scheduling point, and
    /// is woken or interrupted to get there now.
    pub fn kill(&self, control: &GuestControl) {
        self.0.mark_killed(control);
        self.0.wake(control.id);
    }

    /// Raises the events in `bits` for the guest, and wakes it if it is
    /// blocked and one of its pending events is unmasked.
    pub fn raise_events(&self, control: &GuestControl, bits: u64) {
        if control.events.raise(bits) {
            self.0.wake_blocked(control.id);
        }
    }
}

impl Scheduler {
    /// Starts `workers` worker threads (at least one) and the timer thread.
    pub fn start(workers: usize, slice: Duration) -> std::io::Result<Self> {
        let (wake_tx, wake_rx) = unbounded();
        let (run_tx, run_rx) = unbounded();
        let (reap_tx, reap_rx) = unbounded();
        let inner = Arc::new(Inner {
            reap_tx,
            wake_tx,
            wake_rx,
            run_tx,
            run_rx,
            timers: Mutex::new(Timers::default()),
            timer_cv: Condvar::new(),
            workers: (0..workers.max(1)).map(|_| WorkerSlot::default()).collect(),
            slice,
            epoch: Instant::now(),
            shutdown: AtomicBool::new(false),
            timer_idle: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for index in 0..inner.workers.len() {
            let inner = Arc::clone(&inner);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("shoal-worker-{index}"))
                    .spawn(move || {
                        crate::seccomp::confine_or_warn(crate::seccomp::Kind::Worker);
                        worker::run(&inner, index)
                    })?,
            );
        }
        let timer_inner = Arc::clone(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("shoal-timer".into())
                .spawn(move || {
                    crate::seccomp::confine_or_warn(crate::seccomp::Kind::Timer);
                    timer::run(&timer_inner)
                })?,
        );
        let reaper = std::thread::Builder::new()
            .name("shoal-reaper".into())
            .spawn(move || {
                crate::seccomp::confine_or_warn(crate::seccomp::Kind::Reaper);
                reap(&reap_rx)
            })?;
        Ok(Self {
            inner,
            threads: Mutex::new(threads),
            reaper: Mutex::new(Some(reaper)),
        })
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.inner.workers.len()
    }

    /// Hands a new guest to the scheduler.
    pub fn submit(&self, task: Task) {
        if let Some(run_time) = task.control.limits.run_time {
            let when = Instant::now().checked_add(run_time);
            let mut timers = self.inner.lock_timers();
            if let Some(when) = when {
                timers
                    .expiries
                    .push(std::cmp::Reverse((when, task.control.id)));
                timers
                    .limited
                    .insert(task.control.id, Arc::clone(&task.control));
            }
        }
        self.inner.push_runnable(task);
    }

    /// A handle for killing guests.
    pub fn handle(&self) -> SchedulerRef {
        SchedulerRef(Arc::clone(&self.inner))
    }

    /// Stops the threads. Guests still queued or parked are dropped
    /// without running again; kill and wait for them first.
    pub fn stop(&self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        for _ in &self.inner.workers {
            let _ = self.inner.wake_tx.send(Job::Stop);
        }
        self.inner.timer_cv.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
        // Every guest the workers ended is queued for the reaper by now.
        let reaper = self.reaper.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(reaper) = reaper {
            let _ = self.inner.reap_tx.send(Reap::Stop);
            let _ = reaper.join();
        }
    }
}

/// The reaper loop: frees each ended guest (its VM, vCPU and memory go to
/// the pool to be reset, or are torn down: a few hundred microseconds of
/// kernel work), then publishes its end, so that a waiter that sees the
/// end also sees everything of the guest freed or handed back.
fn reap(rx: &Receiver<Reap>) {
    while let Ok(Reap::Ended(task, end)) = rx.recv() {
        let control = Arc::clone(&task.control);
        drop(task);
        tracing::info!(id = control.id, %end, "guest ended");
        control.finish_and_notify(end);
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_of_woken_guests_do_not_pile_up() {
        let mut heap = BinaryHeap::new();
        let far = Instant::now() + Duration::from_secs(3600);
        for generation in 0..1024 {
            heap.push(std::cmp::Reverse((far, 7, generation)));
        }
        // Under the margin: nothing is looked at.
        drop_stale(&mut heap, 1, |(_, _, generation)| *generation == 1023);
        assert_eq!(heap.len(), 1024);
        for generation in 1024..3000 {
            heap.push(std::cmp::Reverse((far, 7, generation)));
            drop_stale(&mut heap, 1, |(_, _, g)| *g == generation);
        }
        assert!(heap.len() <= 1026, "{} deadlines kept", heap.len());
        assert!(heap.iter().any(|r| r.0.2 == 2999), "the current one stays");
    }
}
