//! mmu: drives the paravirtual MMU and checks every effect.
//!
//! - `mmu check [REMAPS]` (default): gives the top of its heap back as a
//!   frame pool, takes frames back and checks they are zeroed, maps them
//!   with patterns, remaps one address between them REMAPS times (default
//!   2000) and reads the right pattern every time, maps 64 pages in one
//!   batch, and checks that a secret left in a frame given back is gone
//!   when it comes back. Exits 0 and prints `mmu ok` when all holds.
//! - `mmu unmap-fault`: maps a page, reads it, unmaps it, reads again: the
//!   host must stop it with a page fault at [`WINDOW`].
//! - `mmu protect-fault`: maps a page writable, writes, makes it read-only,
//!   writes again: a page fault at [`WINDOW`] (a write to a present page).
#![no_std]
#![no_main]

use shoal_guest::abi::layout::PAGE_SIZE;
use shoal_guest::hypercall::Error;
use shoal_guest::mmu::{self, Batch, Refused, WRITE};
use shoal_guest::{boot, println};

shoal_guest::entry!(main);

/// Where the frames are mapped with their patterns.
const PATTERNS: u64 = 0x40_0000_0000;
/// The address remapped again and again.
const WINDOW: u64 = 0x50_0000_0000;
/// Frames in the pool taken from the heap.
const POOL: usize = 80;

fn read(vaddr: u64) -> u64 {
    // SAFETY: the caller mapped `vaddr`; a volatile read makes the access
    // happen here, after the hypercall that changed the mapping.
    unsafe { core::ptr::read_volatile(vaddr as *const u64) }
}

fn write(vaddr: u64, value: u64) {
    // SAFETY: the caller mapped `vaddr` writable (or expects the fault).
    unsafe { core::ptr::write_volatile(vaddr as *mut u64, value) }
}

fn pattern(i: usize) -> u64 {
    0x5eed_0000_0000_0000 | i as u64
}

/// Why `check` stopped.
enum Failed {
    /// A batch was refused.
    Refused(Refused),
    /// A frame call failed.
    Call(Error),
    /// An effect was wrong (printed where it was seen).
    Wrong,
}

impl From<Refused> for Failed {
    fn from(refused: Refused) -> Self {
        Failed::Refused(refused)
    }
}

impl From<Error> for Failed {
    fn from(error: Error) -> Self {
        Failed::Call(error)
    }
}

fn check(remaps: usize) -> Result<(), Failed> {
    mmu::take_heap(POOL as u64)?;
    let mut frames = [0u64; 4];
    mmu::alloc_frames(&mut frames)?;
    let mut batch = Batch::new();
    for (i, frame) in frames.iter().enumerate() {
        batch.map(PATTERNS + i as u64 * PAGE_SIZE, *frame, WRITE)?;
    }
    batch.flush()?;
    for i in 0..frames.len() {
        let page = PATTERNS + i as u64 * PAGE_SIZE;
        if read(page) != 0 || read(page + PAGE_SIZE - 8) != 0 {
            println!("frame {i} did not come back zeroed");
            return Err(Failed::Wrong);
        }
        write(page, pattern(i));
    }

    for round in 0..remaps {
        let i = round % frames.len();
        let mut one = Batch::new();
        one.map(WINDOW, frames[i], mmu::READ_ONLY)?;
        one.flush()?;
        let got = read(WINDOW);
        if got != pattern(i) {
            println!(
                "stale page: round {round} read {got:#x}, want {:#x}",
                pattern(i)
            );
            return Err(Failed::Wrong);
        }
    }
    println!("remapped {remaps} times, never stale");

    // 64 pages in one batch, the frames shared in turn: every page must
    // show its frame's pattern.
    let base = 0x60_0000_0000;
    let mut batch = Batch::new();
    for page in 0..64u64 {
        batch.map(base + page * PAGE_SIZE, frames[page as usize % 4], 0)?;
    }
    if batch.flush()? != 64 {
        println!("batch of 64 not applied whole");
    }
    for page in 0..64u64 {
        let got = read(base + page * PAGE_SIZE);
        if got != pattern(page as usize % 4) {
            println!("batched page {page} read {got:#x}");
            return Err(Failed::Wrong);
        }
    }
    // Unmap all of them again and give frame 3 back with a secret in it.
    for page in 0..64u64 {
        batch.unmap(base + page * PAGE_SIZE)?;
    }
    write(PATTERNS + 3 * PAGE_SIZE + 8, 0x005e_c2e7);
    batch.unmap(PATTERNS + 3 * PAGE_SIZE)?;
    batch.unmap(WINDOW)?;
    batch.flush()?;
    mmu::free_frames(&frames[3..])?;
    // Take every free frame: none may hold the secret.
    let mut all = [0u64; POOL - 3];
    mmu::alloc_frames(&mut all)?;
    for frame in all {
        batch.map(WINDOW, frame, 0)?;
        batch.flush()?;
        if read(WINDOW + 8) != 0 {
            println!("frame {frame:#x} came back with data in it");
            return Err(Failed::Wrong);
        }
    }
    println!("batch of 64 and scrubbed frames ok");
    Ok(())
}

fn fault(protect: bool) -> i32 {
    if let Err(e) = mmu::take_heap(1) {
        println!("cannot take a frame: {e:?}");
        return 1;
    }
    let mut frame = [0u64];
    if mmu::alloc_frames(&mut frame).is_err() {
        return 1;
    }
    let mut batch = Batch::new();
    let _ = batch.map(WINDOW, frame[0], WRITE);
    if batch.flush().is_err() {
        return 1;
    }
    write(WINDOW, 7);
    println!("mapped and wrote {}", read(WINDOW));
    let _ = if protect {
        batch.protect(WINDOW, mmu::READ_ONLY)
    } else {
        batch.unmap(WINDOW)
    };
    if batch.flush().is_err() {
        return 1;
    }
    println!("touching {WINDOW:#x} again");
    if protect {
        write(WINDOW, 8);
    } else {
        let _ = read(WINDOW);
    }
    println!("no fault: a stale mapping survived");
    1
}

fn main() -> i32 {
    let mut args = boot::args();
    match args.next().unwrap_or("check") {
        "check" => {
            let remaps = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
            match check(remaps) {
                Ok(()) => {
                    println!("mmu ok");
                    0
                }
                Err(Failed::Refused(refused)) => {
                    println!("mmu failed: batch refused: {refused:?}");
                    1
                }
                Err(Failed::Call(error)) => {
                    println!("mmu failed: frame call: {error:?}");
                    1
                }
                Err(Failed::Wrong) => {
                    println!("mmu failed");
                    1
                }
            }
        }
        "unmap-fault" => fault(false),
        "protect-fault" => fault(true),
        other => {
            println!("usage: mmu [check [REMAPS] | unmap-fault | protect-fault], not {other}");
            2
        }
    }
}
