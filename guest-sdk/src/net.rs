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
use shoal_abi::hypercall::DeviceInfo;
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
    rx: RxQueue,
    tx: TxQueue,
}

/// The receive queue and its buffers.
struct RxQueue {
    q: Virtq,
    /// `RX_BUFFERS` buffers, identity-mapped.
    buffers: u64,
    /// The receive buffer of each chain the host holds, by head.
    buffer_of: [u8; QUEUE_SIZE as usize],
}

/// The transmit queue and its buffers.
struct TxQueue {
    q: Virtq,
    /// `TX_BUFFERS` buffers, identity-mapped.
    buffers: u64,
    /// The transmit buffer of each chain the host holds, by head.
    buffer_of: [u8; QUEUE_SIZE as usize],
    /// Bit `i` set: transmit buffer `i` is free.
    free: u128,
}

const _: () = assert!(TX_BUFFERS <= 128 && RX_BUFFERS <= QUEUE_SIZE as usize);

/// Every transmit buffer free.
const TX_ALL: u128 = u128::MAX >> (128 - TX_BUFFERS);

impl Nic {
    /// The guest's first network device.
    pub fn find() -> Result<Self, NetError> {
        let (index, info) = (0..)
            .map_while(|i| crate::blk::info(i).ok().map(|info| (i, info)))
            .find(|(_, info)| info.kind == KIND_NET)
            .ok_or(NetError::NoNic)?;
        Self::with_info(index, info)
    }

    /// Sets up network device `index`: both queues, every receive buffer
    /// given to the host.
    pub fn open(index: u32) -> Result<Self, NetError> {
        let info = crate::blk::info(index).map_err(|_| NetError::NoNic)?;
        Self::with_info(index, info)
    }

    /// Sets up network device `index`, which `device_info` described as
    /// `info`.
    fn with_info(index: u32, info: DeviceInfo) -> Result<Self, NetError> {
        if info.kind != KIND_NET || index >= 64 - EVENT_BASE {
            return Err(NetError::NoNic);
        }
        let size = QUEUE_SIZE.min(info.queue_max as u16);
        let event = EVENT_BASE + index;
        let pages = |buffers: usize| (buffers * BUF_LEN) as u64 / PAGE_SIZE;
        let mut nic = Self {
            mac: mac_from_capacity(info.capacity),
            rx: RxQueue {
                q: Virtq::new(index, NET_RX, size, event)?,
                buffers: crate::mmu::take_low(pages(RX_BUFFERS))?,
                buffer_of: [0; QUEUE_SIZE as usize],
            },
            tx: TxQueue {
                q: Virtq::new(index, NET_TX, size, event)?,
                buffers: crate::mmu::take_low(pages(TX_BUFFERS))?,
                buffer_of: [0; QUEUE_SIZE as usize],
                free: TX_ALL,
            },
        };
        for i in 0..RX_BUFFERS {
            nic.rx.post(i);
        }
        nic.rx.q.kick();
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
        self.rx.q.event()
    }

