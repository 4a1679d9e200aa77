//! The thin KVM layer: one file per kind of thing it owns.
//!
//! - [`memory`]: a guest's RAM (lazily backed host memory via `vm-memory`)
//!   and the checked copy-in/copy-out every hypercall goes through;
//! - [`pagemap`]: which pages of guest RAM the guest touched, and how;
//! - [`stats`]: KVM's own counters of a VM or vCPU;
//! - [`vm`]: `/dev/kvm` and a VM with its memory slot;
//! - [`factory`]: the thread that makes every VM, so that KVM skips its
//!   costly debugfs entries;
//! - [`vcpu`]: a vCPU set up for a 64-bit CPL3 guest, its run loop exit
//!   decoding, and the kick that interrupts `KVM_RUN` from another thread.

pub mod factory;
pub mod memory;
pub mod pagemap;
pub mod stats;
pub mod vcpu;
pub mod vm;

pub use memory::GuestRam;
pub use vcpu::{Exit, Kick, KickGuard, PristineState, Vcpu};
pub use vm::{Kvm, Vm};
