//! residue: looks for what an earlier guest left behind. `residue write`
//! stamps a secret over its data segment, heap, stack, x87, SSE, AVX and
//! AVX-512 registers (opmasks included), maps a stamped page at
//! [`WINDOW`], changes the SSE and x87 control words, loads an AMX tile
//! configuration and a tile of the secret, writes the protection-key rights register (PKRU) and
//! the FS and GS bases, loads other DS and ES selectors, and exits with
//! the alignment-check and direction flags set; `residue check` (started
//! later, perhaps in the same VM the host reset for it, perhaps sharing
//! the same image pages) reads its whole memory and all of that CPU state
//! and exits 1 if anything of it shows. It prints the CPU features it
//! found usable (an instruction that raises `#UD` is skipped), so that a
//! test can tell that none of it went unchecked. Everything else a CPL3
//! guest could change is listed in `docs/threat-model.md`. `residue check touch` then reads [`WINDOW`], which it
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

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use shoal_guest::mmu::{self, Batch, WRITE};
use shoal_guest::trap::{self, TrapFrame};
use shoal_guest::{boot, print, println};

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

/// The PKRU `write` leaves (keys 1 to 15 read-only, key 0 open); a new
/// vCPU has 0.
const LEFT_PKRU: u32 = 0x2aaa_aaa8;
/// The FS and GS bases `write` leaves; a new guest starts with 0.
const LEFT_FS_BASE: u64 = 0x5ec2_e75e_c000;
const LEFT_GS_BASE: u64 = 0x5ec2_e75e_d000;
/// The secret as an x87 extended-precision number: its 64-bit significand
/// (the secret with the integer bit set) and sign and exponent.
const X87_SECRET: (u64, u16) = (SECRET | 1 << 63, 0x3fff);
/// The data selectors a guest starts with: the host's user-data
/// selector on hardware KVM; null under PVM, whose guests run on the
/// host's own descriptor tables.
const NEW_SELECTORS: [[u16; 4]; 2] = [[0x18 | 3; 4], [0; 4]];
/// The selector `write` leaves in DS and ES: null, with RPL 3, which any
/// CPL3 code may load.
const LEFT_SELECTOR: u16 = 3;
/// RFLAGS: direction and alignment-check flags.
const RFLAGS_DF: u64 = 1 << 10;
const RFLAGS_AC: u64 = 1 << 18;
/// XCR0 bits: AVX, the three AVX-512 components, the AMX tile
/// configuration.
const XCR0_AVX: u64 = 1 << 2;
const XCR0_AVX512: u64 = 0b111 << 5;
const XCR0_TILECFG: u64 = 1 << 17;
/// Where the AMX tile configuration sits in the standard XSAVE format.
const XSAVE_TILECFG: usize = 2752;

/// In the image's writable data: every guest must start with PRISTINE,
/// whatever an earlier guest of the same image wrote here.
static mut MARK: u64 = PRISTINE;

fn main() -> i32 {
    // Find what the CPU lets a guest use, then read its state before
    // anything else changes it.
    let cpu = Cpu::probe();
    let state = CpuState::read(&cpu);
    let mut args = boot::args();
    let written = match (args.next(), args.next()) {
        (Some("write"), None) => write(true, Heap::Whole),
        (Some("write"), Some("tables")) => write(false, Heap::Whole),
        (Some("write"), Some("ins")) => match write(false, Heap::Ends) {
            0 => pending_ins(),
            failed => failed,
        },
        (Some("check"), None) => return check(&cpu, &state),
        (Some("check"), Some("touch")) => match check(&cpu, &state) {
            0 => {
                // SAFETY: a read of an address this guest never mapped:
                // the host stops the guest here.
                unsafe { (WINDOW as *const u64).read_volatile() as i32 }
            }
            failed => return failed,
        },
        (Some("poison"), None) => poison(),
        _ => {
            println!("usage: residue write [tables|ins] | check [touch] | poison");
            return 2;
        }
    };
    match written {
        0 => stamp_cpu_and_exit(&cpu),
        failed => failed,
    }
}

