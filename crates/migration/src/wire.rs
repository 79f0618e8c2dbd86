//! Migration stream frames (docs/migration.md): `kind u8 | length u32 | payload`, inside TLS.
//! The reader bounds every length before it allocates and parses payloads defensively.

use std::io::{Read, Write};

/// Largest frame payload (a PAGES frame of 1024 pages is a little over 4 MiB).
pub const MAX_FRAME: u32 = 8 << 20;
/// Most pages in one PAGES frame.
pub const MAX_PAGES_PER_FRAME: usize = 1024;
/// Bit of a page number that marks an all-zero page (no data follows it).
pub const ZERO_PAGE: u64 = 1 << 63;
/// Bytes of a guest page.
pub const PAGE: usize = 4096;
/// Magic of the HELLO frame.
pub const MAGIC: &[u8; 8] = b"XCLDMIG\0";
/// Version of the stream.
pub const VERSION: u32 = 2;
/// Most page numbers in one REQUEST frame.
pub const MAX_REQUEST: usize = 512;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// source -> destination: magic, version, the VM's shape, the source CPU.
    Hello = 1,
    /// destination -> source: the VM can be received.
    Accept = 2,
    /// either way: a reason, then the connection ends.
    Refuse = 3,
    /// source -> destination: pages.
    Pages = 4,
    /// source -> destination: the vCPU and device state (the snapshot `vm.state` format).
    State = 5,
    /// source -> destination, right behind STATE: start it once the state is applied (the
    /// source stays paused from here on). Kind 6 is reserved.
    Go = 7,
    /// destination -> source: the VM runs.
    Running = 8,
    /// source -> destination: answer SYNCED once everything before this is applied.
    Sync = 9,
    /// destination -> source: every frame before the SYNC is applied.
    Synced = 10,
    /// source -> destination, before STATE: switch to post-copy; the payload lists the pages
    /// that will follow after GO as runs (first page u64, count u32; increasing, not
    /// overlapping). Other pages are zero.
    Postcopy = 11,
    /// source -> destination: every post-copy page has been sent.
    End = 12,
    /// destination -> source: every post-copy page is in place.
    Complete = 13,
    /// source -> destination: a PAGES payload compressed with LZ4 (block format), after its
    /// uncompressed length (u32, at most MAX_FRAME).
    PagesLz4 = 14,
    /// destination -> source, during post-copy: send these pages (u64 each, at most
    /// MAX_REQUEST) before the others: the guest waits for them.
    Request = 15,
    /// source -> destination, before the memory: a disk follows: index u32, size u64, the
    /// image's path at the source (UTF-8).
    DiskBegin = 16,
    /// source -> destination: disk bytes: index u32, offset u64, the bytes.
    DiskData = 17,
    /// source -> destination, before the memory: the code of the VM's tenant modules, for the
    /// destination to compile while the memory arrives (so that loading them at the switch
    /// costs the guest no compile time): count u32, then each module's length u32 and bytes.
    Modules = 18,
    /// primary -> backup, right after ACCEPT (and MODULES): this stream replicates the VM
    /// (docs/replication.md): heartbeat interval in ms u32, checkpoint interval in ms u32.
    /// Pages before the first CHECKPOINT are the initial copy.
    Protect = 19,
    /// primary -> backup: closes an epoch: epoch u64, the epoch's page count u64, SHA-256 of
    /// the epoch's PAGES (uncompressed) and DISK_DATA payloads in stream order and of the
    /// state, then the state.
    Checkpoint = 20,
    /// backup -> primary: the checkpoint of this epoch (u64) is whole, checked and in place.
    Ack = 21,
    /// primary -> backup: alive, when nothing else was sent for a heartbeat interval.
    Heartbeat = 22,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::State,
            7 => Kind::Go,
            8 => Kind::Running,
            9 => Kind::Sync,
            10 => Kind::Synced,
            11 => Kind::Postcopy,
            12 => Kind::End,
            13 => Kind::Complete,
            14 => Kind::PagesLz4,
            15 => Kind::Request,
            16 => Kind::DiskBegin,
            17 => Kind::DiskData,
            18 => Kind::Modules,
            19 => Kind::Protect,
            20 => Kind::Checkpoint,
            21 => Kind::Ack,
            22 => Kind::Heartbeat,
            _ => return None,
        })
    }
}

