//! A VM's state as the list of its components' sections, and its file form `vm.state`
//! (docs/snapshot-format.md), which is also the payload of a migration's STATE frame.
//!
//! Version 2 (written now): after the magic and version, one framed section per component
//! part, each naming its kind, instance and body layout version, then END. Version 1 (written
//! by xcloud before the component split) had one fixed tag per part; it is read into the same
//! tree, each part as layout version 1 of its kind, so its snapshots still restore.

use crate::error::StateError;
use crate::format::{Fields, FormatError, SectionReader, SectionWriter};
use crate::persist::Persist;

/// The magic of a `vm.state` file.
pub const MAGIC: &[u8; 8] = b"XCLDSNAP";
/// The `vm.state` version written now.
pub const VERSION: u32 = 2;
/// The oldest `vm.state` version read.
pub const OLDEST_VERSION: u32 = 1;
/// Longest section kind.
pub const MAX_KIND: usize = 32;

const WHAT: &str = "vm.state";
const TAG_COMPONENT: u32 = 5;
const TAG_END: u32 = 0xffff_ffff;
/// Version 1's fixed tags and the kinds they are read as.
const V1_TAGS: [(u32, &str); 4] = [(1, "machine"), (2, "vcpu"), (3, "irqchip"), (4, "serial")];

/// One part's saved state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// What kind of part ("vcpu", "serial").
    pub kind: String,
    /// Which of the parts of that kind (a vCPU's index; 0 for a single device).
    pub instance: u32,
    /// The layout version of `body`.
    pub version: u32,
    /// The part's state, as its [`Persist`] implementation wrote it.
    pub body: Vec<u8>,
}

/// The saved state of a whole VM: its components' sections, in the order they were saved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateTree {
    sections: Vec<Section>,
}

fn malformed(detail: String) -> FormatError {
    FormatError::Malformed { what: WHAT, detail }
}

impl StateTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a section; a second section of the same kind and instance is refused.
    pub fn put(&mut self, section: Section) -> Result<(), StateError> {
        if section.kind.is_empty() || section.kind.len() > MAX_KIND || !section.kind.is_ascii() {
            return Err(malformed(format!("a section kind of {} bytes", section.kind.len())).into());
        }
        if self.position(&section.kind, section.instance).is_some() {
            return Err(StateError::Duplicate {
                kind: section.kind,
                instance: section.instance,
            });
        }
        self.sections.push(section);
        Ok(())
    }

    /// Adds `state` as instance `instance` of its kind, at its current layout version.
    pub fn save<T: Persist>(&mut self, instance: u32, state: &T) -> Result<(), StateError> {
        self.put(Section {
            kind: T::KIND.to_string(),
            instance,
            version: T::VERSION,
            body: state.encode(),
        })
    }

    fn position(&self, kind: &str, instance: u32) -> Option<usize> {
        self.sections
            .iter()
            .position(|s| s.kind == kind && s.instance == instance)
    }

    /// Removes and returns instance `instance` of `kind`, if present.
    pub fn take(&mut self, kind: &str, instance: u32) -> Option<Section> {
        self.position(kind, instance).map(|i| self.sections.remove(i))
    }

    /// Removes and decodes instance `instance` of `T`'s kind; `None` if there is none.
    pub fn load<T: Persist>(&mut self, instance: u32) -> Result<Option<T>, StateError> {
        let Some(section) = self.take(T::KIND, instance) else {
            return Ok(None);
        };
        T::decode(section.version, &section.body)
            .map(Some)
            .map_err(|source| StateError::Section {
                kind: section.kind,
                instance,
                source,
            })
    }

    /// Decodes instance `instance` of `T`'s kind and leaves it in the tree (for a part that
    /// must be read before the part that takes it is built); a missing section is an error.
    pub fn peek<T: Persist>(&self, instance: u32) -> Result<T, StateError> {
        let section = self
            .position(T::KIND, instance)
            .map(|i| &self.sections[i])
            .ok_or(StateError::Missing {
                kind: T::KIND,
                instance,
            })?;
        T::decode(section.version, &section.body).map_err(|source| StateError::Section {
            kind: section.kind.clone(),
            instance,
            source,
        })
    }

    /// Like [`StateTree::load`], but a missing section is an error.
    pub fn require<T: Persist>(&mut self, instance: u32) -> Result<T, StateError> {
        self.load(instance)?.ok_or(StateError::Missing {
            kind: T::KIND,
            instance,
        })
    }

    /// The sections still in the tree.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// Succeeds if every section was taken: a restore that left one behind would lose state.
    pub fn ensure_all_taken(&self) -> Result<(), StateError> {
        match self.sections.first() {
            None => Ok(()),
            Some(s) => Err(StateError::Unclaimed {
                kind: s.kind.clone(),
                instance: s.instance,
            }),
        }
    }

    /// The `vm.state` bytes (version 2).
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let mut w = SectionWriter::new(Vec::new(), WHAT, MAGIC, VERSION)?;
        let mut payload = Vec::new();
        for s in &self.sections {
            payload.clear();
            // `put` keeps kinds at 1..=MAX_KIND bytes, so the length fits a byte.
            payload.push(s.kind.len() as u8);
            payload.extend_from_slice(s.kind.as_bytes());
            payload.extend_from_slice(&s.instance.to_le_bytes());
            payload.extend_from_slice(&s.version.to_le_bytes());
            payload.extend_from_slice(&s.body);
            w.section(TAG_COMPONENT, &payload)?;
        }
        Ok(w.finish(TAG_END)?)
    }

    /// Parses `vm.state` bytes of version 1 or 2, checking every section's framing and
    /// checksum (the bodies are checked by their components when restored).
    pub fn decode(data: &[u8]) -> Result<Self, StateError> {
        let version = file_version(data);
        let mut r = SectionReader::new(data, WHAT, MAGIC, version)?;
        let mut tree = Self::new();
        let mut ended = false;
        while let Some((tag, payload)) = r.next_section()? {
            if ended {
                return Err(malformed("data after the END section".into()).into());
            }
            if tag == TAG_END {
                ended = true;
                continue;
            }
            let section = if version == 1 {
                v1_section(&tree, tag, payload)?
            } else if tag == TAG_COMPONENT {
                component_section(payload)?
            } else {
                return Err(malformed(format!("unknown section tag {tag}")).into());
            };
            tree.put(section)?;
        }
        if !ended {
            return Err(FormatError::Truncated {
                what: WHAT,
                detail: "no END section".into(),
            }
            .into());
        }
        Ok(tree)
    }
}