/// What the CPU lets this guest use: each probed by its instruction.
struct Cpu {
    /// XCR0 (0 when `xgetbv` is not available).
    xcr0: u64,
    /// `rdpkru`/`wrpkru`.
    pku: bool,
    /// `rdfsbase`/`wrfsbase` and the GS forms.
    fsgsbase: bool,
}

/// Set by [`on_invalid_opcode`]: the probed instruction raised `#UD`.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
/// The length of the probed instruction, which the handler skips.
static PROBE_LEN: AtomicU64 = AtomicU64::new(0);

fn on_invalid_opcode(frame: &mut TrapFrame) {
    UNSUPPORTED.store(true, Ordering::SeqCst);
    frame.rip += PROBE_LEN.load(Ordering::SeqCst);
}

/// Runs `probe`, whose first instruction is `len` bytes long and the only
/// one that may raise `#UD`: false if it did (and was skipped).
fn usable(len: u64, probe: impl FnOnce()) -> bool {
    UNSUPPORTED.store(false, Ordering::SeqCst);
    PROBE_LEN.store(len, Ordering::SeqCst);
    probe();
    !UNSUPPORTED.load(Ordering::SeqCst)
}

impl Cpu {
    fn probe() -> Self {
        if trap::set_handler(trap::vector_bit(trap::INVALID_OPCODE), on_invalid_opcode).is_err() {
            println!("cannot catch #UD");
            shoal_guest::exit(3);
        }
        let mut xcr0 = 0u64;
        let xgetbv = usable(3, || {
            let (lo, hi): (u32, u32);
            // SAFETY: reads XCR0 (or raises #UD, which the handler skips).
            unsafe {
                core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi,
                    options(nomem, nostack));
            }
            xcr0 = u64::from(hi) << 32 | u64::from(lo);
        });
        let pku = usable(3, || {
            // SAFETY: reads PKRU (or raises #UD, which the handler skips).
            unsafe {
                core::arch::asm!("rdpkru", in("ecx") 0, out("eax") _, out("edx") _,
                options(nomem, nostack));
            }
        });
        let fsgsbase = usable(5, || {
            // SAFETY: reads the FS base (or raises #UD, which the handler
            // skips).
            unsafe { core::arch::asm!("rdfsbase rax", out("rax") _, options(nomem, nostack)) };
        });
        let _ = trap::clear_handler();
        Self {
            xcr0: if xgetbv { xcr0 } else { 0 },
            pku,
            fsgsbase,
        }
    }

    fn has(&self, xcr0_bits: u64) -> bool {
        self.xcr0 & xcr0_bits == xcr0_bits
    }

    /// What it found, for the test to check.
    fn features(&self) -> [(&'static str, bool); 6] {
        [
            ("xsave", self.xcr0 != 0),
            ("avx", self.has(XCR0_AVX)),
            ("avx512", self.has(XCR0_AVX512)),
            ("amx", self.has(XCR0_TILECFG)),
            ("pku", self.pku),
            ("fsgsbase", self.fsgsbase),
        ]
    }
}

/// The XSAVE area, in the standard format: large enough for every
/// component up to the AMX tiles.
#[repr(C, align(64))]
struct XsaveArea([u8; 12 << 10]);

static mut XSAVE_AREA: XsaveArea = XsaveArea([0; 12 << 10]);

/// The CPU state a guest can change at CPL3, as `check` found it.
struct CpuState {
    /// The XSAVE area (with `xsave`; otherwise the 512-byte `fxsave`
    /// area), whose every word is searched for the secret.
    area: &'static [u8],
    /// XINUSE (`xgetbv 1`): the XSAVE components not in their initial
    /// state.
    in_use: u64,
    pkru: u32,
    fs_base: u64,
    gs_base: u64,
    /// DS, ES, FS, GS.
    selectors: [u16; 4],
    rflags: u64,
}