/// Bytes of a CHECKPOINT payload before its state.
pub const CHECKPOINT_HEADER: usize = 8 + 8 + 32;

/// What a CHECKPOINT frame says of its epoch (its state follows the header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointHeader {
    /// Epochs count up from 1.
    pub epoch: u64,
    /// Pages sent in the epoch's PAGES frames.
    pub pages: u64,
    /// SHA-256 of the epoch's PAGES (uncompressed) and DISK_DATA payloads in stream order,
    /// then of the state.
    pub digest: [u8; 32],
}

impl CheckpointHeader {
    /// The CHECKPOINT payload: this header, then `state`.
    pub fn encode(&self, state: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHECKPOINT_HEADER + state.len());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(state);
        out
    }

    /// The header of a CHECKPOINT payload and the state after it.
    pub fn decode(payload: &[u8]) -> Result<(Self, &[u8]), WireError> {
        let bad = |detail: &str| WireError::Malformed {
            kind: Kind::Checkpoint,
            detail: detail.into(),
        };
        let (head, state) = payload
            .split_at_checked(CHECKPOINT_HEADER)
            .ok_or_else(|| bad("shorter than its header"))?;
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&head[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&head[16..48]);
        Ok((
            Self {
                epoch: word(0),
                pages: word(8),
                digest,
            },
            state,
        ))
    }
}

/// The shortest heartbeat interval: a backup takes over after two of silence, and a pause
/// for a large checkpoint, or a busy host, must not look like a dead primary.
pub const MIN_HEARTBEAT_MS: u32 = 10;

/// The longest fence key a PROTECT payload may name.
pub const MAX_FENCE_KEY: usize = 256;

/// A PROTECT payload: how the primary replicates, and the fence it holds, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protect {
    /// The heartbeat interval, ms ([`MIN_HEARTBEAT_MS`]..=60000): the backup takes over after
    /// two of silence.
    pub heartbeat_ms: u32,
    /// The checkpoint interval, ms (1..=60000).
    pub interval_ms: u32,
    /// The fence (docs/replication.md): the generation the primary holds and the fence's key.
    pub fence: Option<(u64, String)>,
}

impl Protect {
    /// heartbeat u32, interval u32, then, if fenced, the generation u64 and the key (UTF-8).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.heartbeat_ms.to_le_bytes().to_vec();
        out.extend_from_slice(&self.interval_ms.to_le_bytes());
        if let Some((generation, key)) = &self.fence {
            out.extend_from_slice(&generation.to_le_bytes());
            out.extend_from_slice(key.as_bytes());
        }
        out
    }

    /// Checks the intervals (up to 60 s) and the fence's key (1 to [`MAX_FENCE_KEY`] bytes
    /// of UTF-8).
    pub fn decode(payload: &[u8]) -> Result<Self, WireError> {
        let bad = |detail: String| WireError::Malformed {
            kind: Kind::Protect,
            detail,
        };
        if payload.len() != 8 && !(17..=16 + MAX_FENCE_KEY).contains(&payload.len()) {
            return Err(bad(format!(
                "{} bytes, not 8 (or 17 to {} with a fence)",
                payload.len(),
                16 + MAX_FENCE_KEY
            )));
        }
        let word = |at: usize| u32::from_le_bytes([payload[at], payload[at + 1], payload[at + 2], payload[at + 3]]);
        let (heartbeat_ms, interval_ms) = (word(0), word(4));
        for (name, ms, least) in [
            ("heartbeat", heartbeat_ms, MIN_HEARTBEAT_MS),
            ("checkpoint interval", interval_ms, 1),
        ] {
            if !(least..=60_000).contains(&ms) {
                return Err(bad(format!("a {name} of {ms} ms ({least} to 60000)")));
            }
        }
        let fence = match payload.get(8..16) {
            None => None,
            Some(generation) => {
                let mut word = [0u8; 8];
                word.copy_from_slice(generation);
                let key =
                    std::str::from_utf8(&payload[16..]).map_err(|_| bad("a fence key that is not UTF-8".into()))?;
                Some((u64::from_le_bytes(word), key.to_string()))
            }
        };
        Ok(Self {
            heartbeat_ms,
            interval_ms,
            fence,
        })
    }
}

