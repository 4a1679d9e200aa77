//! console-ring: uses, and misuses, the console ring in the event page.
//! Modes:
//! - `flood N`: prints N numbered lines with no exit in between, many
//!   more bytes than the ring holds, so some go by hypercall when it is
//!   full; all must arrive, in order.
//! - `spin`: prints a line into the ring and computes forever without an
//!   exit; the host must take the line when it stops the guest.
//! - `fill`: prints four lines of 512 bytes, exactly what the ring holds,
//!   with no exit: none may need a hypercall.
//! - `tail`: writes a wrong `tail` (the host's word), then prints: the SDK
//!   falls back to a hypercall, at which the host must put the tail right,
//!   and the output must still arrive.
//! - `overrun`: prints a line and hands it over, then claims more bytes
//!   than the ring holds and makes a hypercall: the host must stop it.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};
use shoal_guest::abi::event::{CONSOLE_RING_OFFSET, CONSOLE_RING_SIZE};
use shoal_guest::abi::layout::EVENT_PAGE;
use shoal_guest::{boot, console, println, time};

shoal_guest::entry!(main);

/// The ring's `head` (`0`) or `tail` (`1`) word.
fn ring_word(index: usize) -> &'static AtomicU32 {
    // SAFETY: the event page is mapped read-write for the guest's life;
    // the ring's two words sit at `CONSOLE_RING_OFFSET`.
    unsafe { &*((EVENT_PAGE + CONSOLE_RING_OFFSET) as *const AtomicU32).add(index) }
}

fn main() -> i32 {
    let mut args = boot::args();
    let mode = args.next().unwrap_or("flood");
    let count: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    match mode {
        "flood" => {
            for i in 0..count {
                println!("line {i:05} of the flood, with no exit in between");
            }
            0
        }
        "spin" => {
            println!("in the ring before the spin");
            let mut x: u64 = 1;
            loop {
                x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        "fill" => {
            let line = [b'f'; 511];
            let line = core::str::from_utf8(&line).unwrap_or_default();
            for _ in 0..4 {
                println!("{line}");
            }
            0
        }
        "tail" => {
            let head = ring_word(0).load(Ordering::Relaxed);
            ring_word(1).store(head.wrapping_add(1000), Ordering::Release);
            for i in 0..count {
                println!("line {i:05} after a wrong tail");
            }
            0
        }
        "overrun" => {
            println!("handed over before the overrun");
            console::flush();
            let head = ring_word(0).load(Ordering::Relaxed);
            ring_word(0).store(head.wrapping_add(CONSOLE_RING_SIZE + 1), Ordering::Release);
            let _ = time::wall_ns();
            println!("the host let a broken ring through");
            1
        }
        _ => {
            println!("usage: console-ring flood|fill|spin|tail|overrun [N]");
            2
        }
    }
}
