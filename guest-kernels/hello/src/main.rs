//! hello: prints its id, the wall-clock time and its arguments, exits 0.
#![no_std]
#![no_main]

use shoal_guest::{boot, println, time};

shoal_guest::entry!(main);

fn main() {
    let wall = time::wall();
    println!("hello from guest {}", boot::guest_id());
    println!(
        "wall clock: {}.{:09} s since the epoch",
        wall.as_secs(),
        wall.subsec_nanos()
    );
    let info = boot::info();
    println!(
        "memory: {} KiB, abi v{}",
        info.mem_size / 1024,
        info.abi_version
    );
    let mut count = 0;
    for (i, arg) in boot::args().enumerate() {
        println!("arg {i}: {arg}");
        count += 1;
    }
    println!("{count} args");
}
