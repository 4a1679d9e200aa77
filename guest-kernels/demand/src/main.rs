//! demand: a demand-paged array. `demand [PAGES]` reserves a 64 MiB array
//! of virtual addresses (more than the guest's RAM) with nothing mapped,
//! registers a page-fault handler that maps a fresh zeroed frame at each
//! faulting page, writes a pattern into PAGES pages spread over the array
//! (default 256), and reads every one back, plus pages it never wrote
//! (which must read as zero). Exits 0 and prints `demand ok` when every
//! value is right and the handler took exactly one fault per page.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use shoal_guest::abi::layout::PAGE_SIZE;
use shoal_guest::mmu::{self, Batch, WRITE};
use shoal_guest::trap::{self, TrapFrame};
use shoal_guest::{boot, println};

shoal_guest::entry!(main);

/// Where the array starts.
const BASE: u64 = 0x70_0000_0000;
/// Its size in pages (64 MiB).
const ARRAY_PAGES: u64 = 16 << 10;
/// Frames the handler takes from the host at once.
const REFILL: usize = 32;

/// Frames taken from the host and not mapped yet.
struct Frames {
    cache: [AtomicU64; REFILL],
    left: AtomicUsize,
}

static FRAMES: Frames = Frames {
    cache: [const { AtomicU64::new(0) }; REFILL],
    left: AtomicUsize::new(0),
};
static FAULTS: AtomicU64 = AtomicU64::new(0);

/// The next free frame, refilling the cache from the host when empty.
fn next_frame() -> u64 {
    if FRAMES.left.load(Ordering::Relaxed) == 0 {
        let mut frames = [0u64; REFILL];
        if let Err(e) = mmu::alloc_frames(&mut frames) {
            panic!("out of frames for demand paging: {e:?}");
        }
        for (slot, frame) in FRAMES.cache.iter().zip(frames) {
            slot.store(frame, Ordering::Relaxed);
        }
        FRAMES.left.store(REFILL, Ordering::Relaxed);
    }
    let left = FRAMES.left.fetch_sub(1, Ordering::Relaxed) - 1;
    FRAMES.cache[left].load(Ordering::Relaxed)
}

fn on_page_fault(frame: &mut TrapFrame) {
    let addr = frame.fault_addr;
    let in_array = (BASE..BASE + ARRAY_PAGES * PAGE_SIZE).contains(&addr);
    if !in_array || frame.error_code & trap::PF_PRESENT != 0 {
        panic!(
            "page fault at {addr:#x} (code {:#x}) outside the array",
            frame.error_code
        );
    }
    FAULTS.fetch_add(1, Ordering::Relaxed);
    let mut batch = Batch::new();
    if let Err(refused) = batch.map(addr & !(PAGE_SIZE - 1), next_frame(), WRITE) {
        panic!("mapping refused: {refused:?}");
    }
    // The batch flushes when dropped; flush here to see the result.
    if let Err(refused) = batch.flush() {
        panic!("mapping refused: {refused:?}");
    }
}

fn value(page: u64, word: u64) -> u64 {
    0xd0_0000_0000 | page << 8 | word
}

fn word(page: u64, word: u64) -> *mut u64 {
    (BASE + page * PAGE_SIZE + word * 8) as *mut u64
}

fn main() -> i32 {
    let pages: u64 = boot::args()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(256)
        .clamp(1, ARRAY_PAGES / 2);
    // Frames for the pages written, the pages only read, and the cache.
    if let Err(e) = mmu::take_heap(2 * pages + REFILL as u64) {
        println!("not enough RAM for {pages} pages: {e:?}");
        return 2;
    }
    if let Err(e) = trap::set_handler(trap::vector_bit(trap::PAGE_FAULT), on_page_fault) {
        println!("set_handler failed: {e:?}");
        return 1;
    }
    let stride = ARRAY_PAGES / pages;
    for i in 0..pages {
        let page = i * stride;
        // SAFETY: inside the array; the handler maps the page on first touch.
        unsafe {
            word(page, 0).write_volatile(value(page, 0));
            word(page, 511).write_volatile(value(page, 511));
        }
    }
    let written = FAULTS.load(Ordering::Relaxed);
    let mut wrong = 0;
    for i in 0..pages {
        let page = i * stride;
        // SAFETY: as above; the pages after each written one were never
        // touched and fault in as zero.
        let got = unsafe {
            [
                word(page, 0).read_volatile(),
                word(page, 511).read_volatile(),
                word(page + 1, 7).read_volatile(),
            ]
        };
        if got != [value(page, 0), value(page, 511), 0] {
            println!("page {page}: read {got:x?}");
            wrong += 1;
        }
    }
    let faults = FAULTS.load(Ordering::Relaxed);
    println!(
        "demand: {pages} pages written across a {} MiB array, {written} faults; {} more read, {faults} faults in all",
        (ARRAY_PAGES * PAGE_SIZE) >> 20,
        faults - written
    );
    if wrong == 0 && written == pages && faults == 2 * pages {
        println!("demand ok");
        0
    } else {
        println!("demand failed: {wrong} pages wrong");
        1
    }
}