/// An epoch number as an ACK payload.
pub fn encode_ack(epoch: u64) -> [u8; 8] {
    epoch.to_le_bytes()
}

/// The epoch an ACK payload acknowledges.
pub fn decode_ack(payload: &[u8]) -> Result<u64, WireError> {
    let word: [u8; 8] = payload.try_into().map_err(|_| WireError::Malformed {
        kind: Kind::Ack,
        detail: format!("{} bytes, not 8", payload.len()),
    })?;
    Ok(u64::from_le_bytes(word))
}

/// A MODULES payload for `codes`.
pub fn encode_modules(codes: &[std::sync::Arc<[u8]>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + codes.iter().map(|c| 4 + c.len()).sum::<usize>());
    out.extend_from_slice(&(codes.len() as u32).to_le_bytes());
    for code in codes {
        out.extend_from_slice(&(code.len() as u32).to_le_bytes());
        out.extend_from_slice(code);
    }
    out
}

/// The modules' code in a MODULES payload: at most as many modules, and as much code, as a VM
/// may have.
pub fn decode_modules(payload: &[u8]) -> Result<Vec<&[u8]>, String> {
    use xcloud_vmm::extension::{MAX_TENANT_CODE, MAX_TENANT_MODULES};
    let word = |at: usize| -> Result<usize, String> {
        payload
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(|b| u32::from_le_bytes(b) as usize)
            .ok_or_else(|| "a MODULES frame cut short".to_string())
    };
    let count = word(0)?;
    if count > MAX_TENANT_MODULES {
        return Err(format!(
            "a MODULES frame of {count} modules (at most {MAX_TENANT_MODULES})"
        ));
    }
    let (mut at, mut total, mut codes) = (4, 0, Vec::with_capacity(count));
    for _ in 0..count {
        let len = word(at)?;
        total += len;
        if total > MAX_TENANT_CODE {
            return Err(format!("a MODULES frame of over {MAX_TENANT_CODE} bytes of code"));
        }
        let code = payload
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| "a MODULES frame cut short".to_string())?;
        codes.push(code);
        at += 4 + len;
    }
    if at != payload.len() {
        return Err("a MODULES frame with bytes after its modules".into());
    }
    Ok(codes)
}

/// Stream failures.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the migration connection failed")]
    /// Reading or writing the stream failed.
    Io(#[from] std::io::Error),
    #[error("the peer sent an unknown frame kind {0}")]
    /// A frame kind this version does not know.
    UnknownKind(u8),
    #[error("the peer sent a frame of {0} bytes (at most {MAX_FRAME})")]
    /// A frame longer than the stream allows.
    TooLarge(u32),
    #[error("the peer sent a malformed {kind:?} frame: {detail}")]
    /// A frame whose payload does not decode.
    Malformed {
        /// The frame's kind.
        kind: Kind,
        /// What is wrong with it.
        detail: String,
    },
    #[error("expected a {expected:?} frame, got {got:?}")]
    /// A frame that does not belong here.
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: Kind,
    },
    #[error("the peer refused: {0}")]
    /// The other end refused, with its reason.
    Refused(String),
}

/// Longest text of the peer's that is shown.
const MAX_PEER_TEXT: usize = 300;

/// Text the peer sent, safe to print: control characters escaped (no terminal sequences, no
/// fake extra lines), cut to [`MAX_PEER_TEXT`] characters.
pub fn peer_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text
        .chars()
        .take(MAX_PEER_TEXT)
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect();
    if text.chars().count() > MAX_PEER_TEXT {
        out.push_str("...");
    }
    out
}

