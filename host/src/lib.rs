//! shoal: a paravirtualizing microhypervisor on Linux KVM.
//!
//! shoal runs many tiny guest kernels, each deprivileged at CPL3 from its
//! first instruction, that reach the host only through an explicit,
//! versioned hypercall ABI ([`shoal_abi`]). This crate is the host: it loads
//! guest images ([`Image`]), builds each guest's memory and CPU state, runs
//! guests, and serves their hypercalls.
//!
//! ```no_run
//! use shoal_host::{GuestConfig, GuestEnd, Host, builtin};
//!
//! let host = Host::new()?;
//! let image = builtin::image("hello").expect("hello is built in")?;
//! let report = host
//!     .spawn(&image, GuestConfig { args: vec!["world".into()], ..Default::default() })?
//!     .wait();
//! assert_eq!(report.end, GuestEnd::Exited(0));
//! print!("{}", report.console_text());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layout: [`kvm`] is the thin KVM layer; [`boot`] builds a guest's initial
//! state; [`hypercall`] serves the ABI, one module per service; [`guest`]
//! runs one guest; [`sched`] multiplexes guests over a few worker threads;
//! [`host`] is the embedding API; [`mod@bench`] measures.

pub mod bench;
pub mod boot;
pub mod builtin;
pub mod clock;
pub mod console;
pub mod control;
pub mod device;
pub mod end;
pub mod event;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod guest;
pub mod host;
pub mod hypercall;
pub mod kvm;
pub mod limits;
pub mod loader;
mod local;
pub mod mmu;
pub mod observe;
pub mod pool;
pub mod sched;
pub mod seccomp;
pub mod shard;
pub mod stats;
pub mod trap;

pub use device::{DiskSpec, Forward, GatewayStats, Tap, TapStats};
pub use end::{Crash, GuestEnd, PanicReport};
pub use host::{
    DEFAULT_SHARD_SIZE, ForwardError, GuestConfig, GuestHandle, GuestReport, GuestState, Host,
    HostConfig, HostError,
};
pub use hypercall::custom::{Caller, RegisterError};
pub use limits::{Limit, Limits};
pub use loader::{Image, LoadError};
pub use observe::Observe;
pub use stats::{ExitReason, FrameCounts, StatsSnapshot};

/// Locks `mutex`, going on with its data if a holder panicked (every lock
/// in the host guards data that stays consistent between statements).
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
