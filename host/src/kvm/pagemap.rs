//! Which pages of a host range are in memory, and of what kind, read from
//! the host kernel's page tables: `PAGEMAP_SCAN` on `/proc/self/pagemap`
//! (Linux 6.7 and later), one ioctl that walks the range and reports runs
//! of pages of one kind. Reading changes nothing, so KVM's MMU notifier
//! does not run and no translation is lost.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

/// A page kind (`PAGE_IS_*` of `linux/fs.h`): the page is a file's page
/// (a template page the guest has not written), not an anonymous one.
pub const FILE: u64 = 1 << 2;
/// The page is in memory.
pub const PRESENT: u64 = 1 << 3;
/// The page is in swap.
pub const SWAPPED: u64 = 1 << 4;
/// The page is the kernel's shared zero page (read, never written).
pub const PFN_ZERO: u64 = 1 << 5;

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg` (its size is part of [`PAGEMAP_SCAN`]).
#[repr(C)]
struct ScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = (3 << 30)
    | ((size_of::<ScanArg>() as libc::c_ulong) << 16)
    | ((b'f' as libc::c_ulong) << 8)
    | 16;

const _: () = assert!(size_of::<ScanArg>() == 96 && size_of::<PageRegion>() == 24);

/// The process's `/proc/self/pagemap`, opened by the first call. Only an
/// open that worked is kept: a failure (out of fds, say) is tried again
/// next time. A pool opens it as it starts ([`crate::pool`]), so that no
/// thread of the host's sandbox, which may not open files, is the first.
pub fn open() -> std::io::Result<&'static File> {
    static PAGEMAP: OnceLock<File> = OnceLock::new();
    match PAGEMAP.get() {
        Some(file) => Ok(file),
        None => {
            let file = File::open("/proc/self/pagemap")?;
            Ok(PAGEMAP.get_or_init(|| file))
        }
    }
}

/// Runs reported per ioctl; a range with more makes more calls.
const RUNS_PER_CALL: usize = 32;

/// Calls `each(run, kinds)` for every run of pages in the host range
/// `addr..addr + len` (page-aligned) that is in memory or in swap, in
/// address order, with the run's kinds ([`FILE`], [`PRESENT`],
/// [`SWAPPED`], [`PFN_ZERO`]). Pages never touched are not reported. An
/// error (an older kernel, no `/proc`) means nothing is known, though
/// `each` may have seen the runs of the first part of the range.
pub fn scan(addr: u64, len: u64, mut each: impl FnMut(Range<u64>, u64)) -> std::io::Result<()> {
    let pagemap = open()?;
    let end = addr
        .checked_add(len)
        .ok_or(std::io::ErrorKind::InvalidInput)?;
    let mut runs = [PageRegion::default(); RUNS_PER_CALL];
    let mut start = addr;
    while start < end {
        let mut arg = ScanArg {
            size: size_of::<ScanArg>() as u64,
            flags: 0,
            start,
            end,
            walk_end: 0,
            vec: runs.as_mut_ptr() as u64,
            vec_len: RUNS_PER_CALL as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: 0,
            category_anyof_mask: PRESENT | SWAPPED,
            return_mask: FILE | PRESENT | SWAPPED | PFN_ZERO,
        };
        // SAFETY: `arg` is a valid `pm_scan_arg` of the size it states;
        // the kernel writes at most `vec_len` regions into `runs`, which
        // has room for them, and `walk_end` into `arg`. It reads the
        // process's page tables and changes none.
        let found = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        let found = usize::try_from(found).map_err(|_| std::io::Error::last_os_error())?;
        for run in runs.iter().take(found) {
            each(run.start..run.end, run.categories);
        }
        if arg.walk_end <= start {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        start = arg.walk_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_touched_pages_by_kind_and_skips_the_rest() {
        let page = 4096u64;
        // SAFETY: a fresh anonymous mapping at an address the kernel
        // chooses; unmapped at the end of the test.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8 * page as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let at = |i: u64| (base as u64 + i * page) as *mut u8;
        // SAFETY: pages 1 and 2 are written, page 5 is read: all inside
        // the mapping.
        unsafe {
            at(1).write_volatile(1);
            at(2).write_volatile(2);
            assert_eq!(at(5).read_volatile(), 0);
        }
        let mut runs = Vec::new();
        scan(base as u64, 8 * page, |run, kinds| runs.push((run, kinds))).expect("scans");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(base, 8 * page as usize) };
        let rel =
            |run: &Range<u64>| (run.start - base as u64) / page..(run.end - base as u64) / page;
        let runs: Vec<_> = runs.iter().map(|(run, kinds)| (rel(run), *kinds)).collect();
        assert_eq!(runs, [(1..3, PRESENT), (5..6, PRESENT | PFN_ZERO)]);
    }
}
