//! PVH boot: checks and loads an ELF that carries a Xen PVH entry note, and writes what the PVH
//! protocol promises the guest at its entry (`hvm_start_info`, the memory map, the command line,
//! a GDT and a TSS). Any PVH ELF boots, not only the SDK's.
//!
//! The ELF is checked here before linux-loader copies it, so that a bad image is refused with an
//! error that names the problem (which segment, which addresses) and nothing is half-loaded.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::{elf::Elf, elf::PvhBootCapability, KernelLoader};
use std::io::Cursor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use xcloud_abi::{layout, pvh};

const ELF_HEADER_BYTES: usize = 64;
const PHDR_BYTES: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;
const LOW_RAM_END: u64 = 0x9_fc00;

/// Why an image cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("not an ELF file (the image is {len} bytes and does not start with \\x7fELF)")]
    /// Too short or without the ELF magic.
    NotElf {
        /// The image's length.
        len: usize,
    },
    #[error("unsupported ELF: {0}")]
    /// An ELF this VMM does not boot (not 64-bit x86, not executable, ...).
    Unsupported(&'static str),
    #[error("ELF program headers ({count} of {entsize} bytes at offset {offset:#x}) lie outside the {len}-byte file")]
    /// The program header table does not fit the file.
    BadProgramHeaders {
        /// Where the table starts.
        offset: u64,
        /// Its entries.
        count: u16,
        /// Bytes per entry.
        entsize: u16,
        /// The image's length.
        len: usize,
    },
    #[error("ELF segment {index} has its data at file offset {offset:#x}+{size:#x}, beyond the {len}-byte file")]
    /// A segment's bytes are not all in the file.
    SegmentOutsideFile {
        /// Which program header.
        index: usize,
        /// Where its bytes start.
        offset: u64,
        /// How many.
        size: u64,
        /// The image's length.
        len: usize,
    },
    #[error("ELF segment {index} [{start:#x}, {end:#x}) lies outside guest RAM [{:#x}, {mem:#x}); give the guest more memory or relink it", layout::HIGHMEM_START)]
    /// A segment does not fit guest RAM (or overlaps the boot area).
    SegmentOutsideMemory {
        /// Which program header.
        index: usize,
        /// Its first guest-physical byte.
        start: u64,
        /// One past its last.
        end: u64,
        /// Bytes of guest RAM.
        mem: u64,
    },
    #[error(
        "ELF segment {index} has {filesz:#x} bytes in the file but only {memsz:#x} in memory (p_filesz > p_memsz)"
    )]
    /// A segment claims more file bytes than memory.
    FileLargerThanMemory {
        /// Which program header.
        index: usize,
        /// Its bytes in the file.
        filesz: u64,
        /// Its bytes in memory.
        memsz: u64,
    },
    #[error("ELF segments {first} [{first_start:#x}, {first_end:#x}) and {second} [{second_start:#x}, {second_end:#x}) overlap in guest memory")]
    /// Two loadable segments claim the same guest memory.
    Overlap {
        /// The first segment's program header.
        first: usize,
        /// Its first guest-physical byte.
        first_start: u64,
        /// One past its last.
        first_end: u64,
        /// The second segment's program header.
        second: usize,
        /// Its first guest-physical byte.
        second_start: u64,
        /// One past its last.
        second_end: u64,
    },
    #[error("ELF has no loadable segment")]
    /// No loadable segment.
    NoSegments,
    #[error("ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): it cannot be booted by the PVH protocol")]
    /// No PVH entry note: not a PVH kernel.
    NoPvhNote,
    #[error("PVH entry point {entry:#x} is not inside a loaded segment")]
    /// The PVH entry point is outside the loaded segments.
    EntryOutsideImage {
        /// The entry point.
        entry: u64,
    },
    #[error("command line is {len} bytes; at most {} are allowed", layout::CMDLINE_MAX - 1)]
    /// The command line does not fit its page.
    CmdlineTooLong {
        /// Its length.
        len: usize,
    },
    #[error("command line contains a NUL byte")]
    /// The command line holds a NUL byte.
    CmdlineNul,
    #[error("cannot load the ELF image")]
    /// linux-loader refused the image.
    Load(#[source] linux_loader::loader::Error),
    #[error("cannot write boot structure {what} to guest memory")]
    /// A boot structure cannot be written into guest RAM.
    Write {
        /// Which structure.
        what: &'static str,
        #[source]
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// The PVH 32-bit entry point.
    pub entry: u64,
    /// First byte past the loaded image.
    pub image_end: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

/// A loadable segment: guest-physical [start, end).
#[derive(Clone, Copy, Debug)]
struct Segment {
    start: u64,
    end: u64,
}

/// Checks the ELF header and every loadable segment against the file and guest RAM.
fn check_elf(image: &[u8], mem_size: u64) -> Result<Vec<Segment>, BootError> {
    if image.len() < ELF_HEADER_BYTES || &image[..4] != b"\x7fELF" {
        return Err(BootError::NotElf { len: image.len() });
    }
    if image[4] != 2 {
        return Err(BootError::Unsupported("not a 64-bit ELF"));
    }
    if image[5] != 1 {
        return Err(BootError::Unsupported("not little-endian"));
    }
    if u16_at(image, 18) != EM_X86_64 {
        return Err(BootError::Unsupported("not an x86-64 ELF"));
    }
    let phoff = u64_at(image, 32);
    let phentsize = u16_at(image, 54);
    let phnum = u16_at(image, 56);
    let table_end = (phnum as u64)
        .checked_mul(PHDR_BYTES as u64)
        .and_then(|n| n.checked_add(phoff));
    if phentsize as usize != PHDR_BYTES || table_end.is_none_or(|end| end > image.len() as u64) {
        return Err(BootError::BadProgramHeaders {
            offset: phoff,
            count: phnum,
            entsize: phentsize,
            len: image.len(),
        });
    }
    let mut segments = Vec::new();
    // The program header index of each segment, for errors.
    let mut indices = Vec::new();
    for index in 0..phnum as usize {
        let ph = &image[phoff as usize + index * PHDR_BYTES..][..PHDR_BYTES];
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let offset = u64_at(ph, 8);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        if filesz == 0 && memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(BootError::FileLargerThanMemory { index, filesz, memsz });
        }
        if offset.checked_add(filesz).is_none_or(|e| e > image.len() as u64) {
            return Err(BootError::SegmentOutsideFile {
                index,
                offset,
                size: filesz,
                len: image.len(),
            });
        }
        let end = paddr.saturating_add(memsz);
        if paddr < layout::HIGHMEM_START || end > mem_size {
            return Err(BootError::SegmentOutsideMemory {
                index,
                start: paddr,
                end,
                mem: mem_size,
            });
        }
        if let Some((first, other)) = segments
            .iter()
            .zip(&indices)
            .find(|(other, _): &(&Segment, &usize)| paddr < other.end && other.start < end)
            .map(|(other, &i)| (i, other))
        {
            return Err(BootError::Overlap {
                first,
                first_start: other.start,
                first_end: other.end,
                second: index,
                second_start: paddr,
                second_end: end,
            });
        }
        segments.push(Segment { start: paddr, end });
        indices.push(index);
    }
    if segments.is_empty() {
        return Err(BootError::NoSegments);
    }
    Ok(segments)
}

/// Checks `image`, loads it into `mem` and writes the PVH boot structures with `cmdline`.
pub fn load_pvh(mem: &GuestMemoryMmap, mem_size: u64, image: &[u8], cmdline: &str) -> Result<BootInfo, BootError> {
    let segments = check_elf(image, mem_size)?;
    if cmdline.len() >= layout::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong { len: cmdline.len() });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(layout::HIGHMEM_START)),
    )
    .map_err(BootError::Load)?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => return Err(BootError::NoPvhNote),
    };
    if !segments.iter().any(|s| (s.start..s.end).contains(&entry)) {
        return Err(BootError::EntryOutsideImage { entry });
    }
    write_boot_structures(mem, mem_size, cmdline)?;
    let image_end = segments.iter().map(|s| s.end).max().unwrap_or(layout::HIGHMEM_START);
    Ok(BootInfo { entry, image_end })
}

