//! The clock page, at [`crate::layout::CLOCK_PAGE`]: monotonic time with no
//! exit, in the manner of KVM's pvclock.
//!
//! The guest reads the TSC (`rdtsc`, allowed at CPL3) and converts it:
//!
//! ```text
//! ns = ns_base + (((tsc - tsc_base) as u128 * tsc_mul as u128) >> tsc_shift)
//! ```
//!
//! The host may update the page at any time. It makes `seq` odd before it
//! writes and even again after, so a reader copies the fields between two
//! reads of `seq` and retries while `seq` was odd or changed (a seqlock).
//! Time is nanoseconds since the guest started, and never goes backwards.

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The clock page's contents.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ClockPage {
    /// Sequence counter: odd while the host is writing.
    pub seq: u32,
    /// Right shift applied after multiplying by `tsc_mul`.
    pub tsc_shift: u32,
    /// The guest TSC value at `ns_base`.
    pub tsc_base: u64,
    /// Monotonic nanoseconds since guest start at `tsc_base`.
    pub ns_base: u64,
    /// Nanoseconds per TSC tick, scaled by `2^tsc_shift`.
    pub tsc_mul: u64,
    /// TSC ticks per second, for information.
    pub tsc_hz: u64,
    /// Wall-clock time (ns since the Unix epoch) at `ns_base`, as of the
    /// last update: an estimate; the `wall_clock` hypercall is exact.
    pub wall_ns_base: u64,
}
const _: () = assert!(size_of::<ClockPage>() == 48);
const _: () = assert!(offset_of!(ClockPage, tsc_shift) == 4);
const _: () = assert!(offset_of!(ClockPage, tsc_base) == 8);
const _: () = assert!(offset_of!(ClockPage, ns_base) == 16);
const _: () = assert!(offset_of!(ClockPage, tsc_mul) == 24);
const _: () = assert!(offset_of!(ClockPage, tsc_hz) == 32);
const _: () = assert!(offset_of!(ClockPage, wall_ns_base) == 40);

impl ClockPage {
    /// Converts a TSC reading to monotonic nanoseconds with this page's
    /// parameters. A reading before `tsc_base` yields `ns_base`.
    pub const fn tsc_to_ns(&self, tsc: u64) -> u64 {
        let delta = tsc.saturating_sub(self.tsc_base) as u128;
        let scaled = (delta * self.tsc_mul as u128) >> self.tsc_shift;
        self.ns_base.saturating_add(scaled as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_to_ns_scales_and_never_goes_below_base() {
        // 2 GHz: 0.5 ns per tick, scaled by 2^32.
        let page = ClockPage {
            tsc_shift: 32,
            tsc_base: 1000,
            ns_base: 5,
            tsc_mul: 1 << 31,
            ..Default::default()
        };
        assert_eq!(page.tsc_to_ns(1000), 5);
        assert_eq!(page.tsc_to_ns(3000), 1005);
        assert_eq!(page.tsc_to_ns(0), 5);
        assert_eq!(page.tsc_to_ns(u64::MAX), 5 + ((u64::MAX - 1000) / 2));
    }
}
