//! The console: one `ConsoleWrite` hypercall per line under xcloud, the 16550 UART at 0x3f8
//! (polled) anywhere else.

use crate::hypercall::{self, inb, outb};
use core::fmt;
use xcloud_abi::Op;

const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = COM1 + 5;
const TX_EMPTY: u8 = 0x20;

/// Writes raw bytes to the console.
pub fn write_bytes(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if hypercall::xcloud_present() {
        hypercall::call(
            Op::ConsoleWrite,
            [bytes.as_ptr() as u64, bytes.len() as u64, 0, 0, 0, 0],
        );
    } else {
        for &b in bytes {
            // Bounded wait: a missing UART reads 0xff (TX empty) so this never spins forever.
            let mut spins = 0u32;
            while inb(LINE_STATUS) & TX_EMPTY == 0 && spins < 100_000 {
                spins += 1;
            }
            outb(COM1, b);
        }
    }
}

/// A line-buffered console writer: `print!` builds a line on the stack and sends it in one
/// hypercall when the buffer fills, at each newline, or when dropped.
pub struct Console {
    buf: [u8; 256],
    len: usize,
}

impl Console {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self { buf: [0; 256], len: 0 }
    }

    /// Writes what is buffered (one hypercall).
    pub fn flush(&mut self) {
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let mut console = Console::new();
    let _ = fmt::write(&mut console, args);
}

/// Prints to the guest console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the guest console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