impl CpuState {
    fn read(cpu: &Cpu) -> Self {
        // SAFETY: the only reference to the area, taken once.
        let area = unsafe { &mut *core::ptr::addr_of_mut!(XSAVE_AREA) };
        let mut in_use = 0;
        // SAFETY: saves the state into the 64-byte aligned area, which is
        // large enough for every component XCR0 enables; `xsave` and
        // `xgetbv` run only where `xgetbv` did.
        unsafe {
            if cpu.xcr0 != 0 {
                core::arch::asm!("xsave64 [{a}]", a = in(reg) area.0.as_mut_ptr(),
                    in("eax") cpu.xcr0 as u32, in("edx") (cpu.xcr0 >> 32) as u32,
                    options(nostack));
                let (lo, hi): (u32, u32);
                core::arch::asm!("xgetbv", in("ecx") 1, out("eax") lo, out("edx") hi,
                    options(nomem, nostack));
                in_use = u64::from(hi) << 32 | u64::from(lo);
            } else {
                core::arch::asm!("fxsave64 [{a}]", a = in(reg) area.0.as_mut_ptr(),
                    options(nostack));
            }
        }
        let len = if cpu.xcr0 != 0 { area.0.len() } else { 512 };
        let (mut pkru, mut fs_base, mut gs_base) = (0, 0, 0);
        // SAFETY: each reads a register, only where its probe ran.
        unsafe {
            if cpu.pku {
                core::arch::asm!("rdpkru", in("ecx") 0, out("eax") pkru, out("edx") _,
                    options(nomem, nostack));
            }
            if cpu.fsgsbase {
                core::arch::asm!("rdfsbase {f}", "rdgsbase {g}", f = out(reg) fs_base,
                    g = out(reg) gs_base, options(nomem, nostack));
            }
        }
        let mut selectors = [0u16; 4];
        let rflags: u64;
        // SAFETY: reads four segment selectors and the flags.
        unsafe {
            core::arch::asm!(
                "mov {0:x}, ds", "mov {1:x}, es", "mov {2:x}, fs", "mov {3:x}, gs",
                out(reg) selectors[0], out(reg) selectors[1], out(reg) selectors[2],
                out(reg) selectors[3], options(nomem, nostack, preserves_flags),
            );
            core::arch::asm!("pushfq", "pop {}", out(reg) rflags, options(nomem));
        }
        Self {
            area: &area.0[..len],
            in_use,
            pkru,
            fs_base,
            gs_base,
            selectors,
            rflags,
        }
    }
}

