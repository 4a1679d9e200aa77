//! residue: looks for what an earlier guest left behind. `residue write`
//! stamps a secret over its data segment, heap, stack and SSE registers,
//! then exits; `residue check` (started later, perhaps in the same VM the
//! host reused, perhaps sharing the same image pages) reads its whole
//! memory and registers and exits 1 if the secret shows anywhere.
#![no_std]
#![no_main]

use shoal_guest::{boot, println};

shoal_guest::entry!(main);

const SECRET: u64 = 0x5ec2_e75e_c2e7_5ec2;
const PRISTINE: u64 = 0x0123_4567_89ab_cdef;

/// In the image's writable data: every guest must start with PRISTINE,
/// whatever an earlier guest of the same image wrote here.
static mut MARK: u64 = PRISTINE;

fn main() -> i32 {
    // Read the SSE registers before anything else can use them.
    let xmm = sse_registers();
    match boot::args().next() {
        Some("write") => write(),
        Some("check") => check(&xmm),
        _ => {
            println!("usage: residue write|check");
            2
        }
    }
}

fn write() -> i32 {
    // SAFETY: the guest is single-threaded; nothing else touches MARK.
    unsafe { core::ptr::addr_of_mut!(MARK).write_volatile(SECRET) };
    let info = boot::info();
    for addr in (info.heap_start..info.heap_end).step_by(8) {
        // SAFETY: the heap is mapped writable and unused by anything else.
        unsafe { (addr as *mut u64).write_volatile(SECRET) };
    }
    let mut stack = [0u64; 1024];
    for word in &mut stack {
        // SAFETY: `word` is a valid, exclusive reference.
        unsafe { core::ptr::write_volatile(word, SECRET) };
    }
    core::hint::black_box(&stack);
    // SAFETY: only loads SSE registers, which this code does not rely on.
    unsafe {
        core::arch::asm!(
            "movq xmm0, {s}", "movq xmm1, {s}", "movq xmm2, {s}", "movq xmm3, {s}",
            "movq xmm4, {s}", "movq xmm5, {s}", "movq xmm6, {s}", "movq xmm7, {s}",
            "movq xmm8, {s}", "movq xmm9, {s}", "movq xmm10, {s}", "movq xmm11, {s}",
            "movq xmm12, {s}", "movq xmm13, {s}", "movq xmm14, {s}", "movq xmm15, {s}",
            s = in(reg) SECRET,
            options(nomem, nostack),
        );
    }
    0
}

fn check(xmm: &[u64; 16]) -> i32 {
    let mut found = 0;
    if let Some(i) = xmm.iter().position(|&r| r == SECRET) {
        println!("secret in xmm{i}");
        found += 1;
    }
    // SAFETY: the guest is single-threaded; nothing else touches MARK.
    let mark = unsafe { core::ptr::addr_of!(MARK).read_volatile() };
    if mark != PRISTINE {
        println!("data segment holds {mark:#x}, not the image's value");
        found += 1;
    }
    let info = boot::info();
    let mut words = 0u64;
    for range in [
        info.heap_start..info.heap_end,
        info.stack_bottom..info.stack_top,
    ] {
        for addr in range.step_by(8) {
            // SAFETY: heap and stack are mapped readable.
            if unsafe { (addr as *const u64).read_volatile() } == SECRET {
                println!("secret at {addr:#x}");
                return 1;
            }
            words += 1;
        }
    }
    if found > 0 {
        return 1;
    }
    println!("clean: {words} words and 16 SSE registers");
    0
}

fn sse_registers() -> [u64; 16] {
    let mut regs = [0u64; 16];
    // SAFETY: stores the low quadwords of the SSE registers into `regs`,
    // which is valid for 16 writes.
    unsafe {
        core::arch::asm!(
            "movq [{p}], xmm0", "movq [{p} + 8], xmm1", "movq [{p} + 16], xmm2",
            "movq [{p} + 24], xmm3", "movq [{p} + 32], xmm4", "movq [{p} + 40], xmm5",
            "movq [{p} + 48], xmm6", "movq [{p} + 56], xmm7", "movq [{p} + 64], xmm8",
            "movq [{p} + 72], xmm9", "movq [{p} + 80], xmm10", "movq [{p} + 88], xmm11",
            "movq [{p} + 96], xmm12", "movq [{p} + 104], xmm13", "movq [{p} + 112], xmm14",
            "movq [{p} + 120], xmm15",
            p = in(reg) regs.as_mut_ptr(),
            options(nostack),
        );
    }
    regs
}
