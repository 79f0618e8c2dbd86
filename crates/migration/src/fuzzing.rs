//! Entry points for the migration fuzz targets (fuzz/).

use crate::host_cpu::cpu_vendor;
use crate::wire;

/// A HELLO frame this host accepts (its CPU vendor, no CPU features asked for) for a 1-vCPU
/// guest of `mem_bytes`: fuzzing what follows the HELLO needs one, and random bytes rarely
/// make one.
pub fn migration_hello(mem_bytes: u64) -> Vec<u8> {
    let hello = wire::Hello {
        mem_bytes,
        vcpus: 1,
        tsc_khz: 1_000_000,
        cpu_vendor: cpu_vendor(),
        cpu_features: [0; wire::FEATURE_WORDS.len()],
    };
    let mut frame = Vec::new();
    // Writing into a Vec cannot fail, and the payload is far below the frame limit.
    let _ = wire::write_frame(&mut frame, wire::Kind::Hello, &hello.encode());
    frame
}

/// A peer's stream played from memory: reads come from the bytes given (then their end), and
/// what is written is kept. For the fuzz targets and the tests that feed the receiving sides.
pub struct MemoryStream {
    input: std::io::Cursor<Vec<u8>>,
    /// What the receiving side wrote back.
    pub written: Vec<u8>,
    /// Writes past this many bytes fail as to a peer that is gone (None: never).
    write_limit: Option<usize>,
}

impl MemoryStream {
    /// A stream that delivers `input`, then ends.
    pub fn new(input: Vec<u8>) -> Self {
        Self {
            input: std::io::Cursor::new(input),
            written: Vec::new(),
            write_limit: None,
        }
    }

    /// A stream that delivers `input` and takes `limit` bytes of writes; then its peer is gone
    /// (a broken pipe).
    pub fn closing_after(input: Vec<u8>, limit: usize) -> Self {
        Self {
            write_limit: Some(limit),
            ..Self::new(input)
        }
    }
}

impl std::io::Read for MemoryStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for MemoryStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self
            .write_limit
            .is_some_and(|limit| self.written.len() + buf.len() > limit)
        {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl crate::duplex::Duplex for MemoryStream {
    fn read_arrived(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::io::Read::read(&mut self.input, buf)
    }
    fn poll_fd(&self) -> std::os::fd::RawFd {
        -1
    }
}

/// What a primary sends before its first epoch (HELLO for a 4 MiB guest, PROTECT, SYNC), for
/// fuzzing the frames of the epochs after it.
pub fn replication_prelude() -> Vec<u8> {
    let mut frames = migration_hello(4 << 20);
    let _ = wire::write_frame(
        &mut frames,
        wire::Kind::Protect,
        &wire::Protect {
            heartbeat_ms: 100,
            interval_ms: 25,
            fence: None,
        }
        .encode(),
    );
    let _ = wire::write_frame(&mut frames, wire::Kind::Sync, &[]);
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use xcloud_vmm::Console;

    #[test]
    fn the_fuzzing_hello_is_accepted_so_the_frames_after_it_get_explored() {
        // The source side of the stream: the HELLO, then nothing. Accepted, the destination
        // waits for the next frame and meets the end; refused, it would say why.
        let feed = MemoryStream::new(migration_hello(4 << 20));
        let result = crate::destination::receive(feed, Console::new(Box::new(std::io::sink())), &Default::default());
        match result {
            Err(crate::error::MigrationError::Wire(wire::WireError::Io(e))) => {
                assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof)
            }
            Err(other) => panic!("the HELLO was not accepted: {other}"),
            Ok(_) => panic!("a VM without a state"),
        }
    }
}
