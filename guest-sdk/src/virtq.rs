//! The driver side of a virtio split virtqueue (see
//! [`shoal_abi::device`]): the guest puts descriptor chains on the
//! available ring, the host serves them and puts them on the used ring.
//!
//! Both sides use the event index. [`Virtq::kick`] notifies the host only
//! if it asked to hear of the chains just made available (it is idle);
//! [`Virtq::arm`] asks the host for the queue's event at the next used
//! chain, just before the guest blocks. A queue kept busy therefore runs
//! without notifications either way.
//!
//! The rings and every buffer are guest-physical memory: the rings come
//! from the bottom of the boot heap ([`crate::mmu::take_low`]), where
//! virtual and physical addresses are the same.

use crate::hypercall::{self, Error};
use crate::mmu;
use core::sync::atomic::{Ordering, fence};
use shoal_abi::device::{
    DESC_NEXT, DESC_WRITE, Descriptor, NOTIFY_PORT, UsedElem, avail_ring_len, desc_table_len,
    used_ring_len,
};
use shoal_abi::hypercall::QueueSetup;
use shoal_abi::layout::PAGE_SIZE;

/// One buffer of a chain: guest-physical address, length, and whether the
/// device writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Guest-physical address.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// The device writes it (else it reads it).
    pub device_writes: bool,
}

/// A virtqueue this guest drives.
pub struct Virtq {
    device: u32,
    size: u16,
    desc: *mut Descriptor,
    /// The available ring: `flags`, `idx`, `ring[size]`, `used_event`.
    avail: *mut u16,
    /// The used ring: `flags`, `idx`, then the elements.
    used: *mut u8,
    free_head: u16,
    free: u16,
    /// The available index as the guest will publish it next.
    avail_idx: u16,
    /// The available index at the last notification decision.
    kicked_idx: u16,
    /// Used entries consumed so far.
    last_used: u16,
    event: u32,
}

impl Virtq {
    /// Sets up queue `queue` of `device` with `size` descriptors (a power
    /// of two up to the device's `queue_max`), whose used chains raise
    /// `event`.
    pub fn new(device: u32, queue: u32, size: u16, event: u32) -> Result<Self, Error> {
        let n = u32::from(size);
        let desc_len = desc_table_len(n);
        let avail_at = desc_len;
        let used_at = (avail_at + avail_ring_len(n)).next_multiple_of(4);
        let total = used_at + used_ring_len(n);
        let base = mmu::take_low(total.div_ceil(PAGE_SIZE))?;
        let desc = base as *mut Descriptor;
        for i in 0..size {
            // SAFETY: `desc` is the start of `size` descriptors of memory
            // this queue owns (taken above).
            unsafe {
                desc.add(usize::from(i)).write(Descriptor {
                    next: i.wrapping_add(1),
                    ..Descriptor::default()
                })
            };
        }
        hypercall::call(&mut QueueSetup {
            device,
            size: n,
            desc: base,
            avail: base + avail_at,
            used: base + used_at,
            event,
            queue,
        })?;
        Ok(Self {
            device,
            size,
            desc,
            avail: (base + avail_at) as *mut u16,
            used: (base + used_at) as *mut u8,
            free_head: 0,
            free: size,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            event,
        })
    }

    /// The event the host raises for used chains.
    pub fn event(&self) -> u32 {
        self.event
    }

    /// Descriptors not in a chain the host holds.
    pub fn free(&self) -> u16 {
        self.free
    }

