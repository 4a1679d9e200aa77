//! A virtio-blk driver for the host's disks (`shoal run --disk PATH[,ro]`).
//!
//! ```text
//! let mut disk = blk::Disk::open(0)?;
//! disk.write(0, &data)?;                 // blocking, one request
//! disk.flush()?;                         // durable on the host
//! let mut reqs = [blk::Request::read(0, &mut a), blk::Request::read(8, &mut b)];
//! disk.run(&mut reqs);                   // several in flight at once
//! ```
//!
//! Requests go on the device's virtqueue ([`crate::virtq`]); the driver
//! notifies the host only when it is idle and blocks on the queue's event
//! only when nothing it waits for is done yet. Data buffers are used where
//! they are, so they must be guest-physical memory mapped at its own
//! address: the stack, statics, the boot heap, or [`buffer`]; not the
//! `alloc` heap.

use crate::hypercall::{self, Error};
use crate::virtq::{Buf, Virtq};
use shoal_abi::device::{
    BLK_ID_LEN, BLK_S_OK, BLK_S_UNSUPP, BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT, BlkHeader,
    FLAG_READ_ONLY, KIND_BLOCK, SECTOR_SIZE,
};
use shoal_abi::hypercall::DeviceInfo;
use shoal_abi::layout::{IMAGE_BASE, PAGE_SIZE};

/// Descriptors in a disk's queue.
pub const QUEUE_SIZE: u16 = 256;
/// Requests a disk keeps in flight at most (3 descriptors each).
pub const IN_FLIGHT_MAX: usize = 64;
/// Disk `i` completes requests with event `EVENT_BASE + i`.
pub const EVENT_BASE: u32 = 32;

/// Why a request or a disk failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The host refused a call.
    Hypercall(Error),
    /// No such device, or not a disk.
    NoDisk,
    /// The host could not do it: a sector past the end, a write to a
    /// read-only disk, an I/O error on the host.
    Io,
    /// The disk does not know the request.
    Unsupported,
    /// The buffer is not whole sectors, is larger than a request may
    /// carry, or is not guest-physical memory at its own address.
    BadBuffer,
}

impl From<Error> for BlkError {
    fn from(e: Error) -> Self {
        Self::Hypercall(e)
    }
}

/// What a request does.
pub enum Op<'a> {
    /// Read sectors from `sector` into the buffer.
    Read(u64, &'a mut [u8]),
    /// Write the buffer to sectors from `sector`.
    Write(u64, &'a [u8]),
    /// Make every completed write durable.
    Flush,
    /// Read the disk's id (the host file's name, up to 20 bytes).
    GetId(&'a mut [u8; BLK_ID_LEN as usize]),
}

/// A request for [`Disk::run`], and its result once run.
pub struct Request<'a> {
    /// What to do.
    pub op: Op<'a>,
    /// Set by [`Disk::run`].
    pub result: Result<(), BlkError>,
}

impl<'a> Request<'a> {
    /// Reads `buf.len()` bytes (whole sectors) from `sector`.
    pub fn read(sector: u64, buf: &'a mut [u8]) -> Self {
        Self::new(Op::Read(sector, buf))
    }

    /// Writes `buf` (whole sectors) at `sector`.
    pub fn write(sector: u64, buf: &'a [u8]) -> Self {
        Self::new(Op::Write(sector, buf))
    }

    /// A flush.
    pub fn flush() -> Self {
        Self::new(Op::Flush)
    }

    fn new(op: Op<'a>) -> Self {
        Self {
            op,
            result: Err(BlkError::Io),
        }
    }
}

/// The header and status byte of one request in flight.
#[repr(C, align(32))]
struct Meta {
    header: BlkHeader,
    status: u8,
}

/// A disk this guest drives.
pub struct Disk {
    info: DeviceInfo,
    queue: Virtq,
    /// `IN_FLIGHT_MAX` request headers, in memory the host can see.
    meta: *mut Meta,
    /// Bit `i` set: meta slot `i` is free.
    free_slots: u64,
    /// The request (index into `run`'s slice) in each meta slot.
    slot_request: [usize; IN_FLIGHT_MAX],
    /// The meta slot of each chain in flight, by head descriptor.
    head_slot: [u8; QUEUE_SIZE as usize],
}

/// Devices the host gave this guest (disks and any others).
pub fn devices() -> u32 {
    (0..).find(|&index| info(index).is_err()).unwrap_or(0)
}

/// What device `index` is.
pub fn info(index: u32) -> Result<DeviceInfo, Error> {
    let mut info = DeviceInfo {
        index,
        ..DeviceInfo::default()
    };
    hypercall::call(&mut info)?;
    Ok(info)
}

/// `pages` zeroed pages of memory a disk can read into and write from,
/// kept for the rest of the guest's life.
pub fn buffer(pages: u64) -> Result<&'static mut [u8], Error> {
    let addr = crate::mmu::take_low(pages)?;
    // SAFETY: `take_low` handed these pages to the caller alone, mapped
    // writable at their own address.
    Ok(unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, (pages * PAGE_SIZE) as usize) })
}

impl Disk {
    /// Sets up disk `index`'s queue. Its requests complete with event
    /// [`EVENT_BASE`]` + index`.
    pub fn open(index: u32) -> Result<Self, BlkError> {
        let info = info(index).map_err(|_| BlkError::NoDisk)?;
        if info.kind != KIND_BLOCK || index >= 64 - EVENT_BASE {
            return Err(BlkError::NoDisk);
        }
        let size = QUEUE_SIZE.min(info.queue_max as u16);
        let meta = crate::mmu::take_low(
            (IN_FLIGHT_MAX * size_of::<Meta>()).div_ceil(PAGE_SIZE as usize) as u64,
        )? as *mut Meta;
        let queue = Virtq::new(index, 0, size, EVENT_BASE + index)?;
        Ok(Self {
            info,
            queue,
            meta,
            free_slots: u64::MAX >> (64 - IN_FLIGHT_MAX),
            slot_request: [0; IN_FLIGHT_MAX],
            head_slot: [0; QUEUE_SIZE as usize],
        })
    }

