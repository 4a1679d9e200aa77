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

use shoal_abi::layout::{IMAGE_BASE, MAX_MEMORY, MIN_MEMORY, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    /// A host-side write fell outside RAM (a bug in the host's layout code).
    #[error("host write at {0:#x} is outside guest memory")]
    HostWrite(u64),
}

/// One guest's RAM, guest-physical `0..size`.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    size: u64,
}

impl GuestRam {
    /// Maps `size` bytes of lazily backed memory.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if !size.is_multiple_of(PAGE_SIZE) || !(MIN_MEMORY..=MAX_MEMORY).contains(&size) {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).map_err(MemoryError::Mmap)?;
        Ok(Self { mem, size })
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host virtual address of guest-physical 0 (for the KVM memory slot).
    pub fn host_base(&self) -> u64 {
        self.mem
            .get_host_address(GuestAddress(0))
            .map_or(0, |ptr| ptr as u64)
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
}