    /// Sends `frame`, waiting for a free transmit buffer if all are with
    /// the host.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        loop {
            if self.try_send(frame)? {
                return Ok(());
            }
            self.tx.wait();
        }
    }

    /// Sends `frame` if a transmit buffer is free; false if none is.
    pub fn try_send(&mut self, frame: &[u8]) -> Result<bool, NetError> {
        if frame.len() < FRAME_MIN as usize || frame.len() > FRAME_MAX as usize {
            return Err(NetError::BadFrame);
        }
        let Some(mut out) = Sender(&mut self.tx).frame(frame.len()) else {
            return Ok(false);
        };
        out.copy_from_slice(frame);
        out.send();
        Ok(true)
    }

    /// Waits until the host has taken every frame sent so far off the
    /// transmit queue: call it before exiting, or the last frames may go
    /// with the guest.
    pub fn flush(&mut self) {
        loop {
            self.tx.reclaim();
            if self.tx.free == TX_ALL {
                return;
            }
            self.tx.wait();
        }
    }

    /// The two halves of the device, to receive and send at once without
    /// copying (as a TCP/IP stack does).
    pub fn split(&mut self) -> (Receiver<'_>, Sender<'_>) {
        (Receiver(&mut self.rx), Sender(&mut self.tx))
    }

    /// Hands the next received frame to `f` and gives its buffer back to
    /// the host; `None` if no frame is in.
    pub fn recv<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        self.rx.recv(f)
    }

    /// Whether a received frame is waiting.
    pub fn has_frame(&mut self) -> bool {
        self.rx.q.has_used()
    }

    /// Blocks until a frame is in or the monotonic clock reaches
    /// `deadline_ns` (`u64::MAX`: no deadline); true if a frame is in.
    pub fn wait(&mut self, deadline_ns: u64) -> bool {
        self.rx.q.wait(deadline_ns)
    }

    /// Blocks until a frame is in, or (with `tx`) the host is done with a
    /// transmit buffer, or the clock reaches `deadline_ns`; true if a
    /// frame is in.
    pub fn wait_io(&mut self, deadline_ns: u64, tx: bool) -> bool {
        let bit = 1 << self.rx.q.event();
        loop {
            event::take(bit);
            if self.rx.q.arm() || (tx && self.tx.q.arm()) {
                return self.rx.q.has_used();
            }
            if event::wait_any(bit, deadline_ns) == 0 {
                return self.rx.q.has_used();
            }
        }
    }
}

/// The receiving half of a [`Nic`].
pub struct Receiver<'a>(&'a mut RxQueue);

impl<'a> Receiver<'a> {
    /// Whether a received frame is waiting.
    pub fn has_frame(&self) -> bool {
        self.0.q.has_used()
    }

    /// The next received frame, in place in its receive buffer; `None` if
    /// none is in.
    pub fn take(self) -> Option<RxFrame<'a>> {
        let (buffer, len) = self.0.take()?;
        Some(RxFrame {
            rx: self.0,
            buffer,
            len,
        })
    }
}

/// A received Ethernet frame in its receive buffer, which goes back to the
/// host when the frame is dropped.
pub struct RxFrame<'a> {
    rx: &'a mut RxQueue,
    buffer: usize,
    len: usize,
}

impl core::ops::Deref for RxFrame<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.rx.frame(self.buffer, self.len)
    }
}

impl Drop for RxFrame<'_> {
    fn drop(&mut self) {
        self.rx.give_back(self.buffer);
    }
}

/// The sending half of a [`Nic`].
pub struct Sender<'a>(&'a mut TxQueue);

impl<'a> Sender<'a> {
    /// Whether a transmit buffer is free (after taking back those the
    /// host is done with).
    pub fn ready(&mut self) -> bool {
        self.0.ready()
    }

    /// Blocks until the host is done with a transmit buffer.
    pub fn wait(&mut self) {
        self.0.wait();
    }

    /// A free transmit buffer as a frame of `len` bytes (clamped to 14 to
    /// [`FRAME_MAX`]) to fill and [`TxFrame::send`]; `None` if every
    /// transmit buffer is with the host.
    pub fn frame(self, len: usize) -> Option<TxFrame<'a>> {
        let buffer = self.0.free_buffer()?;
        let len = len.clamp(FRAME_MIN as usize, FRAME_MAX as usize);
        Some(TxFrame {
            tx: self.0,
            buffer,
            len,
        })
    }
}

/// A frame being written in a free transmit buffer; dropped unsent, the
/// buffer stays free.
pub struct TxFrame<'a> {
    tx: &'a mut TxQueue,
    buffer: usize,
    len: usize,
}

impl TxFrame<'_> {
    /// Gives the frame to the host.
    pub fn send(self) {
        self.tx.push(self.buffer, self.len);
    }
}

impl core::ops::Deref for TxFrame<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.tx.frame(self.buffer, self.len)
    }
}

impl core::ops::DerefMut for TxFrame<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.tx.frame_mut(self.buffer, self.len)
    }
}

impl RxQueue {
    fn buffer(&self, i: usize) -> u64 {
        self.buffers + (i * BUF_LEN) as u64
    }

