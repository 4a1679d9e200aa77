//! Time: the monotonic clock (read from the clock page, no exit), the wall
//! clock (a hypercall), and sleeping (the `block` hypercall).

use core::time::Duration;
use shoal_abi::ClockPage;
use shoal_abi::hypercall::{Block, WallClock};
use shoal_abi::layout::CLOCK_PAGE;

pub(crate) fn read_tsc() -> u64 {
    // SAFETY: `rdtsc` is allowed at CPL3 (the host leaves CR4.TSD clear) and
    // has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Reads a consistent snapshot of the clock page (a seqlock read).
pub fn clock_page() -> ClockPage {
    let page = CLOCK_PAGE as *const ClockPage;
    loop {
        // SAFETY: the ABI maps a valid, aligned `ClockPage` read-only at
        // `CLOCK_PAGE`; volatile reads observe the host's updates.
        let before = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*page).seq)) };
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Acquire);
        // SAFETY: as above.
        let snapshot = unsafe { core::ptr::read_volatile(page) };
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Acquire);
        // SAFETY: as above.
        let after = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*page).seq)) };
        if before == after && before % 2 == 0 {
            return snapshot;
        }
        core::hint::spin_loop();
    }
}

/// Nanoseconds since this guest started. Never goes backwards; costs no exit.
pub fn monotonic_ns() -> u64 {
    clock_page().tsc_to_ns(read_tsc())
}

/// Time since this guest started. Never goes backwards; costs no exit.
pub fn monotonic() -> Duration {
    Duration::from_nanos(monotonic_ns())
}

/// The host's real time, as nanoseconds since the Unix epoch (one exit).
pub fn wall_ns() -> u64 {
    let mut args = WallClock::default();
    match crate::hypercall::call(&mut args) {
        Ok(_) => args.unix_ns,
        Err(_) => 0,
    }
}

/// The host's real time, as a duration since the Unix epoch (one exit).
pub fn wall() -> Duration {
    Duration::from_nanos(wall_ns())
}

/// Blocks until `monotonic_ns() >= deadline_ns` or an unmasked event is
/// pending (at once if one is). Returns the unmasked pending events (0 when
/// the deadline passed). [`crate::event::wait_any`] is the usual way.
pub fn block_until(deadline_ns: u64) -> u64 {
    let mut args = Block {
        deadline_ns,
        events: 0,
    };
    match crate::hypercall::call(&mut args) {
        Ok(_) => args.events,
        Err(_) => 0,
    }
}

/// Sleeps for at least `duration`, giving the CPU back to the host.
/// Events do not wake it (they stay pending).
pub fn sleep(duration: Duration) {
    let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    let deadline = monotonic_ns().saturating_add(nanos);
    crate::event::wait_any(0, deadline);
}

/// Parses a duration argument: `500ms`, `2s`, `750us`, or a bare number of
/// milliseconds. Returns nanoseconds, or `None` for anything else.
pub fn parse_duration_ns(text: &str) -> Option<u64> {
    let (digits, scale) = if let Some(us) = text.strip_suffix("us") {
        (us, 1_000)
    } else if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1_000_000)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1_000_000_000)
    } else {
        (text, 1_000_000)
    };
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration_ns("500ms"), Some(500_000_000));
        assert_eq!(parse_duration_ns("2s"), Some(2_000_000_000));
        assert_eq!(parse_duration_ns("750us"), Some(750_000));
        assert_eq!(parse_duration_ns("10"), Some(10_000_000));
        assert_eq!(parse_duration_ns("soon"), None);
        assert_eq!(parse_duration_ns("99999999999999s"), None);
    }
}
