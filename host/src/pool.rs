//! Guests made ahead of demand, LightVM's split toolstack: a filler thread
//! keeps a few *shells* ready (a VM with its blank memory registered and
//! its vCPU created, the slow part of starting a guest), and every image's
//! memory layout is built once into a [`Template`] that guests map
//! copy-on-write. Spawning a guest is then taking a shell, mapping the
//! template into it, writing its boot info and entering it.
//!
//! A guest's VM outlives the guest where it can ([`Recycler`]): the
//! filler resets it (new RAM, every translation dropped, the vCPU's state
//! put back) and keeps it ready beside the new shells, so that a host
//! whose guests come and go makes and destroys few VMs.
//! `SHOAL_NO_VM_REUSE=1` has every VM destroyed instead, to compare.

use crate::boot::{BootError, Template};
use crate::clock::{TscScale, rdtsc};
use crate::guest::SpawnError;
use crate::kvm::memory::GuestRam;
use crate::kvm::{Kvm, PristineState, Vcpu, Vm};
use crate::loader::{Fingerprint, Image};
use crossbeam_channel::{Receiver, Sender, bounded, select};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// A VM ready for a guest: blank RAM registered and vCPU 0 created, new
/// or reset after another guest ([`Toolstack::reset`]). Fields drop in
/// order: vCPU, VM, then RAM.
#[derive(Debug)]
pub struct Shell {
    /// The vCPU.
    pub vcpu: Vcpu,
    /// The VM.
    pub vm: Vm,
    /// Its RAM, all zero (or showing the template it last mapped, as
    /// new: see [`GuestRam::clear`]).
    pub ram: GuestRam,
    /// The vCPU's TSC minus the host's.
    pub tsc_offset: i64,
    /// What KVM's shadow page tables of the VM were built from.
    pub shadow: Shadow,
}

/// What the shadow page tables KVM keeps for a VM were built from. KVM
/// shadows the guest's page tables and does not see the host write them,
/// so a VM whose next guest starts with other tables must first have its
/// shadow tables dropped (the slot move of [`Vm::forget_all_translations`]);
/// one whose next guest starts with the very same tables need not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shadow {
    /// None of a guest's tables: the VM never ran a guest (a shell made
    /// ready for one holds only the empty root KVM built ahead of it:
    /// see [`Toolstack::prime`]), or they were all dropped.
    Empty,
    /// The tables of the template with this key, as every guest of it
    /// starts with them: the last guest never changed its tables.
    Template(u64),
    /// Tables a guest changed.
    Stale,
}

/// What every shell of a host shares.
#[derive(Debug)]
pub struct Toolstack {
    /// `/dev/kvm`.
    kvm: Kvm,
    /// The TSC frequency, learnt from the first vCPU.
    scale: OnceLock<TscScale>,
    /// The state of a vCPU that never ran, read from the first one.
    pristine: OnceLock<PristineState>,
}

impl Toolstack {
    /// A toolstack on `kvm`. Opens the process's pagemap now, from the
    /// thread that starts the host, for the resets that scan it later
    /// (without it they give RAM back whole).
    pub fn new(kvm: Kvm) -> Self {
        if let Err(e) = crate::kvm::pagemap::open() {
            tracing::warn!(error = %e, "cannot open the pagemap; resets give RAM back whole");
        }
        Self {
            kvm,
            scale: OnceLock::new(),
            pristine: OnceLock::new(),
        }
    }

