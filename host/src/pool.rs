//! Guests made ahead of demand, LightVM's split toolstack: a filler thread
//! keeps a few *shells* ready (a VM with its blank memory registered and
//! its vCPU created, the slow part of starting a guest), and every image's
//! memory layout is built once into a [`Template`] that guests map
//! copy-on-write. Spawning a guest is then taking a shell, mapping the
//! template into it, writing its boot info and entering it.

use crate::boot::{BootError, Template};
use crate::clock::{TscScale, rdtsc};
use crate::guest::SpawnError;
use crate::kvm::memory::GuestRam;
use crate::kvm::{Kvm, Vcpu, Vm};
use crate::loader::Image;
use crossbeam_channel::{Receiver, Sender, bounded};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// A VM that has never run, with blank RAM registered and vCPU 0 created.
/// Fields drop in order: vCPU, VM, then RAM.
#[derive(Debug)]
pub struct Shell {
    /// The vCPU.
    pub vcpu: Vcpu,
    /// The VM.
    pub vm: Vm,
    /// Its RAM, all zero.
    pub ram: GuestRam,
    /// The vCPU's TSC minus the host's.
    pub tsc_offset: i64,
}

/// What every shell of a host shares.
#[derive(Debug)]
pub struct Toolstack {
    /// `/dev/kvm`.
    pub kvm: Kvm,
    /// The TSC frequency, learnt from the first vCPU.
    pub scale: OnceLock<TscScale>,
}

impl Toolstack {
    /// Creates a shell with `mem_size` bytes of RAM.
    pub fn shell(&self, mem_size: u64) -> Result<Shell, SpawnError> {
        let ram = GuestRam::new(mem_size)?;
        let vm = self.kvm.create_vm(&ram)?;
        let mut vcpu = vm.create_vcpu()?;
        vcpu.prepare_first_run();
        self.scale.get_or_init(|| match vcpu.tsc_khz() {
            Ok(khz) if khz > 0 => TscScale::from_hz(u64::from(khz) * 1000),
            _ => TscScale::measure(Duration::from_millis(20)),
        });
        let before = rdtsc();
        let guest_tsc = vcpu.guest_tsc()?;
        let after = rdtsc();
        let host_tsc = before / 2 + after / 2;
        Ok(Shell {
            vcpu,
            vm,
            ram,
            tsc_offset: guest_tsc.wrapping_sub(host_tsc) as i64,
        })
    }

    /// The TSC scale (known once a shell exists).
    pub fn scale(&self) -> TscScale {
        *self
            .scale
            .get_or_init(|| TscScale::measure(Duration::from_millis(20)))
    }
}

/// Shells of one memory size made ahead of demand by a filler thread.
///
/// Shells are never reused: a VM that ran a guest is destroyed. (Reusing
/// one safely means dropping every shadow mapping KVM built for the old
/// guest, a memory-slot change that waits for an SRCU grace period: it
/// measured slower than making a new VM.)
#[derive(Debug)]
pub struct Pool {
    stop: Arc<AtomicBool>,
    ready: Option<Receiver<Shell>>,
    /// Asks the filler to top the pool up.
    refill: Option<Sender<()>>,
    mem_size: u64,
    counters: Arc<Counters>,
    /// Most shells worth keeping now, and most the filler may make up to
    /// (see [`Pool::set_room`]).
    room: Arc<Room>,
    filler: Option<JoinHandle<()>>,
}

/// How many shells a pool may hold.
#[derive(Debug)]
struct Room {
    /// Shells beyond this are destroyed.
    keep: AtomicUsize,
    /// The filler makes shells up to this: `keep` as of the last take,
    /// lowered at once when `keep` shrinks.
    fill: AtomicUsize,
}

impl Room {
    /// Shells the filler should hold: (keep at most, fill up to).
    fn limits(&self) -> (usize, usize) {
        let keep = self.keep.load(Ordering::Relaxed);
        (keep, keep.min(self.fill.load(Ordering::Relaxed)))
    }
}

#[derive(Debug, Default)]
struct Counters {
    created: AtomicU64,
    misses: AtomicU64,
}

/// What a pool holds and has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolStatus {
    /// Shells ready now.
    pub ready: usize,
    /// Most shells kept ready.
    pub capacity: usize,
    /// Shells the filler made.
    pub created: u64,
    /// Spawns that found no shell ready (or asked for another memory size)
    /// and made their VM themselves.
    pub misses: u64,
}

