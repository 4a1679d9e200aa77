//! The time services: wall clock and blocking. (Monotonic time needs no
//! hypercall: it is on the clock page.)

use super::{Context, Flow, Served};
use shoal_abi::hypercall::{Block, WallClock};

/// `wall_clock`.
pub fn wall_clock(_ctx: &Context<'_>, args: &mut WallClock) -> Served {
    args.unix_ns = crate::clock::wall_ns();
    Ok((0, Flow::Resume))
}

/// `block`: returns at once for a past deadline, otherwise asks the runner
/// to park the guest. No event sources exist yet, so the result is always
/// "deadline reached" with no events.
pub fn block(ctx: &Context<'_>, args: &mut Block) -> Served {
    args.events = 0;
    if args.deadline_ns <= ctx.clock.now_ns() {
        return Ok((0, Flow::Resume));
    }
    Ok((0, Flow::Block(args.deadline_ns)))
}
