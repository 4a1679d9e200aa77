//! The embeddable host: spawn guests, wait for them, kill them, read their
//! console and counters.

use crate::console::{ConsoleSink, DEFAULT_CONSOLE_LIMIT};
use crate::control::GuestControl;
pub use crate::control::GuestState;
use crate::device::{DiskSpec, Forward, Lans, Tap};
use crate::end::GuestEnd;
use crate::guest::SpawnError;
use crate::hypercall::custom::{Caller, RegisterError};
use crate::kvm::vm::VmError;
use crate::limits::Limits;
use crate::loader::Image;
use crate::local::Local;
use crate::lock;
use crate::mmu::Forget;
use crate::pool::PoolStatus;
use crate::sched::{DEFAULT_SLICE, SchedulerRef};
use crate::shard::{Remote, Shards};
use crate::stats::StatsSnapshot;
use shoal_abi::layout::DEFAULT_MEMORY;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

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
    /// Experiment: show the guest its page tables at
    /// [`shoal_abi::layout::TRAPPED_TABLES_WINDOW`] and let it change them
    /// by writing there, each write trapping to the host (feature
    /// `TRAPPED_PAGE_TABLES`): the trap-and-emulate side of the
    /// `mmu_update` comparison in `shoal bench`.
    pub trapped_page_tables: bool,
    /// Offer the console ring (feature `CONSOLE_RING`, on by default):
    /// the guest's output reaches the host at its next exit, with no exit
    /// of its own. Off, the SDK makes one `console_write` per `print!`
    /// (per 512 bytes of it).
    pub console_ring: bool,
    /// How the host drops the translations a page-table change takes
    /// away (the default picks per change; the others are for measuring).
    pub forget: Forget,
    /// The guest's disks: device `i` is `disks[i]`.
    pub disks: Vec<DiskSpec>,
    /// The virtual LAN the guest's network device is on (the device after
    /// the disks), if any. Guests of one host on LANs of the same name
    /// share the LAN.
    pub net: Option<String>,
    /// What the host records about the guest's hypercalls (statistics,
    /// a trace): nothing by default.
    pub observe: crate::Observe,
    /// Stop the guest before its first instruction and serve the GDB
    /// remote protocol to the first debugger that connects here (see
    /// `docs/debugging.md`). Not with shard processes.
    pub gdb: Option<std::net::TcpListener>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            mem_size: DEFAULT_MEMORY,
            args: Vec::new(),
            console_limit: DEFAULT_CONSOLE_LIMIT,
            console_sink: None,
            limits: Limits::default(),
            trapped_page_tables: false,
            console_ring: true,
            forget: Forget::default(),
            disks: Vec::new(),
            net: None,
            observe: crate::Observe::default(),
            gdb: None,
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

/// Why a port forward could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The host address could not be bound, or the gateway not started.
    #[error("cannot forward: {0}")]
    Io(#[from] std::io::Error),
}

/// How a host runs its guests.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Worker threads that run guests (default: one per CPU), in each
    /// process that runs guests.
    pub workers: usize,
    /// Longest a guest keeps a worker while others wait.
    pub slice: Duration,
    /// VMs kept created ahead of demand, for guests of
    /// [`DEFAULT_MEMORY`] (0: every spawn creates its VM and every ended
    /// guest's VM is destroyed), in each process that runs guests; as
    /// many again of ended guests' VMs are kept reset for reuse.
    pub pool: usize,
    /// `None`: run every guest in this process. `Some(n)`: run guests in
    /// shard processes of at most `n` guests each, started as needed
    /// (this program again; see [`crate::shard`]). One process holds at
    /// most ~10,000 guests (two file descriptors each) and slows as it
    /// grows; shards keep the cost per guest flat.
    pub shard_size: Option<usize>,
    /// Confine every thread shoal starts, in this process and in its
    /// shard processes, to the system calls its kind needs
    /// ([`crate::seccomp`]). On by default. Once a host has turned it on,
    /// it stays on for the process.
    pub seccomp: bool,
}

/// VMs a host keeps ready by default: enough to absorb a burst of spawns
/// while the filler catches up, at ~600 KiB of kernel memory each.
pub const DEFAULT_POOL: usize = 32;

/// Guests per shard process that keep per-guest costs flat on the
/// machines shoal targets (see `docs/benchmarks.md`).
pub const DEFAULT_SHARD_SIZE: usize = 100;

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            slice: DEFAULT_SLICE,
            pool: DEFAULT_POOL,
            shard_size: None,
            seccomp: true,
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
    engine: Engine,
    next_id: AtomicU64,
}

#[derive(Debug)]
enum Engine {
    Local(Box<Local>),
    Sharded(Shards),
}

