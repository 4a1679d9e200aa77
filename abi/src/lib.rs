//! The contract between the shoal hypervisor and its guests.
//!
//! Everything a guest and the host must agree on lives here and nowhere else:
//! the ABI version, the hypercall mechanism (port and argument block), the
//! hypercall numbers and their wire types, error codes, feature bits, the
//! guest-physical memory layout, and the layouts of the shared pages (boot
//! info, clock and events) and of the device rings. `docs/abi.md` is the prose specification of the same
//! contract.
//!
//! Every wire type is `#[repr(C)]` with explicit padding and a compile-time
//! size and offset check, so a layout change cannot slip through.
#![no_std]

pub mod boot;
pub mod clock;
pub mod device;
pub mod error;
pub mod event;
pub mod hypercall;
pub mod layout;
pub mod note;

pub use boot::BootInfo;
pub use clock::ClockPage;
pub use error::HypercallError;
pub use event::EventPage;
pub use hypercall::{HypercallHeader, HypercallNr};

/// The version of this ABI. Independent of the crate's semver: it changes
/// only when an existing wire type or rule changes incompatibly. New
/// capabilities are announced with [`features`] bits instead.
pub const ABI_VERSION: u32 = 1;

/// Capability bits published in [`BootInfo::features`] and returned by
/// [`HypercallNr::AbiInfo`]. Append-only: a bit, once given a meaning, keeps it.
pub mod features {
    /// The clock page at [`crate::layout::CLOCK_PAGE`] is published and
    /// valid (monotonic time without an exit).
    pub const CLOCK_PAGE: u64 = 1 << 0;
    /// `block` with a deadline is served.
    pub const BLOCK: u64 = 1 << 1;
    /// Exceptions are reported precisely (vector, error code, rip) when a
    /// guest faults.
    pub const PRECISE_FAULTS: u64 = 1 << 2;

    /// The `yield` hypercall is served.
    pub const YIELD: u64 = 1 << 3;

    /// The paravirtual MMU is served: `mmu_update`, `frame_alloc` and
    /// `frame_free` ([`crate::hypercall::MmuUpdate`]).
    pub const MMU: u64 = 1 << 4;

    /// Exceptions can be handled by the guest: `set_trap_table` and
    /// `trap_return` ([`crate::hypercall::SetTrapTable`]).
    pub const TRAPS: u64 = 1 << 5;

    /// `multicall` is served ([`crate::hypercall::Multicall`]).
    pub const MULTICALL: u64 = 1 << 6;

    /// Experiment, offered only when the host is asked for it: the
    /// guest's page tables are readable, and writable by trap-and-emulate,
    /// at [`crate::layout::TRAPPED_TABLES_WINDOW`]. Not part of
    /// [`ALL_V1`].
    pub const TRAPPED_PAGE_TABLES: u64 = 1 << 7;

    /// The event page at [`crate::layout::EVENT_PAGE`] is live: the host
    /// raises events there and `block` returns when an unmasked one is
    /// pending ([`crate::EventPage`]).
    pub const EVENTS: u64 = 1 << 8;

    /// Devices are served: `device_info`, `queue_setup` and the
    /// notification port ([`crate::device`]).
    pub const DEVICES: u64 = 1 << 9;

    /// Offered only when the host is asked to keep hypercall statistics:
    /// the host measures each hypercall's round trip as the guest sees it
    /// if the guest writes it into the event page's
    /// [`crate::event::CallTiming`] record after the call. Not part of
    /// [`ALL_V1`].
    pub const CALL_TIMING: u64 = 1 << 10;

    /// The console ring in the event page is served: console output
    /// without an exit ([`crate::event::ConsoleRing`]). Offered unless
    /// the host is asked to withhold it.
    pub const CONSOLE_RING: u64 = 1 << 11;

    /// The features every host offers every guest: those of ABI v1 as
    /// first released (bits 0 to 9) but [`TRAPPED_PAGE_TABLES`], which,
    /// like [`CALL_TIMING`] since, is offered only when asked for.
    pub const ALL_V1: u64 =
        CLOCK_PAGE | BLOCK | PRECISE_FAULTS | YIELD | MMU | TRAPS | MULTICALL | EVENTS | DEVICES;
}
