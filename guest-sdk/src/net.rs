//! A virtio-net driver for the host's virtual LANs (`shoal run --net
//! NAME`).
//!
//! ```text
//! let mut nic = net::Nic::find()?;          // the guest's network device
//! nic.send(&frame)?;                        // one Ethernet frame
//! nic.wait(deadline);                       // blocks until a frame is in
//! nic.recv(|frame| handle(frame));          // the next frame, if any
//! ```
//!
//! Frames are whole Ethernet frames without the checksum, 14 to
//! [`FRAME_MAX`] bytes, from the address the host gave the guest
//! ([`Nic::mac`]; frames from another are dropped). The driver keeps
//! [`RX_BUFFERS`] receive buffers with the host and copies each frame to
//! send into one of [`TX_BUFFERS`] transmit buffers, so callers' buffers
//! can be anywhere. It notifies the host only when the host asked
//! (the event index) and blocks only when nothing it waits for is there.

use crate::event;
use crate::hypercall::Error;
use crate::virtq::{Buf, Virtq};
use shoal_abi::device::{
    FRAME_MAX, FRAME_MIN, KIND_NET, NET_HEADER_LEN, NET_RX, NET_TX, ipv4_of, mac_from_capacity,
};
use shoal_abi::layout::PAGE_SIZE;

/// Descriptors in each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// Receive buffers kept with the host.
pub const RX_BUFFERS: usize = 128;
/// Transmit buffers.
pub const TX_BUFFERS: usize = 128;
/// Bytes of one buffer: a header and the largest frame fit.
const BUF_LEN: usize = 2048;
/// Network device `i` signals with event `EVENT_BASE + i` (as disks do).
pub const EVENT_BASE: u32 = crate::blk::EVENT_BASE;

/// Why the network device failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetError {
    /// The host refused a call.
    Hypercall(Error),
    /// No such device, or not a network device.
    NoNic,
    /// The frame is shorter than an Ethernet header or longer than
    /// [`FRAME_MAX`].
    BadFrame,
}

impl From<Error> for NetError {
    fn from(e: Error) -> Self {
        Self::Hypercall(e)
    }
}

/// A network device this guest drives.
pub struct Nic {
    mac: [u8; 6],
    rx: Virtq,
    tx: Virtq,
    /// `RX_BUFFERS` buffers, then `TX_BUFFERS`, identity-mapped.
    buffers: u64,
    /// The receive buffer of each chain the host holds, by head.
    rx_buffer: [u8; QUEUE_SIZE as usize],
    /// The transmit buffer of each chain the host holds, by head.
    tx_buffer: [u8; QUEUE_SIZE as usize],
    /// Bit `i` set: transmit buffer `i` is free.
    tx_free: u128,
}

const _: () = assert!(TX_BUFFERS <= 128 && RX_BUFFERS <= QUEUE_SIZE as usize);

impl Nic {
    /// The guest's first network device.
    pub fn find() -> Result<Self, NetError> {
        let index = (0..crate::blk::devices())
            .find(|&i| crate::blk::info(i).is_ok_and(|info| info.kind == KIND_NET))
            .ok_or(NetError::NoNic)?;
        Self::open(index)
    }

    /// Sets up network device `index`: both queues, every receive buffer
    /// given to the host.
    pub fn open(index: u32) -> Result<Self, NetError> {
        let info = crate::blk::info(index).map_err(|_| NetError::NoNic)?;
        if info.kind != KIND_NET || index >= 64 - EVENT_BASE {
            return Err(NetError::NoNic);
        }
        let size = QUEUE_SIZE.min(info.queue_max as u16);
        let event = EVENT_BASE + index;
        let pages = ((RX_BUFFERS + TX_BUFFERS) * BUF_LEN) as u64 / PAGE_SIZE;
        let mut nic = Self {
            mac: mac_from_capacity(info.capacity),
            rx: Virtq::new(index, NET_RX, size, event)?,
            tx: Virtq::new(index, NET_TX, size, event)?,
            buffers: crate::mmu::take_low(pages)?,
            rx_buffer: [0; QUEUE_SIZE as usize],
            tx_buffer: [0; QUEUE_SIZE as usize],
            tx_free: u128::MAX >> (128 - TX_BUFFERS),
        };
        for i in 0..RX_BUFFERS {
            nic.post_rx(i);
        }
        nic.rx.kick();
        Ok(nic)
    }

