//! KVM's own counters of a VM or vCPU, from its binary statistics
//! (`KVM_GET_STATS_FD`, `Documentation/virt/kvm/api.rst` §4.133): page
//! faults taken and fixed, exits, TLB flushes, shadow pages zapped. For
//! tests and measurements, not for the run path: a read opens a file and
//! closes it again.

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};
use std::fs::File;
use std::mem::offset_of;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;

/// Bytes of `struct kvm_stats_header`.
const HEADER_SIZE: usize = size_of::<kvm_stats_header>();
/// Bytes of `struct kvm_stats_desc` before its name.
const DESC_SIZE: usize = size_of::<kvm_stats_desc>();

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The first value of the counter called `name` (as KVM names it:
/// `pf_taken`, `exits`, `mmu_shadow_zapped`) of the VM or vCPU whose file
/// `fd` is. `None` if KVM keeps no counter of that name; an error if the
/// statistics cannot be read.
pub fn read(fd: &impl AsRawFd, name: &str) -> std::io::Result<Option<u64>> {
    // SAFETY: `KVM_GET_STATS_FD` takes no argument and returns a new file
    // descriptor, owned by nobody but the caller.
    let stats = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD, 0) };
    if stats < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `stats` was just returned to this process and nothing else
    // owns it.
    let stats = unsafe { File::from_raw_fd(stats) };
    let mut header = [0u8; HEADER_SIZE];
    stats.read_exact_at(&mut header, 0)?;
    let name_size = u32_at(&header, offset_of!(kvm_stats_header, name_size)) as usize;
    let count = u32_at(&header, offset_of!(kvm_stats_header, num_desc)) as usize;
    let descs_at = u32_at(&header, offset_of!(kvm_stats_header, desc_offset));
    let data_at = u32_at(&header, offset_of!(kvm_stats_header, data_offset));
    let desc_size = DESC_SIZE + name_size;
    let mut descs = vec![0u8; desc_size.saturating_mul(count).min(1 << 20)];
    stats.read_exact_at(&mut descs, u64::from(descs_at))?;
    for desc in descs.chunks_exact(desc_size) {
        let end = desc[DESC_SIZE..]
            .iter()
            .position(|b| *b == 0)
            .map_or(desc.len(), |n| DESC_SIZE + n);
        if &desc[DESC_SIZE..end] == name.as_bytes() {
            let mut value = [0u8; 8];
            let offset =
                u64::from(data_at) + u64::from(u32_at(desc, offset_of!(kvm_stats_desc, offset)));
            stats.read_exact_at(&mut value, offset)?;
            return Ok(Some(u64::from_ne_bytes(value)));
        }
    }
    Ok(None)
}
