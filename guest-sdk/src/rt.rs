//! The runtime every guest links: the entry point, the ABI note, the panic
//! handler, and the memory functions `core` expects from a C library.

use core::fmt::Write;
use shoal_abi::hypercall::{PANIC_TEXT_MAX, Panic};
use shoal_abi::note::AbiNote;

/// The ABI version note the host checks before it loads the image.
#[used]
#[unsafe(link_section = ".note.shoal")]
static ABI_NOTE: AbiNote = AbiNote::new(shoal_abi::ABI_VERSION);

// The host starts the guest at `_start` at CPL3 with `rsp` at the top of
// the stack it mapped, interrupts off, and BSS already zeroed (the loader
// zero-fills every segment past its file size). Align the stack, clear the
// frame pointer for backtraces, and enter Rust.
core::arch::global_asm!(
    ".pushsection .text.shoal_start, \"ax\"",
    ".globl _start",
    "_start:",
    "    xor ebp, ebp",
    "    and rsp, -16",
    "    call {start}",
    "    ud2",
    ".popsection",
    start = sym start,
);

unsafe extern "Rust" {
    /// Defined by [`crate::entry!`] in the guest crate.
    safe fn __shoal_guest_main() -> i32;
}

extern "C" fn start() -> ! {
    crate::exit(__shoal_guest_main())
}

struct Truncating<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Write for Truncating<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut buf = [0u8; PANIC_TEXT_MAX as usize];
    let mut msg = Truncating {
        buf: &mut buf,
        len: 0,
    };
    let _ = write!(msg, "{}", info.message());
    let len = msg.len;
    let (file, line, column) = info
        .location()
        .map_or(("<unknown>", 0, 0), |l| (l.file(), l.line(), l.column()));
    let mut args = Panic {
        msg_addr: buf.as_ptr() as u64,
        msg_len: len as u64,
        file_addr: file.as_ptr() as u64,
        file_len: file.len() as u64,
        line,
        column,
    };
    let _ = crate::hypercall::call(&mut args);
    crate::exit(shoal_abi::hypercall::PANIC_EXIT_CODE)
}

/// Unoptimized `core` still names the unwinding personality routine even
/// with `panic = "abort"`; it is never called.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

// The C memory functions. `compiler_builtins` does not provide them for
// this target (it expects the C library to), so the SDK does, with the
// string instructions: no loops the compiler could turn back into calls.

/// # Safety
/// As C `memcpy`: both ranges valid for `n` bytes and not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes.
    unsafe {
        core::arch::asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// # Safety
/// As C `memmove`: both ranges valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // Forward copy is safe: `dest` is before `src` or past its end.
        // SAFETY: the caller guarantees both ranges are valid for `n` bytes.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: overlapping with `dest` after `src`: copy backwards from the
    // last byte with the direction flag set, then clear it (the ABI's
    // default).
    unsafe {
        core::arch::asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        );
    }
    dest
}

/// # Safety
/// As C `memset`: `dest` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `dest` is valid for `n` bytes.
    unsafe {
        core::arch::asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") value as u8,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// # Safety
/// As C `memcmp`: both ranges valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n` and the caller guarantees both ranges hold `n` bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As C `bcmp`: both ranges valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as `memcmp`.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `alloc` library names the unwinder's resume routine in
/// landing pads that never run with `panic = "abort"`; should one run, the
/// guest ends as if it panicked.
#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    crate::exit(shoal_abi::hypercall::PANIC_EXIT_CODE)
}
