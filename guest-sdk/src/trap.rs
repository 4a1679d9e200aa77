//! Handling the guest's own exceptions: a page fault on an unmapped page,
//! a breakpoint, a divide error.
//!
//! [`set_handler`] registers one handler for a set of vectors with the host
//! (`set_trap_table`). When such an exception happens, the host saves the
//! guest's state in a [`TrapFrame`] and runs the handler on a stack of its
//! own; when the handler returns, the guest resumes with the frame's
//! registers (`trap_return`), so a handler that edits the frame changes
//! where and how the guest goes on. The SDK saves and restores the SSE
//! state around the handler, so the interrupted code sees every register
//! as it left it.
//!
//! One handler runs at a time: an exception inside the handler stops the
//! guest, with the state of that second exception.
//!
//! ```text
//! fn on_fault(frame: &mut TrapFrame) {
//!     // map a frame at frame.fault_addr, then return to retry the access
//! }
//! trap::set_handler(trap::vector_bit(trap::PAGE_FAULT), on_fault)?;
//! ```

use crate::hypercall::{self, Error};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};
use shoal_abi::HypercallNr;
use shoal_abi::hypercall::{Hypercall, SetTrapTable, TrapReturn};
use shoal_abi::layout::HYPERCALL_PORT;

pub use shoal_abi::hypercall::TrapFrame;

/// Divide error (`#DE`).
pub const DIVIDE_ERROR: u8 = 0;
/// Breakpoint (`#BP`, `int3`).
pub const BREAKPOINT: u8 = 3;
/// Invalid opcode (`#UD`).
pub const INVALID_OPCODE: u8 = 6;
/// General protection fault (`#GP`).
pub const GENERAL_PROTECTION: u8 = 13;
/// Page fault (`#PF`): [`TrapFrame::fault_addr`] is the address.
pub const PAGE_FAULT: u8 = 14;

/// Page-fault error code: the page was present (a protection fault).
pub const PF_PRESENT: u64 = 1 << 0;
/// Page-fault error code: the access was a write.
pub const PF_WRITE: u64 = 1 << 1;
/// Page-fault error code: the access was an instruction fetch.
pub const PF_FETCH: u64 = 1 << 4;

/// The bit of `vector` in [`set_handler`]'s set.
pub const fn vector_bit(vector: u8) -> u32 {
    1 << vector
}

/// A handler: gets the state at the exception and may change it.
pub type Handler = fn(&mut TrapFrame);

const STACK_SIZE: usize = 16 << 10;

/// The handler's stack and the frame the host fills in. Statics of the
/// image, so their addresses are also their guest-physical addresses.
#[repr(C, align(16))]
struct Area {
    stack: [u8; STACK_SIZE],
    frame: TrapFrame,
}

struct Shared(UnsafeCell<Area>);

// SAFETY: only the host writes the frame (while the guest is stopped) and
// only the single running handler reads and writes the area.
unsafe impl Sync for Shared {}

static AREA: Shared = Shared(UnsafeCell::new(Area {
    stack: [0; STACK_SIZE],
    frame: TrapFrame {
        vector: 0,
        _pad: 0,
        error_code: 0,
        fault_addr: 0,
        rip: 0,
        rsp: 0,
        rflags: 0,
        rax: 0,
        rbx: 0,
        rcx: 0,
        rdx: 0,
        rsi: 0,
        rdi: 0,
        rbp: 0,
        r8: 0,
        r9: 0,
        r10: 0,
        r11: 0,
        r12: 0,
        r13: 0,
        r14: 0,
        r15: 0,
    },
}));

/// The registered [`Handler`], as an address (0: none).
static HANDLER: AtomicUsize = AtomicUsize::new(0);

/// The `trap_return` block the entry code builds: header (nr, arg_len,
/// ret) and the one reserved argument word.
const TRAP_RETURN_HEADER: u64 =
    ((TrapReturn::ARG_LEN as u64) << 32) | HypercallNr::TrapReturn as u64;

// The host enters here with `rsp` at the top of the handler stack and
// `rdi` at the frame. Save the SSE state (compiled code may use it), run
// the handler, restore, then `trap_return` from a block on the stack
// without touching the SSE registers again.
core::arch::global_asm!(
    ".pushsection .text.shoal_trap, \"ax\"",
    ".globl shoal_trap_entry",
    "shoal_trap_entry:",
    "    sub rsp, 512",
    "    fxsave64 [rsp]",
    "    call {dispatch}",
    "    fxrstor64 [rsp]",
    "    add rsp, 512",
    "    push 0",
    "    push 0",
    "    mov rax, {header}",
    "    push rax",
    "    mov eax, esp",
    "    mov dx, {port}",
    "    out dx, eax",
    "    mov rdi, [rsp + 8]",
    "    and rsp, -16",
    "    call {refused}",
    "    ud2",
    ".popsection",
    dispatch = sym dispatch,
    refused = sym refused,
    header = const TRAP_RETURN_HEADER,
    port = const HYPERCALL_PORT,
);

unsafe extern "C" {
    fn shoal_trap_entry();
}

extern "C" fn dispatch(frame: *mut TrapFrame) {
    let handler = HANDLER.load(Ordering::Acquire);
    if handler == 0 {
        panic!("exception with no handler registered");
    }
    // SAFETY: only `set_handler` stores into HANDLER, and only addresses
    // of `Handler` functions.
    let handler: Handler = unsafe { core::mem::transmute::<usize, Handler>(handler) };
    // SAFETY: the host passes the frame registered by `set_handler`, in
    // the static area; nothing else touches it while the handler runs.
    handler(unsafe { &mut *frame });
}

extern "C" fn refused(ret: i64) -> ! {
    panic!("trap_return refused: {:?}", Error::from(ret))
}

/// Registers `handler` for the vectors whose bits are set in `vectors`
/// (see [`vector_bit`]), replacing any earlier handler. Exceptions of other
/// vectors stop the guest as before.
pub fn set_handler(vectors: u32, handler: Handler) -> Result<(), Error> {
    HANDLER.store(handler as usize, Ordering::Release);
    let area = AREA.0.get();
    // SAFETY: only addresses are taken; the area is a static.
    let (stack, frame) = unsafe {
        (
            core::ptr::addr_of!((*area).frame) as u64,
            core::ptr::addr_of_mut!((*area).frame) as u64,
        )
    };
    hypercall::call(&mut SetTrapTable {
        entry: shoal_trap_entry as *const () as usize as u64,
        // The stack ends where the frame starts (16-byte aligned: the area
        // is, and the stack's size is a multiple of 16).
        stack,
        frame,
        vectors,
        _pad: 0,
    })
    .map(|_| ())
}

/// Removes the handler: every exception stops the guest again.
pub fn clear_handler() -> Result<(), Error> {
    hypercall::call(&mut SetTrapTable::default())?;
    HANDLER.store(0, Ordering::Release);
    Ok(())
}
