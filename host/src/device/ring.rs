//! The host side of one virtio split virtqueue, over a view of
//! guest-owned memory only.
//!
//! `virtio-queue` keeps the ring state, reads the available ring (it
//! refuses an available index more than a queue ahead), writes the used
//! ring and does the event-index arithmetic both ways. The descriptor
//! chains are walked here ([`walk`]), because the crate's walk ends
//! silently where a hostile chain must be caught: a loop, an index past
//! the table, an indirect table (not offered). Every buffer is checked to
//! lie in guest-owned memory and off the queue's own rings.

use crate::kvm::memory::GuestRam;
use shoal_abi::HypercallError;
use shoal_abi::device::{
    DESC_INDIRECT, DESC_NEXT, Descriptor, QUEUE_SIZE_MAX, REQUEST_MAX, avail_ring_len,
    desc_table_len, used_ring_len,
};
use shoal_abi::event::EVENTS;
use shoal_abi::hypercall::QueueSetup;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use zerocopy::FromBytes;

/// Most bytes the buffers of one chain may add up to: a request's data
/// and room for its header and status.
pub const CHAIN_BYTES_MAX: u64 = REQUEST_MAX as u64 + 4096;

/// A descriptor chain or ring state the host refuses: the guest is
/// stopped with this reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A descriptor index at or past the queue size.
    #[error("descriptor index {0} is past the queue")]
    BadIndex(u16),
    /// The chain has more descriptors than the queue (it loops).
    #[error("descriptor chain from {0} loops or is longer than the queue")]
    Loop(u16),
    /// An indirect descriptor (the feature is not offered).
    #[error("indirect descriptor {0} (not offered)")]
    Indirect(u16),
    /// A buffer outside guest-owned memory.
    #[error("descriptor {index} points outside guest-owned memory: {addr:#x}+{len:#x}")]
    OutOfMemory {
        /// The descriptor.
        index: u16,
        /// Its buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A buffer overlapping the queue's own rings.
    #[error("descriptor {index} points at the queue's own rings: {addr:#x}+{len:#x}")]
    AtRings {
        /// The descriptor.
        index: u16,
        /// Its buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The chain's buffers add up to more than [`CHAIN_BYTES_MAX`].
    #[error("descriptor chain from {0} declares more than {CHAIN_BYTES_MAX} bytes")]
    TooLong(u16),
    /// The available ring is broken (an index more than a queue ahead).
    #[error("available ring: {0}")]
    Avail(String),
    /// A chain the device cannot even answer (no status byte).
    #[error("descriptor chain from {0} is not a request and has no status byte")]
    Unanswerable(u16),
    /// The host failed while serving the guest's request (a host bug).
    #[error("internal host error while serving a request")]
    HostPanic,
}

/// A checked descriptor chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Index of its first descriptor.
    pub head: u16,
    /// Its descriptors, in order; the last has no `DESC_NEXT`.
    pub descs: Vec<Descriptor>,
}

/// The three parts of a queue, as guest-physical ranges `(start, len)`.
type Parts = [(u64, u64); 3];

/// One served queue.
#[derive(Debug)]
pub struct Ring {
    queue: Queue,
    mem: GuestMemoryMmap<()>,
    parts: Parts,
    /// The event raised for used buffers.
    pub event: u32,
}

