//! Events: up to 64 per guest, raised by the host (devices, the embedding
//! program) into the event page, read and cleared here without an exit.
//!
//! ```no_run
//! use shoal_guest::{event, time};
//! let deadline = time::monotonic_ns() + 1_000_000_000;
//! let got = event::wait_any(1 << 3 | 1 << 5, deadline);
//! if got != 0 {
//!     event::take(got);
//! }
//! ```

use core::sync::atomic::{AtomicU64, Ordering};
use shoal_abi::layout::EVENT_PAGE;

/// Bit `n` of the word is event `n`.
fn word(offset: u64) -> &'static AtomicU64 {
    // SAFETY: the ABI maps the event page read-write at `EVENT_PAGE` for
    // the guest's whole life; its first two words are the pending and mask
    // words, which host and guest access only atomically.
    unsafe { &*((EVENT_PAGE + offset) as *const AtomicU64) }
}

fn pending_word() -> &'static AtomicU64 {
    word(0)
}

fn mask_word() -> &'static AtomicU64 {
    word(8)
}

/// The pending events (masked ones included).
pub fn pending() -> u64 {
    pending_word().load(Ordering::SeqCst)
}

/// Clears the pending bits of `events`; returns which of them were pending.
pub fn take(events: u64) -> u64 {
    pending_word().fetch_and(!events, Ordering::SeqCst) & events
}

/// The events that do not wake the guest.
pub fn mask() -> u64 {
    mask_word().load(Ordering::SeqCst)
}

/// Sets the events that do not wake the guest; returns the old mask.
pub fn set_mask(events: u64) -> u64 {
    mask_word().swap(events, Ordering::SeqCst)
}

/// Blocks until one of `events` is pending or the monotonic clock reaches
/// `deadline_ns` (`u64::MAX`: no deadline). Returns which of `events` are
/// pending (0 at the deadline), without clearing them ([`take`] does).
/// Other events do not wake it; the mask is as before when it returns.
pub fn wait_any(events: u64, deadline_ns: u64) -> u64 {
    // The mask is written before pending is looked at (both sequentially
    // consistent), and the host looks again after `block` exits: an event
    // raised at any point wakes the guest.
    let old = set_mask(!events);
    let got = loop {
        let got = pending() & events;
        if got != 0 || crate::time::monotonic_ns() >= deadline_ns {
            break got;
        }
        crate::time::block_until(deadline_ns);
    };
    set_mask(old);
    got
}
