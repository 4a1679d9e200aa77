//! A heap that grows by mapping frames: a global allocator for guests that
//! want `alloc` (`Vec`, `Box`, `BTreeMap`).
//!
//! The heap lives in its own range of virtual addresses, [`HEAP_BASE`]
//! onwards, with nothing mapped at first. When an allocation does not fit,
//! it takes frames from the boot heap ([`crate::mmu::take_heap`]), maps
//! them at the heap's end through the host (`mmu_update`), and tries
//! again: each growth at least doubles the heap, so a heap of `n` pages
//! grew about log2(n) times. The free-list allocator is the
//! `linked_list_allocator` crate's.
//!
//! ```text
//! extern crate alloc;
//! #[global_allocator]
//! static HEAP: shoal_guest::heap::Heap = shoal_guest::heap::Heap::new();
//! ```

use crate::mmu::{self, Batch, WRITE};
use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use shoal_abi::layout::PAGE_SIZE;

/// Where the heap starts.
pub const HEAP_BASE: u64 = 0x10_0000_0000;
/// The most it grows to.
pub const HEAP_MAX: u64 = 1 << 30;
/// Pages of the first growth.
const FIRST_PAGES: u64 = 16;
/// Frames taken and mapped per round of a growth.
const CHUNK: usize = 64;

/// The global allocator. One per guest.
pub struct Heap {
    locked: AtomicBool,
    inner: UnsafeCell<linked_list_allocator::Heap>,
    /// Bytes mapped so far.
    mapped: AtomicU64,
    /// Times it grew.
    grown: AtomicU64,
}

// SAFETY: `inner` is only touched with `locked` held.
unsafe impl Sync for Heap {}

impl Heap {
    /// An empty heap; nothing is mapped until the first allocation.
    pub const fn new() -> Self {
        Self {
            locked: AtomicBool::new(false),
            inner: UnsafeCell::new(linked_list_allocator::Heap::empty()),
            mapped: AtomicU64::new(0),
            grown: AtomicU64::new(0),
        }
    }

    /// Bytes mapped so far.
    pub fn mapped(&self) -> u64 {
        self.mapped.load(Ordering::Relaxed)
    }

    /// Times the heap grew.
    pub fn grown(&self) -> u64 {
        self.grown.load(Ordering::Relaxed)
    }

    fn with<R>(&self, f: impl FnOnce(&mut linked_list_allocator::Heap) -> R) -> R {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held.
        let result = f(unsafe { &mut *self.inner.get() });
        self.locked.store(false, Ordering::Release);
        result
    }

    /// Maps at least `bytes` more at the heap's end; false when the boot
    /// heap or [`HEAP_MAX`] is used up or the host refuses.
    fn grow(&self, bytes: u64) -> bool {
        let mapped = self.mapped();
        let pages = bytes
            .div_ceil(PAGE_SIZE)
            .max(mapped / PAGE_SIZE)
            .max(FIRST_PAGES);
        if mapped + pages * PAGE_SIZE > HEAP_MAX || mmu::take_heap(pages).is_err() {
            return false;
        }
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(CHUNK as u64) as usize;
            let mut frames = [0u64; CHUNK];
            if mmu::alloc_frames(&mut frames[..n]).is_err() {
                return false;
            }
            let mut batch = Batch::new();
            for (i, frame) in frames[..n].iter().enumerate() {
                let vaddr = HEAP_BASE + mapped + (done + i as u64) * PAGE_SIZE;
                if batch.map(vaddr, *frame, WRITE).is_err() {
                    return false;
                }
            }
            if batch.flush().is_err() {
                return false;
            }
            done += n as u64;
        }
        let added = (pages * PAGE_SIZE) as usize;
        self.with(|inner| {
            if mapped == 0 {
                // SAFETY: the range was just mapped writable for the heap
                // alone.
                unsafe { inner.init(HEAP_BASE as *mut u8, added) }
            } else {
                // SAFETY: the range right after the heap's end was just
                // mapped writable for it.
                unsafe { inner.extend(added) }
            }
        });
        self.mapped.store(mapped + added as u64, Ordering::Relaxed);
        self.grown.fetch_add(1, Ordering::Relaxed);
        true
    }
}

impl Default for Heap {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: blocks come from the free-list allocator over memory mapped for
// the heap alone, with the layout asked for; the lock serialises it.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        loop {
            if let Ok(block) = self.with(|inner| inner.allocate_first_fit(layout)) {
                return block.as_ptr();
            }
            let want = layout.size() as u64 + layout.align() as u64 + PAGE_SIZE;
            if !self.grow(want) {
                return core::ptr::null_mut();
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(block) = NonNull::new(ptr) {
            // SAFETY: the caller passes a block this allocator gave out
            // with the same layout.
            self.with(|inner| unsafe { inner.deallocate(block, layout) });
        }
    }
}
