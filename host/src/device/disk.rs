//! Disks: host files served to guests as virtio-blk devices.
//!
//! A writable disk is locked exclusively (`flock`) for as long as a guest
//! has it, across processes too; a read-only disk is locked shared, and
//! within one process every guest of the same read-only file shares one
//! open file ([`Disks`]). Writes go straight to the file (`pwrite`) and a
//! flush is an `fdatasync`: once a flush completes, every write completed
//! before it is on the disk.

use super::ring::Chain;
use shoal_abi::device::{
    BLK_ID_LEN, BLK_S_IOERR, BLK_S_OK, BLK_S_UNSUPP, BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN,
    BLK_T_OUT, BlkHeader, DESC_WRITE, REQUEST_MAX, SECTOR_SIZE,
};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::FromBytes;

/// What one flush counts for in a device thread turn (it may wait for
/// the storage): as much as a full request's data.
pub const FLUSH_COST: u64 = REQUEST_MAX as u64;

/// What serving one chain did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// Bytes written into the chain (its used length).
    pub written: u32,
    /// Its weight in the device thread's turn: data bytes moved, or
    /// [`FLUSH_COST`].
    pub cost: u64,
}

/// What [`Disk::start`] did with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    /// Served, its status written.
    Served(Served),
    /// A flush, to be completed once the file is synced.
    Flush(PendingFlush),
}

/// A flush request whose status is not written yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingFlush {
    /// Where its status byte goes (checked to lie in guest memory).
    status: GuestAddress,
}

impl PendingFlush {
    /// Writes `status` (from [`Disk::sync`]) as the request's status.
    /// `None` if guest memory refused the byte.
    pub fn finish(self, mem: &GuestMemoryMmap<()>, status: u8) -> Option<Served> {
        mem.write_obj(status, self.status).ok()?;
        Some(Served {
            written: 1,
            cost: FLUSH_COST,
        })
    }
}

/// A disk to give a guest: `shoal run --disk PATH[,ro]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    /// The host file.
    pub path: PathBuf,
    /// The guest may only read it (and other guests may share it).
    pub read_only: bool,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;

    /// `PATH`, `PATH,ro` or `PATH,rw`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            _ => (s, false),
        };
        if path.is_empty() {
            return Err("a disk needs a file path".into());
        }
        Ok(Self {
            path: path.into(),
            read_only,
        })
    }
}

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Opening or sizing the file failed.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another guest (or process) holds the file in a way that excludes
    /// this use: writable disks are exclusive.
    #[error("disk {0} is in use by another guest (a writable disk is exclusive)")]
    Busy(PathBuf),
}

/// An open disk.
#[derive(Debug)]
pub struct Disk {
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; BLK_ID_LEN as usize],
}

impl Disk {
    /// Gives up the exclusive lock of a writable disk whose guest is gone
    /// and will do no more I/O (a read-only disk's shared lock stays: other
    /// guests may share the disk).
    pub fn release(&self) {
        if !self.read_only {
            // SAFETY: `flock` on the file this disk owns.
            unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        }
    }

