//! Console output: [`print!`](crate::print) and [`println!`](crate::println).
//!
//! Each `print!` formats into a small buffer on the stack and appends it
//! to the console ring in the event page when the host offers one
//! (feature `CONSOLE_RING`): no exit. The host takes the ring's bytes at
//! the guest's next exit of any kind (a hypercall, a fault, the end of its
//! time slice while others wait, its end), so output is never lost, only
//! held until then; [`flush`] hands it over at once. Output that does not
//! fit in the ring, or any output on a host without it, goes in
//! `console_write` hypercalls, one per [`BUFFER`] bytes.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use shoal_abi::event::{CONSOLE_RING_DATA, CONSOLE_RING_OFFSET, CONSOLE_RING_SIZE};
use shoal_abi::features::CONSOLE_RING;
use shoal_abi::hypercall::ConsoleWrite;
use shoal_abi::layout::EVENT_PAGE;

/// Bytes formatted before they are sent.
pub const BUFFER: usize = 512;

/// Writes raw bytes to the console. Returns how many the host accepted
/// (fewer than `bytes.len()` only when the guest's console limit is hit).
pub fn write_bytes(bytes: &[u8]) -> Result<usize, crate::hypercall::Error> {
    let mut args = ConsoleWrite {
        addr: bytes.as_ptr() as u64,
        len: bytes.len() as u64,
    };
    crate::hypercall::call(&mut args).map(|n| n as usize)
}

/// Hands everything in the console ring to the host now (one exit).
pub fn flush() {
    // An empty write: the host takes the ring before serving any call.
    let _ = write_bytes(&[]);
}

/// Set while [`ring_put`] runs, so that a trap handler that prints in the
/// middle of it does not write the same bytes of the ring (its output goes
/// by hypercall, ahead of the interrupted print's). A handler that never
/// returns to the interrupted code leaves it set: later output then goes
/// by hypercall too.
static IN_RING: AtomicBool = AtomicBool::new(false);

/// Appends `bytes` to the console ring: false if the host offers none,
/// they do not fit, or this interrupted another append.
fn ring_put(bytes: &[u8]) -> bool {
    if crate::boot::info().features & CONSOLE_RING == 0 || IN_RING.swap(true, Ordering::Acquire) {
        return false;
    }
    // SAFETY: the ABI maps the event page read-write at `EVENT_PAGE` for
    // the guest's whole life, with the ring's `head` and `tail` words at
    // `CONSOLE_RING_OFFSET`, written only atomically.
    let (head, tail) = unsafe {
        let words = (EVENT_PAGE + CONSOLE_RING_OFFSET) as *const AtomicU32;
        (&*words, &*words.add(1))
    };
    let at = head.load(Ordering::Relaxed);
    let used = at.wrapping_sub(tail.load(Ordering::Acquire));
    let fits = used <= CONSOLE_RING_SIZE && bytes.len() <= (CONSOLE_RING_SIZE - used) as usize;
    if fits {
        let start = (at % CONSOLE_RING_SIZE) as usize;
        let first = bytes.len().min(CONSOLE_RING_SIZE as usize - start);
        let data = (EVENT_PAGE + CONSOLE_RING_DATA) as *mut u8;
        // SAFETY: both pieces lie in the ring's bytes, the event page's
        // second half, which only the guest writes and only the host
        // reads, while the guest is stopped.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), data.add(start), first);
            core::ptr::copy_nonoverlapping(bytes[first..].as_ptr(), data, bytes.len() - first);
        }
        // The host may stop the guest at any instruction: the bytes are
        // in place before `head` says so.
        head.store(at.wrapping_add(bytes.len() as u32), Ordering::Release);
    }
    IN_RING.store(false, Ordering::Release);
    fits
}

/// Hands `bytes` to the host: through the ring if they fit, else by
/// hypercall (the host takes the ring first, so the order holds).
fn emit(bytes: &[u8]) {
    if !ring_put(bytes) {
        // Output past the console limit is dropped, as documented.
        let _ = write_bytes(bytes);
    }
}

struct Buffered {
    buf: [u8; BUFFER],
    len: usize,
}

impl Buffered {
    fn flush(&mut self) {
        if self.len > 0 {
            emit(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Write for Buffered {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s.as_bytes();
        while !rest.is_empty() {
            if self.len == BUFFER {
                self.flush();
            }
            let n = rest.len().min(BUFFER - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&rest[..n]);
            self.len += n;
            rest = &rest[n..];
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let mut out = Buffered {
        buf: [0; BUFFER],
        len: 0,
    };
    let _ = out.write_fmt(args);
    out.flush();
}

/// Prints to the guest's console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints to the guest's console, with a newline.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
