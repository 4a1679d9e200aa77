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
//! - `mmu catch`: the same faults, caught by its own handler: a read of an
//!   unmapped page (the handler maps a frame there), a write to a
//!   read-only page (the handler makes it writable), `ud2` (the handler
//!   steps over it) and `int3`. Checks what the handler saw, that every
//!   access completed, and that registers survived. Prints `catch ok`.
//! - `mmu trapped [REMAPS]` (with `--trapped-page-tables`): remaps
//!   [`WINDOW`] between four patterned frames REMAPS times (default 500)
//!   by writing its leaf entry through the trapping window, reading the
//!   right pattern every time; unmaps it the same way and checks the
//!   entry reads back as zero. Prints `trapped ok`.
//! - `mmu trapped-forbidden`: writes an entry mapping a page-table frame
//!   through the window; the host must stop it.
//! - `mmu trapped-split`: one 16-byte write across two pages of the
//!   window, which KVM splits into three exits; the host must stop it at
//!   the first (the rest stay pending in the vCPU, for the host to clear
//!   before the VM runs another guest).
//! - `mmu scatter [ROUNDS]`: maps 64 pages at [`WINDOW`], each to one of
//!   its own two patterned frames, and remaps all of them to the other
//!   one in one batch, ROUNDS times (default 200), reading every page's
//!   pattern each round. No two old frames of a batch are adjacent, which
//!   makes the host drop every translation at once (a slot move) rather
//!   than one frame at a time. Then gives every other frame back (64
//!   separate frames), takes them again and checks they are zeroed. Prints
//!   `scatter ok`.
//! - `mmu heap`: fills a `Vec` and a `BTreeMap` from the SDK's heap, which
//!   grows by mapping frames, and checks every value. Prints `heap ok`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use core::sync::atomic::{AtomicU64, Ordering};
use shoal_guest::abi::layout::PAGE_SIZE;
use shoal_guest::hypercall::Error;
use shoal_guest::mmu::{self, Batch, Refused, WRITE, trapped};
use shoal_guest::trap::{self, TrapFrame};
use shoal_guest::{boot, println};

shoal_guest::entry!(main);

#[global_allocator]
static HEAP: shoal_guest::heap::Heap = shoal_guest::heap::Heap::new();

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

/// Takes `pool` frames from the heap, fills `frames` from them and maps
/// those writable at [`PATTERNS`], in order.
fn take_and_map(pool: usize, frames: &mut [u64]) -> Result<(), Failed> {
    mmu::take_heap(pool as u64)?;
    mmu::alloc_frames(frames)?;
    let mut batch = Batch::new();
    for (i, frame) in frames.iter().enumerate() {
        batch.map(PATTERNS + i as u64 * PAGE_SIZE, *frame, WRITE)?;
    }
    batch.flush()?;
    Ok(())
}

