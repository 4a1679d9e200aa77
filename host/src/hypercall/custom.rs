//! Custom hypercalls: the numbers [`CUSTOM_FIRST`]..=[`CUSTOM_LAST`],
//! served by handlers an embedder registers (`Host::register_hypercall`).
//!
//! A handler is typed: a request it decodes with `zerocopy`, a response
//! it returns. The dispatcher does for it what it does for every built-in
//! call: checks `arg_len` (the larger of the two sizes), copies the
//! request out of the guest once, and writes the response and `ret` back
//! in one copy. A handler reaches the caller's memory only through
//! [`Caller`], the same checked copy-in/copy-out door the built-in calls
//! use. A handler that returns an error or panics stops the calling guest
//! with the reason (`Crash::CustomHypercall`); nothing else notices.

use super::{Context, Flow, HEADER_LEN, bad_memory, finish, unknown};
use crate::end::{Crash, GuestEnd};
use crate::kvm::memory::GuestRam;
use shoal_abi::hypercall::{CUSTOM_FIRST, CUSTOM_LAST, MAX_ARG_LEN};
use shoal_abi::{HypercallError, HypercallHeader};
use std::fmt::Display;
use std::sync::OnceLock;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The guest making a custom hypercall: its id and its memory.
pub struct Caller<'a> {
    id: u64,
    ram: &'a GuestRam,
}

impl Caller<'_> {
    /// The calling guest's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Copies `buf.len()` bytes of the guest's memory at guest-physical
    /// `addr` into `buf`: [`HypercallError::Fault`] unless all of it is
    /// guest-owned memory.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), HypercallError> {
        self.ram
            .read_guest(addr, buf)
            .map_err(|_| HypercallError::Fault)
    }

    /// Copies `bytes` into the guest's memory at guest-physical `addr`:
    /// [`HypercallError::Fault`] unless all of it is guest-owned memory.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), HypercallError> {
        self.ram
            .write_guest(addr, bytes)
            .map_err(|_| HypercallError::Fault)
    }
}

/// Why a custom hypercall could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The number is outside the range reserved for experiments.
    #[error("hypercall {0:#x} is not a custom number ({CUSTOM_FIRST:#x}..={CUSTOM_LAST:#x} are)")]
    NotCustom(u32),
    /// A handler has the number already.
    #[error("hypercall {0:#x} has a handler already")]
    Taken(u32),
    /// The request or the response is larger than an argument block
    /// holds.
    #[error(
        "hypercall {nr:#x}: a request or response of {len} bytes is over the {MAX_ARG_LEN} an argument block holds"
    )]
    TooLarge {
        /// The number.
        nr: u32,
        /// The larger of the two sizes.
        len: usize,
    },
    /// The host runs guests in shard processes, where a handler (a
    /// closure of this process) cannot go.
    #[error("custom hypercalls need the guests in this process (a host without shards)")]
    Sharded,
}

/// A handler with its types erased: the argument bytes in, the response
/// written over them, or why the guest must stop.
type Handler = dyn Fn(&Caller<'_>, &mut [u8]) -> Result<(), String> + Send + Sync;

/// A registered handler and the `arg_len` it takes.
struct Entry {
    len: u32,
    handler: Box<Handler>,
}

/// The custom hypercalls of one host: a slot per custom number, set once.
/// A call finds its handler by index, with no lock.
pub struct CustomCalls {
    handlers: Box<[OnceLock<Entry>]>,
}

impl Default for CustomCalls {
    fn default() -> Self {
        Self {
            handlers: (CUSTOM_FIRST..=CUSTOM_LAST)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }
}

impl std::fmt::Debug for CustomCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let numbers: Vec<u32> = (CUSTOM_FIRST..=CUSTOM_LAST)
            .filter(|&nr| self.get(nr).is_some())
            .collect();
        f.debug_struct("CustomCalls")
            .field("numbers", &numbers)
            .finish()
    }
}