/// Writes one frame.
pub fn write_frame(out: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or(WireError::TooLarge(u32::MAX))?;
    let mut header = [0u8; 5];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&len.to_le_bytes());
    out.write_all(&header)?;
    out.write_all(payload)?;
    Ok(())
}

/// Reads one frame into `buf` (reused between calls) and returns its kind.
pub fn read_frame(input: &mut impl Read, buf: &mut Vec<u8>) -> Result<Kind, WireError> {
    let mut header = [0u8; 5];
    input.read_exact(&mut header)?;
    let kind = Kind::from_u8(header[0]).ok_or(WireError::UnknownKind(header[0]))?;
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    buf.resize(len as usize, 0);
    input.read_exact(buf)?;
    if kind == Kind::Refuse {
        return Err(WireError::Refused(peer_text(buf)));
    }
    Ok(kind)
}

/// Reads the next frame and checks that it is `want`.
pub fn expect_frame(input: &mut impl Read, buf: &mut Vec<u8>, want: Kind, name: &'static str) -> Result<(), WireError> {
    match read_frame(input, buf)? {
        got if got == want => Ok(()),
        got => Err(WireError::Unexpected { expected: name, got }),
    }
}

/// The HELLO payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Bytes of guest RAM.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The guest TSC's frequency at the source.
    pub tsc_khz: u64,
    /// CPUID vendor string of the source host (12 bytes).
    pub cpu_vendor: [u8; 12],
    /// The feature words the guest was offered (see [`FEATURE_WORDS`]).
    pub cpu_features: [u32; FEATURE_WORDS.len()],
}

/// CPUID feature words compared before a guest is accepted: (leaf, subleaf, register, name).
pub const FEATURE_WORDS: [(u32, u32, char, &str); 8] = [
    (1, 0, 'c', "1.ecx"),
    (1, 0, 'd', "1.edx"),
    (7, 0, 'b', "7.0.ebx"),
    (7, 0, 'c', "7.0.ecx"),
    (7, 0, 'd', "7.0.edx"),
    (0xd, 1, 'a', "0xd.1.eax"),
    (0x8000_0001, 0, 'c', "0x80000001.ecx"),
    (0x8000_0001, 0, 'd', "0x80000001.edx"),
];

/// The features the source offered that `ours` lacks, by word name and bits.
pub fn missing_features(
    theirs: &[u32; FEATURE_WORDS.len()],
    ours: &[u32; FEATURE_WORDS.len()],
) -> Vec<(&'static str, u32)> {
    FEATURE_WORDS
        .iter()
        .zip(theirs.iter().zip(ours))
        .filter_map(|((_, _, _, name), (t, o))| {
            let missing = t & !o;
            (missing != 0).then_some((*name, missing))
        })
        .collect()
}

const HELLO_BYTES: usize = 44 + 4 * FEATURE_WORDS.len();

impl Hello {
    /// The HELLO payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_BYTES);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.mem_bytes.to_le_bytes());
        out.extend_from_slice(&self.vcpus.to_le_bytes());
        out.extend_from_slice(&self.tsc_khz.to_le_bytes());
        out.extend_from_slice(&self.cpu_vendor);
        for word in &self.cpu_features {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// Reads a HELLO payload, refusing a malformed one.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let bad = |detail: String| WireError::Malformed {
            kind: Kind::Hello,
            detail,
        };
        if b.len() != HELLO_BYTES {
            return Err(bad(format!("{} bytes, expected {HELLO_BYTES}", b.len())));
        }
        if &b[..8] != MAGIC {
            return Err(bad("not an xcloud migration stream".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!("stream version {version}, this xcloud speaks {VERSION}")));
        }
        let mut cpu_vendor = [0u8; 12];
        cpu_vendor.copy_from_slice(&b[32..44]);
        let mut cpu_features = [0u32; FEATURE_WORDS.len()];
        for (i, word) in cpu_features.iter_mut().enumerate() {
            *word = u32_at(44 + 4 * i);
        }
        Ok(Self {
            mem_bytes: u64_at(12),
            vcpus: u32_at(20),
            tsc_khz: u64_at(24),
            cpu_vendor,
            cpu_features,
        })
    }
}

