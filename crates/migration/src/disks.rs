//! Disks move with the VM: the source copies each image while the guest runs (its data
//! extents only: a sparse image's holes stay holes), records the chunks the guest writes
//! meanwhile, sends them again in rounds, and sends the last ones while the guest is paused
//! for the switch, before the STATE. The destination writes a new image in its disk
//! directory and the VM continues on it (docs/migration.md).
//!
//! Replication uses the same copy for its initial copy, then stages the chunks written in each
//! epoch during the checkpoint's pause; its backup writes them at the epoch's checkpoint.
//!
//! Frames: DISK_BEGIN `index u32 | size u64 | source path (the rest, UTF-8)`, DISK_DATA
//! `index u32 | offset u64 | bytes`.

use crate::error::MigrationError;
use crate::wire::{self, Kind, WireError};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use xcloud_vmm::{BlockDevice, BlockState, VmHandle, DIRTY_CHUNK};

/// Rounds of re-sending written chunks while the guest runs, before stop-and-copy.
const ROUNDS: usize = 4;
/// Written chunks few enough to leave to stop-and-copy.
const SETTLED_CHUNKS: usize = 16;

fn io(e: std::io::Error) -> MigrationError {
    MigrationError::Wire(WireError::Io(e))
}

/// Reads `n` bytes of disk `index` at `at` from `image` into `buf` as a DISK_DATA payload.
fn data_payload(index: u32, image: &File, at: u64, n: usize, buf: &mut Vec<u8>) -> Result<(), MigrationError> {
    buf.clear();
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(&at.to_le_bytes());
    let head = buf.len();
    buf.resize(head + n, 0);
    image.read_exact_at(&mut buf[head..], at).map_err(io)
}

