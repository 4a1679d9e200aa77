//! The device calls: `device_info` and `queue_setup` (the rings and the
//! requests themselves never exit; see [`crate::device`]).

use super::{Context, Flow, Served};
use shoal_abi::HypercallError;
use shoal_abi::hypercall::{DeviceInfo, QueueSetup};

/// `device_info`.
pub fn info(ctx: &Context<'_>, args: &mut DeviceInfo) -> Served {
    if args.queues != 0 {
        return Err(HypercallError::ReservedNotZero);
    }
    *args = ctx
        .devices
        .info(args.index)
        .ok_or(HypercallError::Invalid)?;
    Ok((0, Flow::Resume))
}

/// `queue_setup`.
pub fn setup(ctx: &Context<'_>, args: &mut QueueSetup) -> Served {
    ctx.devices.setup(ctx.ram, args)?;
    Ok((0, Flow::Resume))
}
