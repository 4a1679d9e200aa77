//! privileged: executes `hlt`, a privileged instruction, at CPL3. The host
//! must stop the guest with a general-protection fault and its rip.
#![no_std]
#![no_main]

use shoal_guest::println;

shoal_guest::entry!(main);

fn main() -> i32 {
    println!("executing hlt at CPL3");
    // SAFETY: deliberately privileged: at CPL3 `hlt` raises #GP and the
    // host stops the guest; it never halts anything.
    unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
    println!("hlt did not fault");
    1
}
