//! The device thread: one per host process, started with the first guest
//! that has a device. It waits on every device's notification eventfd
//! with epoll and serves the notified devices round-robin, a bounded turn
//! each ([`super::TURN_CHAINS`], [`super::TURN_COST`]): a device with more
//! work goes to the back
//! of the run queue, and the thread looks for new notifications between
//! turns, so a guest with a deep queue delays the others by one turn at
//! most. Disk flushes are synced by flush threads ([`super::flush`]),
//! which give their slots back to this thread to complete.

use super::flush::{Flushers, Wakeups};
use super::{Slot, Turn};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The token of the stop eventfd.
const STOP: u64 = 0;
/// The token of the eventfd of slots whose flushes finished.
const WAKE: u64 = 1;

/// The device thread's shared state.
#[derive(Debug)]
pub struct IoThread {
    epoll: Epoll,
    stop: EventFd,
    /// Watched slots by token.
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    /// Slots the flush threads gave back.
    wakeups: Arc<Wakeups>,
    flushers: Arc<Flushers>,
    next_token: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl IoThread {
    /// Starts the thread.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let wakeups = Arc::new(Wakeups::new()?);
        let io = Arc::new(Self {
            epoll: Epoll::new()?,
            stop: EventFd::new(EFD_NONBLOCK)?,
            slots: Mutex::default(),
            flushers: Arc::new(Flushers::new(Arc::clone(&wakeups))),
            wakeups,
            next_token: AtomicU64::new(WAKE + 1),
            thread: Mutex::new(None),
        });
        for (fd, token) in [(&io.stop, STOP), (io.wakeups.eventfd(), WAKE)] {
            io.epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let runner = Arc::clone(&io);
        let thread = std::thread::Builder::new()
            .name("shoal-io".into())
            .spawn(move || {
                crate::seccomp::confine_or_warn(crate::seccomp::Kind::Device);
                runner.run()
            })?;
        *io.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok(io)
    }

    /// The flush threads, for a new slot.
    pub fn flushers(&self) -> Arc<Flushers> {
        Arc::clone(&self.flushers)
    }

    /// A token for a new slot.
    pub fn token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts waiting on `slot`'s eventfd.
    pub fn watch(&self, slot: &Arc<Slot>) -> std::io::Result<()> {
        let token = slot.token;
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        self.epoll.ctl(
            ControlOperation::Add,
            slot.eventfd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
        slots.insert(token, Arc::clone(slot));
        Ok(())
    }

    /// Stops waiting on `slot`'s eventfd.
    pub fn unwatch(&self, slot: &Arc<Slot>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.remove(&slot.token);
        // Fails only if the fd was never added (an attach that failed
        // before `watch`); nothing to undo then.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            slot.eventfd().as_raw_fd(),
            EpollEvent::default(),
        );
    }

    /// Stops the thread and the flush threads, and waits for them.
    pub fn stop(&self) {
        let _ = self.stop.write(1);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        self.flushers.stop();
    }

    fn run(&self) {
        let mut events = vec![EpollEvent::default(); 64];
        let mut ready: VecDeque<Arc<Slot>> = VecDeque::new();
        loop {
            let timeout = if ready.is_empty() { -1 } else { 0 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "device thread cannot wait; devices stop");
                    return;
                }
            };
            {
                let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
                for event in &events[..n] {
                    if event.data() == STOP {
                        return;
                    }
                    if event.data() == WAKE {
                        for slot in self.wakeups.take() {
                            if slot.enqueue() {
                                ready.push_back(slot);
                            }
                        }
                        continue;
                    }
                    if let Some(slot) = slots.get(&event.data())
                        && slot.enqueue()
                    {
                        ready.push_back(Arc::clone(slot));
                    }
                }
            }
            for _ in 0..ready.len() {
                let Some(slot) = ready.pop_front() else { break };
                if slot.serve() == Turn::More && slot.enqueue() {
                    ready.push_back(slot);
                }
            }
        }
    }
}
