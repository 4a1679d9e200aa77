//! Guest RAM: anonymous, lazily backed host memory (untouched pages cost
//! nothing), with two doors:
//!
//! - the host's own door ([`GuestRam::write_host`]) for building the
//!   guest's system structures anywhere in RAM;
//! - the guest's door ([`GuestRam::read_guest`], [`GuestRam::write_guest`])
//!   for hypercall arguments, which only reaches guest-owned memory
//!   (`IMAGE_BASE..mem_size`): never the null page, the shared pages, the
//!   descriptor tables or the page tables. Addresses and lengths are checked
//!   with overflow-safe arithmetic; bytes are copied, never borrowed, so a
//!   guest cannot change what the host is looking at.
//!
//! The host mapping is private. [`GuestRam::overlay`] maps the start of a
//! template file over it copy-on-write, so every guest of one image shares
//! the image's pages until it writes to them.

use super::pagemap;
use shoal_abi::layout::{IMAGE_BASE, MAX_MEMORY, MIN_MEMORY, PAGE_SIZE};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// A guest address range the guest may not pass to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest range {addr:#x}+{len:#x} is outside guest-owned memory")]
pub struct Fault {
    /// Start.
    pub addr: u64,
    /// Length.
    pub len: u64,
}

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size not a multiple of the page size or outside the accepted range.
    #[error(
        "memory size {0:#x} must be a multiple of 4 KiB between {MIN_MEMORY:#x} and {MAX_MEMORY:#x}"
    )]
    BadSize(u64),
    /// The host mapping failed.
    #[error("cannot map guest memory")]
    Mmap(#[source] std::io::Error),
    /// The host kernel could not tell which pages of guest RAM changed,
    /// or the template's bytes could not be read back.
    #[error("cannot read back guest memory in place")]
    Scan(#[source] std::io::Error),
    /// A host-side write fell outside RAM (a bug in the host's layout code).
    #[error("host write at {0:#x} is outside guest memory")]
    HostWrite(u64),
}

/// A host mapping this module owns and unmaps when dropped.
#[derive(Debug)]
struct Mapping {
    addr: usize,
    /// 0 once given up ([`GuestRam::renew`] failed): nothing is unmapped.
    len: usize,
    /// A file's pages, shared (else anonymous and private).
    shared: bool,
}

impl Mapping {
    const PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

    /// Maps `len` bytes: anonymous and private, or `fd` shared.
    fn new(len: usize, shared: Option<BorrowedFd<'_>>) -> Result<Self, MemoryError> {
        let (flags, fd) = match shared {
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
        };
        // SAFETY: a fresh mapping at an address the kernel chooses touches
        // no existing memory.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                Self::PROT,
                flags | libc::MAP_NORESERVE,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MemoryError::Mmap(std::io::Error::last_os_error()));
        }
        if shared.is_none() {
            no_huge_pages(addr, len);
        }
        Ok(Self {
            addr: addr as usize,
            len,
            shared: shared.is_some(),
        })
    }

    /// Maps the first `len` bytes of `file` (private, copy-on-write), or
    /// new anonymous memory, over the start of this mapping, in place of
    /// what was there. `len` must be page-aligned and at most the
    /// mapping's length; nothing may hold a reference into the range.
    fn map_over(&self, len: usize, file: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        let (flags, fd) = match file {
            Some(fd) => (0, fd.as_raw_fd()),
            None => (libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: the new mapping replaces pages inside this mapping only
        // (the caller's bounds), with the same protections; the caller
        // promises no reference into them is held.
        let addr = unsafe {
            libc::mmap(
                self.addr as *mut libc::c_void,
                len,
                Self::PROT,
                flags | libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        if file.is_none() {
            no_huge_pages(addr, len);
        }
        Ok(())
    }
}

/// Asks the host kernel for no transparent huge pages in a new anonymous
/// mapping (`MADV_NOHUGEPAGE`): KVM's shadow entries are never larger
/// than the guest's own 4 KiB ones, so a huge page would only hold up to
/// 2 MiB a small guest never touches, and make a reset give the whole
/// anonymous part back instead of zeroing the few pages written. A hint:
/// an error changes nothing else.
fn no_huge_pages(addr: *mut libc::c_void, len: usize) {
    // SAFETY: the range is a mapping the caller just made; the advice
    // changes no byte and no protection.
    let _ = unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) };
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `addr..addr + len` is a mapping this value created
            // and owns; nothing refers to it any more (`GuestRam` drops its
            // `vm-memory` view first).
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }
}

