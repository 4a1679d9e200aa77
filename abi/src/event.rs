//! The event page, at [`crate::layout::EVENT_PAGE`]: up to 64 events per
//! guest, in the manner of Xen's event channels, with no exit to look at
//! them.
//!
//! Event `n` is bit `n` of the two words. The host raises an event by
//! setting its `pending` bit (an atomic OR); if the bit is not in `mask`
//! and the guest is blocked in `block`, the guest wakes. The guest clears
//! the pending bits it handled (an atomic AND, or a swap of the word) and
//! sets `mask` bits for events that must not wake it. Both sides access the
//! words only with atomic instructions.
//!
//! No wake-up is lost: the host looks at `pending & !mask` once more after
//! the guest's `block` exit, just before it parks the guest, and every
//! raise after that finds the guest parked and wakes it. A guest that
//! checks `pending`, finds nothing and calls `block` therefore wakes for
//! an event raised in between.

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Events a guest has.
pub const EVENTS: u32 = 64;

/// The event page's first bytes (the rest of the page is reserved, zero,
/// apart from the [`CallTiming`] record at [`CALL_TIMING_OFFSET`] and the
/// console ring at [`CONSOLE_RING_OFFSET`] and [`CONSOLE_RING_DATA`]).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct EventPage {
    /// Bit `n` set: event `n` is pending. Set by the host, cleared by the
    /// guest.
    pub pending: u64,
    /// Bit `n` set: event `n` does not wake the guest (it still becomes
    /// pending). Written by the guest only. Zero at boot.
    pub mask: u64,
}
const _: () = assert!(size_of::<EventPage>() == 16);
const _: () = assert!(offset_of!(EventPage, mask) == 8);

/// Offset of the [`CallTiming`] record in the event page (its own cache
/// line, apart from the event words).
pub const CALL_TIMING_OFFSET: u64 = 64;

/// The round trip of the guest's last hypercall, as the guest measured it
/// (feature [`crate::features::CALL_TIMING`]). A guest that takes part
/// reads its time-stamp counter just before the hypercall instruction and
/// just after, then writes `nr` and the difference in `ticks`. The host
/// reads the record at the guest's next hypercall (and when the guest
/// ends), counts a non-zero `ticks` for `nr`, and sets `ticks` to zero.
/// Written by the guest only between hypercalls, so the host never sees
/// it half-written. A guest that does not take part leaves it zero.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CallTiming {
    /// The call's [`crate::HypercallNr`] (or custom number).
    pub nr: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Time-stamp counter ticks from just before the hypercall
    /// instruction to just after it.
    pub ticks: u64,
}
const _: () = assert!(size_of::<CallTiming>() == 16);
const _: () = assert!(offset_of!(CallTiming, ticks) == 8);
const _: () = assert!(CALL_TIMING_OFFSET as usize >= size_of::<EventPage>());

/// Offset of the [`ConsoleRing`] indices in the event page (feature
/// [`crate::features::CONSOLE_RING`]; their own cache line).
pub const CONSOLE_RING_OFFSET: u64 = 128;

/// Offset of the console ring's bytes in the event page: its second half.
pub const CONSOLE_RING_DATA: u64 = 2048;

/// Bytes the console ring holds.
pub const CONSOLE_RING_SIZE: u32 = 2048;

/// Console output without an exit (feature
/// [`crate::features::CONSOLE_RING`]). The guest appends bytes to the ring
/// and the host takes them whenever the guest exits: at every hypercall
/// (before serving it), exception, preemption and end. Both indices count
/// bytes since boot and wrap at 2^32; byte `i` of the output is at
/// [`CONSOLE_RING_DATA`] + `i % CONSOLE_RING_SIZE`.
///
/// The guest writes the bytes, then `head` with a release store; it has
/// `CONSOLE_RING_SIZE - (head - tail)` bytes of room. The host keeps its
/// own copy of `tail`, writes it here after taking bytes, and stops a
/// guest whose `head` is more than [`CONSOLE_RING_SIZE`] ahead of it.
/// Bytes past the guest's console limit are dropped. A guest that never
/// writes `head` leaves the ring empty.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ConsoleRing {
    /// Bytes written by the guest. Written by the guest only.
    pub head: u32,
    /// Bytes taken by the host. Written by the host only.
    pub tail: u32,
}
const _: () = assert!(size_of::<ConsoleRing>() == 8);
const _: () = assert!(offset_of!(ConsoleRing, tail) == 4);
const _: () = assert!(CONSOLE_RING_OFFSET >= CALL_TIMING_OFFSET + size_of::<CallTiming>() as u64);
const _: () = assert!(CONSOLE_RING_DATA + CONSOLE_RING_SIZE as u64 == crate::layout::PAGE_SIZE);
const _: () = assert!(CONSOLE_RING_SIZE.is_power_of_two());
