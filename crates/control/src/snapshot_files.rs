//! A snapshot's files as the control plane sees them (docs/snapshot-format.md): their names,
//! their sizes and digests as its record keeps them, and a copy checked as it arrives.

use crate::model::{SnapshotFile, SNAPSHOT_FILES};
use crate::ControlError;
use std::io::{Read, Write};
use std::path::Path;

/// The files of the snapshot in `dir`, with their sizes and digests (reads them whole).
pub fn describe(dir: &Path) -> Result<Vec<SnapshotFile>, ControlError> {
    use sha2::Digest;
    SNAPSHOT_FILES
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let io = |e| ControlError::io(format!("reading {}", path.display()), e);
            let mut file = std::fs::File::open(&path).map_err(io)?;
            let mut hasher = sha2::Sha256::new();
            let mut buffer = vec![0u8; 1 << 20];
            let mut bytes = 0u64;
            loop {
                let n = file.read(&mut buffer).map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                bytes += n as u64;
            }
            Ok(SnapshotFile {
                name: name.to_string(),
                bytes,
                sha256: crate::auth::hex(&hasher.finalize()),
            })
        })
        .collect()
}

/// One file of a snapshot as it arrives: written as it comes, checked against its record.
pub struct Arriving<'a, W> {
    expected: &'a SnapshotFile,
    out: W,
    hasher: sha2::Sha256,
    got: u64,
}

impl<'a, W: Write> Arriving<'a, W> {
    /// A file that should be `expected`, written to `out` as it arrives.
    pub fn new(expected: &'a SnapshotFile, out: W) -> Self {
        use sha2::Digest;
        Self {
            expected,
            out,
            hasher: sha2::Sha256::new(),
            got: 0,
        }
    }

    /// Takes the next piece; an error stops the transfer.
    pub fn take(&mut self, chunk: &[u8]) -> Result<(), String> {
        use sha2::Digest;
        self.got += chunk.len() as u64;
        if self.got > self.expected.bytes {
            return Err(format!(
                "it sent more than the {} bytes of {}",
                self.expected.bytes, self.expected.name
            ));
        }
        self.hasher.update(chunk);
        self.out
            .write_all(chunk)
            .map_err(|e| format!("writing {}: {e}", self.expected.name))
    }

    /// Checks that all of it came, unchanged; the writer, to be synced.
    pub fn finish(self) -> Result<W, String> {
        use sha2::Digest;
        let name = &self.expected.name;
        if self.got != self.expected.bytes {
            return Err(format!(
                "{name} ended after {} of its {} bytes",
                self.got, self.expected.bytes
            ));
        }
        let digest = crate::auth::hex(&self.hasher.finalize());
        if digest != self.expected.sha256 {
            return Err(format!("{name} arrived with the digest {digest}, not its own"));
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_taken_only_whole_and_unchanged() {
        let expected = SnapshotFile {
            name: "vm.state".into(),
            bytes: 3,
            sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
        };
        let mut whole = Arriving::new(&expected, Vec::new());
        whole.take(b"a").expect("a piece");
        whole.take(b"bc").expect("a piece");
        assert_eq!(whole.finish().expect("whole"), b"abc");

        let mut changed = Arriving::new(&expected, Vec::new());
        changed.take(b"abd").expect("the right size");
        assert!(changed.finish().expect_err("changed").contains("digest"));

        let mut short = Arriving::new(&expected, Vec::new());
        short.take(b"ab").expect("a piece");
        assert!(short.finish().expect_err("short").contains("2 of its 3"));

        let mut long = Arriving::new(&expected, Vec::new());
        long.take(b"ab").expect("a piece");
        assert!(long.take(b"cd").expect_err("too long").contains("more than"));
    }

    #[test]
    fn describe_gives_sizes_and_digests() {
        let dir = std::env::temp_dir().join(format!("xcloud-describe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("vm.state"), b"abc").expect("write");
        std::fs::write(dir.join("memory.pages"), b"").expect("write");
        let files = describe(&dir).expect("described");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(files[0].bytes, 3);
        assert_eq!(
            files[0].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(files[1].bytes, 0);
        assert!(describe(Path::new("/nonexistent-xcloud")).is_err());
    }
}
