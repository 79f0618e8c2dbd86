//! Snapshots: everything needed to continue a VM exactly, in two files of a directory
//! (docs/snapshot-format.md):
//!
//! - `vm.state`: the configuration, each vCPU's full state (registers, segment and control
//!   registers, XSAVE, XCRs, LAPIC, pending events, MP state, MSRs with the TSC), the in-kernel
//!   irqchip and the serial port — each KVM structure stored as its kernel ABI bytes;
//! - `memory.pages`: the guest pages that were ever touched and are not all zero, with an index.
//!
//! Both are versioned and checksummed; a reader refuses truncated, corrupted or foreign files
//! before anything runs.

pub mod format;
pub mod lazy;

use crate::memory::GuestRam;
use crate::vm::Activity;
use format::{put_blob, Fields, FormatError, SectionReader, SectionWriter};
use kvm_bindings::{
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
/// The memory file's name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.pages";
/// Format version of both files.
pub const VERSION: u32 = 1;
const STATE_MAGIC: &[u8; 8] = b"XCLDSNAP";
const MEMORY_MAGIC: &[u8; 8] = b"XCLDMEM\0";
const PAGE: u64 = 4096;
const MAX_STATE_FILE: u64 = 64 << 20;

const TAG_CONFIG: u32 = 1;
const TAG_VCPU: u32 = 2;
const TAG_IRQCHIP: u32 = 3;
const TAG_SERIAL: u32 = 4;
const TAG_END: u32 = 0xffff_ffff;

/// Snapshot failures.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("cannot read the state of vCPU {index}: {what}")]
    SaveVcpu { index: usize, what: String },
    #[error("cannot restore the state of vCPU {index}: {what}")]
    RestoreVcpu {
        index: usize,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create the snapshot directory {path}")]
    Directory {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the snapshot does not fit this host: {0}")]
    Incompatible(String),
    #[error("the VM changed while it was being snapshotted: {0}")]
    Busy(&'static str),
}

/// The VM's shape, as recorded in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotConfig {
    pub mem_bytes: u64,
    pub vcpus: usize,
    pub tsc_khz: u64,
    pub cmdline: String,
}

/// One vCPU's full architectural state.
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub msrs: Vec<kvm_msr_entry>,
}

/// One vCPU in a snapshot: what it was doing and, unless it never ran, its state.
pub struct VcpuSnapshot {
    pub(crate) activity: Activity,
    pub state: Option<Box<VcpuState>>,
}

/// The device and vCPU part of a snapshot (memory is streamed separately).
pub struct VmSnapshot {
    pub config: SnapshotConfig,
    pub vcpus: Vec<VcpuSnapshot>,
    pub irqchips: Vec<kvm_irqchip>,
    pub serial: vm_superio::serial::SerialState,
}

/// What a snapshot wrote.
#[derive(Clone, Debug, Default)]
pub struct SnapshotSummary {
    /// Pages written (touched and not all zero).
    pub pages: u64,
    /// Bytes of both files.
    pub bytes: u64,
}

fn activity_code(a: Activity) -> u8 {
    match a {
        Activity::Parked => 0,
        Activity::Halted => 2,
        _ => 1,
    }
}

fn activity_from(code: u8) -> Result<Activity, FormatError> {
    Ok(match code {
        0 => Activity::Parked,
        1 => Activity::Paused,
        2 => Activity::Halted,
        other => {
            return Err(FormatError::Malformed {
                what: "vm.state",
                detail: format!("vCPU activity {other}"),
            })
        }
    })
}

fn encode_vcpu(index: usize, v: &VcpuSnapshot) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(index as u32).to_le_bytes());
    out.push(activity_code(v.activity));
    out.push(u8::from(v.state.is_some()));
    if let Some(s) = &v.state {
        put_blob(&mut out, s.regs.as_bytes());
        put_blob(&mut out, s.sregs.as_bytes());
        put_blob(&mut out, s.xsave.region.as_bytes());
        put_blob(&mut out, s.xcrs.as_bytes());
        put_blob(&mut out, s.lapic.as_bytes());
        put_blob(&mut out, s.events.as_bytes());
        put_blob(&mut out, s.mp_state.as_bytes());
        out.extend_from_slice(&(s.msrs.len() as u32).to_le_bytes());
        for m in &s.msrs {
            out.extend_from_slice(&m.index.to_le_bytes());
            out.extend_from_slice(&m.data.to_le_bytes());
        }
    }
    out
}