/// Appends one page to a PAGES payload being built (the payload's page count goes up by one).
pub fn push_page(out: &mut Vec<u8>, pfn: u64, data: &[u8]) {
    if out.is_empty() {
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    if xcloud_vm_core::memory::is_zero(data) {
        out.extend_from_slice(&(pfn | ZERO_PAGE).to_le_bytes());
    } else {
        out.extend_from_slice(&pfn.to_le_bytes());
        out.extend_from_slice(data);
    }
    let count = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) + 1;
    out[..4].copy_from_slice(&count.to_le_bytes());
}

/// Calls `page(pfn, Some(data) | None for a zero page)` for each page of a PAGES payload;
/// every page number must be below `limit`.
pub fn for_each_page(
    payload: &[u8],
    limit: u64,
    mut page: impl FnMut(u64, Option<&[u8]>) -> Result<(), WireError>,
) -> Result<u64, WireError> {
    let bad = |detail: String| WireError::Malformed {
        kind: Kind::Pages,
        detail,
    };
    if payload.len() < 4 {
        return Err(bad("no page count".into()));
    }
    let count = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
    if count > MAX_PAGES_PER_FRAME {
        return Err(bad(format!("{count} pages in one frame")));
    }
    let mut at = 4;
    for _ in 0..count {
        let Some(raw) = payload.get(at..at + 8) else {
            return Err(bad("cut short".into()));
        };
        let mut a = [0u8; 8];
        a.copy_from_slice(raw);
        let word = u64::from_le_bytes(a);
        at += 8;
        let pfn = word & !ZERO_PAGE;
        if pfn >= limit {
            return Err(bad(format!("page {pfn} is outside the guest's {limit} pages")));
        }
        if word & ZERO_PAGE != 0 {
            page(pfn, None)?;
        } else {
            let Some(data) = payload.get(at..at + PAGE) else {
                return Err(bad("cut short".into()));
            };
            at += PAGE;
            page(pfn, Some(data))?;
        }
    }
    if at != payload.len() {
        return Err(bad(format!("{} trailing bytes", payload.len() - at)));
    }
    Ok(count as u64)
}

/// Compresses a PAGES payload into a PAGES_LZ4 payload.
pub fn compress_pages(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&lz4_flex::block::compress(payload));
    out
}

/// Decompresses a PAGES_LZ4 payload into `out` (reused), refusing sizes over MAX_FRAME and
/// data that does not decompress to exactly the announced length.
pub fn decompress_pages(payload: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
    let bad = |detail: String| WireError::Malformed {
        kind: Kind::PagesLz4,
        detail,
    };
    if payload.len() < 4 {
        return Err(bad("no length".into()));
    }
    let len = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
    if len > MAX_FRAME {
        return Err(bad(format!("{len} bytes uncompressed (at most {MAX_FRAME})")));
    }
    out.resize(len as usize, 0);
    match lz4_flex::block::decompress_into(&payload[4..], out) {
        Ok(n) if n == len as usize => Ok(()),
        Ok(n) => Err(bad(format!("{n} bytes, {len} announced"))),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Encodes the POSTCOPY payload: `pfns` (increasing) as runs of consecutive pages, so that the
/// list costs a few bytes per run instead of 8 per page (it is sent while the guest is paused).
pub fn encode_pfns(pfns: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    for (first, count) in xcloud_vm_core::memory::page_runs(pfns) {
        out.extend_from_slice(&first.to_le_bytes());
        out.extend_from_slice(&(count as u32).to_le_bytes());
    }
    out
}

/// Decodes a POSTCOPY payload into page numbers: runs increasing, not overlapping, non-empty
/// and below `limit`.
pub fn decode_pfns(payload: &[u8], limit: u64) -> Result<Vec<u64>, WireError> {
    let bad = |detail: String| WireError::Malformed {
        kind: Kind::Postcopy,
        detail,
    };
    if payload.len() % 12 != 0 {
        return Err(bad(format!("{} bytes is not a list of page runs", payload.len())));
    }
    let mut pfns: Vec<u64> = Vec::new();
    for run in payload.chunks_exact(12) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&run[..8]);
        let first = u64::from_le_bytes(first);
        let count = u32::from_le_bytes([run[8], run[9], run[10], run[11]]) as u64;
        let in_order = pfns.last().is_none_or(|&last| first > last);
        if count == 0 || !in_order || first.checked_add(count).is_none_or(|end| end > limit) {
            return Err(bad(format!(
                "the run of {count} pages at {first} is empty, out of range or out of order"
            )));
        }
        pfns.extend(first..first + count);
    }
    Ok(pfns)
}

