//! The paravirtual MMU: a guest changes its page tables only by asking
//! the host (`mmu_update`), Xen-PV style, and takes and gives back frames
//! (`frame_alloc`, `frame_free`).
//!
//! The host keeps its own copy of the guest's tables (the template's,
//! copied on the guest's first call) and a count of the mappings of every
//! guest frame. A batch is checked whole against the rules before any of
//! it is applied; then the host edits its copy, writes the changed entries
//! into the guest's table frames, and makes KVM forget the translations
//! that the change took away.
//!
//! Visibility on a shadow-paging KVM: KVM does not see the host's own
//! writes to guest page tables, so a shadow entry for a page whose mapping
//! was removed or changed would survive. The host makes KVM drop every
//! shadow entry that points at the *old* frame, through the MMU notifier
//! (an `mprotect` round trip on the frame's host page). New mappings need
//! nothing: a not-present entry is never cached, so the guest's first
//! access faults into KVM, which reads the new entry. Every other change
//! of a present entry, widened permissions included, drops the old
//! frame's translations: on hardware KVM (EPT/NPT) the same notifier call
//! flushes the guest's TLB for those frames, where a stale narrower entry
//! could otherwise raise a spurious fault in the guest.
//!
//! Each notifier call costs every VM in the process a little and holds
//! the process's mapping lock, so a batch that drops many separate frames,
//! or a guest that has spent its notifier budget, drops instead every
//! translation of its own VM by moving a memory slot: one ioctl whose cost
//! (rebuilding its translations) falls on that guest alone ([`Forget`]).

use crate::boot::paging::{
    ACCESSED, ADDR_MASK, DIRTY, NO_EXECUTE, PRESENT, PageTables, PagingError, USER, WRITABLE,
};
use crate::kvm::memory::{GuestRam, MemoryError};
use crate::kvm::vm::{Vm, VmError};
use crate::limits::RateWindow;
use crate::stats::GuestStats;
use shoal_abi::HypercallError;
use shoal_abi::hypercall::{
    MMU_BATCH_MAX, MMU_EXEC, MMU_MAP, MMU_PROTECT, MMU_UNMAP, MMU_VADDR_END, MMU_VADDR_START,
    MMU_WRITE, MmuRequest,
};
use shoal_abi::layout::{
    IMAGE_BASE, PAGE_SIZE, PAGE_TABLE_AREA_END, PAGE_TABLE_AREA_START, TRAPPED_TABLES_WINDOW,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// A refused request: its index in the batch and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Index of the request (`usize::MAX` for the call as a whole).
    pub index: usize,
    /// The error code the guest gets.
    pub error: HypercallError,
}

