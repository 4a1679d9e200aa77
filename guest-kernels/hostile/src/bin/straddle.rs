//! straddle: issues a hypercall whose argument block straddles the end of
//! guest memory. The host cannot write a result there, so it must stop the
//! guest with "bad hypercall memory" (and nothing else).
#![no_std]
#![no_main]

use shoal_guest::abi::{HypercallHeader, hypercall::HypercallNr};
use shoal_guest::{boot, hypercall, println};

shoal_guest::entry!(main);

fn main() -> i32 {
    let top = boot::info().stack_top;
    // The last 8 bytes of RAM are mapped (top of the stack); the header's
    // second half would be past the end.
    let block = (top - 8) as *mut HypercallHeader;
    println!(
        "hypercall with its block at {:#x}, 8 bytes before the end",
        top - 8
    );
    // SAFETY: only the first 8 bytes (nr, arg_len), which are inside RAM,
    // are written; the header's `ret` lies past the end and is never touched
    // by the guest.
    unsafe {
        core::ptr::addr_of_mut!((*block).nr).write_volatile(HypercallNr::WallClock as u32);
        core::ptr::addr_of_mut!((*block).arg_len).write_volatile(8);
    }
    // SAFETY: deliberately invalid: the block straddles the end of RAM,
    // and the host must stop the guest rather than return.
    let _ = unsafe { hypercall::raw(block) };
    println!("the host returned from a straddling hypercall");
    1
}