/// Encodes a REQUEST payload.
pub fn encode_request(pfns: &[u64]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// Decodes a REQUEST payload: at most MAX_REQUEST page numbers, each below `limit`.
pub fn decode_request(payload: &[u8], limit: u64) -> Result<Vec<u64>, WireError> {
    let bad = |detail: String| WireError::Malformed {
        kind: Kind::Request,
        detail,
    };
    if payload.len() % 8 != 0 || payload.len() / 8 > MAX_REQUEST {
        return Err(bad(format!(
            "{} bytes is not a list of at most {MAX_REQUEST} pages",
            payload.len()
        )));
    }
    payload
        .chunks_exact(8)
        .map(|b| {
            let mut word = [0u8; 8];
            word.copy_from_slice(b);
            let pfn = u64::from_le_bytes(word);
            if pfn < limit {
                Ok(pfn)
            } else {
                Err(bad(format!("page {pfn} is beyond the guest's {limit} pages")))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_pages_round_trip_and_lies_are_refused() {
        let mut payload = Vec::new();
        push_page(&mut payload, 1, &[7u8; PAGE]);
        let packed = compress_pages(&payload);
        assert!(packed.len() < payload.len() / 10);
        let mut out = Vec::new();
        decompress_pages(&packed, &mut out).expect("valid");
        assert_eq!(out, payload);
        let mut lying = packed.clone();
        lying[..4].copy_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
        assert!(decompress_pages(&lying, &mut out).is_err());
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decompress_pages(&lying, &mut out).is_err());
        assert!(decompress_pages(&packed[..packed.len() - 3], &mut out).is_err());
    }

    #[test]
    fn features_the_destination_lacks_are_named() {
        let ours = [0xff; FEATURE_WORDS.len()];
        let mut theirs = ours;
        assert!(missing_features(&theirs, &ours).is_empty());
        theirs[2] = 0x1ff;
        assert_eq!(missing_features(&theirs, &ours), vec![("7.0.ebx", 0x100)]);
        assert!(missing_features(&[0; 8], &ours).is_empty(), "fewer features are fine");
    }

    #[test]
    fn pages_round_trip_with_zero_pages_elided() {
        let mut payload = Vec::new();
        push_page(&mut payload, 3, &[7u8; PAGE]);
        push_page(&mut payload, 9, &[0u8; PAGE]);
        assert_eq!(payload.len(), 4 + 8 + PAGE + 8);
        let mut seen = Vec::new();
        let n = for_each_page(&payload, 16, |pfn, data| {
            seen.push((pfn, data.map(|d| d[0])));
            Ok(())
        })
        .expect("valid");
        assert_eq!(n, 2);
        assert_eq!(seen, vec![(3, Some(7)), (9, None)]);
        assert!(for_each_page(&payload, 4, |_, _| Ok(())).is_err(), "page 9 of 4");
        assert!(for_each_page(&payload[..payload.len() - 1], 16, |_, _| Ok(())).is_err());
    }

    #[test]
    fn frames_refuse_oversized_unknown_and_cut_input() {
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut &[0xeeu8, 0, 0, 0, 0][..], &mut buf),
            Err(WireError::UnknownKind(0xee))
        ));
        assert!(matches!(
            read_frame(&mut &[4u8, 0xff, 0xff, 0xff, 0xff][..], &mut buf),
            Err(WireError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame(&mut &[4u8, 8, 0, 0, 0, 1][..], &mut buf),
            Err(WireError::Io(_))
        ));
        let mut out = Vec::new();
        write_frame(&mut out, Kind::Refuse, b"no room").expect("write");
        assert!(matches!(read_frame(&mut &out[..], &mut buf), Err(WireError::Refused(r)) if r == "no room"));
        assert_eq!(peer_text(b"a\x1b[2Jb\nfake line\x07"), "a\\u{1b}[2Jb\\nfake line\\u{7}");
        assert_eq!(peer_text(&[b'x'; 1000]).len(), MAX_PEER_TEXT + 3);
    }

    #[test]
    fn hello_is_checked() {
        let h = Hello {
            mem_bytes: 64 << 20,
            vcpus: 2,
            tsc_khz: 1,
            cpu_vendor: *b"AuthenticAMD",
            cpu_features: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        assert_eq!(Hello::decode(&h.encode()).expect("valid"), h);
        let mut bad = h.encode();
        bad[0] = b'Y';
        assert!(Hello::decode(&bad).is_err());
        assert!(Hello::decode(&bad[..10]).is_err());
    }

    #[test]
    fn page_lists_travel_as_runs_and_lies_are_refused() {
        let pfns = [0, 1, 2, 3, 10, 11, 500, 502];
        let encoded = encode_pfns(&pfns);
        assert_eq!(encoded.len(), 4 * 12, "four runs");
        assert_eq!(decode_pfns(&encoded, 503).expect("decode"), pfns);
        assert!(decode_pfns(&encoded, 502).is_err(), "beyond the guest");
        assert!(decode_pfns(&encoded[..13], 1000).is_err(), "cut");
        let overlapping = [encode_pfns(&[5, 6]), encode_pfns(&[6])].concat();
        assert!(decode_pfns(&overlapping, 1000).is_err());
        let mut empty = encode_pfns(&[5]);
        empty[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode_pfns(&empty, 1000).is_err());
        let mut huge = encode_pfns(&[u64::MAX - 1]);
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_pfns(&huge, u64::MAX).is_err(), "overflowing run");
        assert_eq!(decode_pfns(&[], 10).expect("none"), Vec::<u64>::new());
    }

    #[test]
    fn module_code_travels_whole_and_lies_are_refused() {
        let codes: Vec<std::sync::Arc<[u8]>> = vec![b"(module)".to_vec().into(), vec![7u8; 1000].into()];
        let payload = encode_modules(&codes);
        let back = decode_modules(&payload).expect("decoded");
        assert_eq!(back, [&codes[0][..], &codes[1][..]]);
        assert_eq!(decode_modules(&encode_modules(&[])).expect("none"), Vec::<&[u8]>::new());
        // Cut short, a byte too many, a length past the end, too many modules, too much code.
        assert!(decode_modules(&payload[..payload.len() - 1]).is_err());
        assert!(decode_modules(&[payload.clone(), vec![0]].concat()).is_err());
        assert!(decode_modules(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode_modules(&[2]).is_err());
        assert!(decode_modules(&9u32.to_le_bytes()).is_err());
        let mut huge = 1u32.to_le_bytes().to_vec();
        huge.extend_from_slice(&(5u32 << 20).to_le_bytes());
        huge.resize(8 + (5 << 20), 0);
        let why = decode_modules(&huge).expect_err("too much code");
        assert!(why.contains("bytes of code"), "{why}");
    }

    #[test]
    fn requests_are_bounded() {
        assert_eq!(decode_request(&encode_request(&[7, 3]), 8).expect("decode"), [7, 3]);
        assert!(decode_request(&encode_request(&[8]), 8).is_err());
        assert!(decode_request(&encode_request(&vec![1; MAX_REQUEST + 1]), 8).is_err());
        assert!(decode_request(&[0; 7], 8).is_err());
    }
}
