//! The hypercall dispatcher: the heart of the host.
//!
//! One hypercall is one `out` to the hypercall port with the argument
//! block's address in `eax`. The dispatcher copies the header out of guest
//! memory once, decodes the number, checks the argument length, copies the
//! argument struct out once, decodes it with `zerocopy`, hands the typed
//! value to the call's service (one module per service), and writes header
//! and struct back in one copy. It never holds a reference into guest RAM,
//! reads no guest byte twice, and adds no vCPU ioctl to the exit.

mod console;
pub mod custom;
mod device;
mod mmu;
mod system;
pub(crate) mod time;
mod trap;

use crate::clock::GuestClock;
use crate::console::Console;
use crate::device::Devices;
use crate::end::{Crash, GuestEnd};
use crate::event::Events;
use crate::kvm::Vm;
use crate::kvm::memory::GuestRam;
use crate::mmu::{GuestMmu, Translations};
use crate::observe::Observer;
use crate::stats::GuestStats;
use crate::trap::Traps;
use shoal_abi::hypercall::{self as abi, Hypercall, MAX_ARG_LEN, MULTICALL_MAX, TrapFrame};
use shoal_abi::{HypercallError, HypercallHeader, HypercallNr};
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use zerocopy::{FromBytes, IntoBytes};

const HEADER_LEN: usize = size_of::<HypercallHeader>();

/// What the vCPU does after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Re-enter the guest.
    Resume,
    /// Block the guest until its monotonic clock reaches `deadline_ns` or
    /// an unmasked event is pending; then write the call's result into the
    /// `block` argument block at `at`.
    Block {
        /// The deadline, in guest monotonic ns.
        deadline_ns: u64,
        /// Guest-physical address of the `block` call's argument block.
        at: u64,
    },
    /// Give the worker to another guest, then resume.
    Yield,
    /// Resume the guest with these registers (`trap_return`).
    Return(TrapFrame),
    /// The guest is over.
    End(GuestEnd),
}

/// What a hypercall service may touch.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// The guest's id.
    pub id: u64,
    /// Its RAM (through the checked guest door only).
    pub ram: &'a GuestRam,
    /// Its clock.
    pub clock: &'a GuestClock,
    /// Its console.
    pub console: &'a Console,
    /// Its feature bits.
    pub features: u64,
    /// Its counters.
    pub stats: &'a GuestStats,
    /// Its VM (none in unit tests).
    pub vm: Option<&'a Vm>,
    /// Its page tables and frames.
    pub mmu: &'a RefCell<GuestMmu>,
    /// Its events.
    pub events: &'a Events,
    /// Its devices.
    pub devices: &'a Devices,
    /// Guest-physical address of this call's argument block (set by
    /// [`dispatch`]).
    pub at: u64,
    /// Its exception handler.
    pub traps: &'a Cell<Traps>,
    /// Set when the guest's time slice is over (read, never cleared here).
    pub preempt: &'a AtomicBool,
    /// Whether this call is one of a `multicall`'s.
    pub in_multicall: bool,
    /// The host's custom hypercalls.
    pub custom: &'a custom::CustomCalls,
    /// Watches its hypercalls, if asked to.
    pub observer: Option<&'a Observer>,
}

impl<'a> Context<'a> {
    /// What the MMU needs to drop stale translations.
    pub fn translations(&self) -> Translations<'a> {
        Translations {
            ram: self.ram,
            vm: self.vm,
            stats: self.stats,
            now_ns: self.clock.now_ns(),
            device_gate: self.devices.gate(),
        }
    }
}

/// The result of a service: the value for `ret` and what happens next.
type Served = Result<(i64, Flow), HypercallError>;

/// Serves the hypercall whose argument block is at guest-physical `addr`,
/// and records it if the guest is watched.
pub fn dispatch(ctx: &Context<'_>, addr: u64) -> Flow {
    match ctx.observer {
        None => dispatch_call(ctx, addr),
        Some(observer) => observer.call(|| dispatch_call(ctx, addr)),
    }
}

fn dispatch_call(ctx: &Context<'_>, addr: u64) -> Flow {
    let ctx = &Context { at: addr, ..*ctx };
    let mut header_bytes = [0u8; HEADER_LEN];
    if !addr.is_multiple_of(8) || ctx.ram.read_guest(addr, &mut header_bytes).is_err() {
        return bad_memory(addr, HEADER_LEN as u64);
    }
    let Ok(header) = HypercallHeader::read_from_bytes(&header_bytes) else {
        return bad_memory(addr, HEADER_LEN as u64);
    };
    let _span = tracing::trace_span!("hypercall", nr = header.nr).entered();
    if let Some(observer) = ctx.observer {
        observer.note_nr(header.nr);
    }
    if custom::is_custom(header.nr) {
        return custom::serve(ctx, addr, header);
    }
    let Ok(nr) = HypercallNr::try_from(header.nr) else {
        return unknown(ctx, addr, header);
    };
    ctx.stats.count_hypercall(nr);
    match nr {
        HypercallNr::AbiInfo => serve::<abi::AbiInfo>(ctx, addr, header, system::abi_info),
        HypercallNr::ConsoleWrite => serve::<abi::ConsoleWrite>(ctx, addr, header, console::write),
        HypercallNr::Exit => serve::<abi::Exit>(ctx, addr, header, system::exit),
        HypercallNr::WallClock => serve::<abi::WallClock>(ctx, addr, header, time::wall_clock),
        HypercallNr::Block => serve::<abi::Block>(ctx, addr, header, time::block),
        HypercallNr::Panic => serve::<abi::Panic>(ctx, addr, header, system::panic),
        HypercallNr::Yield => serve::<abi::Yield>(ctx, addr, header, system::yield_now),
        HypercallNr::MmuUpdate => serve::<abi::MmuUpdate>(ctx, addr, header, mmu::update),
        HypercallNr::FrameAlloc => serve::<abi::FrameAlloc>(ctx, addr, header, mmu::alloc),
        HypercallNr::FrameFree => serve::<abi::FrameFree>(ctx, addr, header, mmu::free),
        HypercallNr::SetTrapTable => serve::<abi::SetTrapTable>(ctx, addr, header, trap::set_table),
        HypercallNr::TrapReturn => serve::<abi::TrapReturn>(ctx, addr, header, trap::trap_return),
        HypercallNr::Multicall => serve::<abi::Multicall>(ctx, addr, header, multicall),
        HypercallNr::DeviceInfo => serve::<abi::DeviceInfo>(ctx, addr, header, device::info),
        HypercallNr::QueueSetup => serve::<abi::QueueSetup>(ctx, addr, header, device::setup),
        // A number the ABI crate knows but this host does not serve yet.
        _ => finish(
            ctx,
            addr,
            header,
            Err(HypercallError::UnknownHypercall),
            &[],
        ),
    }
}

