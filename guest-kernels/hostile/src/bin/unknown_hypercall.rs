//! unknown-hypercall: calls numbers the host does not know and a known
//! call with the wrong argument length, through the raw escape hatch.
//! Exits 0 when each got its documented error, 1 otherwise.
#![no_std]
#![no_main]

use shoal_guest::abi::{HypercallError, HypercallHeader};
use shoal_guest::{hypercall, println};

shoal_guest::entry!(main);

#[repr(C, align(8))]
struct Block {
    header: HypercallHeader,
    args: [u64; 4],
}

fn raw(nr: u32, arg_len: u32) -> i64 {
    let mut block = Block {
        header: HypercallHeader {
            nr,
            arg_len,
            ret: 0,
        },
        args: [0; 4],
    };
    // SAFETY: `block` is an aligned local with room for the header and 32
    // argument bytes, more than any `arg_len` used here.
    unsafe { hypercall::raw(core::ptr::addr_of_mut!(block).cast()) }
}

fn main() -> i32 {
    let cases = [
        ("number 999", 999, 0, HypercallError::UnknownHypercall),
        (
            "number 0xdead",
            0xdead,
            16,
            HypercallError::UnknownHypercall,
        ),
        (
            "number u32::MAX",
            u32::MAX,
            0,
            HypercallError::UnknownHypercall,
        ),
        (
            "wall_clock with arg_len 32",
            3,
            32,
            HypercallError::BadLength,
        ),
        (
            "console_write with arg_len 0",
            1,
            0,
            HypercallError::BadLength,
        ),
    ];
    let mut failures = 0;
    for (name, nr, arg_len, expected) in cases {
        let ret = raw(nr, arg_len);
        let ok = ret == expected.to_ret();
        println!(
            "{name}: ret {ret} {}",
            if ok { "as documented" } else { "WRONG" }
        );
        failures += u32::from(!ok);
    }
    i32::from(failures != 0)
}
