//! bench: the guest half of `shoal bench`. Arguments: `MODE COUNT`, where
//! MODE is `floor` (null exits), `hypercall` (abi_info round trips),
//! `yield` (yield hypercalls), `clock` (monotonic clock reads), `remap1`
//! (page remaps, one `mmu_update` each) or `remap64` (page remaps in
//! batches of 64). Prints `result MODE COUNT NANOS`: the total time of
//! COUNT operations measured inside the guest.
#![no_std]
#![no_main]

use shoal_guest::abi::hypercall::AbiInfo;
use shoal_guest::abi::layout::NULL_EXIT_PORT;
use shoal_guest::abi::layout::PAGE_SIZE;
use shoal_guest::mmu::{self, Batch};
use shoal_guest::{boot, hypercall, println, time};

/// Where the remap modes remap pages.
const WINDOW: u64 = 0x50_0000_0000;

/// Two frames to remap between, and the first round of mappings done, so
/// that every timed change takes a mapping away (the costly kind).
fn remap_setup(pages: u64) -> Option<[u64; 2]> {
    mmu::take_heap(2).ok()?;
    let mut frames = [0u64; 2];
    mmu::alloc_frames(&mut frames).ok()?;
    let mut batch = Batch::new();
    for page in 0..pages {
        batch.map(WINDOW + page * PAGE_SIZE, frames[0], 0).ok()?;
    }
    batch.flush().ok()?;
    Some(frames)
}

/// `count` remaps of `batch_len` pages at a time, each page alternating
/// between the two frames.
fn remap(frames: [u64; 2], count: u64, batch_len: u64) -> bool {
    let mut batch = Batch::new();
    for change in 0..count {
        let page = change % batch_len;
        let frame = frames[((change / batch_len + 1) % 2) as usize];
        if batch.map(WINDOW + page * PAGE_SIZE, frame, 0).is_err() {
            return false;
        }
        if page + 1 == batch_len && batch.flush().is_err() {
            return false;
        }
    }
    batch.flush().is_ok()
}

shoal_guest::entry!(main);

fn null_exit() {
    // SAFETY: a 32-bit `out` to the null-exit port only exits to the host,
    // which resumes the guest with all state unchanged.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") NULL_EXIT_PORT, in("eax") 0u32,
            options(nomem, nostack, preserves_flags));
    }
}

fn main() -> i32 {
    let mut args = boot::args();
    let mode = args.next().unwrap_or("floor");
    let count: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let batch_len = match mode {
        "remap1" => 1,
        _ => 64,
    };
    let frames = match mode {
        "remap1" | "remap64" => remap_setup(batch_len),
        _ => None,
    };
    let start = time::monotonic_ns();
    match mode {
        "floor" => (0..count).for_each(|_| null_exit()),
        "hypercall" => {
            for _ in 0..count {
                let mut info = AbiInfo::default();
                if hypercall::call(&mut info).is_err() {
                    return 2;
                }
            }
        }
        "yield" => (0..count).for_each(|_| shoal_guest::yield_now()),
        "clock" => {
            let mut last = 0;
            for _ in 0..count {
                let now = time::monotonic_ns();
                if now < last {
                    return 3;
                }
                last = core::hint::black_box(now);
            }
        }
        "remap1" | "remap64" => match frames {
            Some(frames) if remap(frames, count, batch_len) => {}
            _ => return 4,
        },
        _ => {
            println!("unknown mode {mode}");
            return 1;
        }
    }
    let elapsed = time::monotonic_ns() - start;
    println!("result {mode} {count} {elapsed}");
    0
}
