//! Devices: virtio split virtqueues in guest memory, served by the host.
//!
//! A guest learns its devices with `device_info` (index `0..n`) and gives
//! each device's queue to the host with `queue_setup`: the guest-physical
//! addresses of the three parts of a virtio 1.x split virtqueue, in its own
//! memory, and the event the host raises when it has used buffers. The
//! rings always use the event index (`VIRTIO_RING_F_EVENT_IDX`): each side
//! says in the ring how far the other may go before it wants a
//! notification, so a busy queue runs without any.
//!
//! The guest notifies the host with a 32-bit `out` of the device index to
//! [`NOTIFY_PORT`]. The host serves that port in the kernel (an ioeventfd):
//! the notification costs the guest an exit of a few microseconds that
//! never reaches the host process. The host notifies the guest by raising
//! the queue's event ([`crate::EventPage`]).
//!
//! The host treats every descriptor as hostile. A chain that loops, is
//! longer than the queue, points outside guest-owned memory or at the
//! queue's own rings, has buffers adding up to more than [`REQUEST_MAX`] +
//! 4 KiB, or has no status byte, and an available index that runs more
//! than a queue ahead, stop the guest with the reason. A request that is
//! well formed but cannot be done (a sector past the end, more data than
//! [`REQUEST_MAX`], a write to a read-only disk) gets an error status
//! instead.
//!
//! The block device speaks virtio-blk: each request is a chain of a
//! [`BlkHeader`] (device-readable), data buffers (device-writable for
//! reads, readable for writes) and one status byte (device-writable, last).

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The notification port: `out dx, eax` with `dx` = `NOTIFY_PORT` and
/// `eax` = the device index tells the host the device's queue has new
/// buffers. Any other value or width stops the guest.
pub const NOTIFY_PORT: u16 = 0x508;

/// `DeviceInfo::kind`: a block device.
pub const KIND_BLOCK: u32 = 1;

/// `DeviceInfo::flags`: the device refuses writes.
pub const FLAG_READ_ONLY: u32 = 1;

/// Largest queue size (descriptors) a device accepts.
pub const QUEUE_SIZE_MAX: u32 = 256;

/// Most data bytes one request may carry.
pub const REQUEST_MAX: u32 = 1 << 20;

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;

/// Descriptor flag: the chain goes on at `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (else it reads it).
pub const DESC_WRITE: u16 = 2;
/// Descriptor flag: an indirect table. Not offered; the host refuses it.
pub const DESC_INDIRECT: u16 = 4;

/// One entry of the descriptor table (16-byte aligned, `size` entries).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u32,
    /// [`DESC_NEXT`], [`DESC_WRITE`].
    pub flags: u16,
    /// The next descriptor's index, with [`DESC_NEXT`].
    pub next: u16,
}
const _: () = assert!(size_of::<Descriptor>() == 16);

/// One entry of the used ring.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct UsedElem {
    /// Index of the chain's first descriptor.
    pub id: u32,
    /// Bytes the device wrote into the chain.
    pub len: u32,
}
const _: () = assert!(size_of::<UsedElem>() == 8);

/// Bytes of the descriptor table of a queue of `size`.
pub const fn desc_table_len(size: u32) -> u64 {
    size as u64 * size_of::<Descriptor>() as u64
}

/// Bytes of the available ring (2-byte aligned): `flags`, `idx`,
/// `ring[size]` and `used_event`, each a `u16`.
pub const fn avail_ring_len(size: u32) -> u64 {
    6 + 2 * size as u64
}

/// Bytes of the used ring (4-byte aligned): `flags`, `idx`,
/// `ring[size]` of [`UsedElem`] and `avail_event`.
pub const fn used_ring_len(size: u32) -> u64 {
    6 + 8 * size as u64
}

/// virtio-blk request: read sectors into the data buffers.
pub const BLK_T_IN: u32 = 0;
/// Write the data buffers to sectors.
pub const BLK_T_OUT: u32 = 1;
/// Make every completed write durable before this completes.
pub const BLK_T_FLUSH: u32 = 4;
/// Write the device's id (up to 20 bytes) into the data buffer.
pub const BLK_T_GET_ID: u32 = 8;

/// Status: done.
pub const BLK_S_OK: u8 = 0;
/// Status: failed (out of range, read-only, host I/O error).
pub const BLK_S_IOERR: u8 = 1;
/// Status: request type not supported.
pub const BLK_S_UNSUPP: u8 = 2;

/// Length of the id a `BLK_T_GET_ID` request returns.
pub const BLK_ID_LEN: u32 = 20;

/// The first, device-readable part of a block request.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct BlkHeader {
    /// `BLK_T_*`.
    pub kind: u32,
    /// Zero.
    pub reserved: u32,
    /// First sector (reads and writes).
    pub sector: u64,
}
const _: () = assert!(size_of::<BlkHeader>() == 16);
const _: () = assert!(offset_of!(BlkHeader, sector) == 8);
