//! bench: the guest half of `shoal bench`. Arguments: `MODE COUNT [N]`,
//! where MODE is `floor` (null exits), `hypercall` (abi_info round trips),
//! `yield` (yield hypercalls), `clock` (monotonic clock reads), `trap`
//! (`int3` bounced to a handler that returns at once), or one of
//! the ways to make COUNT page-table changes in rounds of N pages (N is 1
//! to 64, default 64): `trapped` (each change a write to the trapping
//! window: needs `--trapped-page-tables`), `single` (one `mmu_update` per
//! change), `batched` (one `mmu_update` per round) or `multicall` (one
//! `multicall` of N single-change `mmu_update`s per round). Every change
//! remaps a page to the other of two frames, so each takes a mapping
//! away (the costly kind). `scatter COUNT` is the worst batch: COUNT
//! rounds of one `mmu_update` that remaps 512 pages, each from its own
//! frame to another, no two old frames adjacent, then reads every page.
//! Prints `result MODE COUNT NANOS`: the total
//! time of COUNT operations measured inside the guest.
#![no_std]
#![no_main]

use shoal_guest::abi::hypercall::{AbiInfo, MMU_BATCH_MAX, MMU_MAP, MmuRequest, MmuUpdate};
use shoal_guest::abi::layout::NULL_EXIT_PORT;
use shoal_guest::abi::layout::PAGE_SIZE;
use shoal_guest::hypercall::{Call, Queued};
use shoal_guest::mmu::{self, Batch, trapped};
use shoal_guest::{boot, hypercall, println, time};

/// Where the page-table modes remap pages.
const WINDOW: u64 = 0x50_0000_0000;
/// Most pages per round.
const ROUND_MAX: usize = 64;

/// Two frames to remap between, and the first round of mappings done, so
/// that every timed change takes a mapping away and every table exists.
fn remap_setup(pages: usize) -> Option<[u64; 2]> {
    mmu::take_heap(2).ok()?;
    let mut frames = [0u64; 2];
    mmu::alloc_frames(&mut frames).ok()?;
    let mut batch = Batch::new();
    for page in 0..pages as u64 {
        batch.map(WINDOW + page * PAGE_SIZE, frames[0], 0).ok()?;
    }
    batch.flush().ok()?;
    Some(frames)
}

/// Change number `change` in rounds of `n`: which page, to which frame.
fn change_of(frames: [u64; 2], change: u64, n: usize) -> (u64, u64) {
    let n = n as u64;
    let page = WINDOW + (change % n) * PAGE_SIZE;
    (page, frames[((change / n + 1) % 2) as usize])
}

fn map_request(vaddr: u64, frame: u64) -> MmuRequest {
    MmuRequest {
        op: MMU_MAP,
        flags: 0,
        vaddr,
        frame,
    }
}