    /// Puts a chain of `bufs` on the available ring (the host sees it
    /// once it looks; [`Virtq::kick`] tells it). Returns the chain's head,
    /// which [`Virtq::pop_used`] returns when it is done, or `None` if too
    /// few descriptors are free.
    pub fn push(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > usize::from(self.free) {
            return None;
        }
        let head = self.free_head;
        let mut index = head;
        for (i, buf) in bufs.iter().enumerate() {
            // SAFETY: `index` is a free descriptor, below `size`.
            let slot = unsafe { &mut *self.desc.add(usize::from(index)) };
            let next_free = slot.next;
            let last = i + 1 == bufs.len();
            slot.addr = buf.addr;
            slot.len = buf.len;
            slot.flags =
                if buf.device_writes { DESC_WRITE } else { 0 } | if last { 0 } else { DESC_NEXT };
            if last {
                self.free_head = next_free;
            } else {
                slot.next = next_free;
            }
            index = next_free;
        }
        self.free -= bufs.len() as u16;
        let at = 2 + usize::from(self.avail_idx % self.size);
        // SAFETY: `at` is inside the available ring's `ring` array.
        unsafe { self.avail.add(at).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The entry before the index that publishes it.
        fence(Ordering::Release);
        // SAFETY: `idx`, the available ring's second field.
        unsafe { self.avail.add(1).write_volatile(self.avail_idx) };
        Some(head)
    }

    /// Notifies the host if it asked to hear of the chains made available
    /// since the last kick (the event index): a busy host is not told.
    pub fn kick(&mut self) {
        fence(Ordering::SeqCst);
        let avail_event = self.used_word(2 + 4 * usize::from(self.size));
        let (new, old) = (self.avail_idx, self.kicked_idx);
        self.kicked_idx = new;
        if new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old) {
            notify(self.device);
        }
    }

    /// The next chain the host is done with: its head and the bytes the
    /// host wrote into it. Its descriptors are free again.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used_word(1) == self.last_used {
            return None;
        }
        // The index before the entry it published.
        fence(Ordering::Acquire);
        let at = 4 + 8 * usize::from(self.last_used % self.size);
        // SAFETY: `at` is an element inside the used ring.
        let elem = unsafe { self.used.add(at).cast::<UsedElem>().read_volatile() };
        self.last_used = self.last_used.wrapping_add(1);
        let head = elem.id as u16;
        let mut index = head;
        loop {
            // SAFETY: the host returned a chain this guest made, whose
            // descriptors it does not touch any more.
            let desc = unsafe { &mut *self.desc.add(usize::from(index % self.size)) };
            self.free += 1;
            if desc.flags & DESC_NEXT == 0 {
                desc.next = self.free_head;
                break;
            }
            index = desc.next;
        }
        self.free_head = head;
        Some((head, elem.len))
    }

    /// Whether the host used a chain [`Virtq::pop_used`] has not
    /// returned yet.
    pub fn has_used(&self) -> bool {
        self.used_word(1) != self.last_used
    }

    /// Asks for the queue's event when the host uses the next chain.
    /// Returns true if a used chain is already there (do not block).
    pub fn arm(&mut self) -> bool {
        let at = 2 + usize::from(self.size);
        // SAFETY: `used_event`, the available ring's last field.
        unsafe { self.avail.add(at).write_volatile(self.last_used) };
        fence(Ordering::SeqCst);
        self.used_word(1) != self.last_used
    }

    /// Blocks until the host used a chain not yet popped, or the monotonic
    /// clock reaches `deadline_ns` (`u64::MAX`: no deadline); true if one
    /// is there.
    pub fn wait(&mut self, deadline_ns: u64) -> bool {
        let bit = 1 << self.event;
        loop {
            crate::event::take(bit);
            if self.arm() {
                return true;
            }
            if crate::event::wait_any(bit, deadline_ns) == 0 {
                return self.has_used();
            }
        }
    }

    /// The `u16` at `index` (in `u16`s) of the used ring.
    fn used_word(&self, index: usize) -> u16 {
        // SAFETY: callers pass `idx` (1) or `avail_event`, both inside the
        // used ring; the host writes them, hence the volatile read.
        unsafe { self.used.cast::<u16>().add(index).read_volatile() }
    }
}

/// Tells the host that `device`'s queue has new chains: one `out` that
/// KVM hands to the host's device thread without leaving the kernel.
pub fn notify(device: u32) {
    // SAFETY: the notification port is open to the guest (the TSS I/O
    // bitmap); the `out` touches no guest memory itself. It is not
    // `nomem`: the rings must be written before it.
    unsafe {
        core::arch::asm!(
            "out dx, eax",
            in("dx") NOTIFY_PORT,
            in("eax") device,
            options(nostack, preserves_flags),
        );
    }
}
