//! bad-pointer: passes pointers the host must refuse and checks that each
//! call fails with the documented error instead of harming the host.
//! Exits 0 when every call was refused correctly, 1 otherwise.
#![no_std]
#![no_main]

use shoal_guest::abi::HypercallError;
use shoal_guest::abi::hypercall::ConsoleWrite;
use shoal_guest::abi::layout::{CLOCK_PAGE, PAGE_TABLE_AREA_START, SYSTEM_AREA_START};
use shoal_guest::hypercall::{self, Error};
use shoal_guest::{boot, println};

shoal_guest::entry!(main);

fn main() -> i32 {
    let mem = boot::info().mem_size;
    let cases: [(&str, u64, u64, HypercallError); 7] = [
        (
            "past end of memory",
            mem + 0x1000,
            16,
            HypercallError::Fault,
        ),
        (
            "straddles end of memory",
            mem - 8,
            16,
            HypercallError::Fault,
        ),
        ("address overflow", u64::MAX - 4, 16, HypercallError::Fault),
        ("null page", 0, 16, HypercallError::Fault),
        (
            "host system area",
            SYSTEM_AREA_START,
            16,
            HypercallError::Fault,
        ),
        (
            "page tables",
            PAGE_TABLE_AREA_START,
            16,
            HypercallError::Fault,
        ),
        (
            "absurd length",
            CLOCK_PAGE,
            u64::MAX,
            HypercallError::Invalid,
        ),
    ];
    let mut failures = 0;
    for (name, addr, len, expected) in cases {
        let got = hypercall::call(&mut ConsoleWrite { addr, len });
        let ok = got == Err(Error::Abi(expected));
        println!(
            "{name}: {got:?} {}",
            if ok { "refused as documented" } else { "WRONG" }
        );
        failures += u32::from(!ok);
    }
    i32::from(failures != 0)
}