impl Host {
    /// Opens `/dev/kvm` and starts the scheduler with default settings.
    pub fn new() -> Result<Self, HostError> {
        Self::with_config(HostConfig::default())
    }

    /// Starts a host: in this process (opens `/dev/kvm`, starts the
    /// scheduler and the pool), or, with [`HostConfig::shard_size`], a
    /// supervisor that starts its first shard at the first spawn.
    pub fn with_config(config: HostConfig) -> Result<Self, HostError> {
        if config.seccomp {
            crate::seccomp::enable();
        }
        let engine = match config.shard_size {
            None => Engine::Local(Box::new(Local::start(&config)?)),
            Some(size) => Engine::Sharded(Shards::new(config, size)),
        };
        Ok(Self {
            engine,
            next_id: AtomicU64::new(1),
        })
    }

    /// Number of worker threads (in each shard process, when sharded).
    pub fn workers(&self) -> usize {
        match &self.engine {
            Engine::Local(local) => local.workers(),
            Engine::Sharded(shards) => shards.workers(),
        }
    }

    /// Processes running guests: 1 in process, else the shards running.
    pub fn processes(&self) -> usize {
        match &self.engine {
            Engine::Local(_) => 1,
            Engine::Sharded(shards) => shards.processes(),
        }
    }

    /// The pool of VMs made ahead of demand (every shard's, added up):
    /// how many are ready, how many were made, and how many spawns found
    /// none ready.
    pub fn pool(&self) -> PoolStatus {
        match &self.engine {
            Engine::Local(local) => local.pool(),
            Engine::Sharded(shards) => shards.pool(),
        }
    }

    /// Forwards connections to the host TCP address `listen` (port 0:
    /// any free port; see [`Forward::local_addr`]) to `to` on virtual LAN
    /// `lan`, through the host's end of the LAN at `10.0.0.1`. Guest `id`
    /// is at [`shoal_abi::device::guest_ipv4`]`(id)`. The forward lasts
    /// until the returned handle is dropped.
    pub fn forward(
        &self,
        lan: &str,
        listen: SocketAddr,
        to: SocketAddrV4,
    ) -> Result<Forward, ForwardError> {
        Ok(self.lans().gateway(lan)?.forward(listen, to)?)
    }

