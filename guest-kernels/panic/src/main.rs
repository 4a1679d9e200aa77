//! panic: panics on purpose, so tests can check the report.
#![no_std]
#![no_main]

use shoal_guest::println;

shoal_guest::entry!(main);

fn main() {
    println!("about to panic");
    let answer = 6 * 7;
    panic!("deliberate panic, answer = {answer}");
}