/// Loads x87, AVX, AVX-512 and AMX state, PKRU and the FS and GS bases,
/// then exits 0 with DF and AC set: nothing compiled runs after that.
fn stamp_cpu_and_exit(cpu: &Cpu) -> ! {
    let secret = [SECRET; 8];
    let x87 = [X87_SECRET.0, u64::from(X87_SECRET.1)];
    // SAFETY: each block loads registers the compiled code of this guest
    // does not use (it is built without AVX), from valid constants, on
    // features the probe found.
    unsafe {
        // A full x87 stack of the secret.
        core::arch::asm!(
            "fninit", "fld tbyte ptr [{x}]", "fld st(0)", "fld st(0)", "fld st(0)",
            "fld st(0)", "fld st(0)", "fld st(0)", "fld st(0)", "fldcw [{f}]",
            x = in(reg) x87.as_ptr(), f = in(reg) &LEFT_FCW, options(nostack),
        );
        if cpu.has(XCR0_AVX512) {
            core::arch::asm!(
                "kmovq k0, [{p}]", "kmovq k1, [{p}]", "kmovq k2, [{p}]", "kmovq k3, [{p}]",
                "kmovq k4, [{p}]", "kmovq k5, [{p}]", "kmovq k6, [{p}]", "kmovq k7, [{p}]",
                "vmovdqu64 zmm0, [{p}]", "vmovdqu64 zmm1, [{p}]", "vmovdqu64 zmm2, [{p}]",
                "vmovdqu64 zmm3, [{p}]", "vmovdqu64 zmm4, [{p}]", "vmovdqu64 zmm5, [{p}]",
                "vmovdqu64 zmm6, [{p}]", "vmovdqu64 zmm7, [{p}]", "vmovdqu64 zmm8, [{p}]",
                "vmovdqu64 zmm9, [{p}]", "vmovdqu64 zmm10, [{p}]", "vmovdqu64 zmm11, [{p}]",
                "vmovdqu64 zmm12, [{p}]", "vmovdqu64 zmm13, [{p}]", "vmovdqu64 zmm14, [{p}]",
                "vmovdqu64 zmm15, [{p}]", "vmovdqu64 zmm16, [{p}]", "vmovdqu64 zmm17, [{p}]",
                "vmovdqu64 zmm18, [{p}]", "vmovdqu64 zmm19, [{p}]", "vmovdqu64 zmm20, [{p}]",
                "vmovdqu64 zmm21, [{p}]", "vmovdqu64 zmm22, [{p}]", "vmovdqu64 zmm23, [{p}]",
                "vmovdqu64 zmm24, [{p}]", "vmovdqu64 zmm25, [{p}]", "vmovdqu64 zmm26, [{p}]",
                "vmovdqu64 zmm27, [{p}]", "vmovdqu64 zmm28, [{p}]", "vmovdqu64 zmm29, [{p}]",
                "vmovdqu64 zmm30, [{p}]", "vmovdqu64 zmm31, [{p}]",
                p = in(reg) secret.as_ptr(), options(nostack),
            );
        } else if cpu.has(XCR0_AVX) {
            core::arch::asm!(
                "vmovdqu ymm0, [{p}]", "vmovdqu ymm1, [{p}]", "vmovdqu ymm2, [{p}]",
                "vmovdqu ymm3, [{p}]", "vmovdqu ymm4, [{p}]", "vmovdqu ymm5, [{p}]",
                "vmovdqu ymm6, [{p}]", "vmovdqu ymm7, [{p}]", "vmovdqu ymm8, [{p}]",
                "vmovdqu ymm9, [{p}]", "vmovdqu ymm10, [{p}]", "vmovdqu ymm11, [{p}]",
                "vmovdqu ymm12, [{p}]", "vmovdqu ymm13, [{p}]", "vmovdqu ymm14, [{p}]",
                "vmovdqu ymm15, [{p}]",
                p = in(reg) secret.as_ptr(), options(nostack),
            );
        }
        if cpu.has(XCR0_TILECFG) {
            // Palette 1, one tile of 16 rows of 64 bytes, loaded with the
            // secret.
            let mut config = [0u8; 64];
            config[0] = 1;
            config[16] = 64;
            config[48] = 16;
            let tile = [SECRET; 128];
            core::arch::asm!(
                "ldtilecfg [{c}]",
                "tileloadd tmm0, [{t} + {stride} * 1]",
                c = in(reg) config.as_ptr(),
                t = in(reg) tile.as_ptr(),
                stride = in(reg) 64u64,
                options(nostack),
            );
        }
        if cpu.pku {
            core::arch::asm!("wrpkru", in("eax") LEFT_PKRU, in("ecx") 0, in("edx") 0,
                options(nomem, nostack));
        }
        if cpu.fsgsbase {
            core::arch::asm!("wrfsbase {f}", "wrgsbase {g}", f = in(reg) LEFT_FS_BASE,
                g = in(reg) LEFT_GS_BASE, options(nomem, nostack));
        }
    }
    raw_exit_with_flags(RFLAGS_DF | RFLAGS_AC)
}

