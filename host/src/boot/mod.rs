//! Building a guest's initial memory and CPU state: the image, the system
//! area, the page tables (once per image, in a [`Template`]), the boot info
//! page (per guest).

pub mod descriptors;
pub mod paging;

use crate::kvm::memory::{GuestRam, MemoryError};
use crate::kvm::vcpu::CpuSetup;
use crate::loader::{Image, page_end, page_start};
use paging::{NO_EXECUTE, PageTables, PagingError, USER, WRITABLE};
use shoal_abi::boot::{ARGS_MAX, ARGS_OFFSET, BOOT_MAGIC, BootInfo};
use shoal_abi::layout::{BOOT_INFO_PAGE, CLOCK_PAGE, EVENT_PAGE, PAGE_SIZE, STACK_SIZE};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use zerocopy::IntoBytes;

/// Why a guest could not be laid out.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Image, guard page and stack do not fit in the memory size.
    #[error(
        "image ends at {image_end:#x}, but {mem_size:#x} bytes of memory leave room only up to {limit:#x} (stack and guard page above it): give the guest more memory"
    )]
    TooSmall {
        /// End of the image.
        image_end: u64,
        /// Guest memory size.
        mem_size: u64,
        /// Highest image end that fits.
        limit: u64,
    },
    /// Arguments longer than the boot page holds.
    #[error("guest arguments take {0} bytes, at most {ARGS_MAX} fit")]
    ArgsTooLong(usize),
    /// An argument contains a NUL byte.
    #[error("guest arguments may not contain NUL bytes")]
    ArgHasNul,
    /// Writing guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Building the page tables failed.
    #[error(transparent)]
    Paging(#[from] PagingError),
}

/// What the host tells a guest about itself at boot.
#[derive(Clone, Debug)]
pub struct BootParams<'a> {
    /// The guest's id.
    pub guest_id: u64,
    /// Feature bits offered.
    pub features: u64,
    /// Arguments.
    pub args: &'a [String],
}

/// Encodes arguments as NUL-terminated strings.
pub fn encode_args(args: &[String]) -> Result<Vec<u8>, BootError> {
    let mut bytes = Vec::new();
    for arg in args {
        if arg.as_bytes().contains(&0) {
            return Err(BootError::ArgHasNul);
        }
        bytes.extend_from_slice(arg.as_bytes());
        bytes.push(0);
    }
    if bytes.len() as u64 > ARGS_MAX {
        return Err(BootError::ArgsTooLong(bytes.len()));
    }
    Ok(bytes)
}

/// Everything about a guest's initial state that depends only on its
/// image and memory size: the image, the system area and the page tables,
/// written once into a memory file that every guest of the image maps
/// copy-on-write ([`GuestRam::overlay`]); the boot info and initial CPU
/// state.
#[derive(Debug)]
pub struct Template {
    /// Unique in the process: names the template to RAM that maps it.
    key: u64,
    file: std::sync::Arc<OwnedFd>,
    len: u64,
    mem_size: u64,
    cpu: CpuSetup,
    boot_info: BootInfo,
    tables: std::sync::Arc<PageTables>,
    /// Pages a guest is likely to write: copied for it before it runs
    /// (see [`GuestRam::overlay`]).
    written: std::sync::Arc<[std::ops::Range<u64>]>,
}

/// Most pages of writable image segments copied for a guest at load.
const WRITTEN_PAGES_MAX: u64 = 8;