impl CustomCalls {
    /// Serves hypercall `nr` with `handler` from now on.
    pub fn register<Req, Resp, E, F>(&self, nr: u32, handler: F) -> Result<(), RegisterError>
    where
        Req: FromBytes + KnownLayout + Immutable,
        Resp: IntoBytes + Immutable,
        E: Display,
        F: Fn(&Caller<'_>, Req) -> Result<Resp, E> + Send + Sync + 'static,
    {
        let slot = nr
            .checked_sub(CUSTOM_FIRST)
            .and_then(|i| self.handlers.get(i as usize))
            .ok_or(RegisterError::NotCustom(nr))?;
        let len = size_of::<Req>().max(size_of::<Resp>());
        if len > MAX_ARG_LEN as usize {
            return Err(RegisterError::TooLarge { nr, len });
        }
        let erased = move |caller: &Caller<'_>, args: &mut [u8]| {
            // `args` is `len` bytes, at least a request's.
            let request = Req::read_from_prefix(args)
                .map_err(|_| "the request does not decode".to_string())?
                .0;
            let response = handler(caller, request).map_err(|e| e.to_string())?;
            args.fill(0);
            args[..size_of::<Resp>()].copy_from_slice(response.as_bytes());
            Ok(())
        };
        slot.set(Entry {
            len: len as u32,
            handler: Box::new(erased),
        })
        .map_err(|_| RegisterError::Taken(nr))
    }

    fn get(&self, nr: u32) -> Option<&Entry> {
        let i = nr.checked_sub(CUSTOM_FIRST)?;
        self.handlers.get(i as usize)?.get()
    }
}

/// Whether `nr` is in the custom range.
pub(super) fn is_custom(nr: u32) -> bool {
    (CUSTOM_FIRST..=CUSTOM_LAST).contains(&nr)
}

/// Serves custom hypercall `header.nr`, whose block is at `addr`.
pub(super) fn serve(ctx: &Context<'_>, addr: u64, header: HypercallHeader) -> Flow {
    let Some(&Entry { len, ref handler }) = ctx.custom.get(header.nr) else {
        return unknown(ctx, addr, header);
    };
    if header.arg_len != len {
        return finish(ctx, addr, header, Err(HypercallError::BadLength), &[]);
    }
    ctx.stats.count_custom_hypercall();
    let mut block = [0u8; MAX_ARG_LEN as usize];
    let args = &mut block[..len as usize];
    let Some(args_addr) = addr.checked_add(HEADER_LEN as u64) else {
        return bad_memory(addr, HEADER_LEN as u64);
    };
    if ctx.ram.read_guest(args_addr, args).is_err() {
        return bad_memory(addr, (HEADER_LEN + args.len()) as u64);
    }
    if let Some(observer) = ctx.observer {
        observer.note_args(&format_args!("{args:02x?}"));
    }
    let caller = Caller {
        id: ctx.id,
        ram: ctx.ram,
    };
    // A call the host's sandbox denied earlier on this thread is not this
    // handler's.
    let _ = crate::seccomp::take_denied();
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&caller, args)));
    let stop = |reason: String| {
        Flow::End(GuestEnd::Crashed(Crash::CustomHypercall {
            nr: header.nr,
            reason,
        }))
    };
    // A panic's own report (a backtrace) may be what the sandbox denied:
    // the panic is the reason then.
    let denied = crate::seccomp::take_denied();
    match (served, denied) {
        (Err(panic), _) => stop(format!("the handler panicked: {}", panic_text(&*panic))),
        (Ok(_), Some(call)) => stop(format!(
            "the handler made the system call {}, which the host's sandbox denies worker threads",
            call.name()
        )),
        (Ok(Ok(())), None) => finish(ctx, addr, header, Ok((0, Flow::Resume)), args),
        (Ok(Err(reason)), None) => stop(reason),
    }
}

/// The message of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}
