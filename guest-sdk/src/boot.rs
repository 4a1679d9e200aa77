//! What the host told this guest at boot: id, memory, arguments.

use shoal_abi::boot::{ARGS_OFFSET, BootInfo};
use shoal_abi::layout::BOOT_INFO_PAGE;

/// The boot info page. The host maps it read-only at
/// [`BOOT_INFO_PAGE`] before the first instruction and never changes it.
pub fn info() -> &'static BootInfo {
    // SAFETY: the ABI guarantees a valid, aligned, read-only `BootInfo` at
    // `BOOT_INFO_PAGE` for the guest's whole life.
    unsafe { &*(BOOT_INFO_PAGE as *const BootInfo) }
}

/// This guest's id, unique within its host.
pub fn guest_id() -> u64 {
    info().guest_id
}

/// The guest's arguments (`shoal run KERNEL -- ARGS...`), in order.
pub fn args() -> impl Iterator<Item = &'static str> {
    let info = info();
    let len = info.args_len.min(shoal_abi::boot::ARGS_MAX) as usize;
    // SAFETY: the argument area is inside the boot info page, which stays
    // mapped read-only and unchanged for the guest's whole life.
    let bytes: &'static [u8] =
        unsafe { core::slice::from_raw_parts((BOOT_INFO_PAGE + ARGS_OFFSET) as *const u8, len) };
    bytes
        .split(|b| *b == 0)
        .take(info.argc as usize)
        .map(|arg| core::str::from_utf8(arg).unwrap_or("<not utf-8>"))
}
