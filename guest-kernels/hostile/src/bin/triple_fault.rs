//! triple-fault: writes through a null pointer with no fault handler, the
//! classic way to triple-fault a bare machine. The host must stop the guest
//! and report a page fault at address 0 with the faulting rip.
#![no_std]
#![no_main]

use shoal_guest::println;

shoal_guest::entry!(main);

fn main() -> i32 {
    println!("writing to address 0");
    // SAFETY: deliberately invalid: the null page is never mapped, so this
    // write faults and the host stops the guest.
    unsafe { core::ptr::write_volatile(core::ptr::null_mut::<u64>(), 0x5ca1ab1e) };
    println!("the write to address 0 did not fault");
    1
}