/// The `exit` hypercall made by hand: [`LEFT_SELECTOR`] in DS and ES,
/// `flags` set in
/// RFLAGS, then the `out`, with no compiled code in between.
fn raw_exit_with_flags(flags: u64) -> ! {
    use shoal_guest::abi::HypercallNr;
    use shoal_guest::abi::hypercall::{Exit, Hypercall};
    use shoal_guest::abi::layout::HYPERCALL_PORT;
    // The block: header (number, argument length, result) and the code.
    let block: [u64; 3] = [
        (u64::from(Exit::ARG_LEN) << 32) | HypercallNr::Exit as u64,
        0,
        0,
    ];
    // SAFETY: ends the guest; the block is valid and 8-byte aligned.
    unsafe {
        core::arch::asm!(
            "mov ds, {z:x}", "mov es, {z:x}",
            "pushfq", "or [rsp], {f}", "popfq",
            "out dx, eax",
            "ud2",
            z = in(reg) u64::from(LEFT_SELECTOR),
            f = in(reg) flags,
            in("dx") HYPERCALL_PORT,
            in("eax") block.as_ptr() as usize as u32,
            options(noreturn),
        );
    }
}

/// Takes every access right from protection key 0, which every page of
/// the guest has, and touches the stack: the guest stops with a page
/// fault, leaving PKRU so for the host to put right.
fn poison() -> i32 {
    // SAFETY: the store faults; nothing runs after it.
    unsafe {
        core::arch::asm!("wrpkru", "push rax", "ud2",
            in("eax") 0x5555_5555u32, in("ecx") 0, in("edx") 0, options(noreturn));
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

fn check(cpu: &Cpu, state: &CpuState) -> i32 {
    let mut found = 0;
    // Every 8-byte word of the x87, SSE, AVX, AVX-512 and AMX state.
    let words = state
        .area
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]));
    for (i, word) in words.enumerate() {
        if word == SECRET || word == X87_SECRET.0 {
            println!("secret in the XSAVE area at offset {}", i * 8);
            found += 1;
            break;
        }
    }
    // The control words, in the legacy area.
    let fcw = u16::from_le_bytes([state.area[0], state.area[1]]);
    let mxcsr = u32::from_le_bytes(state.area[24..28].try_into().unwrap_or([0; 4]));
    if (mxcsr, fcw) != (0x1f80, 0x37f) {
        println!("control words {mxcsr:#x} and {fcw:#x}, not a new vCPU's");
        found += 1;
    }
    // Only x87, SSE and PKRU may be in use: the guest's own start-up may
    // use the first two, and PKRU reads as in use here however it is set.
    let in_use = state.in_use & !(0b11 | 1 << 9);
    if in_use != 0 {
        println!("XSAVE components {in_use:#x} left in use");
        found += 1;
    }
    if cpu.has(XCR0_TILECFG)
        && state.area[XSAVE_TILECFG..XSAVE_TILECFG + 64]
            .iter()
            .any(|&b| b != 0)
    {
        println!("an AMX tile configuration left loaded");
        found += 1;
    }
    if state.pkru != 0 {
        println!("PKRU {:#x}, not a new vCPU's 0", state.pkru);
        found += 1;
    }
    if (state.fs_base, state.gs_base) != (0, 0) {
        println!("FS base {:#x}, GS base {:#x}", state.fs_base, state.gs_base);
        found += 1;
    }
    if !NEW_SELECTORS.contains(&state.selectors) {
        println!("data selectors {:x?}", state.selectors);
        found += 1;
    }
    if state.rflags & (RFLAGS_DF | RFLAGS_AC) != 0 {
        println!("RFLAGS {:#x}", state.rflags);
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
    print!("clean: {words} words and the CPU state; checked:");
    for (name, _) in cpu.features().iter().filter(|(_, usable)| *usable) {
        print!(" {name}");
    }
    println!();
    0
}
