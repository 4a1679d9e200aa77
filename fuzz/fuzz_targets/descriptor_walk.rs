//! The device side's walk of a guest's descriptor chain, on arbitrary
//! descriptor tables: it must end, and every chain it accepts must keep
//! its promises (`shoal_host::device::ring::check_walk` asserts them).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shoal_host::device::ring::check_walk(data);
});