/// Bytes of the host range `addr..addr + len` resident in memory: pages
/// the guest touched, and image pages it shares copy-on-write with its
/// template. 0 if the range is not mapped (any more).
pub fn resident_bytes(addr: usize, len: usize) -> u64 {
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `mincore` only inspects the page tables of the range and
    // writes one byte per page into `vec`, which has room for every page;
    // a range that is not mapped makes it fail with ENOMEM, nothing more.
    let ok = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) } == 0;
    if !ok {
        return 0;
    }
    vec.iter().filter(|b| *b & 1 != 0).count() as u64 * page as u64
}

/// Most bytes of each part of RAM (the template, the anonymous part past
/// it) that [`GuestRam::clear`] writes back in place: a stack's worth.
/// Past that, it gives the part back to the host kernel instead.
const IN_PLACE_MAX: u64 = shoal_abi::layout::STACK_SIZE;

/// One guest's RAM, guest-physical `0..size`. Fields drop in order: the
/// `vm-memory` view before the mapping it looks at.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    mapping: Mapping,
    size: u64,
    /// The template file mapped over the start, if any.
    overlay: Option<Overlay>,
}

/// A template mapped over the start of RAM.
#[derive(Debug)]
struct Overlay {
    /// The template's key.
    key: u64,
    /// The template file, to copy pages back from.
    file: Arc<OwnedFd>,
    /// Bytes of RAM it covers.
    len: u64,
    /// Pages made writable in the host whenever the RAM maps the
    /// template anew or gave its pages back (`MADV_POPULATE_WRITE`); a
    /// clear in place keeps them so.
    written: Arc<[std::ops::Range<u64>]>,
}

