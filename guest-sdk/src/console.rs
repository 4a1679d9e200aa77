//! Console output: [`print!`](crate::print) and [`println!`](crate::println).
//!
//! Each `print!` formats into a small buffer on the stack and hands it to
//! the host in as few `console_write` hypercalls as fit (one for lines up
//! to [`BUFFER`] bytes): every hypercall is an exit, so output is batched.

use core::fmt::{self, Write};
use shoal_abi::hypercall::ConsoleWrite;

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

struct Buffered {
    buf: [u8; BUFFER],
    len: usize,
}

impl Buffered {
    fn flush(&mut self) {
        if self.len > 0 {
            // Output past the console limit is dropped, as documented.
            let _ = write_bytes(&self.buf[..self.len]);
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