    /// Serves custom hypercall `nr` (in
    /// [`shoal_abi::hypercall::CUSTOM_FIRST`]`..=`[`shoal_abi::hypercall::CUSTOM_LAST`])
    /// with `handler` for every guest of this host from now on: the
    /// guest's request in, the response out, written over the request
    /// (the guest calls it with `shoal_guest::hypercall::custom`). The
    /// handler reaches the guest's memory through [`Caller`]. If it
    /// returns an error or panics, the calling guest stops with the
    /// reason ([`crate::Crash::CustomHypercall`]); the host and other
    /// guests go on. Handlers run on the worker running the guest, so one
    /// that takes long holds that worker.
    ///
    /// ```no_run
    /// # let host = shoal_host::Host::new()?;
    /// host.register_hypercall(0x1000, |_caller, [a, b]: [u64; 2]| {
    ///     a.checked_add(b).ok_or("overflow")
    /// })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn register_hypercall<Req, Resp, E, F>(
        &self,
        nr: u32,
        handler: F,
    ) -> Result<(), RegisterError>
    where
        Req: FromBytes + KnownLayout + Immutable,
        Resp: IntoBytes + Immutable,
        E: std::fmt::Display,
        F: Fn(&Caller<'_>, Req) -> Result<Resp, E> + Send + Sync + 'static,
    {
        match &self.engine {
            Engine::Local(local) => local.custom().register(nr, handler),
            Engine::Sharded(_) => Err(RegisterError::Sharded),
        }
    }

    /// Bridges TAP device `name` to virtual LAN `lan`: the host kernel
    /// joins the LAN as one more endpoint, learning guests' addresses by
    /// ARP like any host on an Ethernet. Makes the device if it does not
    /// exist (which needs `CAP_NET_ADMIN`), or attaches to a persistent one
    /// made for this user. Addressing the interface and bringing it up
    /// are left to the host (`ip addr add 10.0.0.2/24 dev NAME`, `ip link
    /// set NAME up`). The bridge lasts until the returned handle is
    /// dropped.
    pub fn tap(&self, lan: &str, name: &str) -> std::io::Result<Tap> {
        Tap::open(self.lans().join(lan), name)
    }

    /// Frames to one guest that the host's side of LAN `lan` dropped:
    /// the guest was gone, or there was no room on the way. Their senders
    /// count them too, except those that crossed from one shard process
    /// to another (the sender's shard saw them leave, not dropped). In a
    /// host without shards the count goes with the LAN when nothing is on
    /// it any more.
    pub fn lan_lost(&self, lan: &str) -> u64 {
        self.lans().get(lan).map_or(0, |lan| lan.lost())
    }

    /// Where the host's own ends of its LANs go: this process's LANs, or
    /// the supervisor's when guests run in shards.
    fn lans(&self) -> &Lans {
        match &self.engine {
            Engine::Local(local) => local.lans(),
            Engine::Sharded(shards) => shards.lans(),
        }
    }

    /// Spawns `count` guests of `image`, guest `i` with `config(i)`, from
    /// one thread per worker at once: a spawn into a shard is a round
    /// trip to its process, so with several in flight the shards and this
    /// process work side by side. Returns the guests in index order, each
    /// with its spawn call's latency (host ids follow the order the calls
    /// arrived, so they need not follow the indexes). The first failure
    /// stops the spawning and is returned with its index; the guests
    /// started by then are killed as their handles drop.
    pub fn spawn_many(
        &self,
        image: &Image,
        count: usize,
        config: impl Fn(usize) -> GuestConfig + Sync,
    ) -> Result<Vec<(GuestHandle, Duration)>, (usize, SpawnError)> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let spawned = std::sync::Mutex::new(Vec::with_capacity(count));
        let failed = std::sync::Mutex::new(None);
        let spawner = || {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || lock(&failed).is_some() {
                    break;
                }
                let config = config(i);
                let started = std::time::Instant::now();
                match self.spawn(image, config) {
                    Ok(guest) => lock(&spawned).push((i, guest, started.elapsed())),
                    Err(e) => {
                        lock(&failed).get_or_insert((i, e));
                        break;
                    }
                }
            }
        };
        std::thread::scope(|scope| {
            for _ in 1..self.workers().min(count) {
                scope.spawn(spawner);
            }
            spawner();
        });
        if let Some(failure) = lock(&failed).take() {
            // Kill them all before the handles drop (each drop waits for
            // its guest's end, a round trip to a shard).
            let spawned = lock(&spawned);
            for (_, guest, _) in spawned.iter() {
                guest.kill();
            }
            return Err(failure);
        }
        let mut spawned = spawned
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        spawned.sort_by_key(|(i, _, _)| *i);
        Ok(spawned
            .into_iter()
            .map(|(_, guest, took)| (guest, took))
            .collect())
    }

    /// Creates a guest from `image` and makes it runnable.
    pub fn spawn(&self, image: &Image, config: GuestConfig) -> Result<GuestHandle, SpawnError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(match &self.engine {
            Engine::Local(local) => {
                let (control, sched) = local.spawn(id, image, config, None)?;
                GuestHandle {
                    control,
                    runs: Runs::Here(sched),
                }
            }
            Engine::Sharded(shards) => {
                let remote = shards.spawn(id, image, config)?;
                GuestHandle {
                    control: Arc::clone(&remote.control),
                    runs: Runs::InShard(remote),
                }
            }
        })
    }
}

/// A guest, running or finished. Dropping the handle before the guest
/// ended kills it and waits for the end, so nothing it held outlives the
/// handle.
pub struct GuestHandle {
    control: Arc<GuestControl>,
    runs: Runs,
}

/// Where a guest runs.
enum Runs {
    /// In this process, on this scheduler.
    Here(SchedulerRef),
    /// In a shard process.
    InShard(Arc<Remote>),
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
            self.kill();
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
        match &self.runs {
            Runs::Here(_) => self.control.state(),
            Runs::InShard(remote) => remote.state(),
        }
    }

    /// Stops the guest (it ends as [`GuestEnd::Killed`] unless it already
    /// ended). Returns at once; [`GuestHandle::wait`] for the end.
    pub fn kill(&self) {
        match &self.runs {
            Runs::Here(sched) => sched.kill(&self.control),
            Runs::InShard(remote) => remote.kill(),
        }
    }

    /// Raises the guest's events `bits` (bit `n` is event `n` of its
    /// event page, `docs/abi.md`): they become pending, and a guest blocked
    /// in `block` wakes if one of them is not masked. Does nothing once the
    /// guest ended.
    pub fn raise_events(&self, bits: u64) {
        match &self.runs {
            Runs::Here(sched) => sched.raise_events(&self.control, bits),
            Runs::InShard(remote) => remote.raise_events(bits),
        }
    }

    /// Console output so far.
    pub fn console(&self) -> Vec<u8> {
        self.control.console.snapshot()
    }

    /// Counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        match &self.runs {
            Runs::Here(_) => self.control.stats.snapshot(),
            Runs::InShard(remote) => remote.stats(),
        }
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
            stats: self.stats(),
        }
    }
}
