//! trap-attack: abuses the exception-handler calls.
//!
//! - `trap-attack` (default): bad trap tables, a `trap_return` with no
//!   handler running, a forged frame that returns to a kernel address, and
//!   a frame that asks for I/O privilege and interrupts off. Prints one
//!   line per case; exits 0 when each was refused or neutralised as
//!   documented.
//! - `trap-attack nested`: its handler faults; the host must stop it with
//!   the second fault (a page fault at [`NESTED`]).
//! - `trap-attack storm`: its handler returns without fixing the fault,
//!   so the same fault comes back forever.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use shoal_guest::abi::HypercallError;
use shoal_guest::abi::hypercall::{SetTrapTable, TrapReturn};
use shoal_guest::hypercall::{self, Error};
use shoal_guest::trap::{self, TrapFrame};
use shoal_guest::{boot, println};

shoal_guest::entry!(main);

/// Never mapped: touching it faults.
const UNMAPPED: u64 = 0x40_0000_0000;
/// Where the nested handler faults.
const NESTED: u64 = 0x41_0000_0000;

static FORGED: AtomicU64 = AtomicU64::new(0);

fn expect(name: &str, got: Result<u64, Error>, error: HypercallError) -> u32 {
    let ok = got == Err(Error::Abi(error));
    println!(
        "{name}: {got:?} {}",
        if ok { "refused as documented" } else { "WRONG" }
    );
    u32::from(!ok)
}

fn table(entry: u64, stack: u64, frame: u64, vectors: u32) -> SetTrapTable {
    SetTrapTable {
        entry,
        stack,
        frame,
        vectors,
        _pad: 0,
    }
}

/// Breakpoint handler: first forges a return to a kernel address (must be
/// refused, and the handler keeps running), then asks for IOPL 3 and
/// interrupts off on the way back.
fn forge(frame: &mut TrapFrame) {
    let rip = frame.rip;
    // Volatile: the host reads the frame, which the compiler cannot see.
    // SAFETY: a field of a live frame.
    unsafe { core::ptr::write_volatile(&mut frame.rip, 0xffff_8000_0000_1000) };
    let got = hypercall::call(&mut TrapReturn { _reserved: 0 });
    FORGED.store(
        u64::from(got == Err(Error::Abi(HypercallError::Invalid))),
        Ordering::Relaxed,
    );
    frame.rip = rip;
    frame.rflags = (frame.rflags | (3 << 12)) & !(1 << 9);
}

fn rflags() -> u64 {
    let flags: u64;
    // SAFETY: reads the flags through the stack.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) flags) };
    flags
}

fn attacks() -> u32 {
    let info = boot::info();
    let heap = info.heap_start;
    let mut failures = 0;
    failures += expect(
        "trap_return with no handler running",
        hypercall::call(&mut TrapReturn { _reserved: 0 }),
        HypercallError::Invalid,
    );
    let cases = [
        (
            "handle double faults",
            table(0x10_0000, heap + 4096, heap, 1 << 8),
            HypercallError::Invalid,
        ),
        (
            "handler at a kernel address",
            table(1 << 47, heap + 4096, heap, 1 << 14),
            HypercallError::Invalid,
        ),
        (
            "misaligned handler stack",
            table(0x10_0000, heap + 4088, heap, 1 << 14),
            HypercallError::Invalid,
        ),
        (
            "frame in the page tables",
            table(0x10_0000, heap + 4096, 0x1_0000, 1 << 14),
            HypercallError::Fault,
        ),
        (
            "frame past the end of RAM",
            table(0x10_0000, heap + 4096, info.mem_size - 8, 1 << 14),
            HypercallError::Fault,
        ),
    ];
    for (name, mut args, error) in cases {
        failures += expect(name, hypercall::call(&mut args), error);
    }
    if trap::set_handler(trap::vector_bit(trap::BREAKPOINT), forge).is_err() {
        return failures + 1;
    }
    // SAFETY: the handler resumes after the breakpoint.
    unsafe { core::arch::asm!("int3") };
    let forged = FORGED.load(Ordering::Relaxed) == 1;
    println!(
        "return to a kernel address: {}",
        if forged {
            "refused as documented"
        } else {
            "WRONG"
        }
    );
    let flags = rflags();
    let kept = flags & (3 << 12) == 0 && flags & (1 << 9) != 0;
    println!(
        "IOPL 3 and interrupts off asked for: rflags {flags:#x} {}",
        if kept {
            "refused as documented"
        } else {
            "WRONG"
        }
    );
    failures + u32::from(!forged) + u32::from(!kept)
}

fn touch(addr: u64) -> u64 {
    // SAFETY: faults on purpose; the handler decides what happens.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn nested(_: &mut TrapFrame) {
    touch(NESTED);
}

fn ignore(_: &mut TrapFrame) {}

fn main() -> i32 {
    match boot::args().next().unwrap_or("attacks") {
        "attacks" => i32::from(attacks() != 0),
        mode @ ("nested" | "storm") => {
            let handler = if mode == "nested" { nested } else { ignore };
            if trap::set_handler(trap::vector_bit(trap::PAGE_FAULT), handler).is_err() {
                return 1;
            }
            println!("touching {UNMAPPED:#x}");
            touch(UNMAPPED);
            println!("the fault was not taken");
            1
        }
        other => {
            println!("usage: trap-attack [attacks | nested | storm], not {other}");
            2
        }
    }
}
