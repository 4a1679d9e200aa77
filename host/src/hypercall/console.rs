//! The console service.

use super::{Context, Flow, Served};
use shoal_abi::HypercallError;
use shoal_abi::hypercall::{CONSOLE_WRITE_MAX, ConsoleWrite};

/// Bytes copied out of the guest per step (a stack buffer: no allocation
/// on the hypercall path).
const CHUNK: usize = 4096;

/// `console_write`.
pub fn write(ctx: &Context<'_>, args: &mut ConsoleWrite) -> Served {
    if args.len > CONSOLE_WRITE_MAX {
        return Err(HypercallError::Invalid);
    }
    ctx.ram
        .check_guest(args.addr, args.len)
        .map_err(|_| HypercallError::Fault)?;
    if ctx.console.is_full() && args.len > 0 {
        return Err(HypercallError::LimitExceeded);
    }
    let mut chunk = [0u8; CHUNK];
    let mut accepted = 0u64;
    while accepted < args.len {
        let n = (args.len - accepted).min(CHUNK as u64) as usize;
        ctx.ram
            .read_guest(args.addr + accepted, &mut chunk[..n])
            .map_err(|_| HypercallError::Fault)?;
        let taken = ctx.console.write(&chunk[..n]);
        accepted += taken as u64;
        if taken < n {
            break;
        }
    }
    ctx.stats.add_console_bytes(accepted);
    Ok((accepted as i64, Flow::Resume))
}
