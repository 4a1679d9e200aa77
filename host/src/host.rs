//! The embeddable host: spawn guests, wait for them, kill them, read their
//! console and counters.

use crate::console::{Console, ConsoleSink, DEFAULT_CONSOLE_LIMIT};
use crate::control::GuestControl;
pub use crate::control::GuestState;
use crate::end::GuestEnd;
use crate::guest::{Guest, GuestParts, SpawnError};
use crate::kvm::GuestRam;
use crate::kvm::vm::{Kvm, VmError};
use crate::limits::Limits;
use crate::loader::Image;
use crate::pool::{Pool, PoolStatus, Templates, Toolstack};
use crate::sched::{DEFAULT_SLICE, Scheduler, SchedulerRef, Task};
use crate::stats::{GuestStats, StatsSnapshot};
use shoal_abi::layout::DEFAULT_MEMORY;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

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
    /// Run-time, CPU-time and exit-rate limits.
    pub limits: Limits,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            mem_size: DEFAULT_MEMORY,
            args: Vec::new(),
            console_limit: DEFAULT_CONSOLE_LIMIT,
            console_sink: None,
            limits: Limits::default(),
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
    /// The scheduler's threads could not be started.
    #[error("cannot start the scheduler's threads")]
    Threads(#[source] std::io::Error),
}

/// How a host runs its guests.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Worker threads that run guests (default: one per CPU).
    pub workers: usize,
    /// Longest a guest keeps a worker while others wait.
    pub slice: Duration,
    /// VMs kept created ahead of demand, for guests of
    /// [`DEFAULT_MEMORY`] (0: every spawn creates its VM).
    pub pool: usize,
}

/// VMs a host keeps ready by default: enough to absorb a burst of spawns
/// while the filler catches up, at ~600 KiB of kernel memory each.
pub const DEFAULT_POOL: usize = 32;

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            slice: DEFAULT_SLICE,
            pool: DEFAULT_POOL,
        }
    }
}

/// A shoal host: one `/dev/kvm`, a scheduler, any number of guests.
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
///
/// Dropping the host kills the guests still running and waits for them.
#[derive(Debug)]
pub struct Host {
    toolstack: Arc<Toolstack>,
    pool: Pool,
    templates: Templates,
    next_id: AtomicU64,
    sched: Scheduler,
    live: Mutex<HashMap<u64, Weak<GuestControl>>>,
}

impl Host {
    /// Opens `/dev/kvm` and starts the scheduler with default settings.
    pub fn new() -> Result<Self, HostError> {
        Self::with_config(HostConfig::default())
    }

    /// Opens `/dev/kvm` and starts the scheduler. Raises the process's
    /// soft open-file limit to its hard limit: every guest holds a VM and a
    /// vCPU file descriptor.
    pub fn with_config(config: HostConfig) -> Result<Self, HostError> {
        raise_fd_limit();
        let toolstack = Arc::new(Toolstack {
            kvm: Kvm::open()?,
            scale: OnceLock::new(),
        });
        let pool =
            Pool::start(&toolstack, config.pool, DEFAULT_MEMORY).map_err(HostError::Threads)?;
        let sched = Scheduler::start(config.workers, config.slice).map_err(HostError::Threads)?;
        Ok(Self {
            pool,
            toolstack,
            templates: Templates::default(),
            next_id: AtomicU64::new(1),
            sched,
            live: Mutex::new(HashMap::new()),
        })
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.sched.workers()
    }

    /// The pool of VMs made ahead of demand: how many are ready, how many
    /// were made, and how many spawns found none ready.
    pub fn pool(&self) -> PoolStatus {
        self.pool.status()
    }

    /// Creates a guest from `image` and makes it runnable.
    pub fn spawn(&self, image: &Image, config: GuestConfig) -> Result<GuestHandle, SpawnError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let console = Arc::new(Console::new(id, config.console_limit, config.console_sink));
        let stats = Arc::new(GuestStats::default());
        GuestRam::check_size(config.mem_size)?;
        let template = self.templates.get(image, config.mem_size)?;
        let shell = match self.pool.take(config.mem_size) {
            Some(shell) => shell,
            None => self.toolstack.shell(config.mem_size)?,
        };
        let guest = Guest::create(
            shell,
            self.toolstack.scale(),
            GuestParts {
                id,
                template: &template,
                args: &config.args,
                features: shoal_abi::features::ALL_V1,
                console: Arc::clone(&console),
                stats: Arc::clone(&stats),
                exit_rate: config.limits.exit_rate,
            },
        )?;
        let control = Arc::new(GuestControl::new(id, console, stats, config.limits));
        {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.retain(|_, control| control.strong_count() > 0);
            live.insert(id, Arc::downgrade(&control));
        }
        self.sched.submit(Task {
            guest: Box::new(guest),
            control: Arc::clone(&control),
        });
        Ok(GuestHandle {
            control,
            sched: self.sched.handle(),
        })
    }
}

fn raise_fd_limit() {
    // SAFETY: `getrlimit`/`setrlimit` only read and write the struct passed.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let live: Vec<_> = self
            .live
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .filter_map(|(_, control)| control.upgrade())
            .collect();
        let handle = self.sched.handle();
        for control in &live {
            handle.kill(control);
        }
        for control in &live {
            control.wait();
        }
        self.sched.stop();
    }
}

/// A guest, running or finished. Dropping the handle before the guest
/// ended kills it and waits for the end, so nothing it held outlives the
/// handle.
pub struct GuestHandle {
    control: Arc<GuestControl>,
    sched: SchedulerRef,
}

impl std::fmt::Debug for GuestHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestHandle")
            .field("id", &self.control.id)
            .field("state", &self.state())
            .finish()
    }
}

impl Drop for GuestHandle {
    fn drop(&mut self) {
        if self.control.end().is_none() {
            self.sched.kill(&self.control);
            self.control.wait();
        }
    }
}

impl GuestHandle {
    /// The guest's id.
    pub fn id(&self) -> u64 {
        self.control.id
    }

    /// Where the guest is in its life.
    pub fn state(&self) -> GuestState {
        self.control.state()
    }

    /// Stops the guest (it ends as [`GuestEnd::Killed`] unless it already
    /// ended). Returns at once; [`GuestHandle::wait`] for the end.
    pub fn kill(&self) {
        self.sched.kill(&self.control);
    }

    /// Console output so far.
    pub fn console(&self) -> Vec<u8> {
        self.control.console.snapshot()
    }

    /// Counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.control.stats.snapshot()
    }

    /// The end, if the guest is over.
    pub fn try_end(&self) -> Option<GuestEnd> {
        self.control.end()
    }

    /// Waits for the guest to end and returns its report.
    pub fn wait(self) -> GuestReport {
        let end = self.control.wait();
        GuestReport {
            id: self.control.id,
            end,
            console: self.control.console.snapshot(),
            stats: self.control.stats.snapshot(),
        }
    }
}
