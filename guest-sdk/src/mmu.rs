//! The paravirtual MMU: the guest's page tables belong to the host, and
//! the guest changes them by asking (`mmu_update`), in batches.
//!
//! ```text
//! let mut batch = mmu::Batch::new();
//! batch.map(0x4000_0000, frame, mmu::WRITE)?;   // queued
//! batch.unmap(0x4000_1000)?;                    // queued
//! batch.flush()?;                               // one exit for both
//! ```
//!
//! A [`Batch`] sends itself when full, and when dropped (errors there are
//! lost: flush explicitly to see them). Once a call returns, every change
//! in it is visible. Frames are guest-physical page addresses of the
//! guest's own RAM; [`alloc_frames`] hands out zeroed ones from those the
//! guest gave back with [`free_frames`], and [`take_heap`] gives back the
//! top of the boot heap to start that pool.
//!
//! Hypercalls take guest-physical addresses: the SDK passes buffers that
//! live on the stack, which the host maps at their physical addresses.

use crate::hypercall::{self, Error};
use shoal_abi::HypercallError;
use shoal_abi::hypercall::{
    FrameAlloc, FrameFree, MMU_BATCH_MAX, MMU_MAP, MMU_PROTECT, MMU_UNMAP, MmuRequest, MmuUpdate,
};
use shoal_abi::layout::PAGE_SIZE;

pub use shoal_abi::hypercall::{MMU_EXEC as EXEC, MMU_WRITE as WRITE};

/// Flags of a read-only, non-executable page.
pub const READ_ONLY: u32 = 0;

/// Requests a [`Batch`] holds before it sends itself.
pub const BATCH_LEN: usize = 64;

/// A refused `mmu_update`: which request, and why. Nothing of its batch
/// was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Index of the refused request in the batch (`u64::MAX`: the call as
    /// a whole).
    pub index: u64,
    /// Why.
    pub error: Error,
}

/// Applies `requests` in one hypercall: all or none. Returns how many
/// were applied.
pub fn update(requests: &[MmuRequest]) -> Result<usize, Refused> {
    let mut args = MmuUpdate {
        requests: requests.as_ptr() as u64,
        count: requests.len() as u32,
        _pad: 0,
        error_index: u64::MAX,
    };
    match hypercall::call(&mut args) {
        Ok(done) => Ok(done as usize),
        Err(error) => Err(Refused {
            index: args.error_index,
            error,
        }),
    }
}

/// Page-table changes queued for one `mmu_update`.
pub struct Batch {
    requests: [MmuRequest; BATCH_LEN],
    len: usize,
}

impl Batch {
    /// An empty batch.
    pub const fn new() -> Self {
        Self {
            requests: [MmuRequest {
                op: 0,
                flags: 0,
                vaddr: 0,
                frame: 0,
            }; BATCH_LEN],
            len: 0,
        }
    }

    fn push(&mut self, request: MmuRequest) -> Result<(), Refused> {
        if self.len == BATCH_LEN {
            self.flush()?;
        }
        self.requests[self.len] = request;
        self.len += 1;
        Ok(())
    }

    /// Queues mapping `frame` at `vaddr` with `flags` ([`WRITE`],
    /// [`EXEC`]), replacing any mapping there. Like every queuing call, it
    /// sends the batch first if it is full; if that is refused, the error
    /// is returned and this request is not queued.
    pub fn map(&mut self, vaddr: u64, frame: u64, flags: u32) -> Result<(), Refused> {
        self.push(MmuRequest {
            op: MMU_MAP,
            flags,
            vaddr,
            frame,
        })
    }

    /// Queues removing the mapping at `vaddr`.
    pub fn unmap(&mut self, vaddr: u64) -> Result<(), Refused> {
        self.push(MmuRequest {
            op: MMU_UNMAP,
            flags: 0,
            vaddr,
            frame: 0,
        })
    }

    /// Queues changing the flags of the mapping at `vaddr`.
    pub fn protect(&mut self, vaddr: u64, flags: u32) -> Result<(), Refused> {
        self.push(MmuRequest {
            op: MMU_PROTECT,
            flags,
            vaddr,
            frame: 0,
        })
    }

