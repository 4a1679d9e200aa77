//! The paravirtual MMU's calls: `mmu_update`, `frame_alloc`, `frame_free`
//! (the rules live in [`crate::mmu`]).

use super::{Context, Flow, Served, read_array};
use crate::end::{Crash, GuestEnd};
use crate::mmu::MmuFailure;
use shoal_abi::HypercallError;
use shoal_abi::hypercall::{FrameAlloc, FrameFree, MMU_BATCH_MAX, MmuRequest, MmuUpdate};
use zerocopy::{FromZeros, IntoBytes};

/// A host failure while applying checked changes ends the guest: its
/// tables may be half-written.
fn failed(e: MmuFailure) -> Served {
    Ok((
        0,
        Flow::End(GuestEnd::Crashed(Crash::Internal(e.to_string()))),
    ))
}

/// `mmu_update`.
pub fn update(ctx: &Context<'_>, args: &mut MmuUpdate) -> Served {
    args.error_index = u64::MAX;
    if args._pad != 0 {
        return Err(HypercallError::ReservedNotZero);
    }
    let mut buf = [MmuRequest::new_zeroed(); MMU_BATCH_MAX as usize];
    let requests = read_array(ctx, args.requests, args.count, &mut buf)?;
    let mut mmu = ctx.mmu.borrow_mut();
    match mmu
        .active(ctx.ram.size())
        .update(ctx.translations(), requests)
    {
        Ok(Ok(done)) => Ok((done as i64, Flow::Resume)),
        Ok(Err(refused)) => {
            args.error_index = refused.index as u64;
            Err(refused.error)
        }
        Err(e) => failed(e),
    }
}

/// `frame_alloc`.
pub fn alloc(ctx: &Context<'_>, args: &mut FrameAlloc) -> Served {
    if args._pad != 0 {
        return Err(HypercallError::ReservedNotZero);
    }
    if args.count > MMU_BATCH_MAX {
        return Err(HypercallError::Invalid);
    }
    let len = u64::from(args.count) * 8;
    ctx.ram
        .check_guest(args.frames, len)
        .map_err(|_| HypercallError::Fault)?;
    let mut mmu = ctx.mmu.borrow_mut();
    let frames = match mmu
        .active(ctx.ram.size())
        .alloc(ctx.ram, args.count as usize)
    {
        Ok(Ok(frames)) => frames,
        Ok(Err(error)) => return Err(error),
        Err(e) => return failed(e),
    };
    ctx.ram
        .write_guest(args.frames, frames.as_bytes())
        .map_err(|_| HypercallError::Fault)?;
    Ok((i64::from(args.count), Flow::Resume))
}

/// `frame_free`.
pub fn free(ctx: &Context<'_>, args: &mut FrameFree) -> Served {
    if args._pad != 0 {
        return Err(HypercallError::ReservedNotZero);
    }
    let mut buf = [0u64; MMU_BATCH_MAX as usize];
    let frames = read_array(ctx, args.frames, args.count, &mut buf)?;
    let mut mmu = ctx.mmu.borrow_mut();
    match mmu
        .active(ctx.ram.size())
        .give_back(ctx.translations(), frames)
    {
        Ok(Ok(())) => Ok((i64::from(args.count), Flow::Resume)),
        Ok(Err(error)) => Err(error),
        Err(e) => failed(e),
    }
}