fn decode_vcpu(payload: &[u8]) -> Result<(usize, VcpuSnapshot), FormatError> {
    let mut f = Fields::new(payload, "vm.state");
    let index = f.u32()? as usize;
    let activity = activity_from(f.u8()?)?;
    let has_state = f.u8()? != 0;
    let state = if has_state {
        let regs = f.kvm::<kvm_regs>()?;
        let sregs = f.kvm::<kvm_sregs>()?;
        let region = f.kvm::<[u32; 1024]>()?;
        let xsave = kvm_xsave {
            region,
            ..Default::default()
        };
        let xcrs = f.kvm::<kvm_xcrs>()?;
        let lapic = f.kvm::<kvm_lapic_state>()?;
        let events = f.kvm::<kvm_vcpu_events>()?;
        let mp_state = f.kvm::<kvm_mp_state>()?;
        let count = f.u32()? as usize;
        if count > 4096 {
            return Err(FormatError::Malformed {
                what: "vm.state",
                detail: format!("{count} MSRs"),
            });
        }
        let mut msrs = Vec::with_capacity(count);
        for _ in 0..count {
            msrs.push(kvm_msr_entry {
                index: f.u32()?,
                reserved: 0,
                data: f.u64()?,
            });
        }
        Some(Box::new(VcpuState {
            regs,
            sregs,
            xsave,
            xcrs,
            lapic,
            events,
            mp_state,
            msrs,
        }))
    } else {
        None
    };
    if !f.is_empty() {
        return Err(FormatError::Malformed {
            what: "vm.state",
            detail: format!("trailing bytes after vCPU {index}"),
        });
    }
    if state.is_none() && activity != Activity::Parked {
        return Err(FormatError::Malformed {
            what: "vm.state",
            detail: format!("vCPU {index} ran but has no state"),
        });
    }
    Ok((index, VcpuSnapshot { activity, state }))
}

fn encode_serial(s: &vm_superio::serial::SerialState) -> Vec<u8> {
    let mut out = vec![
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ];
    put_blob(&mut out, &s.in_buffer);
    out
}

fn decode_serial(payload: &[u8]) -> Result<vm_superio::serial::SerialState, FormatError> {
    let mut f = Fields::new(payload, "vm.state");
    let mut regs = [0u8; 9];
    regs.copy_from_slice(f.bytes(9)?);
    let in_buffer = f.blob(64)?.to_vec();
    Ok(vm_superio::serial::SerialState {
        baud_divisor_low: regs[0],
        baud_divisor_high: regs[1],
        interrupt_enable: regs[2],
        interrupt_identification: regs[3],
        line_control: regs[4],
        line_status: regs[5],
        modem_control: regs[6],
        modem_status: regs[7],
        scratch: regs[8],
        in_buffer,
    })
}

