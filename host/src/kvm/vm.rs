//! `/dev/kvm` and virtual machines.

use super::memory::GuestRam;
use super::vcpu::{Vcpu, VcpuError};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, IoEventAddress, VmFd};
use std::cell::{Cell, RefCell};
use vmm_sys_util::eventfd::EventFd;

/// Why KVM could not be opened or a VM created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available, and may this user open it?)")]
    Open(#[source] kvm_ioctls::Error),
    /// A capability shoal needs is missing.
    #[error("KVM lacks a capability shoal needs: {0}")]
    MissingCap(&'static str),
    /// `KVM_CREATE_VM` failed.
    #[error("cannot create a VM")]
    Create(#[source] kvm_ioctls::Error),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("cannot register guest memory with KVM")]
    Memory(#[source] kvm_ioctls::Error),
    /// `KVM_IOEVENTFD` failed.
    #[error("cannot register a notification port with KVM")]
    IoEvent(#[source] kvm_ioctls::Error),
    /// Creating or setting up the vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// An open `/dev/kvm`.
#[derive(Debug)]
pub struct Kvm {
    fd: kvm_ioctls::Kvm,
}

impl Kvm {
    /// Opens `/dev/kvm` and checks the capabilities shoal relies on.
    pub fn open() -> Result<Self, VmError> {
        let fd = kvm_ioctls::Kvm::new().map_err(VmError::Open)?;
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::SyncRegs, "KVM_CAP_SYNC_REGS"),
        ] {
            if !fd.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        Ok(Self { fd })
    }

    /// Creates a VM whose only memory is `ram`, at guest-physical 0.
    pub fn create_vm(&self, ram: &GuestRam) -> Result<Vm, VmError> {
        let vm = Vm {
            fd: super::factory::create_vm(&self.fd).map_err(VmError::Create)?,
            flush_slot: Cell::new(None),
            notifications: RefCell::default(),
            aliased: Cell::new(false),
        };
        vm.set_memory(ram)?;
        Ok(vm)
    }
}

/// A virtual machine with its memory registered.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    /// Where the flush slot sits now (`None` until first used).
    flush_slot: Cell<Option<u64>>,
    /// The guest's notification ports: port, value and a copy of the
    /// eventfd (KVM knows a port by all three).
    notifications: RefCell<Vec<(u16, u32, EventFd)>>,
    /// The guest has the read-only alias (memory slot 1).
    aliased: Cell<bool>,
}

/// The memory slot moved to flush every translation.
const FLUSH_SLOT: u32 = 2;
/// The two guest-physical places the flush slot moves between: outside
/// RAM and the trapping alias, below the 36-bit physical width KVM
/// assumes without CPUID. No page table can point there (`mmu_update`
/// maps only the guest's own frames).
const FLUSH_SLOT_ADDRS: [u64; 2] = [0xf_0000_0000, 0xf_0000_1000];

impl Vm {
    /// Makes `ram` the VM's memory, at guest-physical 0. The caller keeps
    /// `ram` alive as long as the VM (`Guest` and `Shell` own both and drop
    /// the VM first).
    fn set_memory(&self, ram: &GuestRam) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_base(),
        };
        // SAFETY: the region is exactly `ram`'s mapping, which the caller
        // keeps alive as long as the VM.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(VmError::Memory)
    }

    /// Takes off what its guest attached beyond RAM, its notification
    /// ports and the read-only alias, so that the VM can run another
    /// guest ([`crate::pool::Toolstack::reset`]).
    pub fn detach_guest(&self) -> Result<(), VmError> {
        for (port, value, eventfd) in self.notifications.take() {
            self.fd
                .unregister_ioevent(&eventfd, &IoEventAddress::Pio(u64::from(port)), value)
                .map_err(VmError::IoEvent)?;
        }
        if self.aliased.replace(false) {
            // A slot of no size is deleted.
            let region = kvm_userspace_memory_region {
                slot: 1,
                ..Default::default()
            };
            // SAFETY: deleting a slot maps nothing.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(VmError::Memory)?;
        }
        Ok(())
    }

    /// Makes `len` bytes of `ram` from `offset` also appear, read-only, at
    /// guest-physical `addr` (memory slot 1): reads see the RAM, writes
    /// exit to the host as MMIO. The caller keeps `ram` alive as long as
    /// the VM, as for its main memory.
    pub fn alias_read_only(
        &self,
        ram: &GuestRam,
        offset: u64,
        len: u64,
        addr: u64,
    ) -> Result<(), VmError> {
        if offset.checked_add(len).is_none_or(|end| end > ram.size()) {
            return Err(VmError::Memory(kvm_ioctls::Error::new(libc::EINVAL)));
        }
        let region = kvm_userspace_memory_region {
            slot: 1,
            flags: kvm_bindings::KVM_MEM_READONLY,
            guest_phys_addr: addr,
            memory_size: len,
            userspace_addr: ram.host_base() + offset,
        };
        self.aliased.set(true);
        // SAFETY: the region lies inside `ram`'s mapping (checked above),
        // which the caller keeps alive as long as the VM.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(VmError::Memory)
    }

    /// Makes KVM drop every translation of this VM (and nothing of any
    /// other VM in the process) by moving a one-page memory slot: KVM
    /// flushes its shadow page tables on a slot move. The slot aliases the
    /// first page of `ram`, which the caller keeps alive as long as the VM.
    /// The guest rebuilds its translations as it touches its pages again.
    pub fn forget_all_translations(&self, ram: &GuestRam) -> Result<(), VmError> {
        let mut region = kvm_userspace_memory_region {
            slot: FLUSH_SLOT,
            flags: 0,
            guest_phys_addr: FLUSH_SLOT_ADDRS[0],
            memory_size: shoal_abi::layout::PAGE_SIZE,
            userspace_addr: ram.host_base(),
        };
        let next = match self.flush_slot.get() {
            // Creating a slot flushes nothing: create it, then move it.
            None => {
                // SAFETY: the region is the first page of `ram`'s mapping,
                // which the caller keeps alive as long as the VM.
                unsafe { self.fd.set_user_memory_region(region) }.map_err(VmError::Memory)?;
                FLUSH_SLOT_ADDRS[1]
            }
            Some(at) if at == FLUSH_SLOT_ADDRS[0] => FLUSH_SLOT_ADDRS[1],
            Some(_) => FLUSH_SLOT_ADDRS[0],
        };
        region.guest_phys_addr = next;
        // SAFETY: as above.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(VmError::Memory)?;
        self.flush_slot.set(Some(next));
        Ok(())
    }

    /// Makes a 32-bit `out` of `value` to `port` signal `eventfd` inside
    /// the kernel, without an exit to this process.
    pub fn notify_on(&self, eventfd: &EventFd, port: u16, value: u32) -> Result<(), VmError> {
        let copy = eventfd.try_clone().map_err(|e| {
            VmError::IoEvent(kvm_ioctls::Error::new(
                e.raw_os_error().unwrap_or(libc::EIO),
            ))
        })?;
        self.fd
            .register_ioevent(eventfd, &IoEventAddress::Pio(u64::from(port)), value)
            .map_err(VmError::IoEvent)?;
        self.notifications.borrow_mut().push((port, value, copy));
        Ok(())
    }

    /// Creates vCPU 0.
    pub fn create_vcpu(&self) -> Result<Vcpu, VcpuError> {
        self.fd
            .create_vcpu(0)
            .map(Vcpu::new)
            .map_err(VcpuError::Create)
    }
}
