//! The shard side: a process started by a sharded [`crate::Host`] runs an
//! in-process engine and serves the supervisor's requests until the
//! supervisor closes the socket (or dies), then kills its guests and
//! exits.
//!
//! A shard is the supervisor's own executable, started again with
//! [`FD_ENV`] naming an inherited socket. A constructor in this library
//! runs before `main` in every program that links it, sees the variable,
//! serves, and exits without ever returning to `main`: so the CLI, test
//! binaries and embedders' programs can all be shards without code of
//! their own.

use super::trunk::{LanPorts, Trunk};
use super::wire::{self, Event, GuestSpec, Reply, Request};
use crate::control::GuestControl;
use crate::host::HostConfig;
use crate::loader::{Fingerprint, Image};
use crate::local::Local;
use crossbeam_channel::{Receiver, Sender};
use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// Names the socket a shard process talks to its supervisor on.
pub(crate) const FD_ENV: &str = "SHOAL_SHARD_FD";

/// Names the shard's end of its trunk (`super::trunk`).
pub(crate) const TRUNK_ENV: &str = "SHOAL_SHARD_TRUNK_FD";

/// Set (to `1`) when the shard is to run in the host's sandbox
/// ([`crate::seccomp`]): its main thread is confined before it serves
/// anything, and so is every thread it starts.
pub(crate) const SECCOMP_ENV: &str = "SHOAL_SHARD_SECCOMP";

#[ctor::ctor(unsafe)]
fn enter_if_shard() {
    let Some(fd) = std::env::var_os(FD_ENV) else {
        return;
    };
    let fd_of = |value: Option<std::ffi::OsString>| {
        value.and_then(|fd| fd.to_str().and_then(|fd| fd.parse::<RawFd>().ok()))
    };
    let code = match (fd_of(Some(fd)), fd_of(std::env::var_os(TRUNK_ENV))) {
        (Some(fd), Some(trunk)) => {
            // SAFETY: ignoring SIGPIPE only turns writes to a closed
            // socket into errors, which `serve` handles. Removing the
            // variables and marking the sockets close-on-exec again keep
            // them from anything this process might start; no other
            // thread exists yet to read the environment meanwhile.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
                std::env::remove_var(FD_ENV);
                std::env::remove_var(TRUNK_ENV);
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                libc::fcntl(trunk, libc::F_SETFD, libc::FD_CLOEXEC);
            }
            // SAFETY: the supervisor started this process with `fd` and
            // `trunk` open for us alone (see `super::Link::start`), and
            // nothing else in it has run yet.
            let (socket, trunk) =
                unsafe { (UnixStream::from_raw_fd(fd), Trunk::from_raw_fd(trunk)) };
            match trunk.and_then(|trunk| serve(socket, trunk)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("shoal shard: {e}");
                    1
                }
            }
        }
        _ => 2,
    };
    // SAFETY: ends the process without returning into a `main` that is
    // not ours to run; every guest was freed in `serve`.
    unsafe { libc::_exit(code) };
}

/// Live guests of this shard, by id.
type Guests = Arc<Mutex<HashMap<u64, Arc<GuestControl>>>>;

struct Shard {
    local: Option<Local>,
    shard_size: usize,
    images: HashMap<Fingerprint, Image>,
    guests: Guests,
    out: Arc<Outbox>,
    trunk: Arc<Trunk>,
    /// This shard's LANs that have guests, each with its way up to the
    /// supervisor.
    uplinks: Arc<LanPorts>,
}

/// Events for the supervisor, encoded where they happen into one buffer
/// that the writer thread takes whole: a guest's console write is copied
/// once, into the buffer, with no allocation of its own, and wakes the
/// writer only if the buffer was empty.
struct Outbox {
    /// Shared with the writer thread.
    frames: Arc<Mutex<Vec<u8>>>,
    /// Holds a token while the writer has work; closed when the last
    /// `Outbox` is gone, which ends the writer.
    wake: Sender<()>,
}

impl Outbox {
    fn push(&self, event: &Event<'_>) {
        let mut frames = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = frames.is_empty();
        // Only a frame over the size limit fails, and console writes and
        // replies are far below it.
        if wire::encode(&mut frames, event).is_ok() && was_empty {
            let _ = self.wake.try_send(());
        }
    }
}