    /// The guest's MAC address, given by the host.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The guest's IPv4 address on the LAN (`10.0.0.0/8`), by the host's
    /// convention ([`shoal_abi::device::ipv4_of`]).
    pub fn ipv4(&self) -> [u8; 4] {
        ipv4_of(self.mac)
    }

    /// The event the device raises.
    pub fn event(&self) -> u32 {
        self.rx.event()
    }

    fn buffer(&self, i: usize) -> u64 {
        self.buffers + (i * BUF_LEN) as u64
    }

    /// Gives receive buffer `i` to the host.
    fn post_rx(&mut self, i: usize) {
        let buf = Buf {
            addr: self.buffer(i),
            len: BUF_LEN as u32,
            device_writes: true,
        };
        if let Some(head) = self.rx.push(&[buf]) {
            self.rx_buffer[usize::from(head)] = i as u8;
        }
    }

    /// Sends `frame`, waiting for a free transmit buffer if all are with
    /// the host.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        loop {
            if self.try_send(frame)? {
                return Ok(());
            }
            self.wait_tx();
        }
    }

    /// Sends `frame` if a transmit buffer is free; false if none is.
    pub fn try_send(&mut self, frame: &[u8]) -> Result<bool, NetError> {
        if frame.len() < FRAME_MIN as usize || frame.len() > FRAME_MAX as usize {
            return Err(NetError::BadFrame);
        }
        self.reclaim_tx();
        if self.tx_free == 0 {
            return Ok(false);
        }
        let i = self.tx_free.trailing_zeros() as usize;
        let addr = self.buffer(RX_BUFFERS + i);
        let header = NET_HEADER_LEN as usize;
        // SAFETY: transmit buffer `i` is free (not with the host) and
        // `BUF_LEN` bytes of identity-mapped memory this driver owns.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, BUF_LEN) };
        buf[..header].fill(0);
        buf[header..header + frame.len()].copy_from_slice(frame);
        let chain = Buf {
            addr,
            len: (header + frame.len()) as u32,
            device_writes: false,
        };
        let Some(head) = self.tx.push(&[chain]) else {
            return Ok(false);
        };
        self.tx_free &= !(1 << i);
        self.tx_buffer[usize::from(head)] = i as u8;
        self.tx.kick();
        Ok(true)
    }

    /// Waits until the host has taken every frame sent so far off the
    /// transmit queue: call it before exiting, or the last frames may go
    /// with the guest.
    pub fn flush(&mut self) {
        let all = u128::MAX >> (128 - TX_BUFFERS);
        loop {
            self.reclaim_tx();
            if self.tx_free == all {
                return;
            }
            self.wait_tx();
        }
    }

    /// Frees the transmit buffers the host is done with.
    fn reclaim_tx(&mut self) {
        while let Some((head, _)) = self.tx.pop_used() {
            self.tx_free |= 1 << self.tx_buffer[usize::from(head)];
        }
    }

    /// Blocks until the host is done with a transmit buffer.
    fn wait_tx(&mut self) {
        let bit = 1 << self.tx.event();
        event::take(bit);
        if !self.tx.arm() {
            event::wait_any(bit, u64::MAX);
        }
    }

    /// Hands the next received frame to `f` and gives its buffer back to
    /// the host; `None` if no frame is in.
    pub fn recv<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let (head, len) = self.rx.pop_used()?;
        let i = usize::from(self.rx_buffer[usize::from(head)]);
        let header = NET_HEADER_LEN as usize;
        let len = (len as usize).clamp(header, BUF_LEN);
        // SAFETY: the host is done with receive buffer `i` (its chain is
        // used) and wrote `len` bytes of it.
        let frame = unsafe {
            core::slice::from_raw_parts((self.buffer(i) + header as u64) as *const u8, len - header)
        };
        let result = f(frame);
        self.post_rx(i);
        self.rx.kick();
        Some(result)
    }

    /// Whether a received frame is waiting.
    pub fn has_frame(&mut self) -> bool {
        self.rx.has_used()
    }

    /// Blocks until a frame is in or the monotonic clock reaches
    /// `deadline_ns` (`u64::MAX`: no deadline); true if a frame is in.
    pub fn wait(&mut self, deadline_ns: u64) -> bool {
        let bit = 1 << self.rx.event();
        loop {
            event::take(bit);
            if self.rx.arm() {
                return true;
            }
            if event::wait_any(bit, deadline_ns) == 0 {
                return self.rx.has_used();
            }
        }
    }
}