    /// Creates a shell with `mem_size` bytes of RAM.
    pub fn shell(&self, mem_size: u64) -> Result<Shell, SpawnError> {
        let ram = GuestRam::new(mem_size)?;
        let vm = self.kvm.create_vm(&ram)?;
        let mut vcpu = vm.create_vcpu()?;
        if self.pristine.get().is_none()
            && let Ok(pristine) = vcpu.pristine()
        {
            let _ = self.pristine.set(pristine);
        }
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
            shadow: Shadow::Empty,
        })
    }

    /// Makes a guest's VM ready for another guest, as a new shell is: its
    /// RAM renewed (nothing of the old guest's memory stays, nor any
    /// translation of it), every other translation dropped by a slot move
    /// (shadow page tables built from the old guest's tables included),
    /// and the vCPU's state put back; what the guest attached beyond RAM
    /// (notification ports, the read-only alias) is taken off first. On an
    /// error the shell must be destroyed.
    ///
    /// If the guest left its template's page tables as they were, the
    /// RAM keeps the template mapped (its pages dropped, so it reads as
    /// the template and zero again) and KVM keeps its shadow tables of
    /// them, without the slot move's SRCU grace period: a next guest of
    /// the same template starts with the same tables, and
    /// [`crate::guest::Guest::create`] drops them for any other. Returns
    /// whether the shadow tables were kept.
    pub fn reset(&self, shell: &mut Shell) -> Result<bool, SpawnError> {
        let pristine = self.pristine.get().ok_or(SpawnError::Reset)?;
        shell.vm.detach_guest()?;
        // First, while the old guest's memory is still there: KVM
        // completes what its last exit left (a string `in` writes guest
        // memory through the guest's page tables, which a light reset
        // would have brought back for the next guest).
        shell.vcpu.reset(pristine)?;
        let kept = match shell.shadow {
            Shadow::Template(key) if shell.ram.overlay_key() == Some(key) => {
                shell.ram.clear()?;
                true
            }
            _ => {
                shell.ram.renew()?;
                shell.vm.forget_all_translations(&shell.ram)?;
                shell.shadow = Shadow::Empty;
                false
            }
        };
        Ok(kept)
    }

    /// Readies a shell that holds no translation (new, or reset with its
    /// RAM renewed) for a guest of `template` ahead of its spawn:
    /// maps the template into its RAM and sets the vCPU for it, then has
    /// KVM do what it does before a first entry ([`Vcpu::prepare_entry`]:
    /// its MMU caches, an empty shadow root, the VM's clock), where a
    /// spawn would wait for it. The shell stays new to a guest of another
    /// template: its spawn maps that one over the RAM and sets the vCPU
    /// again, and the root holds nothing to drop. On an error the shell
    /// must be destroyed.
    ///
    /// [`Vcpu::prepare_entry`]: crate::kvm::Vcpu::prepare_entry
    pub fn prime(&self, shell: &mut Shell, template: &Template) -> Result<(), SpawnError> {
        template.map(&mut shell.ram)?;
        shell.vcpu.setup(template.cpu(), true)?;
        shell.vcpu.prepare_entry()?;
        Ok(())
    }

    /// The TSC scale (known once a shell exists).
    pub fn scale(&self) -> TscScale {
        *self
            .scale
            .get_or_init(|| TscScale::measure(Duration::from_millis(20)))
    }
}

/// Shells of one memory size made ahead of demand by a filler thread,
/// and guests' VMs reset for the next guests.
///
/// Resetting a VM waits for an SRCU grace period (the slot move): done on
/// a spawn's path it measured slower than making a new VM, so the filler
/// does it, after the guest ended and before the next spawn asks.
#[derive(Debug)]
pub struct Pool {
    stop: Arc<AtomicBool>,
    ready: Option<Receiver<Shell>>,
    /// Guests' VMs reset for reuse, taken before new shells.
    reset: Option<Arc<Resets>>,
    /// Where guests' VMs go to be reset (`None`: no pool).
    used: Option<Sender<Shell>>,
    /// `SHOAL_NO_VM_REUSE=1` asked for every VM to be destroyed.
    no_reuse: bool,
    /// Asks the filler to top the pool up.
    refill: Option<Sender<()>>,
    mem_size: u64,
    counters: Arc<Counters>,
    /// Most shells worth keeping now, and most the filler may make up to
    /// (see [`Pool::set_room`]).
    room: Arc<Room>,
    /// The template of the last spawn, which new shells are made ready for.
    last: Arc<LastTemplate>,
    filler: Option<JoinHandle<()>>,
}

/// The template new shells are primed with ([`Toolstack::prime`]): the
/// last one a spawn of the pool's memory size asked for.
#[derive(Debug, Default)]
struct LastTemplate(Mutex<Option<Arc<Template>>>);

impl LastTemplate {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Template>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, template: &Arc<Template>) {
        let mut last = self.lock();
        if last.as_ref().is_none_or(|t| t.key() != template.key()) {
            *last = Some(Arc::clone(template));
        }
    }

    fn get(&self) -> Option<Arc<Template>> {
        self.lock().clone()
    }
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
    primed: AtomicU64,
    misses: AtomicU64,
    recycled: AtomicU64,
    tables_kept: AtomicU64,
    reused: AtomicU64,
}