/// Answers a number this host does not serve, and counts it.
fn unknown(ctx: &Context<'_>, addr: u64, header: HypercallHeader) -> Flow {
    ctx.stats.count_unknown_hypercall();
    finish(
        ctx,
        addr,
        header,
        Err(HypercallError::UnknownHypercall),
        &[],
    )
}

/// `multicall`: each listed block is dispatched as if called alone, until
/// one does not simply return or the slice is over.
fn multicall(ctx: &Context<'_>, args: &mut abi::Multicall) -> Served {
    args.done = 0;
    if ctx.in_multicall {
        return Err(HypercallError::Invalid);
    }
    if args.count > MULTICALL_MAX {
        return Err(HypercallError::Invalid);
    }
    let mut list = [0u64; MULTICALL_MAX as usize];
    let blocks = &mut list[..args.count as usize];
    ctx.ram
        .read_guest(args.calls, blocks.as_mut_bytes())
        .map_err(|_| HypercallError::Fault)?;
    let inner = Context {
        in_multicall: true,
        ..*ctx
    };
    for &block in blocks.iter() {
        if args.done > 0 && ctx.preempt.load(Ordering::Relaxed) {
            break;
        }
        let flow = dispatch(&inner, block);
        args.done += 1;
        if flow != Flow::Resume {
            return Ok((i64::from(args.done), flow));
        }
    }
    Ok((i64::from(args.done), Flow::Resume))
}

/// Copies `count` items of `T` from the guest array at `addr` into the
/// front of `buf` (a buffer on the caller's stack, so the hypercall path
/// allocates nothing) and returns them; `Invalid` if `count` is more than
/// `buf` holds.
fn read_array<'b, T: FromBytes + IntoBytes>(
    ctx: &Context<'_>,
    addr: u64,
    count: u32,
    buf: &'b mut [T],
) -> Result<&'b [T], HypercallError> {
    let items = buf
        .get_mut(..count as usize)
        .ok_or(HypercallError::Invalid)?;
    ctx.ram
        .read_guest(addr, items.as_mut_bytes())
        .map_err(|_| HypercallError::Fault)?;
    Ok(items)
}

fn bad_memory(addr: u64, len: u64) -> Flow {
    Flow::End(GuestEnd::Crashed(Crash::BadHypercallMemory { addr, len }))
}

/// Reads `T` after the header, runs `service`, writes the result back.
fn serve<T: Hypercall + std::fmt::Debug>(
    ctx: &Context<'_>,
    addr: u64,
    header: HypercallHeader,
    service: fn(&Context<'_>, &mut T) -> Served,
) -> Flow {
    if header.arg_len != T::ARG_LEN {
        return finish(ctx, addr, header, Err(HypercallError::BadLength), &[]);
    }
    let mut arg_bytes = [0u8; MAX_ARG_LEN as usize];
    let arg_bytes = &mut arg_bytes[..size_of::<T>()];
    let Some(args_addr) = addr.checked_add(HEADER_LEN as u64) else {
        return bad_memory(addr, HEADER_LEN as u64);
    };
    if ctx.ram.read_guest(args_addr, arg_bytes).is_err() {
        return bad_memory(addr, (HEADER_LEN + arg_bytes.len()) as u64);
    }
    let Ok(mut args) = T::read_from_bytes(arg_bytes) else {
        return bad_memory(addr, (HEADER_LEN + arg_bytes.len()) as u64);
    };
    if let Some(observer) = ctx.observer {
        observer.note_args(&args);
    }
    let result = service(ctx, &mut args);
    finish(ctx, addr, header, result, args.as_bytes())
}

/// Writes `ret` (and the argument struct, if any) back in one copy.
fn finish(
    ctx: &Context<'_>,
    addr: u64,
    mut header: HypercallHeader,
    result: Served,
    args: &[u8],
) -> Flow {
    let (ret, flow) = match result {
        Ok((ret, flow)) => (ret, flow),
        Err(error) => (error.to_ret(), Flow::Resume),
    };
    tracing::trace!(ret, ?flow, "hypercall done");
    if let Flow::End(_) = flow {
        return flow;
    }
    if let Some(observer) = ctx.observer {
        observer.note_ret(ret);
    }
    header.ret = ret;
    let mut block = [0u8; HEADER_LEN + MAX_ARG_LEN as usize];
    let len = HEADER_LEN + args.len();
    block[..HEADER_LEN].copy_from_slice(header.as_bytes());
    block[HEADER_LEN..len].copy_from_slice(args);
    if ctx.ram.write_guest(addr, &block[..len]).is_err() {
        return bad_memory(addr, len as u64);
    }
    flow
}

#[cfg(test)]
mod tests;
