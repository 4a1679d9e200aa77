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

mod serve;
mod wire;

use crate::console::Console;
use crate::control::{GuestControl, GuestState};
use crate::end::{Crash, GuestEnd};
use crate::guest::SpawnError;
use crate::host::{GuestConfig, HostConfig};
use crate::kvm::GuestRam;
use crate::loader::Image;
use crate::pool::PoolStatus;
use crate::stats::StatsSnapshot;
use crossbeam_channel::Sender;
use std::collections::{HashMap, HashSet};
use std::io::{self, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use wire::{Event, Reply, Request};

/// Longest a shard may take to answer a request before the supervisor
/// takes it for hung and kills it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a closing shard may take to end its guests and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shard processes of one host.
#[derive(Debug)]
pub(crate) struct Shards {
    config: HostConfig,
    shard_size: usize,
    links: Mutex<Vec<Arc<Link>>>,
}

impl Shards {
    pub(crate) fn new(config: HostConfig, shard_size: usize) -> Self {
        Self {
            config,
            shard_size: shard_size.max(1),
            links: Mutex::new(Vec::new()),
        }
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
                capacity: sum.capacity + s.capacity,
                created: sum.created + s.created,
                misses: sum.misses + s.misses,
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
        if config.net.is_some() {
            return Err(SpawnError::Shard(
                "virtual LANs do not span shard processes yet: run guests on a LAN in one process \
                 (shard_size None)"
                    .into(),
            ));
        }
        // `place` reserves the guest's slot in the shard's live count.
        let link = self.place().map_err(|e| SpawnError::Shard(e.to_string()))?;
        if let Err(e) = link.send_image(image) {
            link.live.fetch_sub(1, Ordering::SeqCst);
            return Err(e);
        }
        let console = Arc::new(Console::new(id, config.console_limit, config.console_sink));
        let control = Arc::new(GuestControl::new(
            id,
            console,
            Arc::default(),
            config.limits,
        ));
        let remote = Arc::new(Remote {
            control,
            last: OnceLock::new(),
            link: Arc::clone(&link),
        });
        // Known before the shard hears of it: its console and end may
        // come before the reply.
        lock(&link.guests).insert(id, Arc::clone(&remote));
        let reply = link.request(|tag| Request::Spawn {
            tag,
            id,
            image: image.fingerprint(),
            mem_size: config.mem_size,
            args: config.args,
            console_limit: config.console_limit,
            limits: config.limits,
            trapped_page_tables: config.trapped_page_tables,
            forget: config.forget,
            disks: config.disks,
        });
        match reply {
            Some(Reply::Done(Ok(()))) => Ok(remote),
            other => {
                if lock(&link.guests).remove(&id).is_some() {
                    link.live.fetch_sub(1, Ordering::SeqCst);
                }
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
    images: Mutex<HashSet<u64>>,
    dead: AtomicBool,
}

impl Link {
    /// Starts shard `index`: this program again, told by the environment
    /// to serve the socket it inherits.
    fn start(index: usize, config: &HostConfig, shard_size: usize) -> io::Result<Arc<Self>> {
        let (ours, theirs) = UnixStream::pair()?;
        let fd = theirs.as_raw_fd();
        let mut command = Command::new("/proc/self/exe");
        command
            .arg0(format!("shoal-shard-{index}"))
            .env(serve::FD_ENV, fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: between fork and exec the closure only calls `fcntl`,
        // which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                // The shard's end must survive exec (it is close-on-exec).
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop(theirs);
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
        });
        let reader_link = Arc::clone(&link);
        let reader = std::thread::Builder::new()
            .name(format!("shoal-shard-{index}"))
            .spawn(move || reader_link.read_events(input))?;
        *lock(&link.reader) = Some(reader);
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
            remote
                .control
                .finish(GuestEnd::Crashed(Crash::Internal(format!(
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
                    remote.control.finish(GuestEnd::Crashed(Crash::Internal(
                        "the host panicked while serving this guest".into(),
                    )));
                }
            }
            Event::Ended { id, end, stats } => {
                let remote = lock(&self.guests).remove(&id);
                if let Some(remote) = remote {
                    self.live.fetch_sub(1, Ordering::SeqCst);
                    let _ = remote.last.set(stats);
                    remote.control.finish(end);
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
        if let Some(reader) = lock(&self.reader).take() {
            let _ = reader.join();
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
}

impl Remote {
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
            Some(Reply::Stats(stats)) => stats,
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