/// What a pool holds and has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolStatus {
    /// Shells ready now: new ones and guests' VMs reset.
    pub ready: usize,
    /// Of those, guests' VMs reset.
    pub ready_reset: usize,
    /// Most new shells kept ready (as many reset VMs may wait beside them).
    pub capacity: usize,
    /// Shells the filler made.
    pub created: u64,
    /// Shells made ready for the template of the spawn before
    /// ([`Toolstack::prime`]): new ones, and reset VMs whose RAM was
    /// renewed.
    pub primed: u64,
    /// Spawns that found no shell ready (or asked for another memory size)
    /// and made their VM themselves.
    pub misses: u64,
    /// Guests' VMs the filler reset for another guest.
    pub recycled: u64,
    /// Of those, VMs whose shadow page tables were kept, their last
    /// guest having left its template's tables unchanged.
    pub tables_kept: u64,
    /// Spawns that took a reset VM.
    pub reused: u64,
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
        let last = Arc::new(LastTemplate::default());
        if capacity == 0 {
            return Ok(Self {
                stop: Arc::default(),
                ready: None,
                reset: None,
                used: None,
                no_reuse: false,
                refill: None,
                mem_size,
                counters,
                room,
                last,
                filler: None,
            });
        }
        let (tx, rx) = bounded(capacity);
        let resets = Arc::new(Resets {
            shells: Mutex::default(),
            capacity,
        });
        let (used, used_rx) = bounded(capacity);
        let no_reuse = std::env::var_os("SHOAL_NO_VM_REUSE").is_some_and(|v| v == "1");
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
                    resets: Arc::clone(&resets),
                    used: used_rx,
                    refill: refill_rx,
                    mem_size,
                    stop: Arc::clone(&stop),
                    counters: Arc::clone(&counters),
                    room: Arc::clone(&room),
                    last: Arc::clone(&last),
                };
                move || {
                    crate::seccomp::confine_or_warn(crate::seccomp::Kind::Filler);
                    filler.run()
                }
            })?;
        Ok(Self {
            stop,
            ready: Some(rx),
            reset: Some(resets),
            used: Some(used),
            no_reuse,
            refill: Some(refill),
            mem_size,
            counters,
            room,
            last,
            filler: Some(filler),
        })
    }

    /// A ready shell for a guest of `template`, if there is one (the
    /// pool holds shells of one memory size only): a reset VM first, one
    /// that needs nothing more for this template if there is one (it kept
    /// this template's shadow tables, or none), else the oldest (whose
    /// spawn then remaps its RAM and drops another template's shadow
    /// tables: see [`Shadow`]); else a new one, made ready for the
    /// template of the spawn before. New shells are made ready for this
    /// template from now on.
    pub fn take(&self, template: &Arc<Template>) -> Option<Shell> {
        let ready = self.ready.as_ref()?;
        let (mem_size, key) = (template.mem_size(), template.key());
        if mem_size == self.mem_size {
            self.last.set(template);
        }
        let resets = self.reset.as_deref();
        let reused = |shell: Option<Shell>| {
            if shell.is_some() {
                self.counters.reused.fetch_add(1, Ordering::Relaxed);
            }
            shell
        };
        let shell = if mem_size == self.mem_size {
            reused(resets.and_then(|r| {
                r.take(|s| *s == Shadow::Template(key) || *s == Shadow::Empty)
                    .or_else(|| r.take(|_| true))
            }))
            .or_else(|| ready.try_recv().ok())
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

    /// Keeps at most `room` new shells ready (never more than the
    /// capacity), and as many reset VMs: a shard with room for only a few
    /// more guests keeps only that many VMs of each kind waiting, and none
    /// once it is full. The filler destroys shells beyond a smaller room
    /// at once; it fills a larger room at the next spawn (guests ending do
    /// not make VMs nobody may ask for).
    pub fn set_room(&self, room: usize) {
        let before = self.room.keep.swap(room, Ordering::Relaxed);
        self.room.fill.fetch_min(room, Ordering::Relaxed);
        if room < before
            && let Some(refill) = &self.refill
        {
            let _ = refill.try_send(());
        }
    }

    /// Where the guests given shells of this pool hand their VMs when
    /// they end (`None`: the pool keeps no shells).
    pub fn recycler(&self) -> Option<Recycler> {
        if self.no_reuse {
            return None;
        }
        Some(Recycler {
            used: self.used.clone()?,
            mem_size: self.mem_size,
        })
    }

    /// What the pool holds and has done.
    pub fn status(&self) -> PoolStatus {
        let ready_reset = self.reset.as_deref().map_or(0, Resets::len);
        PoolStatus {
            ready: self.ready.as_ref().map_or(0, Receiver::len) + ready_reset,
            ready_reset,
            capacity: self
                .ready
                .as_ref()
                .and_then(Receiver::capacity)
                .unwrap_or(0),
            created: self.counters.created.load(Ordering::Relaxed),
            primed: self.counters.primed.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            recycled: self.counters.recycled.load(Ordering::Relaxed),
            tables_kept: self.counters.tables_kept.load(Ordering::Relaxed),
            reused: self.counters.reused.load(Ordering::Relaxed),
        }
    }
}

/// Guests' VMs reset for reuse, oldest first.
#[derive(Debug)]
struct Resets {
    shells: Mutex<VecDeque<Shell>>,
    capacity: usize,
}

impl Resets {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Shell>> {
        self.shells.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `shell`, if there is room (else destroys it, outside the
    /// lock).
    fn push(&self, shell: Shell) -> bool {
        let refused = {
            let mut shells = self.lock();
            if shells.len() >= self.capacity {
                Some(shell)
            } else {
                shells.push_back(shell);
                None
            }
        };
        refused.is_none()
    }

    /// The oldest shell whose shadow tables `fits`.
    fn take(&self, fits: impl Fn(&Shadow) -> bool) -> Option<Shell> {
        let mut shells = self.lock();
        let at = shells.iter().position(|s| fits(&s.shadow))?;
        shells.remove(at)
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Where an ended guest's VM goes: to its pool's filler, to be reset for
/// another guest, when it can be reused; destroyed otherwise.
#[derive(Clone, Debug)]
pub struct Recycler {
    used: Sender<Shell>,
    mem_size: u64,
}

impl Recycler {
    /// Hands over the VM, vCPU and RAM of a guest that is over (no vCPU
    /// runs, nothing looks at its RAM, its devices are detached). A VM of
    /// another memory size than the pool's, or beyond what the filler has
    /// waiting, is destroyed here.
    pub fn give(&self, shell: Shell) {
        if shell.ram.size() == self.mem_size {
            let _ = self.used.try_send(shell);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the refill channel ends the filler's wait; the flag
        // stops it in the middle of filling.
        self.stop.store(true, Ordering::Release);
        self.ready = None;
        self.reset = None;
        self.used = None;
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
    /// Reset VMs.
    resets: Arc<Resets>,
    /// Guests' VMs to reset.
    used: Receiver<Shell>,
    refill: Receiver<()>,
    mem_size: u64,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    room: Arc<Room>,
    last: Arc<LastTemplate>,
}

impl Filler {
    /// Resets each VM that guests hand back, and at each request destroys
    /// shells beyond the room, then makes shells until the pool is full
    /// or has no more room. Until the pool is dropped.
    fn run(&self) {
        loop {
            select! {
                recv(self.used) -> shell => match shell {
                    Ok(shell) => self.recycle(shell),
                    Err(_) => return,
                },
                recv(self.refill) -> request => {
                    if request.is_err() || !self.top_up() {
                        return;
                    }
                }
            }
        }
    }

    /// Resets a guest's VM and keeps it ready, if there is room for it
    /// (else it is destroyed).
    fn recycle(&self, mut shell: Shell) {
        if self.stop.load(Ordering::Acquire) || self.resets.len() >= self.room.limits().0 {
            return;
        }
        let reset = self.toolstack.reset(&mut shell).and_then(|kept| {
            // RAM renewed and every translation dropped: made ready for
            // the last spawn's image as a new shell is.
            if !kept && let Some(template) = self.last.get() {
                self.toolstack.prime(&mut shell, &template)?;
                self.counters.primed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(kept)
        });
        match reset {
            // Counted once it can be taken.
            Ok(kept) => {
                if self.resets.push(shell) {
                    self.counters.recycled.fetch_add(1, Ordering::Relaxed);
                    if kept {
                        self.counters.tables_kept.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reset a VM for reuse; destroyed"),
        }
    }

    /// Destroys shells beyond the room, then makes new ones up to it,
    /// resetting guests' VMs first as they come. `false`: the pool is
    /// being dropped.
    fn top_up(&self) -> bool {
        let keep = self.room.limits().0;
        while self.tx.len() > keep {
            drop(self.rx.try_recv());
        }
        while self.resets.len() > keep {
            drop(self.resets.take(|_| true));
        }
        while !self.tx.is_full() && self.tx.len() < self.room.limits().1 {
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            while let Ok(shell) = self.used.try_recv() {
                self.recycle(shell);
            }
            match self.toolstack.shell(self.mem_size) {
                Ok(mut shell) => {
                    self.counters.created.fetch_add(1, Ordering::Relaxed);
                    if let Some(template) = self.last.get() {
                        if let Err(e) = self.toolstack.prime(&mut shell, &template) {
                            tracing::warn!(error = %e, "cannot make a shell ready for a template; destroyed");
                            continue;
                        }
                        self.counters.primed.fetch_add(1, Ordering::Relaxed);
                    }
                    if self.tx.send(shell).is_err() {
                        return false;
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
        true
    }
}

/// Templates by image fingerprint and memory size, built on first use.
#[derive(Debug, Default)]
pub struct Templates {
    built: Mutex<HashMap<(Fingerprint, u64), Arc<Template>>>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Fingerprint, u64), Arc<Template>>> {
        self.built.lock().unwrap_or_else(|e| e.into_inner())
    }
}