fn check(remaps: usize) -> Result<(), Failed> {
    let mut frames = [0u64; 4];
    take_and_map(POOL, &mut frames)?;
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

/// What the handler saw last: vector, error code, address, and how many
/// exceptions it took; and the frame it maps on a fault.
static SEEN: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static SPARE: AtomicU64 = AtomicU64::new(0);

fn on_trap(frame: &mut TrapFrame) {
    SEEN[0].store(u64::from(frame.vector), Ordering::Relaxed);
    SEEN[1].store(frame.error_code, Ordering::Relaxed);
    SEEN[2].store(frame.fault_addr, Ordering::Relaxed);
    SEEN[3].fetch_add(1, Ordering::Relaxed);
    let page = frame.fault_addr & !(PAGE_SIZE - 1);
    let mut batch = Batch::new();
    let fixed = match frame.vector as u8 {
        trap::PAGE_FAULT if frame.error_code & trap::PF_PRESENT == 0 => {
            batch.map(page, SPARE.load(Ordering::Relaxed), WRITE)
        }
        trap::PAGE_FAULT => batch.protect(page, WRITE),
        trap::INVALID_OPCODE => {
            frame.rip += 2;
            Ok(())
        }
        _ => Ok(()),
    };
    if fixed.and_then(|()| batch.flush().map(|_| ())).is_err() {
        panic!("the handler could not fix the fault");
    }
}

/// Expects the handler's last exception to be `vector` with `code` at
/// `addr`, as exception number `count`.
fn saw(what: &str, vector: u8, code: u64, addr: u64, count: u64) -> bool {
    let seen: [u64; 4] = core::array::from_fn(|i| SEEN[i].load(Ordering::Relaxed));
    let ok = seen == [u64::from(vector), code, addr, count];
    if !ok {
        println!(
            "{what}: handler saw {seen:x?}, want {:x?}",
            [u64::from(vector), code, addr, count]
        );
    }
    ok
}

/// Reads `vaddr` with known values in registers the compiler would
/// otherwise keep elsewhere, and returns the value and whether they all
/// survived the exception the read raises.
fn read_keeping_registers(vaddr: u64) -> (u64, bool) {
    let (mut a, mut b, mut c, mut x) = (0x1111_u64, 0x2222_u64, 0x3333_u64, 1.5_f64);
    let value: u64;
    // SAFETY: reads one word; the page is mapped by the handler if it is
    // not mapped now. Registers named are declared as changed.
    unsafe {
        core::arch::asm!(
            "mov {v}, [{addr}]",
            addr = in(reg) vaddr,
            v = lateout(reg) value,
            inout("r12") a,
            inout("r13") b,
            inout("rcx") c,
            inout("xmm0") x,
            options(nostack),
        );
    }
    let kept = (a, b, c) == (0x1111, 0x2222, 0x3333) && x == 1.5;
    (value, kept)
}

fn catch() -> bool {
    if mmu::take_heap(2).is_err() {
        return false;
    }
    let mut frames = [0u64; 2];
    if mmu::alloc_frames(&mut frames).is_err() {
        return false;
    }
    SPARE.store(frames[1], Ordering::Relaxed);
    if let Err(e) = trap::set_handler(
        trap::vector_bit(trap::PAGE_FAULT)
            | trap::vector_bit(trap::INVALID_OPCODE)
            | trap::vector_bit(trap::BREAKPOINT),
        on_trap,
    ) {
        println!("set_handler failed: {e:?}");
        return false;
    }
    // An unmapped page: the handler maps the spare frame (zeroed) there.
    let (value, kept) = read_keeping_registers(WINDOW);
    if !saw(
        "read of an unmapped page",
        trap::PAGE_FAULT,
        0b100,
        WINDOW,
        1,
    ) || value != 0
        || !kept
    {
        println!("after the fault: value {value:#x}, registers kept: {kept}");
        return false;
    }
    write(WINDOW, 0x5eed);
    // A read-only page: the write faults, the handler makes it writable.
    let mut batch = Batch::new();
    if batch
        .protect(WINDOW, mmu::READ_ONLY)
        .and_then(|()| batch.flush())
        .is_err()
    {
        return false;
    }
    write(WINDOW + 8, 0xbeef);
    let code = trap::PF_PRESENT | trap::PF_WRITE | 0b100;
    if !saw(
        "write to a read-only page",
        trap::PAGE_FAULT,
        code,
        WINDOW + 8,
        2,
    ) || (read(WINDOW), read(WINDOW + 8)) != (0x5eed, 0xbeef)
    {
        return false;
    }
    // `ud2`, stepped over by the handler; `int3`, resumed after.
    // SAFETY: both raise an exception the handler resumes from.
    unsafe { core::arch::asm!("ud2", options(nostack)) };
    if !saw("ud2", trap::INVALID_OPCODE, 0, 0, 3) {
        return false;
    }
    // SAFETY: as above.
    unsafe { core::arch::asm!("int3", options(nostack)) };
    if !saw("int3", trap::BREAKPOINT, 0, 0, 4) {
        return false;
    }
    println!("caught 4 exceptions, every access completed, registers kept");
    true
}

/// Frames with patterns, mapped at [`PATTERNS`], and the leaf entry of
/// [`WINDOW`] in the trapping window.
fn trapped_setup() -> Option<([u64; 4], *mut u64)> {
    if !trapped::available() {
        println!("start with --trapped-page-tables");
        return None;
    }
    mmu::take_heap(4).ok()?;
    let mut frames = [0u64; 4];
    mmu::alloc_frames(&mut frames).ok()?;
    let mut batch = Batch::new();
    for (i, frame) in frames.iter().enumerate() {
        batch
            .map(PATTERNS + i as u64 * PAGE_SIZE, *frame, WRITE)
            .ok()?;
    }
    // Creates the tables of WINDOW: the window changes leaves only.
    batch.map(WINDOW, frames[0], 0).ok()?;
    batch.flush().ok()?;
    for i in 0..frames.len() {
        write(PATTERNS + i as u64 * PAGE_SIZE, pattern(i));
    }
    Some((frames, trapped::leaf(WINDOW)?))
}

fn trapped_remaps(remaps: usize) -> bool {
    let Some((frames, slot)) = trapped_setup() else {
        return false;
    };
    for round in 0..remaps {
        let i = round % frames.len();
        // SAFETY: the slot came from `trapped::leaf`.
        unsafe { trapped::write(slot, trapped::entry(frames[i], 0)) };
        let got = read(WINDOW);
        if got != pattern(i) {
            println!(
                "stale page: round {round} read {got:#x}, want {:#x}",
                pattern(i)
            );
            return false;
        }
    }
    // SAFETY: as above.
    unsafe { trapped::write(slot, 0) };
    // SAFETY: a slot in the window, which is readable.
    let entry = unsafe { slot.read_volatile() };
    println!("remapped {remaps} times by trapped writes, never stale; unmapped: entry {entry:#x}");
    entry == 0
}

fn trapped_forbidden() -> i32 {
    let Some((_, slot)) = trapped_setup() else {
        return 1;
    };
    let table_frame = shoal_guest::abi::layout::PAGE_TABLE_AREA_START;
    println!("mapping a page-table frame through the window");
    // SAFETY: the slot came from `trapped::leaf`; the host refuses this.
    unsafe { trapped::write(slot, trapped::entry(table_frame, WRITE)) };
    println!("the write was applied");
    1
}

fn trapped_split() -> i32 {
    if !trapped::available() {
        println!("no trapping window (run with --trapped-page-tables)");
        return 1;
    }
    let at = shoal_guest::abi::layout::TRAPPED_TABLES_WINDOW + PAGE_SIZE - 12;
    println!("16 bytes across two pages of the window");
    // SAFETY: a store into the window, which the host traps and refuses.
    unsafe { core::arch::asm!("movdqu [{at}], xmm0", at = in(reg) at, options(nostack)) };
    println!("the write was applied");
    1
}

/// Pages `scatter` remaps in each batch, with two frames each.
const SCATTER: usize = 64;

fn scatter(rounds: u64) -> Result<(), Failed> {
    let mut frames = [0u64; 2 * SCATTER];
    take_and_map(2 * SCATTER, &mut frames)?;
    let mut batch = Batch::new();
    for i in 0..frames.len() {
        write(PATTERNS + i as u64 * PAGE_SIZE, pattern(i));
    }
    for round in 0..rounds {
        let which = |page: usize| 2 * page + (round % 2) as usize;
        for page in 0..SCATTER {
            batch.map(WINDOW + page as u64 * PAGE_SIZE, frames[which(page)], 0)?;
        }
        batch.flush()?;
        for page in 0..SCATTER {
            let got = read(WINDOW + page as u64 * PAGE_SIZE);
            if got != pattern(which(page)) {
                println!("stale page: round {round} page {page} read {got:#x}");
                return Err(Failed::Wrong);
            }
        }
    }
    println!("remapped {SCATTER} pages {rounds} times in batches, never stale");

    // Give back every even frame: 64 separate frames, none mapped.
    let mut even = [0u64; SCATTER];
    for page in 0..SCATTER {
        even[page] = frames[2 * page];
        batch.unmap(WINDOW + page as u64 * PAGE_SIZE)?;
    }
    batch.flush()?;
    for page in 0..SCATTER {
        batch.unmap(PATTERNS + 2 * page as u64 * PAGE_SIZE)?;
    }
    batch.flush()?;
    mmu::free_frames(&even)?;
    mmu::alloc_frames(&mut even)?;
    for frame in even {
        batch.map(WINDOW, frame, 0)?;
        batch.flush()?;
        if read(WINDOW) != 0 || read(WINDOW + PAGE_SIZE - 8) != 0 {
            println!("frame {frame:#x} came back with data in it");
            return Err(Failed::Wrong);
        }
    }
    println!("{SCATTER} separate frames given back came back zeroed");
    Ok(())
}

fn heap() -> bool {
    let mut values: Vec<u64> = Vec::new();
    for i in 0..100_000u64 {
        values.push(i * 3);
    }
    let mut names = BTreeMap::new();
    for i in 0..5_000u64 {
        names.insert(i, alloc::format!("name {i}"));
    }
    let sum: u64 = values.iter().sum();
    let right = sum == 3 * (99_999 * 100_000 / 2)
        && values.iter().enumerate().all(|(i, v)| *v == i as u64 * 3)
        && names.get(&4321).map(String::as_str) == Some("name 4321")
        && names.len() == 5_000;
    println!(
        "heap grew {} times to {} KiB; 100000 values and 5000 names {}",
        HEAP.grown(),
        HEAP.mapped() >> 10,
        if right { "right" } else { "WRONG" }
    );
    right && HEAP.grown() > 1
}

/// Prints how `mode` went; the exit status.
fn report(mode: &str, result: Result<(), Failed>) -> i32 {
    match result {
        Ok(()) => {
            println!("{mode} ok");
            return 0;
        }
        Err(Failed::Refused(refused)) => println!("{mode} failed: batch refused: {refused:?}"),
        Err(Failed::Call(error)) => println!("{mode} failed: frame call: {error:?}"),
        Err(Failed::Wrong) => println!("{mode} failed"),
    }
    1
}

fn main() -> i32 {
    let mut args = boot::args();
    let mode = args.next().unwrap_or("check");
    let number = args.next().and_then(|a| a.parse().ok());
    match mode {
        "check" => report("mmu", check(number.unwrap_or(2000) as usize)),
        "scatter" => report("scatter", scatter(number.unwrap_or(200))),
        "unmap-fault" => fault(false),
        "protect-fault" => fault(true),
        "catch" if catch() => {
            println!("catch ok");
            0
        }
        "catch" => {
            println!("catch failed");
            1
        }
        "trapped" => {
            if trapped_remaps(number.unwrap_or(500) as usize) {
                println!("trapped ok");
                0
            } else {
                println!("trapped failed");
                1
            }
        }
        "trapped-forbidden" => trapped_forbidden(),
        "trapped-split" => trapped_split(),
        "heap" if heap() => {
            println!("heap ok");
            0
        }
        "heap" => 1,
        other => {
            println!(
                "usage: mmu [check [REMAPS] | scatter [ROUNDS] | unmap-fault | protect-fault | catch | trapped [REMAPS] | trapped-forbidden | trapped-split | heap], not {other}"
            );
            2
        }
    }
}
