//! bench: the guest half of `shoal bench`. Arguments: `MODE COUNT`, where
//! MODE is `floor` (null exits), `hypercall` (abi_info round trips),
//! `yield` (yield hypercalls) or `clock` (monotonic clock reads). Prints `result MODE COUNT NANOS`: the
//! total time of COUNT operations measured inside the guest.
#![no_std]
#![no_main]

use shoal_guest::abi::hypercall::AbiInfo;
use shoal_guest::abi::layout::NULL_EXIT_PORT;
use shoal_guest::{boot, hypercall, println, time};

shoal_guest::entry!(main);

fn null_exit() {
    // SAFETY: a 32-bit `out` to the null-exit port only exits to the host,
    // which resumes the guest with all state unchanged.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") NULL_EXIT_PORT, in("eax") 0u32,
            options(nomem, nostack, preserves_flags));
    }
}

fn main() -> i32 {
    let mut args = boot::args();
    let mode = args.next().unwrap_or("floor");
    let count: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let start = time::monotonic_ns();
    match mode {
        "floor" => (0..count).for_each(|_| null_exit()),
        "hypercall" => {
            for _ in 0..count {
                let mut info = AbiInfo::default();
                if hypercall::call(&mut info).is_err() {
                    return 2;
                }
            }
        }
        "yield" => (0..count).for_each(|_| shoal_guest::yield_now()),
        "clock" => {
            let mut last = 0;
            for _ in 0..count {
                let now = time::monotonic_ns();
                if now < last {
                    return 3;
                }
                last = core::hint::black_box(now);
            }
        }
        _ => {
            println!("unknown mode {mode}");
            return 1;
        }
    }
    let elapsed = time::monotonic_ns() - start;
    println!("result {mode} {count} {elapsed}");
    0
}