impl Ring {
    /// Checks the guest's `queue_setup` and starts serving the queue in
    /// `ram` (which the caller keeps mapped while the ring exists).
    pub fn new(ram: &GuestRam, setup: &QueueSetup) -> Result<Self, HypercallError> {
        let size = setup.size;
        if !size.is_power_of_two() || size > QUEUE_SIZE_MAX || setup.event >= EVENTS {
            return Err(HypercallError::Invalid);
        }
        let parts = [
            (setup.desc, desc_table_len(size)),
            (setup.avail, avail_ring_len(size)),
            (setup.used, used_ring_len(size)),
        ];
        for (addr, len) in parts {
            ram.check_guest(addr, len)
                .map_err(|_| HypercallError::Fault)?;
        }
        let aligned = setup.desc.is_multiple_of(16)
            && setup.avail.is_multiple_of(2)
            && setup.used.is_multiple_of(4);
        let apart = (0..3).all(|i| (i + 1..3).all(|j| !overlaps(parts[i], parts[j])));
        if !aligned || !apart {
            return Err(HypercallError::Invalid);
        }
        let mut queue = Queue::new(QUEUE_SIZE_MAX as u16).map_err(|_| HypercallError::Invalid)?;
        queue.set_size(size as u16);
        queue
            .try_set_desc_table_address(GuestAddress(setup.desc))
            .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(setup.avail)))
            .and_then(|()| queue.try_set_used_ring_address(GuestAddress(setup.used)))
            .map_err(|_| HypercallError::Invalid)?;
        queue.set_event_idx(true);
        queue.set_ready(true);
        // SAFETY: the ring lives in its device slot, which the guest
        // detaches (dropping the ring) before its RAM is unmapped.
        let mem = unsafe { ram.guest_view() }.map_err(|_| HypercallError::Fault)?;
        if !queue.is_valid(&mem) {
            return Err(HypercallError::Fault);
        }
        Ok(Self {
            queue,
            mem,
            parts,
            event: setup.event,
        })
    }

    /// Guest-owned memory, for the device to move data through.
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// The next chain the guest made available, checked.
    pub fn pop(&mut self) -> Result<Option<Chain>, RingError> {
        let head = {
            let mut iter = self
                .queue
                .iter(&self.mem)
                .map_err(|e| RingError::Avail(e.to_string()))?;
            match iter.next() {
                Some(chain) => chain.head_index(),
                None => return Ok(None),
            }
        };
        let table = self.queue.desc_table();
        let descs = walk(&self.mem, table, self.queue.size(), head, &self.parts)?;
        Ok(Some(Chain { head, descs }))
    }

    /// Puts the chain from `head` on the used ring, `written` bytes in it.
    pub fn complete(&mut self, head: u16, written: u32) -> Result<(), RingError> {
        self.queue
            .add_used(&self.mem, head, written)
            .map_err(|e| RingError::Avail(e.to_string()))
    }

    /// Asks the guest for a notification when it makes the next chain
    /// available. True if one arrived meanwhile (serve again).
    pub fn rearm(&mut self) -> Result<bool, RingError> {
        self.queue
            .enable_notification(&self.mem)
            .map_err(|e| RingError::Avail(e.to_string()))
    }

    /// Whether the guest asked to hear of the chains completed since the
    /// last call (its used-event index was passed).
    pub fn wants_event(&mut self) -> Result<bool, RingError> {
        self.queue
            .needs_notification(&self.mem)
            .map_err(|e| RingError::Avail(e.to_string()))
    }
}

/// Walks the chain from `head` in the descriptor table at `table` of a
/// queue of `size`, in `mem` (guest-owned memory), checking every
/// descriptor: index inside the table, no indirect table, at most `size`
/// descriptors, every buffer inside `mem` and off the queue's `parts`,
/// at most [`CHAIN_BYTES_MAX`] bytes in all.
pub fn walk<M: GuestMemory>(
    mem: &M,
    table: u64,
    size: u16,
    head: u16,
    parts: &[(u64, u64)],
) -> Result<Vec<Descriptor>, RingError> {
    let mut descs = Vec::new();
    let mut index = head;
    let mut total = 0u64;
    loop {
        if index >= size {
            return Err(RingError::BadIndex(index));
        }
        if descs.len() == usize::from(size) {
            return Err(RingError::Loop(head));
        }
        let mut raw = [0u8; size_of::<Descriptor>()];
        let at = table + u64::from(index) * raw.len() as u64;
        mem.read_slice(&mut raw, GuestAddress(at))
            .map_err(|_| RingError::BadIndex(index))?;
        let desc = Descriptor::read_from_bytes(&raw).map_err(|_| RingError::BadIndex(index))?;
        if desc.flags & DESC_INDIRECT != 0 {
            return Err(RingError::Indirect(index));
        }
        let (addr, len) = (desc.addr, desc.len);
        let range = (addr, u64::from(len));
        if len > 0 && !mem.check_range(GuestAddress(addr), len as usize, Permissions::ReadWrite) {
            return Err(RingError::OutOfMemory { index, addr, len });
        }
        if len > 0 && parts.iter().any(|part| overlaps(range, *part)) {
            return Err(RingError::AtRings { index, addr, len });
        }
        total += u64::from(len);
        if total > CHAIN_BYTES_MAX {
            return Err(RingError::TooLong(head));
        }
        descs.push(desc);
        if desc.flags & DESC_NEXT == 0 {
            return Ok(descs);
        }
        index = desc.next;
    }
}

