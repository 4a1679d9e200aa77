//! residue: looks for what an earlier guest left behind. `residue write`
//! stamps a secret over its data segment, heap, stack and SSE registers,
//! maps a stamped page at [`WINDOW`], changes the SSE and x87 control
//! words, then exits; `residue check` (started later, perhaps in the same
//! VM the host reset for it, perhaps sharing the same image pages) reads
//! its whole memory, registers and control words and exits 1 if anything
//! of that shows. `residue check touch` then reads [`WINDOW`], which it
//! never mapped: the host must stop it with a page fault there.
//! `residue write tables` writes everything but the page at [`WINDOW`],
//! leaving its page tables as the image's template has them (the host may
//! then keep KVM's shadow of them for the next guest). `residue write
//! ins` does the same but stamps only the first and last pages of the
//! heap (the host may then put those few pages right in place rather than
//! give them all back), then ends in a string `in` into its data segment,
//! which the host refuses: KVM completes it as the host resets the VM,
//! and it must land in this guest's memory, not the next one's.
#![no_std]
#![no_main]

use shoal_guest::mmu::{self, Batch, WRITE};
use shoal_guest::{boot, println};

shoal_guest::entry!(main);

const SECRET: u64 = 0x5ec2_e75e_c2e7_5ec2;
const PRISTINE: u64 = 0x0123_4567_89ab_cdef;
/// Where `write` maps a stamped page.
const WINDOW: u64 = 0x50_0000_0000;
/// The SSE control word `write` leaves (round toward zero); a new vCPU
/// has `0x1f80`.
const LEFT_MXCSR: u32 = 0x7f80;
/// The x87 control word `write` leaves (single precision); a new vCPU has
/// `0x37f`.
const LEFT_FCW: u16 = 0x07f;

/// In the image's writable data: every guest must start with PRISTINE,
/// whatever an earlier guest of the same image wrote here.
static mut MARK: u64 = PRISTINE;

fn main() -> i32 {
    // Read the SSE registers before anything else can use them.
    let sse = sse_state();
    let mut args = boot::args();
    match (args.next(), args.next()) {
        (Some("write"), None) => write(true, Heap::Whole),
        (Some("write"), Some("tables")) => write(false, Heap::Whole),
        (Some("write"), Some("ins")) => match write(false, Heap::Ends) {
            0 => pending_ins(),
            failed => failed,
        },
        (Some("check"), None) => check(&sse),
        (Some("check"), Some("touch")) => match check(&sse) {
            0 => {
                // SAFETY: a read of an address this guest never mapped:
                // the host stops the guest here.
                unsafe { (WINDOW as *const u64).read_volatile() as i32 }
            }
            failed => failed,
        },
        _ => {
            println!("usage: residue write [tables|ins] | check [touch]");
            2
        }
    }
}

/// How much of the heap [`write`] stamps.
#[derive(Clone, Copy)]
enum Heap {
    /// All of it.
    Whole,
    /// Its first and last pages.
    Ends,
}

/// Stamps the secret everywhere, over `heap`; `map_window`: at
/// [`WINDOW`] too.
fn write(map_window: bool, heap: Heap) -> i32 {
    // SAFETY: the guest is single-threaded; nothing else touches MARK.
    unsafe { core::ptr::addr_of_mut!(MARK).write_volatile(SECRET) };
    let info = boot::info();
    let (start, end) = (info.heap_start, info.heap_end);
    let stamped = match heap {
        Heap::Whole => [start..end, 0..0],
        Heap::Ends => [start..start + 4096, end - 4096..end],
    };
    for addr in stamped.into_iter().flat_map(|range| range.step_by(8)) {
        // SAFETY: the heap is mapped writable and unused by anything else.
        unsafe { (addr as *mut u64).write_volatile(SECRET) };
    }
    let mut stack = [0u64; 1024];
    for word in &mut stack {
        // SAFETY: `word` is a valid, exclusive reference.
        unsafe { core::ptr::write_volatile(word, SECRET) };
    }
    core::hint::black_box(&stack);
    if map_window {
        // The top page of the stamped heap, mapped once more at WINDOW.
        let mut frame = [0u64];
        let mut batch = Batch::new();
        if mmu::take_heap(1).is_err()
            || mmu::alloc_frames(&mut frame).is_err()
            || batch.map(WINDOW, frame[0], WRITE).is_err()
            || batch.flush().is_err()
        {
            println!("cannot map {WINDOW:#x}");
            return 1;
        }
        // SAFETY: mapped writable just now.
        unsafe { (WINDOW as *mut u64).write_volatile(SECRET) };
    }
    // SAFETY: loads SSE registers (declared clobbered) and valid control
    // words from two constants.
    unsafe {
        core::arch::asm!(
            "movq xmm0, {s}", "movq xmm1, {s}", "movq xmm2, {s}", "movq xmm3, {s}",
            "movq xmm4, {s}", "movq xmm5, {s}", "movq xmm6, {s}", "movq xmm7, {s}",
            "movq xmm8, {s}", "movq xmm9, {s}", "movq xmm10, {s}", "movq xmm11, {s}",
            "movq xmm12, {s}", "movq xmm13, {s}", "movq xmm14, {s}", "movq xmm15, {s}",
            "ldmxcsr [{m}]",
            "fldcw [{f}]",
            s = in(reg) SECRET,
            m = in(reg) &LEFT_MXCSR,
            f = in(reg) &LEFT_FCW,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(readonly, nostack),
        );
    }
    0
}

/// Leaves the secret in KVM's port data (a null exit's `out`), then makes
/// a string `in` of two words to [`MARK`]: the host stops the guest at it,
/// and KVM copies the port data there when it completes the instruction.
fn pending_ins() -> i32 {
    use shoal_guest::abi::layout::NULL_EXIT_PORT;
    // SAFETY: a 32-bit `out` to the null-exit port: the host resumes.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") NULL_EXIT_PORT, in("eax") SECRET as u32,
            options(nomem, nostack));
    }
    // SAFETY: writes at most the 8 bytes of MARK; the host stops the
    // guest here anyway.
    unsafe {
        core::arch::asm!(
            "rep insd",
            in("dx") NULL_EXIT_PORT,
            inout("rdi") core::ptr::addr_of_mut!(MARK) => _,
            inout("rcx") 2u64 => _,
            options(nostack),
        );
    }
    println!("the host let a string in through");
    1
}

fn check(sse: &Sse) -> i32 {
    let mut found = 0;
    if let Some(i) = sse.xmm.iter().position(|&r| r == SECRET) {
        println!("secret in xmm{i}");
        found += 1;
    }
    if (sse.mxcsr, sse.fcw) != (0x1f80, 0x37f) {
        println!(
            "control words {:#x} and {:#x}, not a new vCPU's",
            sse.mxcsr, sse.fcw
        );
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

/// The SSE registers (low quadwords) and the SSE and x87 control words.
struct Sse {
    xmm: [u64; 16],
    mxcsr: u32,
    fcw: u16,
}

fn sse_state() -> Sse {
    let mut regs = [0u64; 16];
    let (mut mxcsr, mut fcw) = (0u32, 0u16);
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
    // SAFETY: stores the control words into two locals, which changes no
    // register.
    unsafe {
        core::arch::asm!(
            "stmxcsr [{m}]",
            "fnstcw [{f}]",
            m = in(reg) &mut mxcsr,
            f = in(reg) &mut fcw,
            options(nostack, preserves_flags),
        );
    }
    Sse {
        xmm: regs,
        mxcsr,
        fcw,
    }
}
