//! privileged: executes an instruction the ABI does not give a guest, at
//! CPL3, and says so if it returns. `privileged` (or `privileged hlt`):
//! `hlt`, which the host must stop with a general-protection fault and its
//! rip. `privileged syscall`: `syscall`, an invalid opcode for a guest.
//! `privileged int3`: a breakpoint. `privileged int80`: `int 0x80`, a
//! software interrupt through a gate the guest may not use.
//! `privileged rep-out`: `rep outsd` to the hypercall port of the
//! addresses of two `console_write` blocks (`one` and `two`), string I/O
//! that is not part of the ABI (`docs/abi.md` §3 says what becomes of it).
//! `privileged syscall-caught`: `syscall` with a `#UD` handler, which
//! checks that the frame's rip is the `syscall` itself and skips it;
//! prints `syscall: #UD at the instruction` and exits 0.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, Ordering};
use shoal_guest::abi::HypercallNr;
use shoal_guest::abi::hypercall::{ConsoleWrite, Hypercall};
use shoal_guest::abi::layout::HYPERCALL_PORT;
use shoal_guest::trap::{self, TrapFrame};
use shoal_guest::{boot, println};

shoal_guest::entry!(main);

/// A `console_write` argument block: header (number, argument length,
/// result) and the call's struct.
#[repr(C, align(8))]
struct WriteBlock {
    nr: u32,
    arg_len: u32,
    ret: i64,
    args: ConsoleWrite,
}

impl WriteBlock {
    fn new(text: &'static [u8]) -> Self {
        Self {
            nr: HypercallNr::ConsoleWrite as u32,
            arg_len: ConsoleWrite::ARG_LEN,
            ret: 0,
            args: ConsoleWrite {
                addr: text.as_ptr() as u64,
                len: text.len() as u64,
            },
        }
    }
}

/// Set by [`on_invalid_opcode`] when the frame's rip was a `syscall`.
static SYSCALL_SEEN: AtomicBool = AtomicBool::new(false);

fn on_invalid_opcode(frame: &mut TrapFrame) {
    // SAFETY: reads two bytes of this guest's own code.
    let bytes = unsafe { (frame.rip as *const [u8; 2]).read_volatile() };
    if bytes == [0x0f, 0x05] {
        SYSCALL_SEEN.store(true, Ordering::SeqCst);
        frame.rip += 2;
    }
}

fn main() -> i32 {
    let mode = boot::args().next().unwrap_or("hlt");
    if mode == "syscall-caught" {
        if trap::set_handler(trap::vector_bit(trap::INVALID_OPCODE), on_invalid_opcode).is_err() {
            println!("cannot catch #UD");
            return 1;
        }
        // SAFETY: raises #UD, which the handler skips; rcx and r11 are
        // declared clobbered (the instruction writes them first).
        unsafe { core::arch::asm!("syscall", out("rcx") _, out("r11") _, options(nostack)) };
        if !SYSCALL_SEEN.load(Ordering::SeqCst) {
            println!("syscall did not raise #UD at itself");
            return 1;
        }
        println!("syscall: #UD at the instruction");
        return 0;
    }
    println!("executing {mode} at CPL3");
    // SAFETY: each arm is an instruction the host stops the guest at (or,
    // for `rep-out` under PVM, two console writes of valid blocks); none
    // reaches anything outside the guest.
    unsafe {
        match mode {
            "hlt" => core::arch::asm!("hlt", options(nomem, nostack)),
            "syscall" => core::arch::asm!("syscall", out("rcx") _, out("r11") _, options(nostack)),
            "int3" => core::arch::asm!("int3", options(nomem, nostack)),
            "int80" => core::arch::asm!("int 0x80", options(nomem, nostack)),
            "rep-out" => {
                let blocks = [WriteBlock::new(b"one\n"), WriteBlock::new(b"two\n")];
                let words = blocks
                    .each_ref()
                    .map(|b| b as *const WriteBlock as usize as u32);
                core::arch::asm!(
                    "rep outsd",
                    in("dx") HYPERCALL_PORT,
                    inout("rsi") words.as_ptr() => _,
                    inout("rcx") 2u64 => _,
                    options(nostack, readonly),
                );
            }
            other => {
                println!(
                    "usage: privileged [hlt|syscall|syscall-caught|int3|int80|rep-out], not {other}"
                );
                return 2;
            }
        }
    }
    println!("{mode} did not fault");
    1
}
