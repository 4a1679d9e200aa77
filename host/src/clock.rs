//! Time for guests: the TSC scale shared by every guest of a host, and each
//! guest's clock page (monotonic time with no exit).

use crate::kvm::memory::{GuestRam, MemoryError};
use shoal_abi::ClockPage;
use shoal_abi::layout::CLOCK_PAGE;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use zerocopy::IntoBytes;

/// Shift used for `tsc_mul`.
const SHIFT: u32 = 32;

/// The host's TSC frequency and its conversion to nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TscScale {
    /// Ticks per second.
    pub hz: u64,
    /// Nanoseconds per tick, times 2^32.
    pub mul: u64,
}

impl TscScale {
    /// The scale for a TSC running at `hz` ticks per second (`hz > 0`).
    pub fn from_hz(hz: u64) -> Self {
        let hz = hz.max(1);
        let mul = ((1_000_000_000u128 << SHIFT) / u128::from(hz)) as u64;
        Self { hz, mul }
    }

    /// Measures the TSC against the host's monotonic clock over `span`:
    /// the fallback when KVM cannot say the frequency.
    pub fn measure(span: Duration) -> Self {
        let (t0, c0) = (Instant::now(), rdtsc());
        std::thread::sleep(span);
        let (t1, c1) = (Instant::now(), rdtsc());
        let nanos = (t1 - t0).as_nanos().max(1);
        Self::from_hz((u128::from(c1.wrapping_sub(c0)) * 1_000_000_000 / nanos) as u64)
    }

    /// Converts a tick count to nanoseconds.
    pub fn ticks_to_ns(&self, ticks: u64) -> u64 {
        ((u128::from(ticks) * u128::from(self.mul)) >> SHIFT) as u64
    }
}

/// Reads the host's TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` has no memory effects and is always allowed in host
    // user mode on x86-64 Linux.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// One guest's time base: monotonic time 0 is the guest's start.
///
/// The host reads guest time with the same formula as the guest (TSC
/// through the clock page), so host and guest never disagree about
/// whether a deadline has passed.
#[derive(Clone, Copy, Debug)]
pub struct GuestClock {
    /// The page as published.
    pub page: ClockPage,
    /// Guest TSC minus host TSC.
    tsc_offset: i64,
}

impl GuestClock {
    /// Starts a guest clock now. `tsc_offset` is guest TSC minus host TSC.
    pub fn start(scale: TscScale, tsc_offset: i64) -> Self {
        let host_tsc = rdtsc();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let page = ClockPage {
            seq: 0,
            tsc_shift: SHIFT,
            tsc_base: host_tsc.wrapping_add_signed(tsc_offset),
            ns_base: 0,
            tsc_mul: scale.mul,
            tsc_hz: scale.hz,
            wall_ns_base: wall,
        };
        Self { page, tsc_offset }
    }

    /// Guest TSC minus host TSC.
    pub fn tsc_offset(&self) -> i64 {
        self.tsc_offset
    }

    /// Writes the clock page into the guest's RAM.
    pub fn publish(&self, ram: &GuestRam) -> Result<(), MemoryError> {
        ram.write_host(CLOCK_PAGE, self.page.as_bytes())
    }

    /// Guest monotonic nanoseconds now, exactly as the guest computes them.
    pub fn now_ns(&self) -> u64 {
        self.page
            .tsc_to_ns(rdtsc().wrapping_add_signed(self.tsc_offset))
    }

    /// The host instant at which guest time reaches `deadline_ns`
    /// (`None` for a deadline too far away to represent).
    pub fn instant_of(&self, deadline_ns: u64) -> Option<Instant> {
        let remaining = deadline_ns.saturating_sub(self.now_ns());
        Instant::now().checked_add(Duration::from_nanos(remaining))
    }
}

/// The host's wall-clock time in nanoseconds since the Unix epoch.
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_converts_ticks_to_nanoseconds() {
        let scale = TscScale::from_hz(2_000_000_000);
        assert_eq!(scale.ticks_to_ns(2_000_000_000), 1_000_000_000);
        let odd = TscScale::from_hz(2_345_678_000);
        let ns = odd.ticks_to_ns(2_345_678_000 * 10);
        assert!(ns.abs_diff(10_000_000_000) < 10, "{ns}");
    }

    #[test]
    fn measured_scale_matches_the_published_page_math() {
        let scale = TscScale::measure(Duration::from_millis(5));
        assert!(scale.hz > 100_000_000, "TSC at {} Hz", scale.hz);
        let clock = GuestClock::start(scale, 0);
        let later = clock.page.tsc_base + scale.hz;
        let ns = clock.page.tsc_to_ns(later);
        assert!(ns.abs_diff(1_000_000_000) < 1_000, "{ns}");
    }
}
