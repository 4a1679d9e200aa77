//! A guest's events, raised by the host from any thread: bits in the
//! event page in guest RAM ([`shoal_abi::EventPage`]), which the guest
//! reads and clears without an exit.
//!
//! Raising sets the pending bits; the caller then wakes the guest if it is
//! parked and an unmasked bit is pending (the scheduler's
//! `raise_events`). The scheduler looks at the page once more under its
//! lock just before it parks a guest, so a raise cannot slip in between
//! the guest's last look and its parking.

use crate::kvm::memory::GuestRam;
use shoal_abi::layout::EVENT_PAGE;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The event page of one guest, while its RAM exists.
#[derive(Debug, Default)]
pub struct Events {
    /// Host address of the event page; 0 before the guest's RAM is
    /// attached and after it is gone. Raisers hold the read lock while
    /// they touch the page, so the RAM cannot go away under them.
    page: RwLock<usize>,
}

impl Events {
    /// Starts raising into `ram`'s event page. The caller calls
    /// [`Events::detach`] before `ram` is unmapped.
    pub fn attach(&self, ram: &GuestRam) {
        *self.page.write().unwrap_or_else(|e| e.into_inner()) =
            (ram.host_base() + EVENT_PAGE) as usize;
    }

    /// Stops touching the guest's RAM: raises from now on do nothing.
    pub fn detach(&self) {
        *self.page.write().unwrap_or_else(|e| e.into_inner()) = 0;
    }

    /// Runs `f` on the pending and mask words, if the page is attached.
    fn with_words<T>(&self, f: impl FnOnce(&AtomicU64, &AtomicU64) -> T) -> Option<T> {
        let page = self.page.read().unwrap_or_else(|e| e.into_inner());
        if *page == 0 {
            return None;
        }
        // SAFETY: `page` is the page-aligned event page inside a guest RAM
        // mapping that stays mapped while the read lock is held (`detach`
        // takes the write lock before the RAM goes). The guest accesses the
        // words only atomically, as the ABI says; a guest that does not
        // can only confuse its own events.
        let (pending, mask) = unsafe {
            let words = *page as *const AtomicU64;
            (&*words, &*words.add(1))
        };
        Some(f(pending, mask))
    }

    /// Makes the events in `bits` pending. Returns whether any pending
    /// event is now unmasked (the guest should be woken).
    pub fn raise(&self, bits: u64) -> bool {
        self.with_words(|pending, mask| {
            let now = pending.fetch_or(bits, Ordering::SeqCst) | bits;
            now & !mask.load(Ordering::SeqCst) != 0
        })
        .unwrap_or(false)
    }

    /// The pending events that are not masked.
    pub fn unmasked(&self) -> u64 {
        self.with_words(|pending, mask| {
            pending.load(Ordering::SeqCst) & !mask.load(Ordering::SeqCst)
        })
        .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raised_events_are_pending_and_masked_ones_do_not_wake() {
        let ram = GuestRam::new(4 << 20).expect("maps");
        let events = Events::default();
        assert!(!events.raise(1), "not attached: nothing happens");
        events.attach(&ram);
        assert_eq!(events.unmasked(), 0);
        ram.write_host(EVENT_PAGE + 8, &0b100u64.to_le_bytes())
            .expect("mask");
        assert!(!events.raise(0b100));
        assert_eq!(events.unmasked(), 0);
        assert!(events.raise(0b1));
        assert_eq!(events.unmasked(), 0b1);
        let mut pending = [0u8; 8];
        ram.read_host(EVENT_PAGE, &mut pending).expect("reads");
        assert_eq!(u64::from_le_bytes(pending), 0b101);
        events.detach();
        assert!(!events.raise(0b10));
        assert_eq!(events.unmasked(), 0);
    }
}