    /// Opens and locks the file of `spec`.
    pub fn open(spec: &DiskSpec) -> Result<Self, DiskError> {
        let open_error = |source| DiskError::Open {
            path: spec.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!spec.read_only)
            .open(&spec.path)
            .map_err(open_error)?;
        let lock = if spec.read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: `flock` on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            return Err(match error.raw_os_error() {
                Some(libc::EWOULDBLOCK) => DiskError::Busy(spec.path.clone()),
                _ => open_error(error),
            });
        }
        let len = file.metadata().map_err(open_error)?.len();
        let mut id = [0u8; BLK_ID_LEN as usize];
        let name = spec
            .path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Self {
            file,
            read_only: spec.read_only,
            sectors: len / SECTOR_SIZE,
            id,
        })
    }

    /// Size in sectors (a partial last sector of the file is not part of
    /// the disk).
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the guest may only read.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Serves one request whose chain the ring has checked: every buffer
    /// lies in `mem` and off the rings. `None` when the chain is not
    /// framed as a request and has no status byte to say so. A flush is
    /// served here too, on the calling thread ([`Disk::start`] leaves it
    /// to another).
    pub fn serve(&self, mem: &GuestMemoryMmap<()>, chain: &Chain) -> Option<Served> {
        match self.start(mem, chain)? {
            Started::Served(served) => Some(served),
            Started::Flush(flush) => flush.finish(mem, self.sync()),
        }
    }

    /// Serves one request as [`Disk::serve`] does, reading the request
    /// from guest memory once, but for a flush of a writable disk: that
    /// is left for the caller to complete ([`PendingFlush::finish`]) once
    /// [`Disk::sync`] has run, which may take milliseconds.
    pub fn start(&self, mem: &GuestMemoryMmap<()>, chain: &Chain) -> Option<Started> {
        let descs = &chain.descs;
        let status = descs
            .last()
            .filter(|d| d.flags & DESC_WRITE != 0 && d.len >= 1)?;
        let status_at = GuestAddress(status.addr);
        let mut header = [0u8; size_of::<BlkHeader>()];
        let framed = descs.len() >= 2
            && descs[0].flags & DESC_WRITE == 0
            && descs[0].len as usize == header.len()
            && mem
                .read_slice(&mut header, GuestAddress(descs[0].addr))
                .is_ok();
        let (result, written, cost) = match BlkHeader::read_from_bytes(&header) {
            Ok(header) if framed => {
                let data = &descs[1..descs.len() - 1];
                let deferred = header.kind == BLK_T_FLUSH
                    && !self.read_only
                    && data.iter().all(|d| d.flags & DESC_WRITE == 0);
                if deferred {
                    return Some(Started::Flush(PendingFlush { status: status_at }));
                }
                let (result, written) = self.request(mem, header, data);
                let cost = match header.kind {
                    BLK_T_FLUSH => FLUSH_COST,
                    _ => data.iter().map(|d| u64::from(d.len)).sum(),
                };
                (result, written, cost)
            }
            _ => (BLK_S_IOERR, 0, 0),
        };
        mem.write_obj(result, status_at).ok()?;
        Some(Started::Served(Served {
            written: written + 1,
            cost,
        }))
    }

    /// Makes every write completed so far durable (`fdatasync`): the
    /// status of the flushes it serves.
    pub fn sync(&self) -> u8 {
        hold::wait_while_held();
        match self.file.sync_data() {
            Ok(()) => BLK_S_OK,
            Err(_) => BLK_S_IOERR,
        }
    }

    /// Serves a framed request: its status and the data bytes written.
    fn request(
        &self,
        mem: &GuestMemoryMmap<()>,
        header: BlkHeader,
        data: &[shoal_abi::device::Descriptor],
    ) -> (u8, u32) {
        let writes_guest = header.kind == BLK_T_IN || header.kind == BLK_T_GET_ID;
        if data
            .iter()
            .any(|d| (d.flags & DESC_WRITE != 0) != writes_guest)
        {
            return (BLK_S_IOERR, 0);
        }
        let bytes: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        match header.kind {
            BLK_T_IN | BLK_T_OUT => {
                let in_range = bytes.is_multiple_of(SECTOR_SIZE)
                    && bytes <= u64::from(REQUEST_MAX)
                    && header
                        .sector
                        .checked_add(bytes / SECTOR_SIZE)
                        .is_some_and(|end| end <= self.sectors);
                if !in_range || (header.kind == BLK_T_OUT && self.read_only) {
                    return (BLK_S_IOERR, 0);
                }
                let mut offset = header.sector * SECTOR_SIZE;
                for d in data {
                    if self
                        .transfer(mem, d.addr, d.len, offset, header.kind == BLK_T_IN)
                        .is_err()
                    {
                        return (BLK_S_IOERR, 0);
                    }
                    offset += u64::from(d.len);
                }
                let written = if writes_guest { bytes as u32 } else { 0 };
                (BLK_S_OK, written)
            }
            BLK_T_FLUSH if self.read_only => (BLK_S_OK, 0),
            BLK_T_FLUSH => (self.sync(), 0),
            BLK_T_GET_ID => {
                let Some(first) = data.first() else {
                    return (BLK_S_IOERR, 0);
                };
                let n = (first.len as usize).min(self.id.len());
                match mem.write_slice(&self.id[..n], GuestAddress(first.addr)) {
                    Ok(()) => (BLK_S_OK, n as u32),
                    Err(_) => (BLK_S_IOERR, 0),
                }
            }
            _ => (BLK_S_UNSUPP, 0),
        }
    }

    /// `pread` (`into_guest`) or `pwrite` the guest buffer `addr..+len`
    /// from or to the file at `offset`, to the end. The kernel copies: no
    /// Rust reference to guest memory is made, so a guest changing the
    /// buffer meanwhile only changes its own data.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap<()>,
        addr: u64,
        len: u32,
        mut offset: u64,
        into_guest: bool,
    ) -> std::io::Result<()> {
        let slice = mem
            .get_slice(GuestAddress(addr), len as usize)
            .map_err(std::io::Error::other)?;
        let guard = slice.ptr_guard_mut();
        let (ptr, len) = (guard.as_ptr(), len as usize);
        let mut done = 0;
        while done < len {
            let offset_arg = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
            // SAFETY: `ptr..ptr + len` is guest memory inside a live
            // mapping (`get_slice` checked it; the caller's view outlives
            // the call), and `done < len`.
            let n = unsafe {
                let at = ptr.add(done).cast();
                if into_guest {
                    libc::pread(self.file.as_raw_fd(), at, len - done, offset_arg)
                } else {
                    libc::pwrite(self.file.as_raw_fd(), at, len - done, offset_arg)
                }
            };
            match n {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n if n < 0 => {
                    let error = std::io::Error::last_os_error();
                    if error.kind() != std::io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
                n => {
                    done += n as usize;
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Holding every disk sync of the process, for tests: a sync stands for
/// the slowest storage there is.
mod hold {
    use std::sync::{Condvar, Mutex};

    /// Whether syncs are held, and how many wait.
    static HELD: Mutex<(bool, usize)> = Mutex::new((false, 0));
    static RELEASED: Condvar = Condvar::new();

    /// Holds every disk sync in this process until dropped.
    #[derive(Debug)]
    pub struct FlushHold(());

    impl FlushHold {
        /// Syncs waiting now.
        pub fn waiting(&self) -> usize {
            crate::lock(&HELD).1
        }
    }

    impl Drop for FlushHold {
        fn drop(&mut self) {
            crate::lock(&HELD).0 = false;
            RELEASED.notify_all();
        }
    }

    /// Holds every disk sync of this process (each waits before its
    /// `fdatasync`) until the returned guard is dropped. For tests that
    /// show what waits for a sync and what does not; nothing else calls
    /// it.
    pub fn hold_flushes() -> FlushHold {
        crate::lock(&HELD).0 = true;
        FlushHold(())
    }

    pub(super) fn wait_while_held() {
        let mut held = crate::lock(&HELD);
        if held.0 {
            held.1 += 1;
            while held.0 {
                held = RELEASED.wait(held).unwrap_or_else(|e| e.into_inner());
            }
            held.1 -= 1;
        }
    }
}

pub use hold::{FlushHold, hold_flushes};

/// The disks open in this process, so that every guest of one read-only
/// file shares one open file and one lock.
#[derive(Debug, Default)]
pub struct Disks {
    shared: Mutex<HashMap<PathBuf, Weak<Disk>>>,
}

impl Disks {
    /// Opens `spec`, or shares the read-only disk already open for it.
    pub fn open(&self, spec: &DiskSpec) -> Result<Arc<Disk>, DiskError> {
        if !spec.read_only {
            return Disk::open(spec).map(Arc::new);
        }
        let key = canonical(&spec.path);
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(disk) = shared.get(&key).and_then(Weak::upgrade) {
            return Ok(disk);
        }
        shared.retain(|_, disk| disk.strong_count() > 0);
        let disk = Arc::new(Disk::open(spec)?);
        shared.insert(key, Arc::downgrade(&disk));
        Ok(disk)
    }
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_abi::device::{DESC_NEXT, Descriptor};

    const BASE: u64 = 0x10_0000;

    fn disk(read_only: bool) -> (Disk, tempfile::NamedTempFile) {
        let file = tempfile::NamedTempFile::new().expect("temporary file");
        file.as_file().set_len(8 * SECTOR_SIZE).expect("sized");
        let spec = DiskSpec {
            path: file.path().to_path_buf(),
            read_only,
        };
        (Disk::open(&spec).expect("opens"), file)
    }

    fn chain(descs: &[(u64, u32, u16)]) -> Chain {
        Chain {
            head: 0,
            descs: descs
                .iter()
                .map(|&(addr, len, flags)| Descriptor {
                    addr,
                    len,
                    flags,
                    next: 0,
                })
                .collect(),
        }
    }

    fn request(mem: &GuestMemoryMmap<()>, kind: u32, sector: u64) -> u64 {
        let header = BlkHeader {
            kind,
            reserved: 0,
            sector,
        };
        mem.write_slice(zerocopy::IntoBytes::as_bytes(&header), GuestAddress(BASE))
            .expect("inside");
        BASE
    }

    fn status(mem: &GuestMemoryMmap<()>) -> u8 {
        mem.read_obj(GuestAddress(BASE + 0x800)).expect("inside")
    }

    #[test]
    fn chains_that_are_not_requests_get_an_error_status_or_none() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), 1 << 16)]).expect("memory");
        let (disk, _file) = disk(false);
        // A lone status byte: answered with an error.
        let served = disk.serve(&mem, &chain(&[(BASE + 0x800, 1, DESC_WRITE)]));
        assert_eq!(served.map(|s| s.written), Some(1));
        assert_eq!(status(&mem), BLK_S_IOERR);
        // Nothing writable to answer in.
        assert_eq!(disk.serve(&mem, &chain(&[(BASE, 16, 0)])), None);
    }

    #[test]
    fn reads_writes_flushes_and_their_errors() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), 1 << 21)]).expect("memory");
        let (disk, file) = disk(false);
        let run = |kind, sector, data: (u64, u32, u16)| {
            let header = request(&mem, kind, sector);
            let mut descs = vec![(header, 16, DESC_NEXT)];
            if data.1 > 0 {
                descs.push(data);
            }
            descs.push((BASE + 0x800, 1, DESC_WRITE));
            let served = disk.serve(&mem, &chain(&descs)).expect("answered");
            (status(&mem), served)
        };
        mem.write_slice(&[7u8; 1024], GuestAddress(BASE + 0x1000))
            .expect("inside");
        let (ok, served) = run(BLK_T_OUT, 2, (BASE + 0x1000, 1024, 0));
        assert_eq!((ok, served.written, served.cost), (BLK_S_OK, 1, 1024));
        let on_disk = std::fs::read(file.path()).expect("readable");
        assert!(on_disk[1024..2048].iter().all(|b| *b == 7));
        let (ok, served) = run(BLK_T_IN, 2, (BASE + 0x2000, 512, DESC_WRITE));
        assert_eq!((ok, served.written), (BLK_S_OK, 513));
        let (ok, served) = run(BLK_T_FLUSH, 0, (0, 0, 0));
        assert_eq!((ok, served.cost), (BLK_S_OK, FLUSH_COST));
        // Past the end, not whole sectors, wrong direction, unknown type.
        assert_eq!(
            run(BLK_T_IN, 8, (BASE + 0x2000, 512, DESC_WRITE)).0,
            BLK_S_IOERR
        );
        assert_eq!(
            run(BLK_T_IN, 0, (BASE + 0x2000, 100, DESC_WRITE)).0,
            BLK_S_IOERR
        );
        assert_eq!(run(BLK_T_IN, 0, (BASE + 0x2000, 512, 0)).0, BLK_S_IOERR);
        assert_eq!(run(99, 0, (0, 0, 0)).0, BLK_S_UNSUPP);
        // More data than a request may carry.
        let big = REQUEST_MAX + 512;
        assert_eq!(
            run(BLK_T_IN, 0, (BASE + 0x1000, big, DESC_WRITE)).0,
            BLK_S_IOERR
        );
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), 1 << 16)]).expect("memory");
        let (disk, _file) = disk(true);
        let header = request(&mem, BLK_T_OUT, 0);
        let descs = [
            (header, 16, DESC_NEXT),
            (BASE + 0x1000, 512, DESC_NEXT),
            (BASE + 0x800, 1, DESC_WRITE),
        ];
        disk.serve(&mem, &chain(&descs)).expect("answered");
        assert_eq!(status(&mem), BLK_S_IOERR);
    }
}