    /// Gives receive buffer `i` to the host.
    fn post(&mut self, i: usize) {
        let buf = Buf {
            addr: self.buffer(i),
            len: BUF_LEN as u32,
            device_writes: true,
        };
        if let Some(head) = self.q.push(&[buf]) {
            self.buffer_of[usize::from(head)] = i as u8;
        }
    }

    /// Hands the next received frame to `f` and gives its buffer back.
    fn recv<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let (i, len) = self.take()?;
        let result = f(self.frame(i, len));
        self.give_back(i);
        Some(result)
    }

    /// The next received frame: its buffer and length.
    fn take(&mut self) -> Option<(usize, usize)> {
        let (head, len) = self.q.pop_used()?;
        let i = usize::from(self.buffer_of[usize::from(head)]);
        let header = NET_HEADER_LEN as usize;
        Some((i, (len as usize).clamp(header, BUF_LEN) - header))
    }

    /// The frame of `len` bytes in receive buffer `i`, taken from the
    /// host.
    fn frame(&self, i: usize, len: usize) -> &[u8] {
        let header = NET_HEADER_LEN as u64;
        // SAFETY: the host is done with receive buffer `i` (its chain was
        // used, `take`) and wrote the header and `len` bytes of it
        // (`take` keeps the length within the buffer).
        unsafe { core::slice::from_raw_parts((self.buffer(i) + header) as *const u8, len) }
    }

    /// Gives receive buffer `i` back to the host.
    fn give_back(&mut self, i: usize) {
        self.post(i);
        self.q.kick();
    }
}

impl TxQueue {
    /// Frees the transmit buffers the host is done with.
    fn reclaim(&mut self) {
        while let Some((head, _)) = self.q.pop_used() {
            self.free |= 1 << self.buffer_of[usize::from(head)];
        }
    }

    /// A free transmit buffer, after taking back those the host is done
    /// with; `None` if all are with the host.
    fn free_buffer(&mut self) -> Option<usize> {
        self.reclaim();
        (self.free != 0).then(|| self.free.trailing_zeros() as usize)
    }

    /// Whether a transmit buffer is free.
    fn ready(&mut self) -> bool {
        self.free_buffer().is_some()
    }

    /// The address of transmit buffer `i`.
    fn buffer(&self, i: usize) -> u64 {
        self.buffers + (i * BUF_LEN) as u64
    }

    /// The frame part (`len` bytes, at most [`FRAME_MAX`]) of free
    /// transmit buffer `i`.
    fn frame(&self, i: usize, len: usize) -> &[u8] {
        let header = u64::from(NET_HEADER_LEN);
        // SAFETY: transmit buffer `i` is free (not with the host), and
        // the header and `len` bytes lie in its `BUF_LEN` bytes of
        // identity-mapped memory this driver owns.
        unsafe { core::slice::from_raw_parts((self.buffer(i) + header) as *const u8, len) }
    }

    /// The frame part of free transmit buffer `i`, to write.
    fn frame_mut(&mut self, i: usize, len: usize) -> &mut [u8] {
        let header = u64::from(NET_HEADER_LEN);
        // SAFETY: as in `frame`; `&mut self` keeps the slice the only
        // reference to the buffer.
        unsafe { core::slice::from_raw_parts_mut((self.buffer(i) + header) as *mut u8, len) }
    }

    /// Gives the frame of `len` bytes in free transmit buffer `i` to the
    /// host, behind a header that asks for nothing.
    fn push(&mut self, i: usize, len: usize) {
        let addr = self.buffer(i);
        // SAFETY: the header is the first bytes of free transmit buffer
        // `i` (see `frame`).
        unsafe { core::ptr::write_bytes(addr as *mut u8, 0, NET_HEADER_LEN as usize) };
        let chain = Buf {
            addr,
            len: NET_HEADER_LEN + len as u32,
            device_writes: false,
        };
        // A free buffer means fewer than `TX_BUFFERS` chains are out, so
        // the queue has room.
        if let Some(head) = self.q.push(&[chain]) {
            self.free &= !(1 << i);
            self.buffer_of[usize::from(head)] = i as u8;
            self.q.kick();
        }
    }

    /// Blocks until the host is done with a transmit buffer.
    fn wait(&mut self) {
        self.q.wait(u64::MAX);
    }
}
