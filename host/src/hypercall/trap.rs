//! The guest's own exception handler: `set_trap_table` and `trap_return`.

use super::{Context, Flow, Served};
use shoal_abi::HypercallError;
use shoal_abi::hypercall::{SetTrapTable, TrapFrame, TrapReturn};
use zerocopy::FromBytes;

/// `set_trap_table`.
pub fn set_table(ctx: &Context<'_>, args: &mut SetTrapTable) -> Served {
    if args._pad != 0 {
        return Err(HypercallError::ReservedNotZero);
    }
    if args.entry != 0
        && ctx
            .ram
            .check_guest(args.frame, size_of::<TrapFrame>() as u64)
            .is_err()
    {
        return Err(HypercallError::Fault);
    }
    let mut traps = ctx.traps.get();
    traps.register(args)?;
    ctx.traps.set(traps);
    Ok((0, Flow::Resume))
}

/// `trap_return`: the registers come from the frame, read once.
pub fn trap_return(ctx: &Context<'_>, args: &mut TrapReturn) -> Served {
    if args._reserved != 0 {
        return Err(HypercallError::ReservedNotZero);
    }
    let mut traps = ctx.traps.get();
    let at = traps.leave()?;
    let mut bytes = [0u8; size_of::<TrapFrame>()];
    ctx.ram
        .read_guest(at, &mut bytes)
        .map_err(|_| HypercallError::Fault)?;
    let frame = TrapFrame::read_from_bytes(&bytes).map_err(|_| HypercallError::Fault)?;
    if !crate::trap::resumable(&frame) {
        return Err(HypercallError::Invalid);
    }
    ctx.traps.set(traps);
    Ok((0, Flow::Return(frame)))
}