    /// The disk's size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.info.capacity
    }

    /// Whether the disk refuses writes.
    pub fn read_only(&self) -> bool {
        self.info.flags & FLAG_READ_ONLY != 0
    }

    /// Most bytes one read or write may carry.
    pub fn request_max(&self) -> usize {
        self.info.request_max as usize
    }

    /// Reads whole sectors from `sector` into `buf`.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.one(Request::read(sector, buf))
    }

    /// Writes `buf`, whole sectors, at `sector`.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        self.one(Request::write(sector, buf))
    }

    /// Makes every completed write durable on the host.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        self.one(Request::flush())
    }

    /// The disk's id.
    pub fn id(&mut self) -> Result<[u8; BLK_ID_LEN as usize], BlkError> {
        let mut id = [0; BLK_ID_LEN as usize];
        self.one(Request::new(Op::GetId(&mut id)))?;
        Ok(id)
    }

    fn one(&mut self, request: Request<'_>) -> Result<(), BlkError> {
        let mut requests = [request];
        self.run(&mut requests);
        let [request] = requests;
        request.result
    }

    /// Runs every request, up to [`IN_FLIGHT_MAX`] in flight at once, and
    /// sets each one's result; returns how many failed. Requests may
    /// complete in any order: a flush covers only the writes that
    /// completed before it was made, so put it in a later `run`.
    pub fn run(&mut self, requests: &mut [Request<'_>]) -> usize {
        let mut next = 0;
        let mut done = 0;
        let mut in_flight = 0;
        while done < requests.len() {
            while next < requests.len() && self.free_slots != 0 && self.queue.free() >= 3 {
                match self.submit(next, &mut requests[next]) {
                    Ok(()) => in_flight += 1,
                    Err(error) => {
                        requests[next].result = Err(error);
                        done += 1;
                    }
                }
                next += 1;
            }
            self.queue.kick();
            let before = done;
            while let Some((head, _)) = self.queue.pop_used() {
                let slot = usize::from(self.head_slot[usize::from(head)]);
                // SAFETY: `slot` is a meta slot in flight, which the host
                // has finished with.
                let status = unsafe { (*self.meta.add(slot)).status };
                requests[self.slot_request[slot]].result = match status {
                    BLK_S_OK => Ok(()),
                    BLK_S_UNSUPP => Err(BlkError::Unsupported),
                    _ => Err(BlkError::Io),
                };
                self.free_slots |= 1 << slot;
                done += 1;
                in_flight -= 1;
            }
            if done == before && in_flight > 0 {
                self.wait();
            }
        }
        requests.iter().filter(|r| r.result.is_err()).count()
    }

    /// Blocks until the host used a chain (or already has).
    fn wait(&mut self) {
        self.queue.wait(u64::MAX);
    }

    /// Puts request `index` on the queue.
    fn submit(&mut self, index: usize, request: &mut Request<'_>) -> Result<(), BlkError> {
        let (kind, sector, data) = match &mut request.op {
            Op::Read(sector, buf) => (BLK_T_IN, *sector, Some((buf.as_ptr(), buf.len(), true))),
            Op::Write(sector, buf) => (BLK_T_OUT, *sector, Some((buf.as_ptr(), buf.len(), false))),
            Op::Flush => (BLK_T_FLUSH, 0, None),
            Op::GetId(buf) => (BLK_T_GET_ID, 0, Some((buf.as_ptr(), buf.len(), true))),
        };
        let data = match data {
            Some((ptr, len, device_writes)) => {
                let whole = kind == BLK_T_GET_ID || (len as u64).is_multiple_of(SECTOR_SIZE);
                if !whole || len > self.request_max() || !physical(ptr as u64, len) {
                    return Err(BlkError::BadBuffer);
                }
                Some(Buf {
                    addr: ptr as u64,
                    len: len as u32,
                    device_writes,
                })
            }
            None => None,
        };
        let slot = self.free_slots.trailing_zeros() as usize;
        // SAFETY: `slot` is free: the host does not look at it.
        let meta = unsafe { &mut *self.meta.add(slot) };
        meta.header = BlkHeader {
            kind,
            reserved: 0,
            sector,
        };
        meta.status = u8::MAX;
        let header = Buf {
            addr: core::ptr::addr_of!(meta.header) as u64,
            len: size_of::<BlkHeader>() as u32,
            device_writes: false,
        };
        let status = Buf {
            addr: core::ptr::addr_of!(meta.status) as u64,
            len: 1,
            device_writes: true,
        };
        let head = match data {
            Some(data) => self.queue.push(&[header, data, status]),
            None => self.queue.push(&[header, status]),
        }
        .ok_or(BlkError::Io)?;
        self.free_slots &= !(1 << slot);
        self.slot_request[slot] = index;
        self.head_slot[usize::from(head)] = slot as u8;
        Ok(())
    }
}

/// Whether `addr..addr + len` is guest RAM mapped at its own address (as
/// all of it is at boot): what the host reads and writes for a device.
fn physical(addr: u64, len: usize) -> bool {
    let mem_size = crate::boot::info().mem_size;
    addr >= IMAGE_BASE
        && addr
            .checked_add(len as u64)
            .is_some_and(|end| end <= mem_size)
}