impl VmSnapshot {
    /// The `vm.state` bytes.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let mut w = SectionWriter::new(Vec::new(), "vm.state", STATE_MAGIC, VERSION)?;
        let mut config = Vec::new();
        config.extend_from_slice(&self.config.mem_bytes.to_le_bytes());
        config.extend_from_slice(&(self.config.vcpus as u32).to_le_bytes());
        config.extend_from_slice(&self.config.tsc_khz.to_le_bytes());
        put_blob(&mut config, self.config.cmdline.as_bytes());
        w.section(TAG_CONFIG, &config)?;
        for (i, v) in self.vcpus.iter().enumerate() {
            w.section(TAG_VCPU, &encode_vcpu(i, v))?;
        }
        for chip in &self.irqchips {
            w.section(TAG_IRQCHIP, chip.as_bytes())?;
        }
        w.section(TAG_SERIAL, &encode_serial(&self.serial))?;
        Ok(w.finish(TAG_END)?)
    }

    /// Parses `vm.state` bytes, checking every section and that the parts fit together.
    pub fn decode(data: &[u8]) -> Result<Self, SnapshotError> {
        let what = "vm.state";
        let malformed = |detail: String| SnapshotError::Format(FormatError::Malformed { what, detail });
        let mut r = SectionReader::new(data, what, STATE_MAGIC, VERSION)?;
        let mut config = None;
        let mut vcpus: Vec<VcpuSnapshot> = Vec::new();
        let mut irqchips = Vec::new();
        let mut serial = None;
        let mut ended = false;
        while let Some((tag, payload)) = r.next_section()? {
            if ended {
                return Err(malformed("data after the END section".into()));
            }
            match tag {
                TAG_CONFIG => {
                    let mut f = Fields::new(payload, what);
                    let mem_bytes = f.u64()?;
                    let vcpus = f.u32()? as usize;
                    let tsc_khz = f.u64()?;
                    let cmdline = String::from_utf8(f.blob(xcloud_abi::layout::CMDLINE_MAX)?.to_vec())
                        .map_err(|_| malformed("the command line is not UTF-8".into()))?;
                    if vcpus == 0 || vcpus > crate::vm::MAX_VCPUS {
                        return Err(malformed(format!("{vcpus} vCPUs")));
                    }
                    crate::memory::validate_size(mem_bytes, 0).map_err(|e| malformed(e.to_string()))?;
                    config = Some(SnapshotConfig {
                        mem_bytes,
                        vcpus,
                        tsc_khz,
                        cmdline,
                    });
                }
                TAG_VCPU => {
                    let (index, v) = decode_vcpu(payload)?;
                    if index != vcpus.len() {
                        return Err(malformed(format!("vCPU {index} out of order")));
                    }
                    vcpus.push(v);
                }
                TAG_IRQCHIP => {
                    let chip = kvm_irqchip::read_from_bytes(payload)
                        .map_err(|_| malformed(format!("an irqchip section of {} bytes", payload.len())))?;
                    irqchips.push(chip);
                }
                TAG_SERIAL => serial = Some(decode_serial(payload)?),
                TAG_END => ended = true,
                other => return Err(malformed(format!("unknown section {other}"))),
            }
        }
        if !ended {
            return Err(SnapshotError::Format(FormatError::Truncated {
                what,
                detail: "no END section".into(),
            }));
        }
        let config = config.ok_or_else(|| malformed("no configuration section".into()))?;
        if vcpus.len() != config.vcpus {
            return Err(malformed(format!(
                "{} vCPU sections for {} vCPUs",
                vcpus.len(),
                config.vcpus
            )));
        }
        if irqchips.len() != 3 {
            return Err(malformed(format!("{} irqchip sections, expected 3", irqchips.len())));
        }
        let serial = serial.ok_or_else(|| malformed("no serial section".into()))?;
        Ok(Self {
            config,
            vcpus,
            irqchips,
            serial,
        })
    }
}

use zerocopy::FromBytes;

/// Writes the non-zero resident pages of `ram` to `path`; returns pages and bytes written.
pub fn write_memory(path: &Path, ram: &GuestRam) -> Result<(u64, u64), SnapshotError> {
    let what = "memory.pages";
    let io = |source| SnapshotError::Format(FormatError::Io { what, source });
    let mem = ram.mem();
    let size = ram.size();
    let mut page = vec![0u8; PAGE as usize];
    let mut index = Vec::new();
    for pfn in ram.resident_pages() {
        mem.read_slice(&mut page, GuestAddress(pfn * PAGE))
            .map_err(|_| SnapshotError::Busy("guest memory unreadable"))?;
        if !crate::memory::is_zero(&page) {
            index.push(pfn);
        }
    }
    let file = std::fs::File::create(path).map_err(io)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut crc = crc32fast::Hasher::new();
    out.write_all(MEMORY_MAGIC).map_err(io)?;
    out.write_all(&VERSION.to_le_bytes()).map_err(io)?;
    out.write_all(&(PAGE as u32).to_le_bytes()).map_err(io)?;
    out.write_all(&size.to_le_bytes()).map_err(io)?;
    out.write_all(&(index.len() as u64).to_le_bytes()).map_err(io)?;
    for pfn in &index {
        let b = pfn.to_le_bytes();
        crc.update(&b);
        out.write_all(&b).map_err(io)?;
    }
    for pfn in &index {
        mem.read_slice(&mut page, GuestAddress(pfn * PAGE))
            .map_err(|_| SnapshotError::Busy("guest memory unreadable"))?;
        crc.update(&page);
        out.write_all(&page).map_err(io)?;
    }
    out.write_all(&crc.finalize().to_le_bytes()).map_err(io)?;
    out.flush().map_err(io)?;
    let bytes = 32 + index.len() as u64 * (8 + PAGE) + 4;
    Ok((index.len() as u64, bytes))
}

/// The checked header and index of a `memory.pages` file: the page numbers (in range, strictly
/// increasing) and the file's exact size matched against them.
pub(crate) struct MemoryIndex {
    pub pfns: Vec<u64>,
    /// Where the first page's data starts in the file.
    pub data_start: u64,
}

