//! Spreading guests over several host processes under one supervisor.
//!
//! One process stops scaling well before 10,000 guests: it may hold at
//! most 20,000 file descriptors (every guest holds a VM and a vCPU), and
//! every `munmap`, `mprotect` or `KVM_CREATE_VM` in it costs time in
//! proportion to the VMs it already has. A sharded [`crate::Host`] keeps
//! each process small instead: it places each guest in the shard process
//! with the fewest guests, starts another shard when all hold
//! [`crate::HostConfig::shard_size`] guests, and relays kill, stats,
//! console output and ends over one socket per shard (length-prefixed
//! postcard frames, `shard/wire.rs`). The embedder still sees one host and
//! one kind of [`crate::GuestHandle`].
//!
//! A virtual LAN spans shards as a two-level switch. Each shard's LAN
//! sends frames for addresses it does not have, and copies of flooded
//! frames, up a trunk (`shard/trunk.rs`) to the supervisor's LAN of the
//! same name. There each shard is one endpoint, holding the addresses of
//! its guests on that LAN from their spawn to their end; the host's own
//! ends of the LAN (port forwards) are endpoints there too.

mod serve;
mod trunk;
pub(crate) mod wire;

use crate::console::Console;
use crate::control::{GuestControl, GuestState};
use crate::device::{DeviceError, Lan, Lans};
use crate::end::{Crash, GuestEnd};
use crate::guest::SpawnError;
use crate::host::{GuestConfig, HostConfig};
use crate::kvm::GuestRam;
use crate::loader::{Fingerprint, Image};
use crate::pool::PoolStatus;
use crate::stats::StatsSnapshot;
use crossbeam_channel::Sender;
use shoal_abi::device::guest_mac;
use std::collections::{HashMap, HashSet};
use std::io::{self, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use trunk::{LanPorts, Port, Trunk};
use wire::{Event, GuestSpec, Reply, Request};

/// Longest a shard may take to answer a request before the supervisor
/// takes it for hung and kills it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a closing shard may take to end its guests and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

use crate::lock;

/// The shard processes of one host.
#[derive(Debug)]
pub(crate) struct Shards {
    config: HostConfig,
    shard_size: usize,
    links: Mutex<Vec<Arc<Link>>>,
    switch: Arc<Switch>,
}

impl Shards {
    pub(crate) fn new(config: HostConfig, shard_size: usize) -> Self {
        Self {
            config,
            shard_size: shard_size.max(1),
            links: Mutex::new(Vec::new()),
            switch: Arc::default(),
        }
    }

    /// The supervisor's LANs, where the host's own ends of them go.
    pub(crate) fn lans(&self) -> &Lans {
        &self.switch.lans
    }

    pub(crate) fn workers(&self) -> usize {
        self.config.workers
    }

    /// Shard processes running.
    pub(crate) fn processes(&self) -> usize {
        lock(&self.links).iter().filter(|l| !l.is_dead()).count()
    }

    /// The pools of every shard, added up.
    pub(crate) fn pool(&self) -> PoolStatus {
        let links = lock(&self.links).clone();
        links
            .iter()
            .filter_map(|link| match link.request(|tag| Request::Pool { tag }) {
                Some(Reply::Pool(status)) => Some(status),
                _ => None,
            })
            .fold(PoolStatus::default(), |sum, s| PoolStatus {
                ready: sum.ready + s.ready,
                ready_reset: sum.ready_reset + s.ready_reset,
                capacity: sum.capacity + s.capacity,
                created: sum.created + s.created,
                primed: sum.primed + s.primed,
                misses: sum.misses + s.misses,
                recycled: sum.recycled + s.recycled,
                tables_kept: sum.tables_kept + s.tables_kept,
                reused: sum.reused + s.reused,
            })
    }

    /// Starts guest `id` in the least loaded shard, starting a shard if
    /// every one is full.
    pub(crate) fn spawn(
        &self,
        id: u64,
        image: &Image,
        config: GuestConfig,
    ) -> Result<Arc<Remote>, SpawnError> {
        GuestRam::check_size(config.mem_size)?;
        if config.gdb.is_some() {
            return Err(SpawnError::Shard(
                "a guest under a debugger runs in the host's own process, not in a shard".into(),
            ));
        }
        // `place` reserves the guest's slot in the shard's live count.
        let link = self.place().map_err(|e| SpawnError::Shard(e.to_string()))?;
        if let Err(e) = link.send_image(image) {
            link.live.fetch_sub(1, Ordering::SeqCst);
            return Err(e);
        }
        let numbered = config.net.as_deref().map(|name| self.switch.number(name));
        let number = numbered.as_ref().map_or(0, |(number, _)| *number);
        // Frames for the guest go to its shard from now until its end.
        let lan = numbered.map(|(number, lan)| link.lans.port(&link.trunk, number, || lan));
        if let Some((lan, port)) = &lan
            && !lan.attach(guest_mac(id), Arc::downgrade(port) as _)
        {
            link.live.fetch_sub(1, Ordering::SeqCst);
            return Err(DeviceError::AddressTaken(guest_mac(id)).into());
        }
        let (console_limit, limits) = (config.console_limit, config.limits);
        let (spec, sink) = GuestSpec::new(config, number);
        let console = Arc::new(Console::new(id, console_limit, sink));
        let control = Arc::new(GuestControl::new(id, console, Arc::default(), limits));
        let remote = Arc::new(Remote {
            control,
            last: OnceLock::new(),
            link: Arc::clone(&link),
            lan,
        });
        // Known before the shard hears of it: its console and end may
        // come before the reply.
        lock(&link.guests).insert(id, Arc::clone(&remote));
        let reply = link.request(|tag| Request::Spawn {
            tag,
            id,
            image: image.fingerprint(),
            guest: spec,
        });
        match reply {
            Some(Reply::Done(Ok(()))) => Ok(remote),
            other => {
                if lock(&link.guests).remove(&id).is_some() {
                    link.live.fetch_sub(1, Ordering::SeqCst);
                }
                remote.forget();
                Err(SpawnError::Shard(match other {
                    Some(Reply::Done(Err(why))) => why,
                    _ => "the shard process exited".into(),
                }))
            }
        }
    }

    fn place(&self) -> io::Result<Arc<Link>> {
        let mut links = lock(&self.links);
        let least = links
            .iter()
            .filter(|l| !l.is_dead())
            .min_by_key(|l| l.live.load(Ordering::SeqCst));
        if let Some(link) = least
            && link.live.load(Ordering::SeqCst) < self.shard_size
        {
            link.live.fetch_add(1, Ordering::SeqCst);
            return Ok(Arc::clone(link));
        }
        let link = Link::start(links.len(), &self.config, self.shard_size)?;
        link.live.fetch_add(1, Ordering::SeqCst);
        links.push(Arc::clone(&link));
        Ok(link)
    }
}

impl Drop for Shards {
    /// Kills the guests still running, waits for them, then closes every
    /// shard and waits for its process.
    fn drop(&mut self) {
        let links = std::mem::take(&mut *lock(&self.links));
        let remotes: Vec<Arc<Remote>> = links
            .iter()
            .flat_map(|link| lock(&link.guests).values().cloned().collect::<Vec<_>>())
            .collect();
        for remote in &remotes {
            remote.kill();
        }
        for remote in &remotes {
            remote.control.wait();
        }
        for link in links {
            link.close();
        }
    }
}

/// One shard process and the socket to it.
#[derive(Debug)]
pub(crate) struct Link {
    index: usize,
    writer: Mutex<UnixStream>,
    child: Mutex<Option<Child>>,
    reader: Mutex<Option<JoinHandle<()>>>,
    live: AtomicUsize,
    guests: Mutex<HashMap<u64, Arc<Remote>>>,
    pending: Mutex<HashMap<u64, Sender<Reply>>>,
    next_tag: AtomicU64,
    images: Mutex<HashSet<Fingerprint>>,
    dead: AtomicBool,
    /// Frames to and from the shard's LANs.
    trunk: Arc<Trunk>,
    /// The supervisor's LANs the shard has guests on, with its port on
    /// each.
    lans: LanPorts,
    trunk_reader: Mutex<Option<JoinHandle<()>>>,
}

impl Link {
    /// Starts shard `index`: this program again, told by the environment
    /// to serve the socket it inherits.
    fn start(index: usize, config: &HostConfig, shard_size: usize) -> io::Result<Arc<Self>> {
        let (ours, theirs) = UnixStream::pair()?;
        let (trunk, their_trunk) = Trunk::pair()?;
        let fds = [theirs.as_raw_fd(), their_trunk.raw_fd()];
        let mut command = Command::new("/proc/self/exe");
        command
            .arg0(format!("shoal-shard-{index}"))
            .env(serve::FD_ENV, fds[0].to_string())
            .env(serve::TRUNK_ENV, fds[1].to_string())
            .env(serve::SECCOMP_ENV, if config.seccomp { "1" } else { "0" })
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: between fork and exec the closure only calls `fcntl`,
        // which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                // The shard's ends must survive exec (they are
                // close-on-exec).
                for fd in fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop((theirs, their_trunk));
        let input = ours.try_clone()?;
        let link = Arc::new(Self {
            index,
            writer: Mutex::new(ours),
            child: Mutex::new(Some(child)),
            reader: Mutex::new(None),
            live: AtomicUsize::new(0),
            guests: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_tag: AtomicU64::new(1),
            images: Mutex::new(HashSet::new()),
            dead: AtomicBool::new(false),
            trunk: Arc::new(trunk),
            lans: LanPorts::default(),
            trunk_reader: Mutex::new(None),
        });
        let reader_link = Arc::clone(&link);
        let reader = std::thread::Builder::new()
            .name(format!("shoal-shard-{index}"))
            .spawn(move || {
                crate::seccomp::confine_or_warn(crate::seccomp::Kind::Trunk);
                reader_link.read_events(input)
            })?;
        *lock(&link.reader) = Some(reader);
        let frames_link = Arc::clone(&link);
        let frames = std::thread::Builder::new()
            .name(format!("shoal-trunk-{index}"))
            .spawn(move || {
                crate::seccomp::confine_or_warn(crate::seccomp::Kind::Trunk);
                frames_link.lans.serve(&frames_link.trunk)
            })?;
        *lock(&link.trunk_reader) = Some(frames);
        let started = link.request(|tag| Request::Start {
            tag,
            workers: config.workers,
            slice: config.slice,
            pool: config.pool,
            shard_size,
        });
        match started {
            Some(Reply::Done(Ok(()))) => Ok(link),
            other => {
                link.close();
                Err(io::Error::other(match other {
                    Some(Reply::Done(Err(why))) => format!("shard {index}: {why}"),
                    _ => format!("shard {index} exited while starting"),
                }))
            }
        }
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn send(&self, request: &Request) -> io::Result<()> {
        if self.is_dead() {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        wire::send(&mut *lock(&self.writer), request)
    }

    /// Sends a tagged request and waits for its reply; `None` if the
    /// shard is gone.
    fn request(&self, make: impl FnOnce(u64) -> Request) -> Option<Reply> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        lock(&self.pending).insert(tag, tx);
        // After the insert: a reader that marks the link dead later also
        // drops this sender, so the wait below cannot hang.
        if self.send(&make(tag)).is_err() {
            lock(&self.pending).remove(&tag);
            return None;
        }
        match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(reply) => Some(reply),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                tracing::error!(shard = self.index, "shard stopped answering; killing it");
                self.kill_process();
                None
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Kills the shard process (its guests then end as lost).
    fn kill_process(&self) {
        if let Some(child) = lock(&self.child).as_mut() {
            let _ = child.kill();
        }
    }

    /// Sends `image` to the shard unless it has it already.
    fn send_image(&self, image: &Image) -> Result<(), SpawnError> {
        let key = image.fingerprint();
        let mut images = lock(&self.images);
        if images.insert(key) {
            let sent = self.send(&Request::Image {
                key,
                image: image.clone(),
            });
            if let Err(e) = sent {
                images.remove(&key);
                return Err(SpawnError::Shard(e.to_string()));
            }
        }
        Ok(())
    }

    /// The reader thread: routes every event, then fails what is left
    /// when the shard's socket closes.
    fn read_events(&self, socket: UnixStream) {
        let mut input = BufReader::new(socket);
        let mut body = Vec::new();
        while let Ok(Some(event)) = wire::receive::<Event<'static>>(&mut input, &mut body) {
            self.dispatch(event);
        }
        // Closed, or a frame that makes no sense: either way this shard is
        // done for, and must not run guests nobody can see any more.
        self.kill_process();
        self.dead.store(true, Ordering::SeqCst);
        lock(&self.pending).clear();
        let orphans: Vec<_> = lock(&self.guests).drain().map(|(_, r)| r).collect();
        self.live.store(0, Ordering::SeqCst);
        for remote in orphans {
            tracing::warn!(id = remote.control.id, shard = self.index, "shard lost");
            remote.finish(GuestEnd::Crashed(Crash::Internal(format!(
                "shard process {} running this guest exited",
                self.index
            ))));
        }
    }

    fn dispatch(&self, event: Event<'static>) {
        match event {
            Event::Reply { tag, reply } => {
                if let Some(waiter) = lock(&self.pending).remove(&tag) {
                    let _ = waiter.send(reply);
                }
            }
            Event::Console { id, bytes } => {
                let remote = lock(&self.guests).get(&id).cloned();
                let Some(remote) = remote else { return };
                // An embedder's sink that panics ends its own guest, as in
                // a single process; this thread goes on serving the rest.
                let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    remote.control.console.write(&bytes)
                }));
                if written.is_err() && lock(&self.guests).remove(&id).is_some() {
                    self.live.fetch_sub(1, Ordering::SeqCst);
                    remote.kill();
                    remote.finish(GuestEnd::Crashed(Crash::Internal(
                        "the host panicked while serving this guest".into(),
                    )));
                }
            }
            Event::Ended { id, end, stats } => {
                let remote = lock(&self.guests).remove(&id);
                if let Some(remote) = remote {
                    self.live.fetch_sub(1, Ordering::SeqCst);
                    let _ = remote.last.set(*stats);
                    remote.finish(end);
                }
            }
        }
    }

    /// Closes the socket (the shard then kills its guests and exits) and
    /// waits for the process and the reader thread.
    fn close(&self) {
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Write);
        if let Some(child) = lock(&self.child).as_mut() {
            let give_up = Instant::now() + EXIT_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.trunk.shut_down();
        let dropped = self.trunk.dropped();
        if dropped > 0 {
            tracing::info!(
                shard = self.index,
                dropped,
                "frames the trunk to the shard dropped"
            );
        }
        for reader in [&self.reader, &self.trunk_reader] {
            if let Some(reader) = lock(reader).take() {
                let _ = reader.join();
            }
        }
    }
}