    /// Requests queued and not yet sent.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sends the queued requests (if any) and empties the batch, whatever
    /// the outcome. Returns how many were applied.
    pub fn flush(&mut self) -> Result<usize, Refused> {
        let len = core::mem::take(&mut self.len);
        if len == 0 {
            return Ok(0);
        }
        update(&self.requests[..len])
    }
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Fills `frames` with zeroed frames from those given back, one call per
/// 512. Each call is all or nothing (`LimitExceeded` when fewer are free);
/// on an error, frames filled by earlier calls stay taken.
pub fn alloc_frames(frames: &mut [u64]) -> Result<(), Error> {
    for chunk in frames.chunks_mut(MMU_BATCH_MAX as usize) {
        hypercall::call(&mut FrameAlloc {
            frames: chunk.as_mut_ptr() as u64,
            count: chunk.len() as u32,
            _pad: 0,
        })?;
    }
    Ok(())
}

/// Gives unmapped frames back; the host scrubs them.
pub fn free_frames(frames: &[u64]) -> Result<(), Error> {
    for chunk in frames.chunks(MMU_BATCH_MAX as usize) {
        hypercall::call(&mut FrameFree {
            frames: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            _pad: 0,
        })?;
    }
    Ok(())
}

/// The end of the boot heap after the pages [`take_heap`] took (0: none
/// taken yet).
static BOOT_HEAP_END: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// The start of the boot heap after the pages [`take_low`] took (0: none
/// taken yet).
static BOOT_HEAP_START: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// What is left of the boot heap: `(start, end)`.
fn boot_heap() -> (u64, u64) {
    use core::sync::atomic::Ordering;
    let info = crate::boot::info();
    let or = |taken: u64, at_boot: u64| if taken == 0 { at_boot } else { taken };
    (
        or(BOOT_HEAP_START.load(Ordering::Relaxed), info.heap_start),
        or(BOOT_HEAP_END.load(Ordering::Relaxed), info.heap_end),
    )
}

/// Takes the bottom `pages` pages of what is left of the boot heap for
/// the caller to keep: zeroed, writable and mapped at their own
/// guest-physical addresses, which is what device rings and buffers
/// need. Returns their address; `LimitExceeded` when the heap is too
/// small.
pub fn take_low(pages: u64) -> Result<u64, Error> {
    use core::sync::atomic::Ordering;
    let (start, end) = boot_heap();
    if pages > end.saturating_sub(start) / PAGE_SIZE {
        return Err(Error::Abi(HypercallError::LimitExceeded));
    }
    BOOT_HEAP_START.store(start + pages * PAGE_SIZE, Ordering::Relaxed);
    Ok(start)
}

/// Unmaps the top `pages` pages of what is left of the boot heap and
/// gives their frames back, so that [`alloc_frames`] has frames to hand
/// out. May be called again for more. Returns the new end of the boot
/// heap; the guest must not touch memory above it. The heap pages must
/// still be mapped at their own addresses, as at boot.
pub fn take_heap(pages: u64) -> Result<u64, Error> {
    use core::sync::atomic::Ordering;
    let (bottom, top) = boot_heap();
    let heap = top.saturating_sub(bottom) / PAGE_SIZE;
    if pages > heap {
        return Err(Error::Abi(HypercallError::LimitExceeded));
    }
    let end = top - pages * PAGE_SIZE;
    let mut done = 0;
    while done < pages {
        let mut frames = [0u64; BATCH_LEN];
        let n = (pages - done).min(BATCH_LEN as u64) as usize;
        let mut batch = Batch::new();
        for (i, frame) in frames[..n].iter_mut().enumerate() {
            *frame = end + (done + i as u64) * PAGE_SIZE;
            batch.unmap(*frame).map_err(|r| r.error)?;
        }
        batch.flush().map_err(|r| r.error)?;
        free_frames(&frames[..n])?;
        done += n as u64;
        BOOT_HEAP_END.store(top - done * PAGE_SIZE, Ordering::Relaxed);
    }
    Ok(end)
}

/// The trap-and-emulate experiment (feature `TRAPPED_PAGE_TABLES`, asked
/// for with `shoal run --trapped-page-tables`): the guest reads its page
/// tables through a window and changes a leaf entry by writing it there;
/// each write traps to the host, which checks it by the rules of
/// `mmu_update` and applies it. One exit per entry, no batching: the
/// baseline paravirtualization is measured against.
pub mod trapped {
    use shoal_abi::features::TRAPPED_PAGE_TABLES;
    use shoal_abi::layout::pte::{ACCESSED, ADDR_MASK, DIRTY, NO_EXECUTE, PRESENT, USER, WRITABLE};
    use shoal_abi::layout::{PAGE_SIZE, PAGE_TABLE_AREA_START, TRAPPED_TABLES_WINDOW};

    /// Whether the host opened the window for this guest.
    pub fn available() -> bool {
        crate::boot::info().features & TRAPPED_PAGE_TABLES != 0
    }

    /// Where the table at guest-physical `table` shows in the window.
    fn shown(table: u64) -> *mut u64 {
        (TRAPPED_TABLES_WINDOW + table - PAGE_TABLE_AREA_START) as *mut u64
    }

    /// The leaf entry of `vaddr` in the window, if the tables down to it
    /// exist (this experiment changes leaves only: create them first with
    /// a `map` through [`super::Batch`]).
    pub fn leaf(vaddr: u64) -> Option<*mut u64> {
        if !available() {
            return None;
        }
        let mut table = PAGE_TABLE_AREA_START;
        for level in [39, 30, 21] {
            let index = ((vaddr >> level) & 511) as usize;
            // SAFETY: the window maps every table frame readable; `table`
            // came from a present entry, so it is a table frame.
            let entry = unsafe { shown(table).add(index).read_volatile() };
            if entry & PRESENT == 0 {
                return None;
            }
            table = entry & ADDR_MASK;
        }
        // SAFETY: as above, inside the leaf table's page.
        Some(unsafe { shown(table).add(((vaddr / PAGE_SIZE) & 511) as usize) })
    }

    /// The entry that maps `frame` with `flags` ([`super::WRITE`],
    /// [`super::EXEC`]), as the host would write it.
    pub fn entry(frame: u64, flags: u32) -> u64 {
        let mut entry = frame | PRESENT | USER | ACCESSED;
        if flags & super::WRITE != 0 {
            entry |= WRITABLE | DIRTY;
        }
        if flags & super::EXEC == 0 {
            entry |= NO_EXECUTE;
        }
        entry
    }

    /// Writes `entry` into the leaf at `slot` (from [`leaf`]): one trap.
    /// A write the host refuses stops the guest.
    ///
    /// # Safety
    /// `slot` must come from [`leaf`].
    pub unsafe fn write(slot: *mut u64, entry: u64) {
        // SAFETY: the caller passes a slot in the window, whose write
        // traps to the host and completes when the host has applied it.
        unsafe { slot.write_volatile(entry) }
    }
}