/// Reads and checks the header and index of the memory file `input` (of `file_len` bytes) for
/// a guest of `size` bytes, leaving `input` at the first page's data.
pub(crate) fn read_memory_index(input: &mut impl Read, file_len: u64, size: u64) -> Result<MemoryIndex, SnapshotError> {
    let what = "memory.pages";
    let io = |source| SnapshotError::Format(FormatError::Io { what, source });
    let truncated = |detail: String| SnapshotError::Format(FormatError::Truncated { what, detail });
    let malformed = |detail: String| SnapshotError::Format(FormatError::Malformed { what, detail });
    let mut header = [0u8; 32];
    input
        .read_exact(&mut header)
        .map_err(|_| truncated("the header is cut short".into()))?;
    if &header[..8] != MEMORY_MAGIC {
        return Err(FormatError::Magic {
            what,
            found: header[..8].to_vec(),
        }
        .into());
    }
    let mut f = Fields::new(&header[8..], what);
    let version = f.u32()?;
    if version != VERSION {
        return Err(FormatError::Version {
            what,
            found: version,
            supported: VERSION,
        }
        .into());
    }
    let (page_size, mem_bytes, count) = (f.u32()? as u64, f.u64()?, f.u64()?);
    if page_size != PAGE || mem_bytes != size {
        return Err(malformed(format!(
            "pages of {page_size} bytes for {mem_bytes} bytes of RAM; the VM has {size} bytes"
        )));
    }
    if count > size / PAGE {
        return Err(malformed(format!("{count} pages for a {size}-byte guest")));
    }
    let expected = 32 + count * (8 + PAGE) + 4;
    if file_len != expected {
        return Err(truncated(format!(
            "{file_len} bytes where {count} pages need {expected}"
        )));
    }
    let mut raw = vec![0u8; count as usize * 8];
    input.read_exact(&mut raw).map_err(io)?;
    let mut pfns = Vec::with_capacity(count as usize);
    for chunk in raw.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let pfn = u64::from_le_bytes(b);
        if pfn >= size / PAGE || pfns.last().is_some_and(|&last| pfn <= last) {
            return Err(malformed(format!("page number {pfn} is out of range or out of order")));
        }
        pfns.push(pfn);
    }
    Ok(MemoryIndex {
        pfns,
        data_start: 32 + count * 8,
    })
}

/// Reads `path` into `ram` (a fresh, zeroed guest), checking everything; on error the caller
/// discards the guest.
pub fn read_memory(path: &Path, ram: &GuestRam) -> Result<u64, SnapshotError> {
    let size = ram.size();
    let what = "memory.pages";
    let io = |source| SnapshotError::Format(FormatError::Io { what, source });
    let malformed = |detail: String| SnapshotError::Format(FormatError::Malformed { what, detail });
    let file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut input = BufReader::with_capacity(1 << 20, file);
    let index = read_memory_index(&mut input, file_len, size)?.pfns;
    let count = index.len() as u64;
    let mut crc = crc32fast::Hasher::new();
    for pfn in &index {
        crc.update(&pfn.to_le_bytes());
    }
    // Two stages that overlap: this thread reads chunks of pages and checksums them, a writer
    // puts each run of consecutive pages into the memfd with one pwritev (the kernel fills them
    // without a page fault per page). Buffers go back and forth, so none is allocated twice.
    const CHUNK: usize = 1024;
    let memfd = ram.file();
    let (to_writer, chunks) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(2);
    let (recycle, spare) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| -> Result<(), SnapshotError> {
        let index = &index;
        let writer = scope.spawn(move || -> Result<(), SnapshotError> {
            for (first, chunk) in chunks {
                let pfns = &index[first..first + chunk.len() / PAGE as usize];
                write_runs(memfd, pfns, &chunk)
                    .map_err(|e| malformed(format!("cannot put pages from {} into guest RAM: {e}", pfns[0])))?;
                let _ = recycle.send(chunk);
            }
            Ok(())
        });
        let read = (|| -> Result<(), SnapshotError> {
            for first in (0..index.len()).step_by(CHUNK) {
                let pages = CHUNK.min(index.len() - first);
                let mut chunk = spare.try_recv().unwrap_or_default();
                chunk.resize(pages * PAGE as usize, 0);
                input.read_exact(&mut chunk).map_err(io)?;
                crc.update(&chunk);
                if to_writer.send((first, chunk)).is_err() {
                    break; // the writer failed: its error is the one to report
                }
            }
            Ok(())
        })();
        drop(to_writer);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(malformed("the page writer panicked".into())));
        read.and(written)
    })?;
    let mut trailer = [0u8; 4];
    input.read_exact(&mut trailer).map_err(io)?;
    if u32::from_le_bytes(trailer) != crc.finalize() {
        return Err(FormatError::Checksum {
            what,
            detail: "the pages".into(),
        }
        .into());
    }
    Ok(count)
}

