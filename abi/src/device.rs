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
//!
//! The network device speaks virtio-net without offloads: queue
//! [`NET_RX`] holds device-writable chains the host fills with one
//! received frame each, queue [`NET_TX`] device-readable chains of one
//! frame to send; every chain starts with a [`NetHeader`] (all zero on
//! transmit; on receive the host writes it with `num_buffers` 1). Frames
//! are Ethernet frames of 14 to [`FRAME_MAX`] bytes without the checksum.
//! The host gives each guest a MAC address ([`guest_mac`]) and drops, and
//! counts, frames that claim another source.

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The notification port: `out dx, eax` with `dx` = `NOTIFY_PORT` and
/// `eax` = the device index tells the host the device's queue has new
/// buffers. Any other value or width stops the guest.
pub const NOTIFY_PORT: u16 = 0x508;

/// `DeviceInfo::kind`: a block device.
pub const KIND_BLOCK: u32 = 1;

/// `DeviceInfo::kind`: a network device (two queues, [`NET_RX`] and
/// [`NET_TX`]).
pub const KIND_NET: u32 = 2;

/// The network device's receive queue.
pub const NET_RX: u32 = 0;
/// The network device's transmit queue.
pub const NET_TX: u32 = 1;

/// Largest Ethernet frame (header and payload, no checksum).
pub const FRAME_MAX: u32 = 1514;
/// Smallest frame: an Ethernet header.
pub const FRAME_MIN: u32 = 14;

/// The first three bytes of every MAC address the host gives a guest
/// (locally administered, unicast).
pub const MAC_PREFIX: [u8; 3] = [0x02, 0x73, 0x68];

/// The MAC address of the host's own end of every virtual LAN (port
/// forwards), `02:73:68:00:00:01`; its IPv4 address is [`GATEWAY_IPV4`].
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x73, 0x68, 0, 0, 1];
/// The host's IPv4 address on every virtual LAN.
pub const GATEWAY_IPV4: [u8; 4] = [10, 0, 0, 1];

/// The MAC address of guest `id`: [`MAC_PREFIX`] and the low 24 bits of
/// `id + 16` (the first 16 are the host's own).
pub const fn guest_mac(id: u64) -> [u8; 6] {
    let n = (id + 16) & 0xff_ffff;
    [
        MAC_PREFIX[0],
        MAC_PREFIX[1],
        MAC_PREFIX[2],
        (n >> 16) as u8,
        (n >> 8) as u8,
        n as u8,
    ]
}

/// The IPv4 address that goes with a host-given MAC address on a virtual
/// LAN (`10.0.0.0/8`): 10 and its last three bytes.
pub const fn ipv4_of(mac: [u8; 6]) -> [u8; 4] {
    [10, mac[3], mac[4], mac[5]]
}

/// The host-given MAC address that goes with IPv4 address `ip` on a
/// virtual LAN (the inverse of [`ipv4_of`]); `None` outside `10.0.0.0/8`.
pub const fn mac_of_ipv4(ip: [u8; 4]) -> Option<[u8; 6]> {
    if ip[0] != 10 {
        return None;
    }
    Some([
        MAC_PREFIX[0],
        MAC_PREFIX[1],
        MAC_PREFIX[2],
        ip[1],
        ip[2],
        ip[3],
    ])
}

/// The IPv4 address of guest `id` on a virtual LAN.
pub const fn guest_ipv4(id: u64) -> [u8; 4] {
    ipv4_of(guest_mac(id))
}

/// The MAC address in `DeviceInfo::capacity` of a network device.
pub const fn mac_from_capacity(capacity: u64) -> [u8; 6] {
    let b = capacity.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

/// `DeviceInfo::capacity` of a network device with `mac`.
pub const fn mac_to_capacity(mac: [u8; 6]) -> u64 {
    u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0])
}

/// The virtio-net header (version 1, 12 bytes) that starts every chain of
/// the network queues. No offloads: on transmit it must be all zero, on
/// receive the host writes zeros and `num_buffers` 1.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NetHeader {
    /// Zero (no checksum offload).
    pub flags: u8,
    /// Zero (no segmentation offload).
    pub gso_type: u8,
    /// Zero.
    pub hdr_len: u16,
    /// Zero.
    pub gso_size: u16,
    /// Zero.
    pub csum_start: u16,
    /// Zero.
    pub csum_offset: u16,
    /// Receive: 1. Transmit: zero.
    pub num_buffers: u16,
}
const _: () = assert!(size_of::<NetHeader>() == 12);

/// Bytes of [`NetHeader`].
pub const NET_HEADER_LEN: u32 = 12;

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

impl Descriptor {
    /// A descriptor of the buffer `addr..+len` with `flags`, going on at
    /// `next` if `flags` has [`DESC_NEXT`].
    pub const fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Self {
            addr,
            len,
            flags,
            next,
        }
    }
}

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
