//! The boot info page, at [`crate::layout::BOOT_INFO_PAGE`].
//!
//! The host writes it before the guest's first instruction; the guest maps
//! it read-only. [`BootInfo`] sits at the start of the page; the guest's
//! arguments follow at [`ARGS_OFFSET`] as `argc` UTF-8 strings, each ended by
//! a NUL byte, `args_len` bytes in all. New fields are only ever appended
//! (their presence is announced by a feature bit), so old guests keep
//! working.

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `BootInfo::magic`: "SHOALBI1" read as a little-endian u64.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"SHOALBI1");

/// Offset of the argument strings from the start of the boot info page.
pub const ARGS_OFFSET: u64 = 512;
/// Largest `args_len`: the rest of the page.
pub const ARGS_MAX: u64 = crate::layout::PAGE_SIZE - ARGS_OFFSET;

/// What the host tells the guest at boot.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// The host's [`crate::ABI_VERSION`].
    pub abi_version: u32,
    /// Number of argument strings.
    pub argc: u32,
    /// [`crate::features`] bits offered to this guest.
    pub features: u64,
    /// The guest's id, unique within its host.
    pub guest_id: u64,
    /// Size of guest RAM in bytes (RAM is `0..mem_size`).
    pub mem_size: u64,
    /// Guest-physical address of the clock page.
    pub clock_page: u64,
    /// First byte of the loaded image.
    pub image_start: u64,
    /// End (exclusive, page-aligned) of the loaded image.
    pub image_end: u64,
    /// Start of free, mapped, zeroed read-write memory (page-aligned).
    pub heap_start: u64,
    /// End (exclusive) of that memory; a guard page follows.
    pub heap_end: u64,
    /// Lowest address of the stack.
    pub stack_bottom: u64,
    /// Initial stack pointer (end of RAM).
    pub stack_top: u64,
    /// Total length of the argument strings, NULs included.
    pub args_len: u64,
}
const _: () = assert!(size_of::<BootInfo>() == 104);
const _: () = assert!(offset_of!(BootInfo, abi_version) == 8);
const _: () = assert!(offset_of!(BootInfo, argc) == 12);
const _: () = assert!(offset_of!(BootInfo, features) == 16);
const _: () = assert!(offset_of!(BootInfo, guest_id) == 24);
const _: () = assert!(offset_of!(BootInfo, mem_size) == 32);
const _: () = assert!(offset_of!(BootInfo, clock_page) == 40);
const _: () = assert!(offset_of!(BootInfo, heap_start) == 64);
const _: () = assert!(offset_of!(BootInfo, stack_top) == 88);
const _: () = assert!(offset_of!(BootInfo, args_len) == 96);
const _: () = assert!(size_of::<BootInfo>() as u64 <= ARGS_OFFSET);