/// Writes `data` (the pages `pfns`, increasing, in order) into guest RAM through its memfd, one
/// write per run of consecutive pages.
fn write_runs(memfd: &std::fs::File, pfns: &[u64], data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut at = 0;
    for (first, count) in crate::memory::page_runs(pfns) {
        let bytes = count as usize * PAGE as usize;
        memfd.write_all_at(&data[at..at + bytes], first * PAGE)?;
        at += bytes;
    }
    Ok(())
}

/// Writes `snapshot` and the memory into `dir` (created if needed). Files are written under
/// temporary names and renamed, so a failed snapshot never leaves a half-written one behind.
pub fn write_dir(dir: &Path, snapshot: &VmSnapshot, ram: &GuestRam) -> Result<SnapshotSummary, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Directory {
        path: dir.display().to_string(),
        source,
    })?;
    let io = |source| {
        SnapshotError::Format(FormatError::Io {
            what: "vm.state",
            source,
        })
    };
    let state = snapshot.encode()?;
    let tmp_mem = dir.join(format!("{MEMORY_FILE}.tmp"));
    let (pages, mem_bytes) = write_memory(&tmp_mem, ram)?;
    let tmp_state = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp_state, &state).map_err(io)?;
    std::fs::rename(&tmp_mem, dir.join(MEMORY_FILE)).map_err(io)?;
    std::fs::rename(&tmp_state, dir.join(STATE_FILE)).map_err(io)?;
    Ok(SnapshotSummary {
        pages,
        bytes: mem_bytes + state.len() as u64,
    })
}

/// Reads and checks `dir/vm.state`.
pub fn read_state(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    let data = format::read_file(&dir.join(STATE_FILE), "vm.state", MAX_STATE_FILE)?;
    VmSnapshot::decode(&data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmSnapshot {
        let state = VcpuState {
            regs: kvm_regs {
                rip: 0x10_0000,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            lapic: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                reserved: 0,
                data: 42,
            }],
        };
        VmSnapshot {
            config: SnapshotConfig {
                mem_bytes: 64 << 20,
                vcpus: 2,
                tsc_khz: 2_600_000,
                cmdline: "a b".into(),
            },
            vcpus: vec![
                VcpuSnapshot {
                    activity: Activity::Paused,
                    state: Some(Box::new(state)),
                },
                VcpuSnapshot {
                    activity: Activity::Parked,
                    state: None,
                },
            ],
            irqchips: (0..3)
                .map(|chip_id| kvm_irqchip {
                    chip_id,
                    ..Default::default()
                })
                .collect(),
            serial: vm_superio::serial::Serial::new(NoTrigger, std::io::sink()).state(),
        }
    }

    struct NoTrigger;
    impl vm_superio::Trigger for NoTrigger {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            Ok(())
        }
    }

    #[test]
    fn state_round_trips() {
        let bytes = sample().encode().expect("encode");
        let back = VmSnapshot::decode(&bytes).expect("decode");
        assert_eq!(back.config, sample().config);
        assert_eq!(back.vcpus.len(), 2);
        let s = back.vcpus[0].state.as_ref().expect("vCPU 0 has state");
        assert_eq!(s.regs.rip, 0x10_0000);
        assert_eq!(s.msrs[0].data, 42);
        assert!(back.vcpus[1].state.is_none());
        assert_eq!(back.irqchips[2].chip_id, 2);
    }

    #[test]
    fn mutated_state_files_never_panic_and_are_all_refused() {
        let good = sample().encode().expect("encode");
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut accepted = 0;
        for _ in 0..5_000 {
            let mut bad = good.clone();
            for _ in 0..(1 + next() % 4) {
                let at = (next() as usize) % bad.len();
                bad[at] = next() as u8;
            }
            if next() % 5 == 0 {
                bad.truncate((next() as usize) % good.len());
            }
            if VmSnapshot::decode(&bad).is_ok() && bad != good {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 0, "checksums catch every mutation");
    }
}