/// `count` changes in rounds of `n`, made the way `mode` says. Not
/// inlined, as the other big-framed modes: `main`'s frame stays small, so
/// that the quick modes (`floor 1` is the spawn benchmark's guest) touch
/// one page of stack, as a small guest would.
#[inline(never)]
fn remap(mode: &str, frames: [u64; 2], count: u64, n: usize) -> bool {
    match mode {
        "trapped" => {
            let mut slots = [core::ptr::null_mut(); ROUND_MAX];
            for (page, slot) in slots[..n].iter_mut().enumerate() {
                match trapped::leaf(WINDOW + page as u64 * PAGE_SIZE) {
                    Some(leaf) => *slot = leaf,
                    None => return false,
                }
            }
            for change in 0..count {
                let (_, frame) = change_of(frames, change, n);
                // SAFETY: the slot came from `trapped::leaf`.
                unsafe {
                    trapped::write(
                        slots[(change % n as u64) as usize],
                        trapped::entry(frame, 0),
                    )
                };
            }
            true
        }
        "single" => (0..count).all(|change| {
            let (page, frame) = change_of(frames, change, n);
            mmu::update(&[map_request(page, frame)]).is_ok()
        }),
        "batched" => {
            let mut batch = Batch::new();
            for change in 0..count {
                let (page, frame) = change_of(frames, change, n);
                let full = (change + 1) % n as u64 == 0;
                if batch.map(page, frame, 0).is_err() || (full && batch.flush().is_err()) {
                    return false;
                }
            }
            batch.flush().is_ok()
        }
        "multicall" => {
            let mut requests = [map_request(0, 0); ROUND_MAX];
            let mut change = 0;
            while change < count {
                let round = (count - change).min(n as u64) as usize;
                for (i, request) in requests[..round].iter_mut().enumerate() {
                    let (page, frame) = change_of(frames, change + i as u64, n);
                    *request = map_request(page, frame);
                }
                let mut calls: [Call<MmuUpdate>; ROUND_MAX] = core::array::from_fn(|i| {
                    Call::new(MmuUpdate {
                        requests: core::ptr::addr_of!(requests[i]) as u64,
                        count: 1,
                        _pad: 0,
                        error_index: 0,
                    })
                });
                let mut queued: [&mut dyn Queued; ROUND_MAX] =
                    calls.each_mut().map(|c| c as &mut dyn Queued);
                if hypercall::multicall(&mut queued[..round]).is_err()
                    || calls[..round].iter().any(|c| c.result() != Ok(1))
                {
                    return false;
                }
                change += round as u64;
            }
            true
        }
        _ => false,
    }
}

/// Pages remapped per round by `scatter`: a whole batch.
const SCATTER_PAGES: usize = MMU_BATCH_MAX as usize;

/// Frames for `scatter`, two per page, and the pages mapped to the first
/// of each pair.
#[inline(never)]
fn scatter_setup() -> Option<[u64; 2 * SCATTER_PAGES]> {
    let mut frames = [0u64; 2 * SCATTER_PAGES];
    mmu::take_heap(frames.len() as u64).ok()?;
    mmu::alloc_frames(&mut frames).ok()?;
    scatter_round(&frames, 0).then_some(frames)
}

/// Round `round` of the worst batch: page `i` moves to frame `2i` or
/// `2i + 1`, so no two old frames are adjacent and the host drops the
/// translations of 512 separate frames; then every page is read.
#[inline(never)]
fn scatter_round(frames: &[u64; 2 * SCATTER_PAGES], round: u64) -> bool {
    let mut requests = [map_request(0, 0); SCATTER_PAGES];
    for (page, request) in requests.iter_mut().enumerate() {
        let vaddr = WINDOW + page as u64 * PAGE_SIZE;
        *request = map_request(vaddr, frames[2 * page + (round % 2) as usize]);
    }
    if mmu::update(&requests).is_err() {
        return false;
    }
    for request in &requests {
        // SAFETY: the page was just mapped, readable.
        core::hint::black_box(unsafe { core::ptr::read_volatile(request.vaddr as *const u64) });
    }
    true
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
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(ROUND_MAX)
        .clamp(1, ROUND_MAX);
    let frames = match mode {
        "trapped" | "single" | "batched" | "multicall" => remap_setup(n),
        _ => None,
    };
    if mode == "scatter" {
        return scatter(count);
    }
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
        "trap" => {
            let handled = shoal_guest::trap::set_handler(
                shoal_guest::trap::vector_bit(shoal_guest::trap::BREAKPOINT),
                |_| {},
            );
            if handled.is_err() {
                return 5;
            }
            for _ in 0..count {
                // SAFETY: the handler resumes after the breakpoint.
                unsafe { core::arch::asm!("int3", options(nostack)) };
            }
        }
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
        "trapped" | "single" | "batched" | "multicall" => match frames {
            Some(frames) if remap(mode, frames, count, n) => {}
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

/// The `scatter` mode, with its frames in its own frame.
#[inline(never)]
fn scatter(count: u64) -> i32 {
    let Some(frames) = scatter_setup() else {
        return 4;
    };
    let start = time::monotonic_ns();
    if !(1..=count).all(|round| scatter_round(&frames, round)) {
        return 4;
    }
    let elapsed = time::monotonic_ns() - start;
    println!("result scatter {count} {elapsed}");
    0
}
