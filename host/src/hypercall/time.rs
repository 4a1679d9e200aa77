//! The time services: wall clock and blocking. (Monotonic time needs no
//! hypercall: it is on the clock page.)

use super::{Context, Flow, HEADER_LEN, Served};
use crate::event::Events;
use crate::kvm::memory::GuestRam;
use shoal_abi::HypercallHeader;
use shoal_abi::hypercall::{Block, WallClock};

/// `wall_clock`.
pub fn wall_clock(_ctx: &Context<'_>, args: &mut WallClock) -> Served {
    args.unix_ns = crate::clock::wall_ns();
    Ok((0, Flow::Resume))
}

/// `block`: returns at once when an unmasked event is pending (1, with the
/// events) or the deadline is past (0); otherwise asks the runner to park
/// the guest, which writes the result when the guest wakes
/// ([`crate::guest::Guest::run`]).
pub fn block(ctx: &Context<'_>, args: &mut Block) -> Served {
    args.events = ctx.events.unmasked();
    if args.events != 0 {
        return Ok((1, Flow::Resume));
    }
    if args.deadline_ns <= ctx.clock.now_ns() {
        return Ok((0, Flow::Resume));
    }
    Ok((
        0,
        Flow::Block {
            deadline_ns: args.deadline_ns,
            at: ctx.at,
        },
    ))
}

/// Writes the result of a `block` call at `at` after the guest woke: 1 and
/// the events if unmasked events are pending, else the 0 written when it
/// blocked stays.
pub fn woke(ram: &GuestRam, events: &Events, at: u64) {
    let pending = events.unmasked();
    if pending == 0 {
        return;
    }
    let ret_at = at + core::mem::offset_of!(HypercallHeader, ret) as u64;
    let events_at = at + HEADER_LEN as u64 + core::mem::offset_of!(Block, events) as u64;
    // The block was read and written at this address when the guest
    // blocked, and the guest did not run since: these cannot fail.
    let _ = ram.write_guest(ret_at, &1i64.to_le_bytes());
    let _ = ram.write_guest(events_at, &pending.to_le_bytes());
}
