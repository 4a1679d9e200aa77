//! The embeddable host: spawn guests, wait for them, kill them, read their
//! console and counters.

use crate::console::{Console, ConsoleSink, DEFAULT_CONSOLE_LIMIT};
use crate::end::GuestEnd;
use crate::guest::{Guest, GuestParts, SpawnError, Step};
use crate::kvm::Kick;
use crate::kvm::vm::{Kvm, VmError};
use crate::loader::Image;
use crate::stats::{GuestStats, StatsSnapshot};
use shoal_abi::layout::DEFAULT_MEMORY;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

/// How to run one guest.
pub struct GuestConfig {
    /// Guest RAM in bytes (multiple of 4 KiB, 2 MiB to 256 MiB).
    pub mem_size: u64,
    /// Arguments the guest reads from its boot info.
    pub args: Vec<String>,
    /// Console bytes kept (and streamed) at most.
    pub console_limit: u64,
    /// Receives console output as it is written.
    pub console_sink: Option<ConsoleSink>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            mem_size: DEFAULT_MEMORY,
            args: Vec::new(),
            console_limit: DEFAULT_CONSOLE_LIMIT,
            console_sink: None,
        }
    }
}

/// Where a guest is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum GuestState {
    /// Created, not yet entered.
    Runnable = 0,
    /// Executing (or in a hypercall).
    Running = 1,
    /// Blocked until a deadline.
    Blocked = 2,
    /// Over; [`GuestHandle::wait`] returns at once.
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

/// Everything a finished guest leaves behind.
#[derive(Clone, Debug)]
pub struct GuestReport {
    /// The guest's id.
    pub id: u64,
    /// How it ended.
    pub end: GuestEnd,
    /// Its console output (up to its limit).
    pub console: Vec<u8>,
    /// Its counters.
    pub stats: StatsSnapshot,
}

impl GuestReport {
    /// The console output as text (lossy).
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.console).into_owned()
    }
}

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// KVM is not usable.
    #[error(transparent)]
    Kvm(#[from] VmError),
}

/// A shoal host: one `/dev/kvm`, any number of guests.
///
/// ```no_run
/// use shoal_host::{GuestConfig, Host, Image};
///
/// let host = Host::new()?;
/// let image = Image::from_file("guest.elf".as_ref())?;
/// let guest = host.spawn(&image, GuestConfig::default())?;
/// let report = guest.wait();
/// println!("{}: {}", report.end, report.console_text());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Host {
    kvm: Kvm,
    scale: OnceLock<crate::clock::TscScale>,
    next_id: AtomicU64,
}

struct Shared {
    killed: AtomicBool,
    state: AtomicU8,
    park: Mutex<()>,
    wake: Condvar,
    console: Arc<Console>,
    stats: Arc<GuestStats>,
}

impl Shared {
    fn set_state(&self, state: GuestState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// Sleeps until `until` or a kill; true when killed.
    fn park_until(&self, until: Option<Instant>) -> bool {
        let mut guard = self.park.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.killed.load(Ordering::Acquire) {
                return true;
            }
            let wait = match until {
                Some(until) => match until.checked_duration_since(Instant::now()) {
                    Some(wait) if !wait.is_zero() => wait,
                    _ => return false,
                },
                None => std::time::Duration::from_secs(3600),
            };
            guard = self
                .wake
                .wait_timeout(guard, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl Host {
    /// Opens `/dev/kvm`.
    pub fn new() -> Result<Self, HostError> {
        Ok(Self {
            kvm: Kvm::open()?,
            scale: OnceLock::new(),
            next_id: AtomicU64::new(1),
        })
    }

    /// Creates a guest from `image` and starts running it on its own thread.
    pub fn spawn(&self, image: &Image, config: GuestConfig) -> Result<GuestHandle, SpawnError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let console = Arc::new(Console::new(id, config.console_limit, config.console_sink));
        let stats = Arc::new(GuestStats::default());
        let guest = Guest::create(
            &self.kvm,
            GuestParts {
                id,
                image,
                mem_size: config.mem_size,
                args: &config.args,
                features: shoal_abi::features::ALL_V1,
                console: Arc::clone(&console),
                stats: Arc::clone(&stats),
            },
            &self.scale,
        )?;
        let shared = Arc::new(Shared {
            killed: AtomicBool::new(false),
            state: AtomicU8::new(GuestState::Runnable as u8),
            park: Mutex::new(()),
            wake: Condvar::new(),
            console,
            stats,
        });
        let runner_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("guest-{id}"))
            .stack_size(256 << 10)
            .spawn(move || run(guest, &runner_shared))
            .map_err(SpawnError::Thread)?;
        Ok(GuestHandle {
            id,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }
}

/// Runs a guest to its end on the current thread.
fn run(mut guest: Guest, shared: &Shared) -> GuestEnd {
    let span = tracing::info_span!("guest", id = guest.id());
    let _entered = span.enter();
    guest.arm_kick();
    tracing::debug!("running");
    let end = loop {
        shared.set_state(GuestState::Running);
        match guest.run(&shared.killed) {
            Step::Ended(end) => break end,
            Step::Blocked(deadline) => {
                shared.set_state(GuestState::Blocked);
                tracing::trace!(deadline, "blocked");
                let since = Instant::now();
                let killed = shared.park_until(guest.clock().instant_of(deadline));
                shared
                    .stats
                    .add_blocked_ns(since.elapsed().as_nanos() as u64);
                if killed {
                    break GuestEnd::Killed;
                }
            }
        }
    };
    guest.disarm_kick();
    shared.set_state(GuestState::Ended);
    tracing::info!(%end, "guest ended");
    end
}

/// A running (or finished) guest. Dropping the handle without
/// [`GuestHandle::wait`] kills the guest and waits for its thread, so
/// nothing it held outlives the handle.
pub struct GuestHandle {
    id: u64,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<GuestEnd>>>,
}

impl std::fmt::Debug for GuestHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestHandle")
            .field("id", &self.id)
            .field("state", &self.state())
            .finish()
    }
}

impl Drop for GuestHandle {
    fn drop(&mut self) {
        if self
            .thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            self.kill();
            let thread = self
                .thread
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        }
    }
}

impl GuestHandle {
    /// The guest's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Where the guest is in its life.
    pub fn state(&self) -> GuestState {
        GuestState::from_u8(self.shared.state.load(Ordering::Acquire))
    }

    /// Stops the guest (it ends as [`GuestEnd::Killed`] unless it already
    /// ended). Returns at once; [`GuestHandle::wait`] for the end.
    pub fn kill(&self) {
        self.shared.killed.store(true, Ordering::Release);
        drop(self.shared.park.lock().unwrap_or_else(|e| e.into_inner()));
        self.shared.wake.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(thread) = thread.as_ref().filter(|t| !t.is_finished()) {
            Kick::send(thread.as_pthread_t());
        }
    }

    /// Console output so far.
    pub fn console(&self) -> Vec<u8> {
        self.shared.console.snapshot()
    }

    /// Counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Waits for the guest to end and returns its report.
    pub fn wait(self) -> GuestReport {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        let end = match thread.map(JoinHandle::join) {
            Some(Ok(end)) => end,
            Some(Err(_)) => {
                GuestEnd::Crashed(crate::end::Crash::Internal("guest thread panicked".into()))
            }
            None => GuestEnd::Killed,
        };
        GuestReport {
            id: self.id,
            end,
            console: self.shared.console.snapshot(),
            stats: self.shared.stats.snapshot(),
        }
    }
}
