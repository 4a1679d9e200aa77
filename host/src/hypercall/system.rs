//! The system calls of the ABI: version and features, exit, panic.

use super::{Context, Flow, Served};
use crate::end::{GuestEnd, PanicReport};
use shoal_abi::hypercall::{AbiInfo, Exit, PANIC_TEXT_MAX, Panic, Yield};
use shoal_abi::{ABI_VERSION, HypercallError};

/// `abi_info`.
pub fn abi_info(ctx: &Context<'_>, args: &mut AbiInfo) -> Served {
    if args._pad != 0 {
        return Err(HypercallError::ReservedNotZero);
    }
    args.version = ABI_VERSION;
    args.features = ctx.features;
    Ok((0, Flow::Resume))
}

/// `exit`.
pub fn exit(_ctx: &Context<'_>, args: &mut Exit) -> Served {
    Ok((0, Flow::End(GuestEnd::Exited(args.code))))
}

/// Copies up to `PANIC_TEXT_MAX` bytes of guest text, lossily decoded.
fn guest_text(ctx: &Context<'_>, addr: u64, len: u64) -> String {
    let mut buf = vec![0u8; len.min(PANIC_TEXT_MAX) as usize];
    match ctx.ram.read_guest(addr, &mut buf) {
        Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
        Err(_) => "<outside guest memory>".to_string(),
    }
}

/// `panic`: ends the guest whatever its arguments hold.
pub fn panic(ctx: &Context<'_>, args: &mut Panic) -> Served {
    let report = PanicReport {
        message: guest_text(ctx, args.msg_addr, args.msg_len),
        file: guest_text(ctx, args.file_addr, args.file_len),
        line: args.line,
        column: args.column,
    };
    Ok((0, Flow::End(GuestEnd::Panicked(report))))
}

/// `yield`.
pub fn yield_now(_ctx: &Context<'_>, args: &mut Yield) -> Served {
    if args._reserved != 0 {
        return Err(HypercallError::ReservedNotZero);
    }
    Ok((0, Flow::Yield))
}