impl Pool {
    /// Starts a filler that keeps up to `capacity` shells of `mem_size`
    /// bytes ready. A capacity of 0 starts nothing: every spawn is cold.
    pub fn start(
        toolstack: &Arc<Toolstack>,
        capacity: usize,
        mem_size: u64,
    ) -> std::io::Result<Self> {
        let counters = Arc::new(Counters::default());
        let room = Arc::new(Room {
            keep: AtomicUsize::new(capacity),
            fill: AtomicUsize::new(capacity),
        });
        if capacity == 0 {
            return Ok(Self {
                stop: Arc::default(),
                ready: None,
                refill: None,
                mem_size,
                counters,
                room,
                filler: None,
            });
        }
        let (tx, rx) = bounded(capacity);
        let (refill, refill_rx) = bounded(1);
        let _ = refill.try_send(());
        let stop = Arc::new(AtomicBool::new(false));
        let toolstack = Arc::clone(toolstack);
        let filler = std::thread::Builder::new()
            .name("shoal-pool".into())
            .spawn({
                let filler = Filler {
                    toolstack,
                    tx,
                    rx: rx.clone(),
                    refill: refill_rx,
                    mem_size,
                    stop: Arc::clone(&stop),
                    counters: Arc::clone(&counters),
                    room: Arc::clone(&room),
                };
                move || filler.run()
            })?;
        Ok(Self {
            stop,
            ready: Some(rx),
            refill: Some(refill),
            mem_size,
            counters,
            room,
            filler: Some(filler),
        })
    }

    /// A ready shell of `mem_size` bytes, if there is one (the pool
    /// holds shells of one size only).
    pub fn take(&self, mem_size: u64) -> Option<Shell> {
        let ready = self.ready.as_ref()?;
        let shell = if mem_size == self.mem_size {
            ready.try_recv().ok()
        } else {
            None
        };
        if shell.is_none() {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
        }
        let keep = self.room.keep.load(Ordering::Relaxed);
        self.room.fill.store(keep, Ordering::Relaxed);
        if let Some(refill) = &self.refill {
            let _ = refill.try_send(());
        }
        shell
    }

    /// Keeps at most `room` shells ready (never more than the capacity):
    /// a shard with room for only a few more guests keeps only that many
    /// VMs waiting, and none once it is full. The filler destroys shells
    /// beyond a smaller room at once; it fills a larger room at the next
    /// spawn (guests ending do not make VMs nobody may ask for).
    pub fn set_room(&self, room: usize) {
        let before = self.room.keep.swap(room, Ordering::Relaxed);
        self.room.fill.fetch_min(room, Ordering::Relaxed);
        if room < before
            && let Some(refill) = &self.refill
        {
            let _ = refill.try_send(());
        }
    }

    /// What the pool holds and has done.
    pub fn status(&self) -> PoolStatus {
        PoolStatus {
            ready: self.ready.as_ref().map_or(0, Receiver::len),
            capacity: self
                .ready
                .as_ref()
                .and_then(Receiver::capacity)
                .unwrap_or(0),
            created: self.counters.created.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the refill channel ends the filler's wait; the flag
        // stops it in the middle of filling.
        self.stop.store(true, Ordering::Release);
        self.ready = None;
        self.refill = None;
        if let Some(filler) = self.filler.take() {
            let _ = filler.join();
        }
    }
}

/// The filler thread's state.
struct Filler {
    toolstack: Arc<Toolstack>,
    tx: Sender<Shell>,
    /// To destroy shells beyond the room.
    rx: Receiver<Shell>,
    refill: Receiver<()>,
    mem_size: u64,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    room: Arc<Room>,
}

impl Filler {
    /// At each request, destroys shells beyond the room, then makes shells
    /// until the pool is full or has no more room.
    fn run(&self) {
        while self.refill.recv().is_ok() {
            while self.tx.len() > self.room.limits().0 {
                drop(self.rx.try_recv());
            }
            while !self.tx.is_full() && self.tx.len() < self.room.limits().1 {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                match self.toolstack.shell(self.mem_size) {
                    Ok(shell) => {
                        self.counters.created.fetch_add(1, Ordering::Relaxed);
                        if self.tx.send(shell).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors or memory, say: spawns
                        // fall back to cold starts, which report the
                        // error; try again later.
                        tracing::warn!(error = %e, "cannot make a shell ahead of demand");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
    }
}

/// Templates by image fingerprint and memory size, built on first use.
#[derive(Debug, Default)]
pub struct Templates {
    built: Mutex<HashMap<(u64, u64), Arc<Template>>>,
}

/// Templates kept at most; past that, all are dropped and rebuilt on
/// demand (guests keep mapping a dropped template's pages).
const TEMPLATES_KEPT: usize = 64;

impl Templates {
    /// The template of `image` in `mem_size` bytes.
    pub fn get(&self, image: &Image, mem_size: u64) -> Result<Arc<Template>, BootError> {
        let key = (image.fingerprint(), mem_size);
        if let Some(template) = self.lock().get(&key) {
            return Ok(Arc::clone(template));
        }
        // Built outside the lock: two spawns racing build it twice, and one
        // copy wins.
        let template = Arc::new(Template::build(image, mem_size)?);
        let mut built = self.lock();
        if built.len() >= TEMPLATES_KEPT {
            built.clear();
        }
        Ok(Arc::clone(built.entry(key).or_insert(template)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), Arc<Template>>> {
        self.built.lock().unwrap_or_else(|e| e.into_inner())
    }
}