impl GuestRam {
    /// Maps `size` bytes of lazily backed, private memory.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::map(size, None)
    }

    /// Maps the first `size` bytes of the file `fd` shared: the host's
    /// writes go to the file (for building templates).
    pub fn shared(fd: BorrowedFd<'_>, size: u64) -> Result<Self, MemoryError> {
        Self::map(size, Some(fd))
    }

    /// Checks that guest RAM may have `size` bytes.
    pub fn check_size(size: u64) -> Result<(), MemoryError> {
        if !size.is_multiple_of(PAGE_SIZE) || !(MIN_MEMORY..=MAX_MEMORY).contains(&size) {
            return Err(MemoryError::BadSize(size));
        }
        Ok(())
    }

    fn map(size: u64, shared: Option<BorrowedFd<'_>>) -> Result<Self, MemoryError> {
        Self::check_size(size)?;
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let mapping = Mapping::new(len, shared)?;
        let flags = if shared.is_some() {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
        } | libc::MAP_NORESERVE;
        // SAFETY: `mapping` is a live mapping of exactly `len` bytes with
        // these protections and flags, and outlives the view (field order).
        let region =
            unsafe { MmapRegion::build_raw(mapping.addr as *mut u8, len, Mapping::PROT, flags) }
                .map_err(|e| MemoryError::Mmap(std::io::Error::other(e)))?;
        let mem = GuestRegionMmap::new(region, GuestAddress(0))
            .and_then(|region| GuestMemoryMmap::from_regions(vec![region]).ok())
            .ok_or(MemoryError::BadSize(size))?;
        Ok(Self {
            mem,
            mapping,
            size,
            overlay: None,
        })
    }

    /// Maps the first `len` bytes of `template` over this RAM,
    /// copy-on-write: the guest reads the template's pages until it writes
    /// to them. Whatever RAM held there before is gone. `key` names the
    /// template: RAM that already shows it, fresh from [`GuestRam::clear`],
    /// is left as it is. The pages of `written` are made writable in the
    /// host now (`MADV_POPULATE_WRITE`), and stay so through every
    /// [`GuestRam::clear`]. Call only before the guest first
    /// runs: KVM drops its mappings of the replaced pages, but nothing else
    /// may be looking at them.
    pub fn overlay(
        &mut self,
        template: &Arc<OwnedFd>,
        len: u64,
        key: u64,
        written: &Arc<[std::ops::Range<u64>]>,
    ) -> Result<(), MemoryError> {
        if !len.is_multiple_of(PAGE_SIZE) || len > self.size {
            return Err(MemoryError::BadSize(len));
        }
        match &self.overlay {
            Some(mapped) if mapped.key == key => return Ok(()),
            // Another template's pages past `len` must not stay.
            Some(_) => self.renew()?,
            None => {}
        }
        self.mapping
            .map_over(len as usize, Some(template.as_fd()))
            .map_err(MemoryError::Mmap)?;
        let overlay = Overlay {
            key,
            file: Arc::clone(template),
            len,
            written: Arc::clone(written),
        };
        self.populate(&overlay.written);
        self.overlay = Some(overlay);
        Ok(())
    }

    /// The key of the template mapped over this RAM, if any.
    pub fn overlay_key(&self) -> Option<u64> {
        self.overlay.as_ref().map(|o| o.key)
    }

    /// Makes this RAM read as its template and zero again, as it did
    /// when the template was mapped, keeping the mappings: for giving a
    /// VM to another guest of the same template, under the same
    /// conditions as [`GuestRam::renew`]; on an error the RAM must be
    /// dropped.
    ///
    /// Where it can, it writes the right bytes back into the pages the
    /// host already maps and leaves every host page table entry as it is,
    /// so that KVM keeps its translations of them and the next guest does
    /// not fault them in again (see `GuestRam::restore`). Otherwise it
    /// gives every page back to the host kernel (`MADV_DONTNEED`), and
    /// KVM drops all its translations through the MMU notifier. RAM
    /// without a template is only ever cleared that way.
    pub fn clear(&mut self) -> Result<(), MemoryError> {
        self.private_only()?;
        if let Some(overlay) = &self.overlay {
            match self.restore(overlay) {
                Ok(()) => return Ok(()),
                Err(error) => {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        tracing::warn!(%error, "guest RAM is cleared whole: KVM's translations are dropped at every reset")
                    });
                }
            }
        }
        self.advise(0, self.size, libc::MADV_DONTNEED)?;
        if let Some(overlay) = &self.overlay {
            self.populate(&overlay.written);
        }
        Ok(())
    }

    /// Puts back in place what is not as a new guest finds it, from the
    /// host kernel's page tables ([`pagemap::scan`]):
    ///
    /// - in the template part, a page that is no longer the template
    ///   file's page (a private copy: the guest, or the host for it,
    ///   wrote it, now or for an earlier guest) gets the template's bytes
    ///   again, read from the file into the same page;
    /// - in the anonymous part, a page in memory that is not the kernel's
    ///   zero page is filled with zeros;
    /// - the template's own pages, zero pages and pages never touched
    ///   are left as they are;
    /// - a page in swap (or any other entry that is not a page in memory)
    ///   is given back (`MADV_DONTNEED`): KVM has no translation of it to
    ///   keep.
    ///
    /// Each part is written in place only while that comes to at most
    /// [`IN_PLACE_MAX`]; past that, the whole part is given back instead
    /// (and the template's pages written ahead are made writable again),
    /// so that a reset VM does not keep a big guest's memory.
    ///
    /// Writing a page the host already maps writable changes no page
    /// table entry, so KVM's translations stay right; what does change
    /// one (giving a page back) runs the MMU notifier as always. An error
    /// may leave RAM partly restored, for the caller to clear the other
    /// way.
    fn restore(&self, overlay: &Overlay) -> Result<(), MemoryError> {
        let base = self.mapping.addr as u64;
        let (mut copy, mut zero, mut give_back) = (Vec::new(), Vec::new(), Vec::new());
        let scanned = pagemap::scan(base, self.size, |run, kinds| {
            let run = run.start - base..run.end - base;
            if kinds & pagemap::PRESENT == 0 {
                give_back.push(run);
                return;
            }
            let split = overlay.len.clamp(run.start, run.end);
            if kinds & pagemap::FILE == 0 && run.start < split {
                copy.push(run.start..split);
            }
            if kinds & pagemap::PFN_ZERO == 0 && split < run.end {
                zero.push(split..run.end);
            }
        });
        scanned.map_err(MemoryError::Scan)?;
        let bytes =
            |ranges: &[std::ops::Range<u64>]| ranges.iter().map(|r| r.end - r.start).sum::<u64>();
        for range in &give_back {
            self.advise(range.start, range.end - range.start, libc::MADV_DONTNEED)?;
        }
        let copy_back = bytes(&copy) <= IN_PLACE_MAX;
        if copy_back {
            for range in copy {
                self.read_template(overlay, range)
                    .map_err(MemoryError::Scan)?;
            }
        } else {
            self.advise(0, overlay.len, libc::MADV_DONTNEED)?;
        }
        if !copy_back || !give_back.is_empty() {
            self.populate(&overlay.written);
        }
        if bytes(&zero) > IN_PLACE_MAX {
            return self.advise(overlay.len, self.size - overlay.len, libc::MADV_DONTNEED);
        }
        for range in zero {
            // SAFETY: `range` lies inside this RAM's mapping (the scan
            // covered only it) and past the template, in pages the host
            // maps (present); no vCPU runs on it and no host code holds
            // a reference into it (the conditions of `clear`).
            unsafe {
                std::ptr::write_bytes(
                    (base + range.start) as *mut u8,
                    0,
                    (range.end - range.start) as usize,
                );
            }
        }
        Ok(())
    }

    /// Copies the template's bytes of `range` (inside the template part)
    /// back into RAM, straight from the file.
    fn read_template(&self, overlay: &Overlay, range: std::ops::Range<u64>) -> std::io::Result<()> {
        let mut at = range.start;
        while at < range.end {
            let len = (range.end - at) as usize;
            // SAFETY: `at..range.end` lies inside this RAM's mapping, which
            // the kernel writes (no reference into it is held, as for
            // `restore`); the offset is the same range of the file.
            let read = unsafe {
                libc::pread(
                    overlay.file.as_raw_fd(),
                    (self.mapping.addr as u64 + at) as *mut libc::c_void,
                    len,
                    at as libc::off_t,
                )
            };
            match read {
                n if n > 0 => at += n as u64,
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                _ => return Err(std::io::Error::last_os_error()),
            }
        }
        Ok(())
    }

    /// Replaces all of this RAM with new pages that read as zero, as if
    /// it had just been mapped: the old pages (the guest's and any
    /// template overlay's) go back to the host kernel, and KVM drops its
    /// translations of them through the MMU notifier. For giving a VM to
    /// another guest; call only while no vCPU runs on the RAM and no host
    /// code looks at it. Private RAM only (not a template being built).
    /// On an error the RAM is unusable (part of it may be unmapped) and
    /// must be dropped, which then leaves its range alone: another
    /// mapping may have been placed in the hole.
    pub fn renew(&mut self) -> Result<(), MemoryError> {
        self.private_only()?;
        let len = self.mapping.len;
        self.overlay = None;
        self.mapping.map_over(len, None).map_err(|e| {
            self.mapping.len = 0;
            MemoryError::Mmap(e)
        })
    }

    /// Makes KVM forget every translation to guest-physical
    /// `addr..addr + len` (page-aligned, inside RAM), while nothing else
    /// in the host writes guest RAM: the host page range
    /// is made read-only and then writable again, and each change runs
    /// KVM's MMU notifier, which drops the shadow entries that map those
    /// pages. The contents stay. How the host makes a changed guest page
    /// table visible on a shadow-paging KVM, where its own writes to the
    /// tables are not seen (see `docs/architecture.md`).
    pub fn forget_translations(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        self.check_host_range(addr, len)?;
        let host = (self.mapping.addr as u64 + addr) as *mut libc::c_void;
        // SAFETY: the range lies inside this RAM's own mapping (checked
        // above), and only its protection changes, ending as it began; no
        // host code writes guest RAM between this call and the one that
        // restores it: both run on the thread that runs the guest, and the
        // caller holds the guest's device gate for writing, which keeps
        // its device thread off guest RAM (`mmu::Translations`).
        if unsafe { libc::mprotect(host, len as usize, libc::PROT_READ) } != 0 {
            return Err(MemoryError::Mmap(std::io::Error::last_os_error()));
        }
        // Restoring the protection merges the range back, so it cannot run
        // out of mappings; should it fail anyway, guest RAM stays
        // read-only and the host's next write to it would fault the whole
        // process. Retry, then stop rather than risk that.
        for _ in 0..3 {
            // SAFETY: as above.
            if unsafe { libc::mprotect(host, len as usize, Mapping::PROT) } == 0 {
                return Ok(());
            }
        }
        tracing::error!(
            error = %std::io::Error::last_os_error(),
            "cannot make guest RAM writable again; aborting"
        );
        std::process::abort()
    }

    /// Gives the host pages of `addr..addr + len` (page-aligned, inside
    /// the anonymous part of RAM, past any template overlay) back to the
    /// host kernel: they read as zero afterwards, and KVM forgets their
    /// translations.
    pub fn discard(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        self.advise(addr, len, libc::MADV_DONTNEED)
    }

    /// Refuses RAM that maps a file shared (a template being built): only
    /// private RAM may be handed from guest to guest.
    fn private_only(&self) -> Result<(), MemoryError> {
        if self.mapping.shared {
            return Err(MemoryError::Mmap(std::io::Error::from(
                std::io::ErrorKind::Unsupported,
            )));
        }
        Ok(())
    }

    /// `madvise(advice)` over `addr..addr + len` (page-aligned, inside
    /// RAM): here only `MADV_DONTNEED`, after which pages read as zero or
    /// as the file they map, and `MADV_POPULATE_WRITE`, which changes no
    /// byte.
    fn advise(&self, addr: u64, len: u64, advice: libc::c_int) -> Result<(), MemoryError> {
        self.check_host_range(addr, len)?;
        let host = (self.mapping.addr as u64 + addr) as *mut libc::c_void;
        // SAFETY: the range lies inside this RAM's own mapping, and both
        // advices leave it mapped with its protections; what they do to
        // its contents is what the callers ask for.
        if unsafe { libc::madvise(host, len as usize, advice) } != 0 {
            return Err(MemoryError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Makes the pages of each range (page-aligned, inside RAM) present
    /// and writable in the host, copying template pages as a write would
    /// (`MADV_POPULATE_WRITE`), so that KVM maps them writable at the
    /// guest's first touch: a page the guest reads and then writes would
    /// otherwise fault twice, the second time copying a page the host has
    /// mapped, with a TLB shootdown. Contents do not change. A hint: on an
    /// error (an old kernel, no memory) the pages fault in later.
    fn populate(&self, ranges: &[std::ops::Range<u64>]) {
        for range in ranges {
            let len = range.end.saturating_sub(range.start);
            let _ = self.advise(range.start, len, libc::MADV_POPULATE_WRITE);
        }
    }

    fn check_host_range(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        let end = addr.checked_add(len).ok_or(MemoryError::HostWrite(addr))?;
        if !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || end > self.size {
            return Err(MemoryError::HostWrite(addr));
        }
        Ok(())
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of this RAM resident in host memory (see [`resident_bytes`]).
    pub fn resident_bytes(&self) -> u64 {
        resident_bytes(self.mapping.addr, self.mapping.len)
    }

    /// Host virtual address of guest-physical 0 (for the KVM memory slot).
    pub fn host_base(&self) -> u64 {
        self.mapping.addr as u64
    }

    /// Checks that `addr..addr + len` is guest-owned memory. An empty
    /// range touches nothing and is accepted wherever it points.
    pub fn check_guest(&self, addr: u64, len: u64) -> Result<(), Fault> {
        if len == 0 {
            return Ok(());
        }
        let fault = Fault { addr, len };
        let end = addr.checked_add(len).ok_or(fault)?;
        if addr < IMAGE_BASE || end > self.size {
            return Err(fault);
        }
        Ok(())
    }

    /// A `vm-memory` view of guest-owned memory only (`IMAGE_BASE..size`,
    /// at the same guest-physical addresses), for code that takes
    /// guest-chosen addresses and a `GuestMemory`, such as `virtio-queue`:
    /// through it nothing outside guest-owned memory can be reached.
    ///
    /// # Safety
    ///
    /// The view points into this RAM's mapping without keeping it alive:
    /// the caller drops the view before this `GuestRam`.
    pub unsafe fn guest_view(&self) -> Result<GuestMemoryMmap<()>, MemoryError> {
        let len =
            usize::try_from(self.size - IMAGE_BASE).map_err(|_| MemoryError::BadSize(self.size))?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: `IMAGE_BASE..size` lies inside this RAM's live mapping
        // (`size >= MIN_MEMORY > IMAGE_BASE`), with these protections; the
        // caller drops the view before the mapping goes.
        let region = unsafe {
            MmapRegion::build_raw(
                (self.mapping.addr + IMAGE_BASE as usize) as *mut u8,
                len,
                Mapping::PROT,
                flags,
            )
        }
        .map_err(|e| MemoryError::Mmap(std::io::Error::other(e)))?;
        GuestRegionMmap::new(region, GuestAddress(IMAGE_BASE))
            .and_then(|region| GuestMemoryMmap::from_regions(vec![region]).ok())
            .ok_or(MemoryError::BadSize(self.size))
    }

    /// Copies guest-owned bytes at `addr` into `buf`.
    pub fn read_guest(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        let fault = Fault {
            addr,
            len: buf.len() as u64,
        };
        self.check_guest(addr, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| fault)
    }

    /// Copies `data` into guest-owned memory at `addr`.
    pub fn write_guest(&self, addr: u64, data: &[u8]) -> Result<(), Fault> {
        let fault = Fault {
            addr,
            len: data.len() as u64,
        };
        self.check_guest(addr, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| fault)
    }

    /// Writes anywhere in RAM: the host's door, for the guest's system
    /// structures. Never called with guest-chosen addresses.
    pub fn write_host(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| MemoryError::HostWrite(addr))
    }

    /// Reads anywhere in RAM: the host's door, for host-owned structures
    /// (for example the exception frame on the host's CPL0 stack).
    pub fn read_host(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::HostWrite(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_door_refuses_host_areas_end_of_memory_and_overflow() {
        let ram = GuestRam::new(4 << 20).expect("4 MiB maps");
        let mut buf = [0u8; 16];
        assert!(ram.read_guest(IMAGE_BASE, &mut buf).is_ok());
        assert!(ram.read_guest((4 << 20) - 16, &mut buf).is_ok());
        // SAFETY: dropped at the end of the test, before `ram`.
        let view = unsafe { ram.guest_view() }.expect("view");
        assert!(view.read_slice(&mut buf, GuestAddress(IMAGE_BASE)).is_ok());
        assert!(
            view.read_slice(&mut buf, GuestAddress(IMAGE_BASE - 8))
                .is_err()
        );
        assert!(
            view.read_slice(&mut buf, GuestAddress((4 << 20) - 8))
                .is_err()
        );
        drop(view);
        assert!(ram.read_guest((4 << 20) - 8, &mut buf).is_err());
        assert!(ram.read_guest(0, &mut buf).is_err());
        assert!(ram.read_guest(0x3000, &mut buf).is_err());
        assert!(ram.read_guest(IMAGE_BASE - 8, &mut buf).is_err());
        assert!(ram.check_guest(u64::MAX - 4, 16).is_err());
        assert!(ram.write_guest(4 << 20, &buf).is_err());
    }

    #[test]
    fn sizes_are_checked() {
        assert!(GuestRam::new(MIN_MEMORY - PAGE_SIZE).is_err());
        assert!(GuestRam::new(MAX_MEMORY + PAGE_SIZE).is_err());
        assert!(GuestRam::new(MIN_MEMORY + 1).is_err());
        assert!(GuestRam::new(MIN_MEMORY).is_ok());
    }

    /// A template memory file of `pages` pages, page `i` filled with `i + 1`.
    fn template(pages: u64) -> Arc<OwnedFd> {
        use std::io::Write;
        let mut file = std::fs::File::from(crate::boot::memfd(0).expect("creates"));
        for page in 0..pages {
            file.write_all(&[page as u8 + 1; PAGE_SIZE as usize])
                .expect("writes");
        }
        Arc::new(file.into())
    }

    fn byte_at(ram: &GuestRam, addr: u64) -> u8 {
        let mut byte = [0u8];
        ram.read_host(addr, &mut byte).expect("reads");
        byte[0]
    }

    /// The kinds of RAM page `page` (see [`pagemap::scan`]), 0 if never
    /// touched.
    fn kinds_of(ram: &GuestRam, page: u64) -> u64 {
        let mut kinds = 0;
        pagemap::scan(ram.host_base() + page * PAGE_SIZE, PAGE_SIZE, |_, k| {
            kinds = k
        })
        .expect("scans");
        kinds
    }

    #[test]
    fn clearing_shows_the_template_and_zeros_again_and_another_template_replaces_it_whole() {
        let (big, small) = (template(4), template(2));
        let mut ram = GuestRam::new(MIN_MEMORY).expect("maps");
        let second_page: Arc<[_]> = std::iter::once(PAGE_SIZE..2 * PAGE_SIZE).collect();
        let none: Arc<[_]> = Arc::new([]);
        ram.overlay(&big, 4 * PAGE_SIZE, 1, &second_page)
            .expect("overlays");
        assert_eq!(ram.overlay_key(), Some(1));
        // The guest's writes: into template pages and past them; a read
        // of a template page and of an anonymous one.
        for page in [1, 3, 8] {
            ram.write_host(page * PAGE_SIZE + 7, &[0xee])
                .expect("writes");
        }
        assert_eq!((byte_at(&ram, 7), byte_at(&ram, 9 * PAGE_SIZE)), (1, 0));
        ram.clear().expect("clears");
        assert_eq!(ram.overlay_key(), Some(1));
        for (page, expected) in [(0, 1), (1, 2), (3, 4), (8, 0), (9, 0)] {
            assert_eq!(byte_at(&ram, page * PAGE_SIZE + 7), expected, "page {page}");
        }
        // Put right in place: the pages are where they were, the
        // template's own page still the file's.
        use pagemap::{FILE, PFN_ZERO, PRESENT};
        for (page, kinds) in [
            (0, PRESENT | FILE),
            (1, PRESENT),
            (3, PRESENT),
            (8, PRESENT),
        ] {
            assert_eq!(kinds_of(&ram, page), kinds, "page {page}");
        }
        assert_eq!(kinds_of(&ram, 9), PRESENT | PFN_ZERO);
        // More than a stack's worth written past the template: that part
        // is given back.
        let pages = IN_PLACE_MAX / PAGE_SIZE + 1;
        for page in 8..8 + pages {
            ram.write_host(page * PAGE_SIZE, &[0xee]).expect("writes");
        }
        ram.write_host(2 * PAGE_SIZE, &[0xee]).expect("writes");
        ram.clear().expect("clears");
        assert_eq!((kinds_of(&ram, 8), kinds_of(&ram, 3)), (0, PRESENT));
        for page in [2, 8, 8 + pages - 1] {
            assert_eq!(
                byte_at(&ram, page * PAGE_SIZE),
                if page == 2 { 3 } else { 0 }
            );
        }
        // The same template again: nothing to map.
        ram.overlay(&big, 4 * PAGE_SIZE, 1, &none)
            .expect("overlays");
        assert_eq!(byte_at(&ram, 3 * PAGE_SIZE), 4);
        // A shorter one: the longer one's last pages read as zero.
        ram.overlay(&small, 2 * PAGE_SIZE, 2, &none)
            .expect("overlays");
        assert_eq!(ram.overlay_key(), Some(2));
        for (page, expected) in [(0, 1), (1, 2), (2, 0), (3, 0)] {
            assert_eq!(byte_at(&ram, page * PAGE_SIZE), expected, "page {page}");
        }
        ram.renew().expect("renews");
        assert_eq!((ram.overlay_key(), byte_at(&ram, 0)), (None, 0));
    }
}