impl Template {
    /// Lays out `image` in `mem_size` bytes of guest memory.
    pub fn build(image: &Image, mem_size: u64) -> Result<Self, BootError> {
        let file = memfd(mem_size)?;
        let ram = GuestRam::shared(file.as_fd(), mem_size)?;
        let stack_bottom = mem_size - STACK_SIZE;
        let limit = stack_bottom - PAGE_SIZE;
        if image.end() > limit {
            return Err(BootError::TooSmall {
                image_end: image.end(),
                mem_size,
                limit,
            });
        }

        for segment in image.segments() {
            ram.write_host(segment.vaddr, &segment.data)?;
        }
        descriptors::write(&ram)?;

        let mut pt = PageTables::new();
        let user_ro = USER | NO_EXECUTE;
        let user_rw = USER | WRITABLE | NO_EXECUTE;
        pt.map(BOOT_INFO_PAGE, BOOT_INFO_PAGE, user_ro)?;
        pt.map(CLOCK_PAGE, CLOCK_PAGE, user_ro)?;
        pt.map(EVENT_PAGE, EVENT_PAGE, user_rw)?;
        pt.map(descriptors::GDT, descriptors::GDT, WRITABLE | NO_EXECUTE)?;
        pt.map(descriptors::IDT, descriptors::IDT, 0)?;
        pt.identity(
            descriptors::TSS,
            page_end(descriptors::TSS + descriptors::TSS_SIZE),
            WRITABLE | NO_EXECUTE,
        )?;
        pt.map(
            descriptors::KERNEL_STACK,
            descriptors::KERNEL_STACK,
            WRITABLE | NO_EXECUTE,
        )?;
        for segment in image.segments() {
            let mut flags = USER;
            if segment.writable {
                flags |= WRITABLE;
            }
            if !segment.executable {
                flags |= NO_EXECUTE;
            }
            pt.identity(page_start(segment.vaddr), page_end(segment.end()), flags)?;
        }
        let heap_start = image.end();
        pt.identity(heap_start, limit, user_rw)?;
        pt.identity(stack_bottom, mem_size, user_rw)?;
        pt.write(&ram)?;

        let boot_info = BootInfo {
            magic: BOOT_MAGIC,
            abi_version: shoal_abi::ABI_VERSION,
            argc: 0,
            features: 0,
            guest_id: 0,
            mem_size,
            clock_page: CLOCK_PAGE,
            image_start: image.start(),
            image_end: image.end(),
            heap_start,
            heap_end: limit,
            stack_bottom,
            stack_top: mem_size,
            args_len: 0,
        };
        let cpu = CpuSetup {
            gdt: (descriptors::GDT, descriptors::GDT_LIMIT),
            idt: (descriptors::IDT, descriptors::IDT_LIMIT),
            tss: (descriptors::TSS, (descriptors::TSS_SIZE - 1) as u32),
            cr3: pt.root(),
            rip: image.entry(),
            rsp: mem_size,
            rdi: BOOT_INFO_PAGE,
        };
        // The event page (the console ring, event masks) and the first
        // pages of the writable segments (the SDK's statics among them).
        let mut written = Vec::new();
        written.push(EVENT_PAGE..EVENT_PAGE + PAGE_SIZE);
        let mut budget = WRITTEN_PAGES_MAX * PAGE_SIZE;
        for segment in image.segments().iter().filter(|s| s.writable) {
            let start = page_start(segment.vaddr);
            let end = page_end(segment.end()).min(start + budget);
            budget -= end - start;
            if end > start {
                written.push(start..end);
            }
        }
        static KEYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Self {
            key: KEYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            file: std::sync::Arc::new(file),
            len: image.end(),
            mem_size,
            cpu,
            boot_info,
            tables: std::sync::Arc::new(pt),
            written: written.into(),
        })
    }

    /// The template's key, unique in the process.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// Guest memory size the template was laid out for.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The initial CPU state.
    pub fn cpu(&self) -> &CpuSetup {
        &self.cpu
    }

    /// Page-table frames the layout uses.
    pub fn table_frames(&self) -> usize {
        self.tables.frames()
    }

    /// The page tables every guest of the template starts with.
    pub fn tables(&self) -> &std::sync::Arc<PageTables> {
        &self.tables
    }

    /// Bytes at the start of RAM that map the template file (the rest is
    /// anonymous memory).
    pub fn overlay_len(&self) -> u64 {
        self.len
    }

    /// Maps the template into `ram` (of the template's size, not yet run),
    /// copy-on-write, with nothing of a guest's own yet: what a pool does
    /// ahead of a spawn ([`GuestRam::overlay`]; RAM already showing the
    /// template is left as it is).
    pub fn map(&self, ram: &mut GuestRam) -> Result<(), MemoryError> {
        if ram.size() != self.mem_size {
            return Err(MemoryError::BadSize(ram.size()));
        }
        ram.overlay(&self.file, self.len, self.key, &self.written)
    }

    /// Maps the template into `ram` (of the template's size, not yet run)
    /// and writes the guest's own boot info. Returns the boot info.
    pub fn load(&self, ram: &mut GuestRam, params: &BootParams<'_>) -> Result<BootInfo, BootError> {
        let args = encode_args(params.args)?;
        self.map(ram)?;
        let boot_info = BootInfo {
            argc: params.args.len() as u32,
            features: params.features,
            guest_id: params.guest_id,
            args_len: args.len() as u64,
            ..self.boot_info
        };
        ram.write_host(BOOT_INFO_PAGE, boot_info.as_bytes())?;
        ram.write_host(BOOT_INFO_PAGE + ARGS_OFFSET, &args)?;
        Ok(boot_info)
    }
}

/// An anonymous memory file of `len` bytes (reading as zero), closed on
/// exec: what a template is built in.
pub fn memfd(len: u64) -> Result<OwnedFd, MemoryError> {
    // SAFETY: the name is a NUL-terminated string; the call has no other
    // preconditions.
    let fd = unsafe { libc::memfd_create(c"shoal-template".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Mmap(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len).map_err(MemoryError::Mmap)?;
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_are_nul_terminated_and_bounded() {
        let args = vec!["a".to_string(), "bc".to_string()];
        assert_eq!(encode_args(&args).expect("fits"), b"a\0bc\0");
        assert!(matches!(
            encode_args(&["x\0y".to_string()]),
            Err(BootError::ArgHasNul)
        ));
        let long = vec!["x".repeat(ARGS_MAX as usize)];
        assert!(matches!(encode_args(&long), Err(BootError::ArgsTooLong(_))));
    }
}
