//! The shoal guest SDK: write a paravirtual guest kernel as a small `no_std`
//! Rust program.
//!
//! A guest is a `#![no_std]`, `#![no_main]` binary crate that names its
//! entry function with [`entry!`], prints with [`println!`], reads the clock
//! with [`time::monotonic`] (no exit) and [`time::wall`], sleeps with
//! [`time::sleep`], and ends by returning from its entry function or with
//! [`exit`]. Its `build.rs` calls `shoal_guest_build::link()`, so a plain
//! `cargo build` produces an image `shoal run` accepts.
//!
//! ```text
//! #![no_std]
//! #![no_main]
//!
//! shoal_guest::entry!(main);
//!
//! fn main() {
//!     shoal_guest::println!("hello from guest {}", shoal_guest::boot::guest_id());
//! }
//! ```
//!
//! Pages are mapped, unmapped and protected through the host ([`mmu`]);
//! exceptions such as page faults can be handled by the guest ([`trap`]);
//! a heap that grows by mapping frames serves `alloc` ([`heap`]).
//!
//! Disks the host gives the guest are driven through virtio rings with
//! [`blk`] (built on [`virtq`]), without an exit per request; a virtual
//! LAN's network device with [`net`], the same way; the crate
//! `shoal-guest-net` runs TCP and UDP sockets over it.
//!
//! Everything privileged goes through hypercalls ([`hypercall`]), including
//! a raw escape hatch ([`hypercall::raw`]) for ABI experiments.
#![cfg_attr(not(test), no_std)]

pub mod blk;
pub mod boot;
pub mod console;
pub mod event;
pub mod heap;
pub mod hypercall;
pub mod mmu;
pub mod net;
pub mod time;
pub mod trap;
pub mod virtq;

#[cfg(not(any(test, feature = "hosted")))]
mod rt;

pub use shoal_abi as abi;
pub use zerocopy;

/// Ends the guest with `code`. Never returns.
pub fn exit(code: i32) -> ! {
    let mut args = abi::hypercall::Exit { code, _pad: 0 };
    loop {
        // `exit` does not return; should a host ever return from it, asking
        // again is the only thing left to do.
        let _ = hypercall::call(&mut args);
    }
}

/// Gives the CPU to another guest; returns when this guest's turn comes
/// again (one hypercall).
pub fn yield_now() {
    let _ = hypercall::call(&mut abi::hypercall::Yield { _reserved: 0 });
}

/// What an entry function may return: `()` means exit code 0, an `i32` is
/// the exit code, and `Result<(), E>` prints the error and exits 1.
pub trait Termination {
    /// The exit code.
    fn report(self) -> i32;
}

impl Termination for () {
    fn report(self) -> i32 {
        0
    }
}

impl Termination for i32 {
    fn report(self) -> i32 {
        self
    }
}

impl<E: core::fmt::Debug> Termination for Result<(), E> {
    fn report(self) -> i32 {
        match self {
            Ok(()) => 0,
            Err(e) => {
                println!("error: {e:?}");
                1
            }
        }
    }
}

/// Names the guest's entry function: `entry!(main)` with `fn main()`,
/// `fn main() -> i32` or `fn main() -> Result<(), E>`. The SDK's startup
/// code calls it once, then exits with the code it reports.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub fn __shoal_guest_main() -> i32 {
            $crate::Termination::report($main())
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::Error;
    use shoal_abi::HypercallError;

    #[test]
    fn entry_return_values_become_exit_codes() {
        assert_eq!(().report(), 0);
        assert_eq!(7.report(), 7);
        assert_eq!(Ok::<(), &str>(()).report(), 0);
    }

    #[test]
    fn negative_results_decode_to_documented_or_unknown_errors() {
        assert_eq!(Error::from(-3), Error::Abi(HypercallError::Fault));
        assert_eq!(
            Error::from(-1),
            Error::Abi(HypercallError::UnknownHypercall)
        );
        assert_eq!(Error::from(-77), Error::Unknown(-77));
    }
}