/// The PVH memory map for a guest of `mem_size` bytes.
pub fn memory_map(mem_size: u64) -> Vec<pvh::MemmapEntry> {
    let entry = |addr: u64, end: u64, kind: u32| pvh::MemmapEntry {
        addr,
        size: end - addr,
        kind,
        reserved: 0,
    };
    vec![
        entry(0, layout::GDT, pvh::MEMMAP_RAM),
        entry(layout::GDT, layout::BOOT_END, pvh::MEMMAP_RESERVED),
        entry(layout::BOOT_END, LOW_RAM_END, pvh::MEMMAP_RAM),
        entry(LOW_RAM_END, layout::HIGHMEM_START, pvh::MEMMAP_RESERVED),
        entry(layout::HIGHMEM_START, mem_size, pvh::MEMMAP_RAM),
    ]
}

/// GDT entries: null, flat 32-bit code (0x08), flat data (0x10), the TSS (0x18).
fn gdt() -> [u64; 4] {
    let tss_limit = layout::TSS_SIZE - 1;
    let base = layout::TSS;
    let tss = (tss_limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40) // present, busy 32-bit TSS
        | (((tss_limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff, tss]
}

fn write_boot_structures(mem: &GuestMemoryMmap, mem_size: u64, cmdline: &str) -> Result<(), BootError> {
    let write = |what: &'static str, bytes: &[u8], at: u64| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|source| BootError::Write { what, source })
    };
    let gdt_bytes: Vec<u8> = gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    write("GDT", &gdt_bytes, layout::GDT)?;
    // TSS: I/O map base at offset 0x66 points just past the 0x68-byte TSS; the bitmap stays zero
    // (every port allowed) and ends with the required 0xff byte.
    write("TSS", &0x68u16.to_le_bytes(), layout::TSS + 0x66)?;
    write("TSS", &[0xff], layout::TSS + layout::TSS_SIZE - 1)?;
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    write("command line", &cmd, layout::CMDLINE)?;
    let map = memory_map(mem_size);
    let map_bytes: Vec<u8> = map
        .iter()
        .flat_map(|e| {
            let mut b = Vec::with_capacity(24);
            b.extend_from_slice(&e.addr.to_le_bytes());
            b.extend_from_slice(&e.size.to_le_bytes());
            b.extend_from_slice(&e.kind.to_le_bytes());
            b.extend_from_slice(&e.reserved.to_le_bytes());
            b
        })
        .collect();
    write("memory map", &map_bytes, layout::MEMMAP)?;
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&pvh::START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
    info.extend_from_slice(&0u64.to_le_bytes()); // modlist_paddr
    info.extend_from_slice(&layout::CMDLINE.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr
    info.extend_from_slice(&layout::MEMMAP.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    write("hvm_start_info", &info, layout::START_INFO)
}

/// Registers of the boot vCPU at the PVH entry: 32-bit protected mode, paging off,
/// `%ebx` = address of `hvm_start_info`.
pub fn boot_regs(info: &BootInfo) -> kvm_regs {
    kvm_regs {
        rip: info.entry,
        rbx: layout::START_INFO,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Loads `code` into CS and `data` into every data segment register.
pub(crate) fn set_segments(sregs: &mut kvm_sregs, code: kvm_segment, data: kvm_segment) {
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
}

/// Segment and control registers of the boot vCPU at the PVH entry, applied over `sregs`.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let flat = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    set_segments(&mut sregs, flat(0x08, 0xb), flat(0x10, 0x3));
    sregs.tr = kvm_segment {
        base: layout::TSS,
        limit: (layout::TSS_SIZE - 1) as u32,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        s: 0,
        g: 0,
        ..flat(0x18, 0xb)
    };
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (gdt().len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// A minimal ELF for tests and fuzzing seeds: one PT_LOAD of `code` at `paddr` and, if asked,
/// a PVH note whose entry is `paddr`.
pub fn minimal_elf(paddr: u64, code: &[u8], with_pvh_note: bool) -> Vec<u8> {
    const NOTE_AT: usize = 0x180;
    const CODE_AT: usize = 0x200;
    let mut f = vec![0u8; CODE_AT];
    f.extend_from_slice(code);
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little-endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes());
    f[32..40].copy_from_slice(&(ELF_HEADER_BYTES as u64).to_le_bytes());
    f[52..54].copy_from_slice(&(ELF_HEADER_BYTES as u16).to_le_bytes());
    f[54..56].copy_from_slice(&(PHDR_BYTES as u16).to_le_bytes());
    f[56..58].copy_from_slice(&(1 + u16::from(with_pvh_note)).to_le_bytes());
    let mut phdr = |index: usize, kind: u32, offset: u64, addr: u64, size: u64| {
        let at = ELF_HEADER_BYTES + index * PHDR_BYTES;
        f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        f[at + 8..at + 16].copy_from_slice(&offset.to_le_bytes());
        f[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
        f[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
        f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        f[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
    };
    phdr(0, PT_LOAD, CODE_AT as u64, paddr, code.len() as u64);
    if with_pvh_note {
        phdr(1, PT_NOTE, NOTE_AT as u64, 0, 20);
        let note = [
            4u32,
            4,
            pvh::NOTE_PHYS32_ENTRY,
            u32::from_le_bytes(*b"Xen\0"),
            paddr as u32,
        ];
        for (i, word) in note.iter().enumerate() {
            f[NOTE_AT + 4 * i..NOTE_AT + 4 * i + 4].copy_from_slice(&word.to_le_bytes());
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    fn ram() -> GuestRam {
        GuestRam::new(4 << 20).expect("guest RAM")
    }

    #[test]
    fn a_pvh_elf_loads_and_gets_boot_structures() {
        let ram = ram();
        let info = load_pvh(ram.mem(), ram.size(), &minimal_elf(0x10_0000, &[0xf4], true), "a b").expect("boots");
        assert_eq!(info.entry, 0x10_0000);
        let magic: u32 = ram.mem().read_obj(GuestAddress(layout::START_INFO)).expect("read");
        assert_eq!(magic, pvh::START_MAGIC);
        let mut cmd = [0u8; 4];
        ram.mem()
            .read_slice(&mut cmd, GuestAddress(layout::CMDLINE))
            .expect("read");
        assert_eq!(&cmd, b"a b\0");
    }

    #[test]
    fn garbage_is_not_an_elf() {
        let ram = ram();
        assert!(matches!(
            load_pvh(
                ram.mem(),
                ram.size(),
                b"MZ\x90\x00 not an elf at all, really not one",
                ""
            ),
            Err(BootError::NotElf { .. })
        ));
        assert!(matches!(
            load_pvh(ram.mem(), ram.size(), &[], ""),
            Err(BootError::NotElf { .. })
        ));
    }

    #[test]
    fn an_elf_without_pvh_note_is_refused() {
        let ram = ram();
        assert!(matches!(
            load_pvh(ram.mem(), ram.size(), &minimal_elf(0x10_0000, &[0xf4], false), ""),
            Err(BootError::NoPvhNote)
        ));
    }

    #[test]
    fn segments_outside_memory_are_refused() {
        let ram = ram();
        let err = load_pvh(ram.mem(), ram.size(), &minimal_elf(0x80_0000, &[0xf4], true), "").expect_err("outside");
        assert!(matches!(err, BootError::SegmentOutsideMemory { index: 0, .. }), "{err}");
        let err = load_pvh(ram.mem(), ram.size(), &minimal_elf(0x1000, &[0xf4], true), "").expect_err("below 1 MiB");
        assert!(matches!(err, BootError::SegmentOutsideMemory { .. }), "{err}");
    }

    #[test]
    fn truncated_or_hostile_headers_are_refused() {
        let ram = ram();
        let mut f = minimal_elf(0x10_0000, &[0xf4], true);
        f[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            load_pvh(ram.mem(), ram.size(), &f, ""),
            Err(BootError::BadProgramHeaders { .. })
        ));
        let mut f = minimal_elf(0x10_0000, &[0xf4], true);
        f[64 + 32..64 + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(load_pvh(ram.mem(), ram.size(), &f, "").is_err());
        let f = minimal_elf(0x10_0000, &[0xf4], true);
        assert!(load_pvh(ram.mem(), ram.size(), &f[..100], "").is_err());
    }

    #[test]
    fn long_command_lines_are_refused() {
        let ram = ram();
        let long = "x".repeat(layout::CMDLINE_MAX);
        assert!(matches!(
            load_pvh(ram.mem(), ram.size(), &minimal_elf(0x10_0000, &[0xf4], true), &long),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn memory_map_covers_ram_without_overlap() {
        let map = memory_map(64 << 20);
        for w in map.windows(2) {
            assert_eq!(w[0].addr + w[0].size, w[1].addr);
        }
        assert_eq!(map.last().map(|e| e.addr + e.size), Some(64 << 20));
    }

    #[test]
    fn file_bytes_beyond_memory_bytes_and_overlapping_segments_are_named() {
        let good = minimal_elf(0x10_0000, &[0x90; 64], true);
        let phdr0 = ELF_HEADER_BYTES;
        let mut bad = good.clone();
        bad[phdr0 + 40..phdr0 + 48].copy_from_slice(&16u64.to_le_bytes());
        let err = check_elf(&bad, 4 << 20).expect_err("p_filesz > p_memsz");
        assert!(
            matches!(
                err,
                BootError::FileLargerThanMemory {
                    index: 0,
                    filesz: 64,
                    memsz: 16
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("p_filesz > p_memsz"), "{err}");

        let phdr1 = ELF_HEADER_BYTES + PHDR_BYTES;
        let mut overlapping = good;
        overlapping[phdr1..phdr1 + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        overlapping[phdr1 + 24..phdr1 + 32].copy_from_slice(&0x10_0020u64.to_le_bytes());
        let err = check_elf(&overlapping, 4 << 20).expect_err("overlap");
        assert!(
            matches!(
                err,
                BootError::Overlap {
                    first: 0,
                    second: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("overlap"), "{err}");
    }
}
