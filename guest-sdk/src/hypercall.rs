//! Hypercalls: typed calls for every ABI struct, and a raw escape hatch.
//!
//! A hypercall writes a [`HypercallHeader`] and the argument struct into
//! one 8-byte-aligned block on the stack and executes `out dx, eax` with the
//! block's address; the host fills in the result before the instruction
//! completes. Each call costs one exit to the host.

use shoal_abi::hypercall::Hypercall;
use shoal_abi::layout::HYPERCALL_PORT;
use shoal_abi::{HypercallError, HypercallHeader};

/// Why a typed hypercall failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A documented error code.
    Abi(HypercallError),
    /// A negative result this SDK does not know (a newer host).
    Unknown(i64),
}

impl From<i64> for Error {
    fn from(ret: i64) -> Self {
        HypercallError::from_ret(ret).map_or(Error::Unknown(ret), Error::Abi)
    }
}

#[repr(C, align(8))]
struct Block<T> {
    header: HypercallHeader,
    args: T,
}

/// Performs the hypercall `T::NR` with `args`, which the host may update
/// (output fields). Returns the call's non-negative result.
pub fn call<T: Hypercall>(args: &mut T) -> Result<u64, Error> {
    let mut block = Block {
        header: HypercallHeader {
            nr: T::NR as u32,
            arg_len: T::ARG_LEN,
            ret: 0,
        },
        args: *args,
    };
    // SAFETY: `block` is an aligned local (stack addresses are below 4 GiB
    // in every shoal guest) holding the header and `T::ARG_LEN` bytes.
    let ret = unsafe { raw(core::ptr::addr_of_mut!(block).cast()) };
    // SAFETY: `block` is a live local; the volatile read observes the
    // host's writes to the argument struct.
    *args = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(block.args)) };
    if ret < 0 {
        Err(Error::from(ret))
    } else {
        Ok(ret as u64)
    }
}

/// The raw escape hatch: executes the hypercall instruction on an argument
/// block the caller built (a [`HypercallHeader`] followed by `arg_len`
/// bytes) and returns the header's `ret` afterwards. Use it to experiment
/// with calls the typed API does not know; a host that does not know the
/// number answers `-(HypercallError::UnknownHypercall)`.
///
/// # Safety
/// `block` must be 8-byte aligned, below 4 GiB, and valid for reads and
/// writes of the header and the `arg_len` bytes after it. A block outside
/// guest RAM makes the host stop the guest.
pub unsafe fn raw(block: *mut HypercallHeader) -> i64 {
    let addr = block as usize as u32;
    // SAFETY: `out` to the hypercall port is the ABI's hypercall instruction:
    // the host reads and writes the block at `addr` and resumes after the
    // instruction with every register preserved. The asm is not `nomem`, so
    // the compiler assumes the block may have been read and written.
    unsafe {
        core::arch::asm!(
            "out dx, eax",
            in("dx") HYPERCALL_PORT,
            in("eax") addr,
            options(nostack, preserves_flags),
        );
    }
    // SAFETY: the caller guarantees the header is valid for reads; the
    // volatile read observes the host's write.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*block).ret)) }
}