/// The supervisor's side of a guest that runs in a shard.
#[derive(Debug)]
pub(crate) struct Remote {
    /// End, console and waiters, kept here; counters live in the shard.
    pub(crate) control: Arc<GuestControl>,
    /// The counters the shard sent with the end.
    last: OnceLock<StatsSnapshot>,
    link: Arc<Link>,
    /// The supervisor's LAN that holds the guest's address, if on one,
    /// and the shard's port there.
    lan: Option<(Arc<Lan>, Arc<Port>)>,
}

impl Remote {
    /// Takes the guest's address off the supervisor's LAN.
    fn forget(&self) {
        if let Some((lan, port)) = &self.lan {
            lan.detach(guest_mac(self.control.id), &**port);
        }
    }

    /// Records that the guest ended.
    fn finish(&self, end: GuestEnd) {
        self.forget();
        self.control.finish(end);
    }

    pub(crate) fn kill(&self) {
        let _ = self.link.send(&Request::Kill {
            id: self.control.id,
        });
    }

    pub(crate) fn raise_events(&self, bits: u64) {
        let _ = self.link.send(&Request::Raise {
            id: self.control.id,
            bits,
        });
    }

    fn query(&self) -> Option<(GuestState, StatsSnapshot)> {
        if self.control.end().is_some() {
            return None;
        }
        match self.link.request(|tag| Request::Stats {
            tag,
            id: self.control.id,
        }) {
            Some(Reply::Stats(stats)) => stats.map(|s| *s),
            _ => None,
        }
    }

    pub(crate) fn state(&self) -> GuestState {
        self.query().map_or(GuestState::Ended, |(state, _)| state)
    }

    pub(crate) fn stats(&self) -> StatsSnapshot {
        match self.query() {
            Some((_, stats)) => stats,
            // Over: the shard sent its last counters with the end, which
            // arrived before any reply that found the guest gone.
            None => self.last.get().cloned().unwrap_or_default(),
        }
    }
}

/// The supervisor's side of the LANs that span shards: its own LAN of
/// each name, each numbered for the trunks.
#[derive(Debug, Default)]
struct Switch {
    lans: Lans,
    /// LAN `n` on the trunks is `numbered[n]`; kept for the host's life.
    numbered: Mutex<Vec<Arc<Lan>>>,
}

impl Switch {
    /// The number and the LAN of `name`.
    fn number(&self, name: &str) -> (u32, Arc<Lan>) {
        let mut numbered = lock(&self.numbered);
        let found = numbered.iter().position(|lan| lan.name() == name);
        let number = found.unwrap_or_else(|| {
            numbered.push(self.lans.join(name));
            numbered.len() - 1
        });
        (number as u32, Arc::clone(&numbered[number]))
    }
}
