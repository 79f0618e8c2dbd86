//! The VM's console: where the serial port and the `ConsoleWrite` hypercall send guest output.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A shared, cloneable console sink (stdout for `xcloud run`, a buffer in tests).
#[derive(Clone)]
pub struct Console(Arc<Mutex<Box<dyn Write + Send>>>);

impl Console {
    /// A console writing to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(sink)))
    }

    /// The console on the process's standard output.
    pub fn stdout() -> Self {
        Self::new(Box::new(std::io::stdout()))
    }

    /// Writes guest bytes and flushes them; output errors are logged, never fatal to the VM.
    pub fn emit(&self, bytes: &[u8]) {
        let mut sink = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = sink.write_all(bytes).and_then(|_| sink.flush()) {
            tracing::debug!("console write failed: {e}");
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.emit(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An in-memory console that tests and benchmarks read back.
#[derive(Clone, Default)]
pub struct CaptureBuffer(Arc<Mutex<Vec<u8>>>);

impl CaptureBuffer {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Write for CaptureBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