/// Serves requests from `socket`, and frames from `trunk`, until the
/// socket closes.
fn serve(socket: UnixStream, trunk: Trunk) -> io::Result<()> {
    if std::env::var_os(SECCOMP_ENV).is_some_and(|v| v == "1") {
        crate::seccomp::enable();
        crate::seccomp::confine(crate::seccomp::Kind::ShardServer).map_err(io::Error::other)?;
    }
    let mut input = BufReader::new(socket.try_clone()?);
    let (wake, woken) = crossbeam_channel::bounded(1);
    let frames = Arc::new(Mutex::new(Vec::new()));
    let writer = std::thread::Builder::new()
        .name("shoal-shard-out".into())
        .spawn({
            let frames = Arc::clone(&frames);
            move || {
                crate::seccomp::confine_or_warn(crate::seccomp::Kind::Trunk);
                write_events(socket, &frames, &woken)
            }
        })?;
    let out = Arc::new(Outbox { frames, wake });
    let trunk = Arc::new(trunk);
    let uplinks = Arc::new(LanPorts::default());
    let frames = std::thread::Builder::new()
        .name("shoal-shard-trunk".into())
        .spawn({
            let (trunk, uplinks) = (Arc::clone(&trunk), Arc::clone(&uplinks));
            move || {
                crate::seccomp::confine_or_warn(crate::seccomp::Kind::Trunk);
                uplinks.serve(&trunk)
            }
        })?;
    let mut shard = Shard {
        local: None,
        shard_size: 0,
        images: HashMap::new(),
        guests: Arc::default(),
        out,
        trunk: Arc::clone(&trunk),
        uplinks,
    };
    let mut body = Vec::new();
    let served = loop {
        match wire::receive::<Request>(&mut input, &mut body) {
            Ok(Some(request)) => shard.handle(request),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // The supervisor is done or gone: the engine kills what is left and
    // waits for it (their ends go out before the writer stops).
    drop(shard);
    trunk.shut_down();
    let _ = frames.join();
    let _ = writer.join();
    served
}

/// Writes whatever the outbox holds each time it is woken, until every
/// [`Outbox`] is gone (the engine has stopped and every guest's hooks are
/// dropped), then what is left.
fn write_events(mut socket: UnixStream, frames: &Mutex<Vec<u8>>, woken: &Receiver<()>) {
    let mut batch = Vec::new();
    loop {
        let open = woken.recv().is_ok();
        batch.clear();
        std::mem::swap(
            &mut *frames.lock().unwrap_or_else(|e| e.into_inner()),
            &mut batch,
        );
        if !batch.is_empty() && socket.write_all(&batch).is_err() {
            return;
        }
        if !open {
            return;
        }
    }
}

impl Shard {
    fn reply(&self, tag: u64, reply: Reply) {
        self.out.push(&Event::Reply { tag, reply });
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Start {
                tag,
                workers,
                slice,
                pool,
                shard_size,
            } => {
                self.shard_size = shard_size;
                let config = HostConfig {
                    workers,
                    slice,
                    pool,
                    shard_size: None,
                    seccomp: crate::seccomp::enabled(),
                };
                let started = Local::start(&config).map(|local| {
                    local.pool_handle().set_room(shard_size);
                    self.local = Some(local);
                });
                self.reply(tag, Reply::Done(started.map_err(|e| e.to_string())));
            }
            Request::Image { key, image } => {
                self.images.insert(key, image);
            }
            Request::Spawn {
                tag,
                id,
                image,
                guest,
            } => {
                let result = self.spawn(id, image, guest);
                self.reply(tag, Reply::Done(result));
            }
            Request::Kill { id } => {
                let control = self.lock_guests().get(&id).cloned();
                if let (Some(control), Some(local)) = (control, &self.local) {
                    local.scheduler().kill(&control);
                }
            }
            Request::Raise { id, bits } => {
                let control = self.lock_guests().get(&id).cloned();
                if let (Some(control), Some(local)) = (control, &self.local) {
                    local.scheduler().raise_events(&control, bits);
                }
            }
            Request::Stats { tag, id } => {
                let control = self.lock_guests().get(&id).cloned();
                let stats = control.map(|c| Box::new((c.state(), c.stats.snapshot())));
                self.reply(tag, Reply::Stats(stats));
            }
            Request::Pool { tag } => {
                let status = self.local.as_ref().map(Local::pool).unwrap_or_default();
                self.reply(tag, Reply::Pool(status));
            }
        }
    }

    fn lock_guests(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<GuestControl>>> {
        self.guests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts this shard's LAN `name` on the trunk as `number`: frames for
    /// addresses not in this shard go up it.
    fn uplink(&self, local: &Local, number: u32, name: &str) {
        let (lan, uplink) = self
            .uplinks
            .port(&self.trunk, number, || local.lans().join(name));
        lan.set_uplink(Arc::downgrade(&uplink) as _);
    }

    fn spawn(&self, id: u64, image: Fingerprint, guest: GuestSpec) -> Result<(), String> {
        let local = self.local.as_ref().ok_or("the shard was not started")?;
        let image = self.images.get(&image).ok_or("unknown image")?;
        if let Some((number, name)) = &guest.net {
            self.uplink(local, *number, name);
        }
        let console_out = Arc::clone(&self.out);
        let config = guest.into_config(Some(Box::new(move |id, bytes| {
            console_out.push(&Event::Console {
                id,
                bytes: bytes.into(),
            });
        })));
        let end_out = Arc::clone(&self.out);
        let guests = Arc::clone(&self.guests);
        let pool = local.pool_handle();
        let shard_size = self.shard_size;
        // Ended goes out before the guest leaves the table, so a stats
        // request that misses it is answered after the end.
        let on_end = Box::new(move |end: &crate::GuestEnd, stats| {
            end_out.push(&Event::Ended {
                id,
                end: end.clone(),
                stats: Box::new(stats),
            });
            let mut guests = guests.lock().unwrap_or_else(|e| e.into_inner());
            guests.remove(&id);
            pool.set_room(shard_size.saturating_sub(guests.len()));
        });
        let (control, _) = local
            .spawn(id, image, config, Some(on_end))
            .map_err(|e| e.to_string())?;
        // Under the table's lock: a guest whose end hook already ran is
        // not added (the hook records the end before it takes the lock).
        let mut guests = self.lock_guests();
        if control.end().is_none() {
            guests.insert(id, control);
        }
        // No more VMs waiting than guests this shard may still take.
        local
            .pool_handle()
            .set_room(self.shard_size.saturating_sub(guests.len()));
        Ok(())
    }
}