/// Whether two ranges `(start, len)` share a byte.
fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    let end = |(start, len): (u64, u64)| start.saturating_add(len);
    a.1 > 0 && b.1 > 0 && a.0 < end(b) && b.0 < end(a)
}

/// Walks a descriptor table built from arbitrary bytes and checks what
/// the walk promises: it ends (no panic, no hang), and a chain it accepts
/// has at most a queue of descriptors, a last one without `DESC_NEXT`, no
/// indirect descriptor, and buffers inside memory, off the rings, within
/// [`CHAIN_BYTES_MAX`]. The fuzz target (`fuzz/`) and the unit tests feed
/// it; it panics when a promise is broken. Returns the length of the
/// chain it accepted (0: refused).
///
/// `data`: byte 0 picks the queue size (a power of two up to 256), bytes
/// 1–2 the head, the rest is the descriptor table (as much as fits) in
/// 1 MiB of memory at `0x10_0000`, with the rings' other parts after it.
pub fn check_walk(data: &[u8]) -> usize {
    const BASE: u64 = 0x10_0000;
    const LEN: u64 = 1 << 20;
    let Some((&shift, rest)) = data.split_first() else {
        return 0;
    };
    let size = 1u16 << (shift % 9);
    let (head, table) = match rest {
        [a, b, table @ ..] => (u16::from_le_bytes([*a, *b]) % (size + 2), table),
        _ => return 0,
    };
    let table_len = desc_table_len(u32::from(size));
    let parts = [
        (BASE, table_len),
        (BASE + table_len, avail_ring_len(u32::from(size))),
        (BASE + 0x1000, used_ring_len(u32::from(size))),
    ];
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), LEN as usize)])
        .expect("anonymous memory");
    let n = table.len().min(table_len as usize);
    mem.write_slice(&table[..n], GuestAddress(BASE))
        .expect("inside");
    let Ok(descs) = walk(&mem, BASE, size, head, &parts) else {
        return 0;
    };
    assert!(!descs.is_empty() && descs.len() <= usize::from(size));
    let last = descs.last().expect("non-empty");
    assert_eq!(last.flags & DESC_NEXT, 0);
    let mut total = 0;
    for desc in &descs {
        assert_eq!(desc.flags & DESC_INDIRECT, 0);
        let range = (desc.addr, u64::from(desc.len));
        if desc.len > 0 {
            assert!(desc.addr >= BASE && desc.addr + u64::from(desc.len) <= BASE + LEN);
            assert!(parts.iter().all(|part| !overlaps(range, *part)));
        }
        total += u64::from(desc.len);
    }
    assert!(total <= CHAIN_BYTES_MAX);
    descs.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x10_0000;
    const SIZE: u16 = 8;

    fn table(descs: &[Descriptor]) -> (GuestMemoryMmap<()>, [(u64, u64); 3]) {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), 1 << 20)]).expect("memory");
        for (i, desc) in descs.iter().enumerate() {
            mem.write_slice(
                zerocopy::IntoBytes::as_bytes(desc),
                GuestAddress(BASE + 16 * i as u64),
            )
            .expect("inside");
        }
        let parts = [(BASE, 128), (BASE + 128, 22), (BASE + 0x1000, 70)];
        (mem, parts)
    }

    const DATA: u64 = BASE + 0x2000;

    #[test]
    fn a_well_formed_chain_is_walked_in_order() {
        let (mem, parts) = table(&[
            Descriptor::new(DATA, 16, DESC_NEXT, 2),
            Descriptor::new(0, 0, 0, 0),
            Descriptor::new(DATA + 16, 512, DESC_NEXT | 2, 3),
            Descriptor::new(DATA + 528, 1, 2, 0),
        ]);
        let chain = walk(&mem, BASE, SIZE, 0, &parts).expect("accepted");
        assert_eq!(chain.len(), 3);
        assert_eq!(chain[1].len, 512);
    }

    #[test]
    fn hostile_chains_are_refused_with_their_reason() {
        let cases: [(&[Descriptor], u16, RingError); 7] = [
            (
                &[
                    Descriptor::new(DATA, 16, DESC_NEXT, 1),
                    Descriptor::new(DATA, 16, DESC_NEXT, 0),
                ],
                0,
                RingError::Loop(0),
            ),
            (
                &[Descriptor::new(DATA, 16, 0, 0)],
                9,
                RingError::BadIndex(9),
            ),
            (
                &[Descriptor::new(DATA, 16, DESC_NEXT, 8)],
                0,
                RingError::BadIndex(8),
            ),
            (
                &[Descriptor::new(DATA, 64, DESC_INDIRECT, 0)],
                0,
                RingError::Indirect(0),
            ),
            (
                &[Descriptor::new(0x1000, 16, 0, 0)],
                0,
                RingError::OutOfMemory {
                    index: 0,
                    addr: 0x1000,
                    len: 16,
                },
            ),
            (
                &[Descriptor::new(BASE + 0x1010, 8, 2, 0)],
                0,
                RingError::AtRings {
                    index: 0,
                    addr: BASE + 0x1010,
                    len: 8,
                },
            ),
            (
                &[
                    Descriptor::new(DATA, 1 << 19, DESC_NEXT, 1),
                    Descriptor::new(DATA, 1 << 19, DESC_NEXT, 2),
                    Descriptor::new(DATA, 8192, 0, 0),
                ],
                0,
                RingError::TooLong(0),
            ),
        ];
        for (descs, head, want) in cases {
            let (mem, parts) = table(descs);
            assert_eq!(walk(&mem, BASE, SIZE, head, &parts), Err(want));
        }
    }

    #[test]
    fn random_tables_never_break_the_walks_promises() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut long_chains = 0;
        for _ in 0..3000 {
            let mut data = vec![(next() % 9) as u8, next() as u8, (next() % 3) as u8];
            for _ in 0..(next() % 64) {
                // Descriptors near the memory, with small lengths and
                // indices, so that walks get somewhere.
                let addr = match next() % 4 {
                    0 => 0x10_0000 + (next() % (3 << 19)) - (1 << 12),
                    _ => 0x10_2000 + next() % 0x1000,
                };
                let len = match next() % 4 {
                    0 => (next() % 0x9_0000) as u32,
                    _ => (next() % 0x1000) as u32,
                };
                let flags = (next() % if next() % 8 == 0 { 8 } else { 4 }) as u16;
                let next_index = (next() % 10) as u16;
                data.extend_from_slice(&addr.to_le_bytes());
                data.extend_from_slice(&len.to_le_bytes());
                data.extend_from_slice(&flags.to_le_bytes());
                data.extend_from_slice(&next_index.to_le_bytes());
            }
            if check_walk(&data) > 1 {
                long_chains += 1;
            }
        }
        // The inputs reach accepted chains, not only refusals.
        assert!(
            long_chains > 150,
            "{long_chains} chains of two or more accepted"
        );
    }
}
