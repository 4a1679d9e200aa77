//! Hypercalls: typed calls for every ABI struct, and a raw escape hatch.
//!
//! A hypercall writes a [`HypercallHeader`] and the argument struct into
//! one 8-byte-aligned block on the stack and executes `out dx, eax` with the
//! block's address; the host fills in the result before the instruction
//! completes. Each call costs one exit to the host.

use shoal_abi::event::{CALL_TIMING_OFFSET, CallTiming};
use shoal_abi::features::CALL_TIMING;
use shoal_abi::hypercall::{Hypercall, MAX_ARG_LEN};
use shoal_abi::layout::{EVENT_PAGE, HYPERCALL_PORT};
use shoal_abi::{HypercallError, HypercallHeader};
use zerocopy::{FromBytes, Immutable, IntoBytes};

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

/// One hypercall of a [`multicall`]: its argument block, filled in by the
/// host when the multicall runs.
#[repr(C, align(8))]
pub struct Call<T: Hypercall> {
    header: HypercallHeader,
    args: T,
}

impl<T: Hypercall> Call<T> {
    /// The call `T::NR` with `args`, not made yet.
    pub fn new(args: T) -> Self {
        Self {
            header: HypercallHeader {
                nr: T::NR as u32,
                arg_len: T::ARG_LEN,
                ret: 0,
            },
            args,
        }
    }

    /// The call's result once its multicall ran.
    pub fn result(&self) -> Result<u64, Error> {
        // SAFETY: a live field; the volatile read observes the host's write.
        let ret = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(self.header.ret)) };
        if ret < 0 {
            Err(Error::from(ret))
        } else {
            Ok(ret as u64)
        }
    }

    /// The arguments as the host left them (output fields filled in).
    pub fn args(&self) -> T {
        // SAFETY: as in `result`.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!(self.args)) }
    }
}

/// A [`Call`] of any hypercall, as a multicall lists it.
pub trait Queued {
    /// The guest-physical address of the argument block.
    fn block(&mut self) -> u64;
}

impl<T: Hypercall> Queued for Call<T> {
    fn block(&mut self) -> u64 {
        core::ptr::addr_of_mut!(self.header) as u64
    }
}

/// Makes `calls` in order with as few exits as the host allows: one per
/// [`MULTICALL_MAX`] calls, unless the host stops a run early at the end
/// of the guest's time slice, when the rest goes in another exit. Each
/// call's result is in its [`Call`]. A call that blocks or yields returns
/// here when the guest runs again; one that ends the guest does not
/// return. Returns the number of calls made.
///
/// [`MULTICALL_MAX`]: shoal_abi::hypercall::MULTICALL_MAX
pub fn multicall(calls: &mut [&mut dyn Queued]) -> Result<usize, Error> {
    const MAX: usize = shoal_abi::hypercall::MULTICALL_MAX as usize;
    let mut done = 0;
    while done < calls.len() {
        let mut blocks = [0u64; MAX];
        let n = (calls.len() - done).min(MAX);
        for (block, call) in blocks.iter_mut().zip(&mut calls[done..done + n]) {
            *block = call.block();
        }
        let mut args = shoal_abi::hypercall::Multicall {
            calls: blocks.as_ptr() as u64,
            count: n as u32,
            done: 0,
        };
        call(&mut args)?;
        if args.done == 0 {
            return Err(Error::Abi(HypercallError::Invalid));
        }
        done += args.done as usize;
    }
    Ok(done)
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

/// Makes custom hypercall `nr` (one of the numbers reserved for
/// experiments, [`CUSTOM_FIRST`]..=[`CUSTOM_LAST`]) with `request` and
/// returns the host handler's response. Request and response are plain
/// `zerocopy` types the host's handler shares (`Host::register_hypercall`);
/// the argument block holds the larger of the two. A host with no handler
/// for `nr` answers [`HypercallError::UnknownHypercall`]; one whose
/// handler expects other sizes, [`HypercallError::BadLength`]. A handler
/// that fails stops this guest, so this returns only with an answer.
///
/// ```ignore
/// let sum: u64 = hypercall::custom(0x1000, &[2u64, 40])?;
/// ```
///
/// [`CUSTOM_FIRST`]: shoal_abi::hypercall::CUSTOM_FIRST
/// [`CUSTOM_LAST`]: shoal_abi::hypercall::CUSTOM_LAST
pub fn custom<Req, Resp>(nr: u32, request: &Req) -> Result<Resp, Error>
where
    Req: IntoBytes + Immutable,
    Resp: FromBytes,
{
    const MAX: usize = MAX_ARG_LEN as usize;
    #[repr(C, align(8))]
    struct Raw {
        header: HypercallHeader,
        args: [u8; MAX],
    }
    let len = size_of::<Req>().max(size_of::<Resp>());
    if len > MAX {
        return Err(Error::Abi(HypercallError::BadLength));
    }
    let mut block = Raw {
        header: HypercallHeader {
            nr,
            arg_len: len as u32,
            ret: 0,
        },
        args: [0; MAX],
    };
    block.args[..size_of::<Req>()].copy_from_slice(request.as_bytes());
    // SAFETY: `block` is an aligned local below 4 GiB holding the header
    // and `len` bytes after it.
    let ret = unsafe { raw(core::ptr::addr_of_mut!(block).cast()) };
    if ret < 0 {
        return Err(Error::from(ret));
    }
    // SAFETY: a live local; the volatile read observes the host's write.
    let args = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(block.args)) };
    Resp::read_from_prefix(&args)
        .map(|(response, _)| response)
        .map_err(|_| Error::Abi(HypercallError::Invalid))
}

/// The raw escape hatch: executes the hypercall instruction on an argument
/// block the caller built (a [`HypercallHeader`] followed by `arg_len`
/// bytes) and returns the header's `ret` afterwards. Use it to experiment
/// with calls the typed API does not know; a host that does not know the
/// number answers `-(HypercallError::UnknownHypercall)`.
///
/// When the host offers [`CALL_TIMING`] (it keeps hypercall statistics),
/// the call is timed with the time-stamp counter and its round trip left
/// in the event page's [`CallTiming`] record for the host to count.
///
/// [`CALL_TIMING`]: shoal_abi::features::CALL_TIMING
/// [`CallTiming`]: shoal_abi::event::CallTiming
///
/// # Safety
/// `block` must be 8-byte aligned, below 4 GiB, and valid for reads and
/// writes of the header and the `arg_len` bytes after it. A block outside
/// guest RAM makes the host stop the guest.
pub unsafe fn raw(block: *mut HypercallHeader) -> i64 {
    if crate::boot::info().features & CALL_TIMING == 0 {
        // SAFETY: as this function's.
        unsafe { out(block) }
    } else {
        // SAFETY: the caller guarantees the header is valid for reads.
        let nr = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*block).nr)) };
        let start = crate::time::read_tsc();
        // SAFETY: as this function's.
        let ret = unsafe { out(block) };
        let ticks = crate::time::read_tsc().wrapping_sub(start);
        let record = (EVENT_PAGE + CALL_TIMING_OFFSET) as *mut CallTiming;
        // SAFETY: the event page is mapped read-write for the guest, and
        // the host reads the record only while the guest is stopped in its
        // next hypercall.
        unsafe {
            core::ptr::write_volatile(
                record,
                CallTiming {
                    nr,
                    reserved: 0,
                    ticks: ticks.max(1),
                },
            )
        };
        ret
    }
}

/// The hypercall instruction itself.
///
/// # Safety
/// As [`raw`]'s.
unsafe fn out(block: *mut HypercallHeader) -> i64 {
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