/// The host failed to apply a checked batch (a host bug or the host out
/// of memory): the guest cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum MmuFailure {
    /// Editing the tables failed.
    #[error("page-table update failed: {0}")]
    Paging(#[from] PagingError),
    /// Changing the host mapping of guest RAM failed.
    #[error("page-table update failed: {0}")]
    Memory(#[from] MemoryError),
    /// Moving the flush slot failed.
    #[error("page-table update failed: {0}")]
    Kvm(#[from] VmError),
}

/// How the host makes KVM drop the translations a change took away (and
/// whether frames given back return their host memory at once, which
/// calls the same notifier).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
pub enum Forget {
    /// The notifier for up to [`NOTIFIER_RUNS_MAX`] runs of frames a batch
    /// while the guest's notifier budget lasts, else the slot move.
    #[default]
    Auto,
    /// Always the MMU notifier: an `mprotect` pair per run of frames.
    Notifier,
    /// Always the slot move: every translation of the guest's VM; frames
    /// given back keep their host memory.
    SlotMove,
}

/// Most runs of old frames one batch drops through the notifier
/// ([`Forget::Auto`]); a batch with more moves the slot.
pub const NOTIFIER_RUNS_MAX: usize = 8;
/// Notifier calls (runs) a guest may make per [`BUDGET_WINDOW_NS`]
/// ([`Forget::Auto`]); past it, its changes move the slot until the
/// window ends.
pub const NOTIFIER_BUDGET: u32 = 500;
/// The window of [`NOTIFIER_BUDGET`].
pub const BUDGET_WINDOW_NS: u64 = 1_000_000_000;

/// What dropping translations needs: the guest's RAM (for the notifier),
/// its VM (for the slot move; none in unit tests, which then always use
/// the notifier), its counters and the time (for the budget).
#[derive(Clone, Copy)]
pub struct Translations<'a> {
    /// The guest's RAM.
    pub ram: &'a GuestRam,
    /// Its VM.
    pub vm: Option<&'a Vm>,
    /// Its counters.
    pub stats: &'a GuestStats,
    /// The guest's clock now.
    pub now_ns: u64,
    /// Held for reading by the guest's device thread while it touches
    /// guest RAM, if the guest has devices: the notifier's `mprotect`
    /// makes frames read-only for a moment, so it runs only with this
    /// held for writing, and a busy device makes the change move the slot
    /// instead.
    pub device_gate: Option<&'a std::sync::RwLock<()>>,
}

/// A guest's notifier budget: [`NOTIFIER_BUDGET`] calls per
/// [`BUDGET_WINDOW_NS`].
fn notifier_budget() -> RateWindow {
    RateWindow::per(u64::from(NOTIFIER_BUDGET), BUDGET_WINDOW_NS)
}

/// A guest's MMU state: the template's tables until the guest first asks
/// for a change, then its own.
#[derive(Debug)]
pub struct GuestMmu {
    template: Arc<PageTables>,
    overlay_len: u64,
    forget: Forget,
    own: Option<Box<Mmu>>,
}

impl GuestMmu {
    /// A guest that starts with `template`'s tables, whose RAM maps the
    /// template file over its first `overlay_len` bytes, and whose stale
    /// translations are dropped as `forget` says.
    pub fn new(template: Arc<PageTables>, overlay_len: u64, forget: Forget) -> Self {
        Self {
            template,
            overlay_len,
            forget,
            own: None,
        }
    }

    /// Whether the guest still has its template's tables, untouched.
    pub fn is_template(&self) -> bool {
        self.own.is_none()
    }

    /// The guest's own state, set up on first use.
    pub fn active(&mut self, mem_size: u64) -> &mut Mmu {
        let (template, overlay_len, forget) = (&self.template, self.overlay_len, self.forget);
        self.own.get_or_insert_with(|| {
            let mut mmu = Mmu::new(PageTables::clone(template), overlay_len, mem_size);
            mmu.forget = forget;
            Box::new(mmu)
        })
    }
}

/// Mapping count of a frame given back with `frame_free`.
const FREE: u32 = u32::MAX;

/// Guest-physical address of the read-only alias of the page-table area
/// that the trap-and-emulate window maps: outside RAM, and below 2^36,
/// the physical address width KVM gives a guest without CPUID.
pub const TABLES_ALIAS: u64 = 1 << 35;
/// Bytes of the page-table area, and of its alias and window.
pub const TABLES_LEN: u64 = PAGE_TABLE_AREA_END - PAGE_TABLE_AREA_START;

/// A guest's own page tables and frames.
#[derive(Debug)]
pub struct Mmu {
    tables: PageTables,
    /// Mappings of each frame `IMAGE_BASE..mem_size`, or [`FREE`].
    maps: Vec<u32>,
    /// Frames given back, oldest first.
    free: VecDeque<u64>,
    overlay_len: u64,
    /// Whether the trap-and-emulate window is open.
    window: bool,
    /// Leaf tables by frame: the first virtual address each maps (found
    /// again when a trapped write names a table not seen yet).
    leaf_tables: HashMap<u64, u64>,
    forget: Forget,
    budget: RateWindow,
}

/// What one checked request does.
struct Change {
    vaddr: u64,
    entry: Entry,
}

/// The new leaf: a whole entry, none, or the old frame with new flag bits.
enum Entry {
    Map(u64),
    Unmap,
    Protect(u64),
}

impl Mmu {
    fn new(tables: PageTables, overlay_len: u64, mem_size: u64) -> Self {
        let frames = mem_size.saturating_sub(IMAGE_BASE) / PAGE_SIZE;
        let mut mmu = Self {
            tables,
            maps: vec![0; frames as usize],
            free: VecDeque::new(),
            overlay_len,
            window: false,
            leaf_tables: HashMap::new(),
            forget: Forget::default(),
            budget: notifier_budget(),
        };
        for (_, entry) in mmu.tables.leaves() {
            if let Some(slot) = mmu.slot(entry & ADDR_MASK) {
                mmu.maps[slot] += 1;
            }
        }
        mmu
    }

    /// The index of guest frame `frame` in `maps`, if it is one.
    fn slot(&self, frame: u64) -> Option<usize> {
        let index = frame.checked_sub(IMAGE_BASE)? / PAGE_SIZE;
        (frame.is_multiple_of(PAGE_SIZE) && index < self.maps.len() as u64)
            .then_some(index as usize)
    }

    /// Frames given back and not taken again.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Checks `requests` whole, then applies them, writes the changed
    /// entries into the guest's RAM and drops stale translations. Returns
    /// the number applied.
    pub fn update(
        &mut self,
        at: Translations<'_>,
        requests: &[MmuRequest],
    ) -> Result<Result<usize, Refused>, MmuFailure> {
        let changes = match self.check(requests) {
            Ok(changes) => changes,
            Err(refused) => return Ok(Err(refused)),
        };
        let mut stale = Vec::new();
        for change in &changes {
            let old = self.tables.leaf(change.vaddr);
            let new = match change.entry {
                Entry::Map(entry) => entry,
                Entry::Unmap => 0,
                Entry::Protect(flags) => (old & ADDR_MASK) | flags,
            };
            self.tables.set_leaf(change.vaddr, new)?;
            if new & PRESENT != 0
                && let Some(slot) = self.slot(new & ADDR_MASK)
            {
                self.maps[slot] += 1;
            }
            if old & PRESENT != 0 {
                if let Some(slot) = self.slot(old & ADDR_MASK) {
                    self.maps[slot] -= 1;
                }
                // Any change may leave a cached translation that
                // disagrees with the new entry. A widened permission would
                // only fault into KVM under shadow paging, but on hardware
                // paging the guest's TLB may keep the narrower entry and
                // the CPU raise the fault in the guest.
                if old != new {
                    stale.push(old & ADDR_MASK);
                }
            }
        }
        self.tables.write_dirty(at.ram)?;
        self.forget_stale(at, stale)?;
        Ok(Ok(changes.len()))
    }

    /// Makes KVM drop its translations of the `stale` frames, the way
    /// [`Forget`] says.
    fn forget_stale(&mut self, at: Translations<'_>, stale: Vec<u64>) -> Result<(), MmuFailure> {
        let runs = runs(stale);
        if runs.is_empty() {
            return Ok(());
        }
        let gate = at.device_gate.map(|gate| gate.try_write());
        let device_busy = matches!(gate, Some(Err(_)));
        match at.vm {
            Some(vm) if device_busy || !self.notifier_for(runs.len(), at.now_ns) => {
                vm.forget_all_translations(at.ram)?;
                at.stats.count_slot_move();
            }
            _ => {
                at.stats.count_notifier_calls(runs.len());
                for (start, len) in runs {
                    at.ram.forget_translations(start, len)?;
                }
            }
        }
        Ok(())
    }

    /// Whether `runs` runs of frames go through the MMU notifier now (and
    /// are counted against the budget).
    fn notifier_for(&mut self, runs: usize, now_ns: u64) -> bool {
        match self.forget {
            Forget::Notifier => true,
            Forget::SlotMove => false,
            Forget::Auto => runs <= NOTIFIER_RUNS_MAX && self.budget.allow_n(runs as u64, now_ns),
        }
    }

    /// Checks every request against the rules and the state the earlier
    /// requests of the batch leave.
    fn check(&self, requests: &[MmuRequest]) -> Result<Vec<Change>, Refused> {
        let whole = |error| Refused {
            index: usize::MAX,
            error,
        };
        if requests.len() > MMU_BATCH_MAX as usize {
            return Err(whole(HypercallError::Invalid));
        }
        // Addresses the batch maps (true) or unmaps (false) before a request.
        let mut mapped: HashMap<u64, bool> = HashMap::new();
        let mut new_tables: HashSet<(u32, u64)> = HashSet::new();
        let mut changes = Vec::with_capacity(requests.len());
        for (index, request) in requests.iter().enumerate() {
            let refuse = |error| Refused { index, error };
            let vaddr = request.vaddr;
            if !vaddr.is_multiple_of(PAGE_SIZE) {
                return Err(refuse(HypercallError::Invalid));
            }
            let in_window = (TRAPPED_TABLES_WINDOW..TRAPPED_TABLES_WINDOW + TABLES_LEN)
                .contains(&vaddr)
                && self.window;
            if !(MMU_VADDR_START..MMU_VADDR_END).contains(&vaddr) || in_window {
                return Err(refuse(HypercallError::Denied));
            }
            let is_mapped = *mapped
                .entry(vaddr)
                .or_insert_with(|| self.tables.leaf(vaddr) & PRESENT != 0);
            let entry = match request.op {
                MMU_MAP => {
                    let flags = leaf_flags(request.flags).ok_or(refuse(HypercallError::Invalid))?;
                    let frame = request.frame;
                    if !frame.is_multiple_of(PAGE_SIZE) {
                        return Err(refuse(HypercallError::Invalid));
                    }
                    match self.slot(frame) {
                        Some(slot) if self.maps[slot] != FREE => {}
                        _ => return Err(refuse(HypercallError::Denied)),
                    }
                    let needed = self.tables.tables_needed(vaddr);
                    for level in [39, 30, 21].into_iter().skip(3 - needed as usize) {
                        new_tables.insert((level, vaddr >> level));
                    }
                    if new_tables.len() as u64 > self.tables.frames_left() {
                        return Err(refuse(HypercallError::LimitExceeded));
                    }
                    mapped.insert(vaddr, true);
                    Entry::Map(frame | flags)
                }
                MMU_UNMAP if request.flags == 0 && request.frame == 0 && is_mapped => {
                    mapped.insert(vaddr, false);
                    Entry::Unmap
                }
                MMU_PROTECT if request.frame == 0 && is_mapped => {
                    let flags = leaf_flags(request.flags).ok_or(refuse(HypercallError::Invalid))?;
                    Entry::Protect(flags)
                }
                _ => return Err(refuse(HypercallError::Invalid)),
            };
            changes.push(Change { vaddr, entry });
        }
        Ok(changes)
    }

    /// Opens the trap-and-emulate window: maps [`TRAPPED_TABLES_WINDOW`]
    /// to the alias of the page-table area at [`TABLES_ALIAS`], writable in
    /// the page tables so that a write reaches KVM, whose read-only memslot
    /// there turns it into an MMIO exit for [`Mmu::trapped_write`].
    pub fn open_window(&mut self, ram: &GuestRam) -> Result<(), MmuFailure> {
        let flags = PRESENT | WRITABLE | USER | NO_EXECUTE | ACCESSED | DIRTY;
        for offset in (0..TABLES_LEN).step_by(PAGE_SIZE as usize) {
            let entry = (TABLES_ALIAS + offset) | flags;
            self.tables
                .set_leaf(TRAPPED_TABLES_WINDOW + offset, entry)?;
        }
        self.tables.write_dirty(ram)?;
        self.window = true;
        Ok(())
    }

    /// Serves a trapped write of `len` bytes of `value` at guest-physical
    /// `addr` in the alias: an aligned 8-byte write of a leaf entry
    /// becomes the `map` or `unmap` it asks for, checked and applied like
    /// one `mmu_update` request (a zero written over a zero changes
    /// nothing). Anything else is refused.
    pub fn trapped_write(
        &mut self,
        at: Translations<'_>,
        addr: u64,
        len: u32,
        value: u64,
    ) -> Result<Result<(), HypercallError>, MmuFailure> {
        let offset = match addr.checked_sub(TABLES_ALIAS) {
            Some(offset) if self.window && offset < TABLES_LEN && len == 8 => offset,
            _ => return Ok(Err(HypercallError::Denied)),
        };
        if !offset.is_multiple_of(8) {
            return Ok(Err(HypercallError::Invalid));
        }
        let table = PAGE_TABLE_AREA_START + offset / PAGE_SIZE * PAGE_SIZE;
        if !self.leaf_tables.contains_key(&table) {
            self.leaf_tables = self.tables.leaf_tables().into_iter().collect();
        }
        let Some(base) = self.leaf_tables.get(&table) else {
            return Ok(Err(HypercallError::Denied));
        };
        let vaddr = base | ((offset % PAGE_SIZE / 8) << 12);
        let known = PRESENT | WRITABLE | USER | ACCESSED | DIRTY | NO_EXECUTE | ADDR_MASK;
        let request = if value & PRESENT == 0 {
            if value != 0 {
                return Ok(Err(HypercallError::Invalid));
            }
            if self.tables.leaf(vaddr) & PRESENT == 0 {
                return Ok(Ok(()));
            }
            MmuRequest {
                op: MMU_UNMAP,
                flags: 0,
                vaddr,
                frame: 0,
            }
        } else {
            if value & !known != 0 || value & USER == 0 {
                return Ok(Err(HypercallError::Invalid));
            }
            let write = if value & WRITABLE != 0 { MMU_WRITE } else { 0 };
            let exec = if value & NO_EXECUTE == 0 { MMU_EXEC } else { 0 };
            MmuRequest {
                op: MMU_MAP,
                flags: write | exec,
                vaddr,
                frame: value & ADDR_MASK,
            }
        };
        Ok(self
            .update(at, &[request])?
            .map(|_| ())
            .map_err(|r| r.error))
    }

    /// Takes `count` free frames, zeroed, oldest given back first.
    ///
    /// The frames are scrubbed here rather than when given back: hypercall
    /// results may have been written into a free frame since (hypercall
    /// pointers are guest-physical and reach every guest frame).
    pub fn alloc(
        &mut self,
        ram: &GuestRam,
        count: usize,
    ) -> Result<Result<Vec<u64>, HypercallError>, MmuFailure> {
        if count > MMU_BATCH_MAX as usize {
            return Ok(Err(HypercallError::Invalid));
        }
        if count > self.free.len() {
            return Ok(Err(HypercallError::LimitExceeded));
        }
        let frames: Vec<u64> = self.free.drain(..count).collect();
        self.scrub(ram, &frames)?;
        for frame in &frames {
            if let Some(slot) = self.slot(*frame) {
                self.maps[slot] = 0;
            }
        }
        Ok(Ok(frames))
    }

    /// Zeroes `frames` by writing: no notifier call, and a frame whose
    /// host page was given back reads as zero and is left alone (reading
    /// it maps nothing new).
    fn scrub(&self, ram: &GuestRam, frames: &[u64]) -> Result<(), MmuFailure> {
        let zeros = [0u8; PAGE_SIZE as usize];
        let mut page = [0u8; PAGE_SIZE as usize];
        for &frame in frames {
            ram.read_host(frame, &mut page)?;
            if page != zeros {
                ram.write_host(frame, &zeros)?;
            }
        }
        Ok(())
    }

    /// Checks that `frames` may all be given back, then makes them free,
    /// returning the host memory of those in anonymous RAM at once when
    /// they make few runs and the notifier budget allows (they are
    /// scrubbed when taken again either way).
    pub fn give_back(
        &mut self,
        at: Translations<'_>,
        frames: &[u64],
    ) -> Result<Result<(), HypercallError>, MmuFailure> {
        if frames.len() > MMU_BATCH_MAX as usize {
            return Ok(Err(HypercallError::Invalid));
        }
        let mut seen = HashSet::with_capacity(frames.len());
        for frame in frames {
            let Some(slot) = self.slot(*frame) else {
                return Ok(Err(if frame.is_multiple_of(PAGE_SIZE) {
                    HypercallError::Denied
                } else {
                    HypercallError::Invalid
                }));
            };
            if self.maps[slot] != 0 || !seen.insert(*frame) {
                return Ok(Err(HypercallError::Invalid));
            }
        }
        let anonymous = frames.iter().copied().filter(|f| *f >= self.overlay_len);
        let runs = runs(anonymous.collect());
        if self.notifier_for(runs.len(), at.now_ns) {
            at.stats.count_notifier_calls(runs.len());
            for (start, len) in runs {
                at.ram.discard(start, len)?;
            }
        }
        for frame in frames {
            if let Some(slot) = self.slot(*frame) {
                self.maps[slot] = FREE;
            }
            self.free.push_back(*frame);
        }
        Ok(Ok(()))
    }
}

/// The leaf bits for ABI `flags`, if they are all known.
fn leaf_flags(flags: u32) -> Option<u64> {
    if flags & !(MMU_WRITE | MMU_EXEC) != 0 {
        return None;
    }
    let mut bits = PRESENT | USER | ACCESSED;
    if flags & MMU_WRITE != 0 {
        bits |= WRITABLE | DIRTY;
    }
    if flags & MMU_EXEC == 0 {
        bits |= NO_EXECUTE;
    }
    Some(bits)
}

/// Frames sorted and merged into contiguous (start, length) runs.
fn runs(mut frames: Vec<u64>) -> Vec<(u64, u64)> {
    frames.sort_unstable();
    frames.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for frame in frames {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == frame => *len += PAGE_SIZE,
            _ => runs.push((frame, PAGE_SIZE)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 4 << 20;

    fn mmu() -> (Mmu, GuestRam) {
        let mut tables = PageTables::new();
        tables
            .identity(IMAGE_BASE, IMAGE_BASE + 4 * PAGE_SIZE, USER | WRITABLE)
            .expect("maps");
        (Mmu::new(tables, 0, MEM), GuestRam::new(MEM).expect("maps"))
    }

    static STATS: std::sync::LazyLock<GuestStats> = std::sync::LazyLock::new(GuestStats::default);

    fn at(ram: &GuestRam) -> Translations<'_> {
        Translations {
            ram,
            vm: None,
            stats: &STATS,
            now_ns: 0,
            device_gate: None,
        }
    }

    fn request(op: u32, flags: u32, vaddr: u64, frame: u64) -> MmuRequest {
        MmuRequest {
            op,
            flags,
            vaddr,
            frame,
        }
    }

    #[test]
    fn the_notifier_budget_refills_each_window() {
        let mut budget = notifier_budget();
        assert!(budget.allow_n(u64::from(NOTIFIER_BUDGET) - 1, 0));
        assert!(budget.allow_n(1, 10));
        assert!(!budget.allow_n(1, BUDGET_WINDOW_NS - 1));
        assert!(budget.allow_n(3, BUDGET_WINDOW_NS));
        assert!(!budget.allow_n(u64::from(NOTIFIER_BUDGET), BUDGET_WINDOW_NS + 1));
        assert!(!budget.allow_n(u64::MAX, 5 * BUDGET_WINDOW_NS));
    }

    #[test]
    fn many_separate_frames_or_a_spent_budget_move_the_slot() {
        let (mut mmu, _ram) = mmu();
        assert!(mmu.notifier_for(NOTIFIER_RUNS_MAX, 0));
        assert!(!mmu.notifier_for(NOTIFIER_RUNS_MAX + 1, 0));
        let mut left = NOTIFIER_BUDGET as usize - NOTIFIER_RUNS_MAX;
        while left > 0 {
            assert!(mmu.notifier_for(left.min(NOTIFIER_RUNS_MAX), 1));
            left -= left.min(NOTIFIER_RUNS_MAX);
        }
        assert!(!mmu.notifier_for(1, 2));
        mmu.forget = Forget::Notifier;
        assert!(mmu.notifier_for(MMU_BATCH_MAX as usize, 3));
        mmu.forget = Forget::SlotMove;
        assert!(!mmu.notifier_for(1, BUDGET_WINDOW_NS * 2));
    }

    #[test]
    fn initial_mappings_are_counted() {
        let (mmu, _ram) = mmu();
        assert_eq!(mmu.maps[..5], [1, 1, 1, 1, 0]);
    }

    #[test]
    fn a_refused_request_leaves_the_whole_batch_unapplied() {
        let (mut mmu, ram) = mmu();
        let v = 0x4000_0000;
        let batch = [
            request(MMU_MAP, MMU_WRITE, v, IMAGE_BASE),
            request(MMU_MAP, 0, v + PAGE_SIZE, 0x3000),
        ];
        let got = mmu.update(at(&ram), &batch).expect("no host failure");
        assert_eq!(
            got,
            Err(Refused {
                index: 1,
                error: HypercallError::Denied
            })
        );
        assert_eq!(mmu.tables.leaf(v), 0);
        assert_eq!(mmu.maps[0], 1);
    }

    #[test]
    fn map_unmap_protect_update_entries_and_counts() {
        let (mut mmu, ram) = mmu();
        let v = 0x4000_0000;
        let batch = [
            request(MMU_MAP, MMU_WRITE, v, IMAGE_BASE + 4 * PAGE_SIZE),
            request(MMU_PROTECT, 0, v, 0),
            request(MMU_MAP, MMU_EXEC, v + PAGE_SIZE, IMAGE_BASE),
            request(MMU_UNMAP, 0, IMAGE_BASE + PAGE_SIZE, 0),
        ];
        assert_eq!(mmu.update(at(&ram), &batch).expect("applies"), Ok(4));
        let leaf = mmu.tables.leaf(v);
        assert_eq!(leaf & ADDR_MASK, IMAGE_BASE + 4 * PAGE_SIZE);
        assert_eq!(leaf & (WRITABLE | NO_EXECUTE), NO_EXECUTE);
        assert_eq!(mmu.tables.leaf(v + PAGE_SIZE) & NO_EXECUTE, 0);
        assert_eq!(mmu.maps[..5], [2, 0, 1, 1, 1]);
        // The entries reached guest RAM.
        let mut bytes = [0u8; 8];
        let (_, (table, index)) = mmu.tables.set_leaf(v, leaf).expect("same entry");
        ram.read_host(table + index as u64 * 8, &mut bytes)
            .expect("reads");
        assert_eq!(u64::from_le_bytes(bytes), leaf);
    }

    #[test]
    fn rules_refuse_what_is_not_the_guests() {
        let (mut mmu, ram) = mmu();
        let v = 0x4000_0000;
        let cases = [
            (request(MMU_MAP, 0, v, 0x1_0000), HypercallError::Denied),
            (request(MMU_MAP, 0, v, MEM), HypercallError::Denied),
            (
                request(MMU_MAP, 0, 0x2000, IMAGE_BASE),
                HypercallError::Denied,
            ),
            (
                request(MMU_MAP, 0, 1 << 47, IMAGE_BASE),
                HypercallError::Denied,
            ),
            (
                request(MMU_MAP, 0, v + 1, IMAGE_BASE),
                HypercallError::Invalid,
            ),
            (
                request(MMU_MAP, 0, v, IMAGE_BASE + 1),
                HypercallError::Invalid,
            ),
            (request(MMU_MAP, 4, v, IMAGE_BASE), HypercallError::Invalid),
            (request(MMU_UNMAP, 0, v, 0), HypercallError::Invalid),
            (request(MMU_PROTECT, 0, v, 0), HypercallError::Invalid),
            (request(9, 0, v, 0), HypercallError::Invalid),
        ];
        for (req, error) in cases {
            let got = mmu.update(at(&ram), &[req]).expect("no host failure");
            assert_eq!(got, Err(Refused { index: 0, error }), "{req:?}");
        }
        let too_many = vec![request(MMU_UNMAP, 0, v, 0); MMU_BATCH_MAX as usize + 1];
        assert!(
            mmu.update(at(&ram), &too_many)
                .expect("no failure")
                .is_err()
        );
    }

    #[test]
    fn table_frames_running_out_is_a_limit() {
        let (mut mmu, ram) = mmu();
        // Each 1 GiB apart: two new tables each, until the area is full.
        let batch: Vec<MmuRequest> = (0..200)
            .map(|i| request(MMU_MAP, 0, (1 + i) << 30, IMAGE_BASE))
            .collect();
        let got = mmu.update(at(&ram), &batch).expect("no host failure");
        assert!(matches!(
            got,
            Err(Refused {
                error: HypercallError::LimitExceeded,
                ..
            })
        ));
        assert_eq!(mmu.maps[0], 1, "nothing applied");
    }

    #[test]
    fn frames_given_back_come_back_zeroed_and_only_when_unmapped() {
        let (mut mmu, ram) = mmu();
        let frame = IMAGE_BASE + 2 * PAGE_SIZE;
        assert_eq!(
            mmu.give_back(at(&ram), &[frame]).expect("no failure"),
            Err(HypercallError::Invalid),
            "still mapped"
        );
        ram.write_host(frame, b"secret").expect("writes");
        let unmap = [request(MMU_UNMAP, 0, frame, 0)];
        assert_eq!(mmu.update(at(&ram), &unmap).expect("applies"), Ok(1));
        assert_eq!(
            mmu.give_back(at(&ram), &[frame, frame])
                .expect("no failure"),
            Err(HypercallError::Invalid),
            "twice in one batch"
        );
        assert_eq!(mmu.give_back(at(&ram), &[frame]).expect("frees"), Ok(()));
        assert_eq!(
            mmu.give_back(at(&ram), &[frame]).expect("no failure"),
            Err(HypercallError::Invalid),
            "already free"
        );
        let map = [request(MMU_MAP, 0, frame, frame)];
        assert!(mmu.update(at(&ram), &map).expect("no failure").is_err());
        assert_eq!(
            mmu.alloc(&ram, 2).expect("no failure"),
            Err(HypercallError::LimitExceeded)
        );
        // A hypercall result written into the free frame is scrubbed too.
        ram.write_host(frame + 8, b"later").expect("writes");
        assert_eq!(mmu.alloc(&ram, 1).expect("no failure"), Ok(vec![frame]));
        let mut bytes = [1u8; 16];
        ram.read_host(frame, &mut bytes).expect("reads");
        assert_eq!(bytes, [0; 16]);
        assert_eq!(mmu.update(at(&ram), &map).expect("applies"), Ok(1));
    }

    #[test]
    fn runs_merge_neighbours() {
        assert_eq!(
            runs(vec![0x3000, 0x1000, 0x2000, 0x2000, 0x9000]),
            vec![(0x1000, 0x3000), (0x9000, 0x1000)]
        );
    }
}