/// The version a `vm.state` claims if it is one this reader knows; otherwise the current one,
/// so that the reader's error names what it supports.
fn file_version(data: &[u8]) -> u32 {
    match data.get(8..12) {
        Some(&[a, b, c, d]) => {
            let v = u32::from_le_bytes([a, b, c, d]);
            if (OLDEST_VERSION..=VERSION).contains(&v) {
                v
            } else {
                VERSION
            }
        }
        _ => VERSION,
    }
}

fn component_section(payload: &[u8]) -> Result<Section, FormatError> {
    let mut f = Fields::new(payload, WHAT);
    let len = f.u8()? as usize;
    let kind = f.bytes(len)?;
    if kind.is_empty() || len > MAX_KIND || !kind.iter().all(|b| b.is_ascii_graphic()) {
        return Err(malformed(format!(
            "a section kind of {len} bytes that is not plain ASCII"
        )));
    }
    let instance = f.u32()?;
    let version = f.u32()?;
    Ok(Section {
        kind: String::from_utf8_lossy(kind).into_owned(),
        instance,
        version,
        body: f.rest().to_vec(),
    })
}

/// A version 1 section as the tree's section: its kind from the tag, its instance counted in
/// file order (version 1 wrote vCPUs and irqchips in index order), layout version 1.
fn v1_section(tree: &StateTree, tag: u32, payload: &[u8]) -> Result<Section, FormatError> {
    let kind = V1_TAGS
        .iter()
        .find(|(t, _)| *t == tag)
        .map(|(_, k)| *k)
        .ok_or_else(|| malformed(format!("unknown section {tag}")))?;
    let instance = tree.sections.iter().filter(|s| s.kind == kind).count() as u32;
    Ok(Section {
        kind: kind.to_string(),
        instance,
        version: 1,
        body: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter(u64);

    impl Persist for Counter {
        const KIND: &'static str = "counter";
        const VERSION: u32 = 2;
        fn encode(&self) -> Vec<u8> {
            self.0.to_le_bytes().to_vec()
        }
        fn decode(version: u32, body: &[u8]) -> Result<Self, FormatError> {
            let mut f = Fields::new(body, "counter");
            let value = match version {
                1 => f.u32()? as u64,
                2 => f.u64()?,
                other => return Err(crate::persist::unknown_version::<Self>(other)),
            };
            f.finish()?;
            Ok(Counter(value))
        }
    }

    fn flat(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }

    fn sample() -> StateTree {
        let mut tree = StateTree::new();
        tree.save(0, &Counter(7)).expect("save");
        tree.save(1, &Counter(u64::MAX)).expect("save");
        tree
    }

    #[test]
    fn a_tree_round_trips_and_every_section_must_be_taken() {
        let bytes = sample().encode().expect("encode");
        let mut back = StateTree::decode(&bytes).expect("decode");
        assert_eq!(back, sample());
        assert_eq!(back.peek::<Counter>(1).expect("counter 1, left in").0, u64::MAX);
        assert_eq!(back.require::<Counter>(1).expect("counter 1").0, u64::MAX);
        assert!(matches!(
            back.ensure_all_taken(),
            Err(StateError::Unclaimed { instance: 0, .. })
        ));
        assert_eq!(back.require::<Counter>(0).expect("counter 0").0, 7);
        back.ensure_all_taken().expect("all taken");
        assert!(matches!(
            back.require::<Counter>(0),
            Err(StateError::Missing { kind: "counter", .. })
        ));
    }

    #[test]
    fn old_layouts_are_read_and_unknown_ones_refused() {
        let mut tree = StateTree::new();
        for (instance, version, body) in [(0, 1, 5u32.to_le_bytes().to_vec()), (1, 9, vec![])] {
            tree.put(Section {
                kind: "counter".into(),
                instance,
                version,
                body,
            })
            .expect("put");
        }
        assert_eq!(tree.require::<Counter>(0).expect("version 1").0, 5);
        let err = tree.require::<Counter>(1).err().expect("version 9 refused");
        assert!(
            flat(&err).contains("counter format version 9 is not supported"),
            "{err}"
        );
    }

    #[test]
    fn duplicates_and_bad_kinds_are_refused() {
        let mut tree = sample();
        assert!(matches!(tree.save(1, &Counter(1)), Err(StateError::Duplicate { .. })));
        let bad = Section {
            kind: "x".repeat(33),
            instance: 0,
            version: 1,
            body: vec![],
        };
        assert!(tree.put(bad).is_err());
    }

    #[test]
    fn a_version_1_file_is_read_as_version_1_sections_in_file_order() {
        let mut w = SectionWriter::new(Vec::new(), WHAT, MAGIC, 1).expect("writer");
        w.section(1, b"config").expect("section");
        w.section(2, b"vcpu0").expect("section");
        w.section(2, b"vcpu1").expect("section");
        w.section(3, b"chip0").expect("section");
        w.section(4, b"uart").expect("section");
        let bytes = w.finish(TAG_END).expect("finish");
        let tree = StateTree::decode(&bytes).expect("decode");
        let got: Vec<(&str, u32, u32, &[u8])> = tree
            .sections()
            .iter()
            .map(|s| (s.kind.as_str(), s.instance, s.version, s.body.as_slice()))
            .collect();
        assert_eq!(
            got,
            [
                ("machine", 0, 1, &b"config"[..]),
                ("vcpu", 0, 1, b"vcpu0"),
                ("vcpu", 1, 1, b"vcpu1"),
                ("irqchip", 0, 1, b"chip0"),
                ("serial", 0, 1, b"uart"),
            ]
        );
    }

    #[test]
    fn mutated_files_never_panic_and_are_all_refused() {
        let good = sample().encode().expect("encode");
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5_000 {
            let mut bad = good.clone();
            for _ in 0..(1 + next() % 4) {
                let at = (next() as usize) % bad.len();
                bad[at] = next() as u8;
            }
            if next() % 5 == 0 {
                bad.truncate((next() as usize) % good.len());
            }
            if bad != good {
                assert!(StateTree::decode(&bad).is_err(), "a mutation was accepted");
            }
        }
    }
}