/// Sends `len` bytes of disk `index` from `offset`, read from `image`, in DIRTY_CHUNK frames.
fn send_range<S: Write>(
    out: &mut S,
    index: u32,
    image: &File,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, MigrationError> {
    let mut at = offset;
    let end = offset + len;
    let mut sent = 0;
    while at < end {
        let n = (end - at).min(DIRTY_CHUNK) as usize;
        data_payload(index, image, at, n, buf)?;
        wire::write_frame(out, Kind::DiskData, buf)?;
        at += n as u64;
        sent += n as u64;
    }
    Ok(sent)
}

/// The source's side: what it copies and how far it got.
pub(crate) struct DiskCopy {
    devices: Vec<std::sync::Arc<BlockDevice>>,
    images: Vec<(u64, File)>,
    /// Image bytes sent so far.
    pub bytes: u64,
}

impl DiskCopy {
    /// Starts tracking writes and sends every image's data while the guest runs, then rounds
    /// of what it wrote meanwhile until little is left.
    pub fn start<S: Write>(handle: &VmHandle, out: &mut S) -> Result<Self, MigrationError> {
        let devices = handle.block_devices().to_vec();
        let mut copy = Self {
            devices,
            images: Vec::new(),
            bytes: 0,
        };
        let mut buf = Vec::new();
        for (index, dev) in handle.block_devices().iter().enumerate() {
            dev.start_tracking();
            let (size, path, image) = dev.image().map_err(io)?;
            let mut begin = Vec::new();
            begin.extend_from_slice(&(index as u32).to_le_bytes());
            begin.extend_from_slice(&size.to_le_bytes());
            begin.extend_from_slice(path.to_string_lossy().as_bytes());
            wire::write_frame(out, Kind::DiskBegin, &begin)?;
            for (from, to) in xcloud_vmm::disk_extents(&image, size) {
                copy.bytes += send_range(out, index as u32, &image, from, to - from, &mut buf)?;
            }
            copy.images.push((size, image));
        }
        for _ in 0..ROUNDS {
            if copy.send_dirty(out)? <= SETTLED_CHUNKS {
                break;
            }
        }
        Ok(copy)
    }

    /// Sends the chunks written since the last look; returns how many.
    pub fn send_dirty<S: Write>(&mut self, out: &mut S) -> Result<usize, MigrationError> {
        let mut buf = Vec::new();
        let mut chunks = 0;
        for (index, dev) in self.devices.iter().enumerate() {
            let (size, image) = &self.images[index];
            for chunk in dev.take_dirty() {
                let at = chunk * DIRTY_CHUNK;
                if at < *size {
                    self.bytes += send_range(out, index as u32, image, at, (*size - at).min(DIRTY_CHUNK), &mut buf)?;
                    chunks += 1;
                }
            }
        }
        Ok(chunks)
    }

    /// Replication, while the VM is paused for a checkpoint: the chunks written since the last
    /// look, read into DISK_DATA payloads (reusing the buffers of `frames`). Returns their
    /// bytes.
    pub fn stage_dirty(&mut self, frames: &mut Vec<Vec<u8>>) -> Result<u64, MigrationError> {
        let mut used = 0;
        let mut bytes = 0;
        for (index, dev) in self.devices.iter().enumerate() {
            let (size, image) = &self.images[index];
            for chunk in dev.take_dirty() {
                let at = chunk * DIRTY_CHUNK;
                if at >= *size {
                    continue;
                }
                if used == frames.len() {
                    frames.push(Vec::new());
                }
                let n = (*size - at).min(DIRTY_CHUNK) as usize;
                data_payload(index as u32, image, at, n, &mut frames[used])?;
                used += 1;
                bytes += n as u64;
            }
        }
        frames.truncate(used);
        self.bytes += bytes;
        Ok(bytes)
    }
}

impl Drop for DiskCopy {
    fn drop(&mut self) {
        for dev in &self.devices {
            dev.stop_tracking();
        }
    }
}

/// The destination's side: the images it is writing, removed again unless the VM runs on them.
pub(crate) struct DiskReceiver {
    dir: Option<PathBuf>,
    /// Per disk: the new image, its size, its path here.
    images: Vec<(File, u64, PathBuf)>,
    kept: bool,
}

impl DiskReceiver {
    /// Receives disks into `dir` (None: a VM with disks is refused).
    pub fn new(dir: Option<&Path>) -> Self {
        Self {
            dir: dir.map(Path::to_path_buf),
            images: Vec::new(),
            kept: false,
        }
    }

    /// DISK_BEGIN: creates the new image (refusing to overwrite anything).
    pub fn begin(&mut self, payload: &[u8]) -> Result<(), String> {
        if payload.len() < 12 {
            return Err("a DISK_BEGIN frame is too short".into());
        }
        let index = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
        let size = u64::from_le_bytes(payload[4..12].try_into().map_err(|_| "DISK_BEGIN")?);
        let source = String::from_utf8_lossy(&payload[12..]).into_owned();
        if index != self.images.len() {
            return Err(format!("disk {index} arrived out of order"));
        }
        let Some(dir) = &self.dir else {
            return Err(format!(
                "the VM has a disk ({source}) and this destination has no disk directory (xcloud receive --disk-dir DIR)"
            ));
        };
        let name = Path::new(&source)
            .file_name()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("the disk path {source:?} has no file name"))?;
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("cannot create {} for the VM's disk {source}: {e}", path.display()))?;
        self.images.push((file, size, path.clone()));
        self.images
            .last()
            .map(|(f, _, _)| f.set_len(size))
            .transpose()
            .map_err(|e| format!("cannot size {} to {size} bytes: {e}", path.display()))?;
        Ok(())
    }

    /// Checks a DISK_DATA payload: its disk began and the bytes lie inside it. Returns the
    /// disk, the offset and the bytes.
    fn locate<'p>(&self, payload: &'p [u8]) -> Result<(usize, u64, &'p [u8]), String> {
        if payload.len() < 12 {
            return Err("a DISK_DATA frame is too short".into());
        }
        let index = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
        let offset = u64::from_le_bytes(payload[4..12].try_into().map_err(|_| "DISK_DATA")?);
        let bytes = &payload[12..];
        let (_, size, _) = self
            .images
            .get(index)
            .ok_or(format!("data for disk {index}, which did not begin"))?;
        if offset.checked_add(bytes.len() as u64).is_none_or(|end| end > *size) {
            return Err(format!("data past the end of disk {index}"));
        }
        Ok((index, offset, bytes))
    }

    /// Checks a DISK_DATA payload without writing it (replication stages an epoch's data until
    /// its checkpoint); returns how many bytes it carries.
    pub fn check(&self, payload: &[u8]) -> Result<u64, String> {
        self.locate(payload).map(|(_, _, bytes)| bytes.len() as u64)
    }

    /// The bytes of every disk together (what an epoch may write at most).
    pub fn total_size(&self) -> u64 {
        self.images.iter().map(|(_, size, _)| size).sum()
    }

    /// DISK_DATA: writes the bytes where they go, inside the disk.
    pub fn data(&mut self, payload: &[u8]) -> Result<(), String> {
        let (index, offset, bytes) = self.locate(payload)?;
        let (file, _, path) = &self.images[index];
        file.write_all_at(bytes, offset)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Before the VM is built: every image is durable and closed (the VM opens and locks it
    /// again), and the saved disks name the new images.
    pub fn finish(&mut self, state: &mut xcloud_state::StateTree) -> Result<(), String> {
        use xcloud_state::Persist;
        let saved = state.sections().iter().filter(|s| s.kind == BlockState::KIND).count();
        if saved != self.images.len() {
            return Err(format!("the VM has {saved} disks and {} were sent", self.images.len()));
        }
        for (index, (file, size, path)) in self.images.iter().enumerate() {
            file.sync_all()
                .map_err(|e| format!("cannot flush {}: {e}", path.display()))?;
            let mut s: BlockState = state.peek(index as u32).map_err(|e| e.to_string())?;
            if s.size != *size {
                return Err(format!(
                    "disk {index} was sent with {size} bytes and saved with {}",
                    s.size
                ));
            }
            s.path = path.to_string_lossy().into_owned();
            state.take(BlockState::KIND, index as u32);
            state.save(index as u32, &s).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The VM runs on the new images: keep them.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for DiskReceiver {
    fn drop(&mut self) {
        if !self.kept {
            // Images this destination made for a VM that never ran here.
            for (_, _, path) in self.images.drain(..) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(index: u32, size: u64, path: &str) -> Vec<u8> {
        let mut b = index.to_le_bytes().to_vec();
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(path.as_bytes());
        b
    }

    fn data(index: u32, offset: u64, bytes: &[u8]) -> Vec<u8> {
        let mut d = index.to_le_bytes().to_vec();
        d.extend_from_slice(&offset.to_le_bytes());
        d.extend_from_slice(bytes);
        d
    }

    #[test]
    fn a_destination_writes_inside_its_new_images_only_and_removes_them_unless_kept() {
        let dir = std::env::temp_dir().join(format!("xcloud-disks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        assert!(
            DiskReceiver::new(None).begin(&begin(0, 4096, "/a/b.img")).is_err(),
            "no directory"
        );
        let mut r = DiskReceiver::new(Some(&dir));
        assert!(r.begin(&begin(1, 4096, "/a/b.img")).is_err(), "out of order");
        assert!(r.begin(&[0; 5]).is_err(), "short");
        r.begin(&begin(0, 4096, "/a/b.img")).expect("begin");
        r.data(&data(0, 100, b"hello")).expect("data");
        assert!(r.data(&data(0, 4094, b"abc")).is_err(), "past the end");
        assert!(r.data(&data(0, u64::MAX, b"a")).is_err(), "overflow");
        assert!(r.data(&data(1, 0, b"a")).is_err(), "no such disk");
        let path = dir.join("b.img");
        assert_eq!(&std::fs::read(&path).expect("image")[100..105], b"hello");
        // A second receiver never overwrites an image that is there.
        let mut again = DiskReceiver::new(Some(&dir));
        assert!(again.begin(&begin(0, 4096, "/elsewhere/b.img")).is_err());
        drop(again);
        assert!(path.exists(), "the refused receiver removed nothing of the other");
        drop(r);
        assert!(!path.exists(), "an image for a VM that never ran here is removed");
        let mut kept = DiskReceiver::new(Some(&dir));
        kept.begin(&begin(0, 512, "c.img")).expect("begin");
        kept.keep();
        assert!(dir.join("c.img").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
