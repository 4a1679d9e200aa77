//! The guest image loader: parses and checks a guest ELF once, so that many
//! guests can be started from the same [`Image`].
//!
//! An image is refused unless it is a little-endian x86-64 `ET_EXEC` ELF
//! that carries the shoal ABI note with the version this host speaks, and
//! whose loadable segments lie inside guest RAM above the image base, do not
//! overlap, and contain the entry point in an executable segment. The ELF
//! parser (`elf` crate) itself bounds-checks every table it reads.

use elf::ElfBytes;
use elf::abi::{EM_X86_64, ET_EXEC, PF_W, PF_X, PT_LOAD, PT_NOTE};
use elf::endian::AnyEndian;
use elf::file::Class;
use elf::note::Note;
use shoal_abi::ABI_VERSION;
use shoal_abi::layout::{IMAGE_BASE, MAX_MEMORY, PAGE_SIZE};
use shoal_abi::note::{NOTE_NAME, NOTE_TYPE_ABI_VERSION};
use std::path::Path;

/// Most loadable segments an image may have.
pub const MAX_SEGMENTS: usize = 16;

/// Why an image was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read guest image {path}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not a parseable ELF file.
    #[error("not a valid ELF file")]
    Parse(#[source] elf::ParseError),
    /// An ELF file of the wrong kind.
    #[error("not a 64-bit little-endian x86-64 executable (ET_EXEC) ELF file: {0}")]
    WrongKind(&'static str),
    /// No shoal ABI note.
    #[error("no shoal ABI note: was the guest built with the shoal guest SDK?")]
    NoAbiNote,
    /// The ABI note's descriptor is not a 4-byte version.
    #[error("malformed shoal ABI note")]
    BadAbiNote,
    /// Built for another ABI version.
    #[error("guest was built for ABI v{guest}, but this host speaks ABI v{host}")]
    AbiMismatch {
        /// The guest's version.
        guest: u32,
        /// The host's version.
        host: u32,
    },
    /// No loadable segment.
    #[error("no loadable segments")]
    NoSegments,
    /// Too many loadable segments.
    #[error("{0} loadable segments, at most {MAX_SEGMENTS} are allowed")]
    TooManySegments(usize),
    /// A segment's file bytes are not inside the file, or filesz > memsz.
    #[error("segment at {vaddr:#x}: file range or sizes are invalid")]
    BadSegmentData {
        /// The segment's address.
        vaddr: u64,
    },
    /// A segment lies outside the loadable range.
    #[error(
        "segment {vaddr:#x}..{end:#x} is outside the loadable range {IMAGE_BASE:#x}..{MAX_MEMORY:#x}"
    )]
    SegmentOutOfRange {
        /// Start.
        vaddr: u64,
        /// End (exclusive), saturated on overflow.
        end: u64,
    },
    /// Two segments share memory.
    #[error("segments at {a:#x} and {b:#x} overlap or share a page")]
    Overlap {
        /// One segment's start.
        a: u64,
        /// The other's.
        b: u64,
    },
    /// Entry point not inside an executable segment.
    #[error("entry point {0:#x} is not inside an executable segment")]
    BadEntry(u64),
}

/// One loadable segment, its bytes copied out of the file.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    /// Guest address of the first byte.
    pub vaddr: u64,
    /// Size in memory; bytes past `data.len()` are zero.
    pub mem_size: u64,
    /// The file bytes.
    pub data: Vec<u8>,
    /// Writable.
    pub writable: bool,
    /// Executable.
    pub executable: bool,
}

impl Segment {
    /// End address (exclusive).
    pub fn end(&self) -> u64 {
        self.vaddr + self.mem_size
    }
}

/// A checked guest image, ready to be loaded into any number of guests.
/// Immutable once checked, so the host can build its memory template once
/// and share it between every guest of the image.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Image {
    entry: u64,
    abi_version: u32,
    segments: Vec<Segment>,
    fingerprint: Fingerprint,
}

impl Image {
    /// Reads and checks the ELF file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes)
    }

    /// Checks an ELF image held in memory.
    pub fn parse(bytes: &[u8]) -> Result<Self, LoadError> {
        let file = ElfBytes::<AnyEndian>::minimal_parse(bytes).map_err(LoadError::Parse)?;
        let header = &file.ehdr;
        if header.class != Class::ELF64 {
            return Err(LoadError::WrongKind("not 64-bit"));
        }
        if header.endianness != AnyEndian::Little {
            return Err(LoadError::WrongKind("not little-endian"));
        }
        if header.e_machine != EM_X86_64 {
            return Err(LoadError::WrongKind("not x86-64"));
        }
        if header.e_type != ET_EXEC {
            return Err(LoadError::WrongKind("not ET_EXEC"));
        }
        let phdrs = file
            .segments()
            .ok_or(LoadError::NoSegments)?
            .iter()
            .collect::<Vec<_>>();

        let abi_version = find_abi_version(&file, &phdrs)?;
        if abi_version != ABI_VERSION {
            return Err(LoadError::AbiMismatch {
                guest: abi_version,
                host: ABI_VERSION,
            });
        }

        let loads: Vec<_> = phdrs
            .iter()
            .filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0)
            .collect();
        if loads.is_empty() {
            return Err(LoadError::NoSegments);
        }
        if loads.len() > MAX_SEGMENTS {
            return Err(LoadError::TooManySegments(loads.len()));
        }
        let mut segments = loads
            .into_iter()
            .map(|p| segment(bytes, p))
            .collect::<Result<Vec<_>, _>>()?;
        segments.sort_by_key(|s| s.vaddr);
        for pair in segments.windows(2) {
            if page_end(pair[0].end()) > page_start(pair[1].vaddr) {
                return Err(LoadError::Overlap {
                    a: pair[0].vaddr,
                    b: pair[1].vaddr,
                });
            }
        }
        let entry = header.e_entry;
        if !segments
            .iter()
            .any(|s| s.executable && (s.vaddr..s.end()).contains(&entry))
        {
            return Err(LoadError::BadEntry(entry));
        }
        let fingerprint = fingerprint(entry, abi_version, &segments);
        Ok(Image {
            entry,
            abi_version,
            segments,
            fingerprint,
        })
    }

    /// Entry point.
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// The ABI version from the note.
    pub fn abi_version(&self) -> u32 {
        self.abi_version
    }

    /// Loadable segments, sorted by address.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// A digest of everything loaded: equal images have equal
    /// fingerprints, and different ones different fingerprints (SHA-256:
    /// no one can make two images that share one, so a template or a
    /// shard's copy of an image found by it is that image's).
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// First byte of the image.
    pub fn start(&self) -> u64 {
        self.segments.first().map_or(IMAGE_BASE, |s| s.vaddr)
    }

    /// End of the image, rounded up to a page.
    pub fn end(&self) -> u64 {
        page_end(self.segments.last().map_or(IMAGE_BASE, Segment::end))
    }
}

/// An image's SHA-256 digest ([`Image::fingerprint`]).
pub type Fingerprint = [u8; 32];

/// The digest of what is loaded: the entry point, the ABI version, and
/// each segment's address, sizes, flags and bytes, each field of fixed
/// width or preceded by its length, so that no two images encode alike.
fn fingerprint(entry: u64, abi_version: u32, segments: &[Segment]) -> Fingerprint {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    digest.update(entry.to_le_bytes());
    digest.update(abi_version.to_le_bytes());
    digest.update((segments.len() as u64).to_le_bytes());
    for s in segments {
        digest.update(s.vaddr.to_le_bytes());
        digest.update(s.mem_size.to_le_bytes());
        digest.update([u8::from(s.writable), u8::from(s.executable)]);
        digest.update((s.data.len() as u64).to_le_bytes());
        digest.update(&s.data);
    }
    digest.finalize().into()
}

fn find_abi_version(
    file: &ElfBytes<'_, AnyEndian>,
    phdrs: &[elf::segment::ProgramHeader],
) -> Result<u32, LoadError> {
    let name = std::str::from_utf8(&NOTE_NAME[..NOTE_NAME.len() - 1]).unwrap_or("shoal");
    for phdr in phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
        let notes = file.segment_data_as_notes(phdr).map_err(LoadError::Parse)?;
        for note in notes {
            let Note::Unknown(note) = note else { continue };
            if note.n_type != u64::from(NOTE_TYPE_ABI_VERSION) || note.name_str().ok() != Some(name)
            {
                continue;
            }
            let desc: [u8; 4] = note.desc.try_into().map_err(|_| LoadError::BadAbiNote)?;
            return Ok(u32::from_le_bytes(desc));
        }
    }
    Err(LoadError::NoAbiNote)
}

fn segment(file: &[u8], p: &elf::segment::ProgramHeader) -> Result<Segment, LoadError> {
    let vaddr = p.p_vaddr;
    let end = vaddr.checked_add(p.p_memsz);
    if vaddr < IMAGE_BASE || end.is_none_or(|end| end > MAX_MEMORY) {
        return Err(LoadError::SegmentOutOfRange {
            vaddr,
            end: end.unwrap_or(u64::MAX),
        });
    }
    let bad = LoadError::BadSegmentData { vaddr };
    if p.p_filesz > p.p_memsz {
        return Err(bad);
    }
    let start = usize::try_from(p.p_offset).map_err(|_| LoadError::BadSegmentData { vaddr })?;
    let len = usize::try_from(p.p_filesz).map_err(|_| LoadError::BadSegmentData { vaddr })?;
    let data = start
        .checked_add(len)
        .and_then(|end| file.get(start..end))
        .ok_or(bad)?
        .to_vec();
    Ok(Segment {
        vaddr,
        mem_size: p.p_memsz,
        data,
        writable: p.p_flags & PF_W != 0,
        executable: p.p_flags & PF_X != 0,
    })
}

/// Rounds down to a page boundary.
pub fn page_start(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

/// Rounds up to a page boundary (addresses here are below `MAX_MEMORY`).
pub fn page_end(addr: u64) -> u64 {
    page_start(addr.saturating_add(PAGE_SIZE - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use elf::abi::PF_R;

    /// A loadable segment for [`elf_bytes`]: address, flags, file bytes,
    /// size in memory.
    struct Seg(u64, u32, Vec<u8>, u64);

    /// Builds an ELF64 x86-64 executable: header, program headers (the
    /// segments, then a PT_NOTE with the ABI note when `version` is set),
    /// then the segment data and the note.
    fn elf_bytes(entry: u64, segs: &[Seg], version: Option<u32>) -> Vec<u8> {
        let phnum = segs.len() + usize::from(version.is_some());
        let mut data_off = 64 + 56 * phnum as u64;
        let mut out = Vec::new();
        out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        out.extend_from_slice(&ET_EXEC.to_le_bytes());
        out.extend_from_slice(&EM_X86_64.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&entry.to_le_bytes());
        out.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for half in [64u16, 56, phnum as u16, 64, 0, 0] {
            out.extend_from_slice(&half.to_le_bytes());
        }
        let mut payload = Vec::new();
        let mut phdr =
            |p_type: u32, flags: u32, vaddr: u64, filesz: u64, memsz: u64, out: &mut Vec<u8>| {
                out.extend_from_slice(&p_type.to_le_bytes());
                out.extend_from_slice(&flags.to_le_bytes());
                let align = if p_type == PT_NOTE { 4 } else { 0x1000 };
                for word in [data_off, vaddr, vaddr, filesz, memsz, align] {
                    out.extend_from_slice(&word.to_le_bytes());
                }
                data_off += filesz;
            };
        for Seg(vaddr, flags, bytes, memsz) in segs {
            phdr(
                PT_LOAD,
                *flags,
                *vaddr,
                bytes.len() as u64,
                *memsz,
                &mut out,
            );
            payload.extend_from_slice(bytes);
        }
        if let Some(version) = version {
            let note = shoal_abi::note::AbiNote::new(version);
            let mut bytes = Vec::new();
            for word in [note.namesz, note.descsz, note.n_type] {
                bytes.extend_from_slice(&word.to_le_bytes());
            }
            bytes.extend_from_slice(&note.name);
            bytes.extend_from_slice(&note.version.to_le_bytes());
            phdr(
                PT_NOTE,
                PF_R,
                0,
                bytes.len() as u64,
                bytes.len() as u64,
                &mut out,
            );
            payload.extend_from_slice(&bytes);
        }
        out.extend_from_slice(&payload);
        out
    }

    fn text(vaddr: u64) -> Seg {
        Seg(vaddr, PF_R | PF_X, vec![0x90; 16], 16)
    }

    #[test]
    fn a_well_formed_image_loads() {
        let bytes = elf_bytes(
            IMAGE_BASE,
            &[
                text(IMAGE_BASE),
                Seg(IMAGE_BASE + 0x1000, PF_R | PF_W, vec![1; 8], 0x2000),
            ],
            Some(ABI_VERSION),
        );
        let image = Image::parse(&bytes).expect("valid");
        assert_eq!(image.entry, IMAGE_BASE);
        assert_eq!(image.segments.len(), 2);
        assert!(image.segments[1].writable && !image.segments[1].executable);
        assert_eq!(image.end(), IMAGE_BASE + 0x3000);
    }

    #[test]
    fn images_that_differ_in_anything_loaded_have_different_fingerprints() {
        let image = |entry: u64, flags: u32, byte: u8, memsz: u64| {
            let data = Seg(IMAGE_BASE + 0x1000, flags, vec![byte; 8], memsz);
            let bytes = elf_bytes(entry, &[text(IMAGE_BASE), data], Some(ABI_VERSION));
            Image::parse(&bytes).expect("valid").fingerprint()
        };
        let base = image(IMAGE_BASE, PF_R | PF_W, 1, 0x2000);
        assert_eq!(base, image(IMAGE_BASE, PF_R | PF_W, 1, 0x2000));
        for other in [
            image(IMAGE_BASE + 1, PF_R | PF_W, 1, 0x2000),
            image(IMAGE_BASE, PF_R, 1, 0x2000),
            image(IMAGE_BASE, PF_R | PF_W, 2, 0x2000),
            image(IMAGE_BASE, PF_R | PF_W, 1, 0x3000),
        ] {
            assert_ne!(base, other);
        }
        // A byte moved from one segment's data to the next's: the same
        // bytes in a row, told apart by the lengths.
        let split = |first: usize| {
            let bytes = elf_bytes(
                IMAGE_BASE,
                &[
                    Seg(IMAGE_BASE, PF_R | PF_X, vec![0x90; first], 0x1000),
                    Seg(IMAGE_BASE + 0x1000, PF_R, vec![0x90; 32 - first], 0x1000),
                ],
                Some(ABI_VERSION),
            );
            Image::parse(&bytes).expect("valid").fingerprint()
        };
        assert_ne!(split(16), split(17));
    }

    #[test]
    fn abi_version_mismatch_names_both_versions() {
        let bytes = elf_bytes(IMAGE_BASE, &[text(IMAGE_BASE)], Some(ABI_VERSION + 1));
        let err = Image::parse(&bytes).expect_err("refused");
        assert!(
            matches!(err, LoadError::AbiMismatch { guest, host } if guest == ABI_VERSION + 1 && host == ABI_VERSION)
        );
        assert_eq!(
            err.to_string(),
            format!(
                "guest was built for ABI v{}, but this host speaks ABI v{ABI_VERSION}",
                ABI_VERSION + 1
            )
        );
    }

    #[test]
    fn missing_note_is_refused() {
        let bytes = elf_bytes(IMAGE_BASE, &[text(IMAGE_BASE)], None);
        assert!(matches!(Image::parse(&bytes), Err(LoadError::NoAbiNote)));
    }

    #[test]
    fn overlapping_segments_are_refused() {
        let bytes = elf_bytes(
            IMAGE_BASE,
            &[text(IMAGE_BASE), Seg(IMAGE_BASE + 8, PF_R, vec![0; 8], 8)],
            Some(ABI_VERSION),
        );
        assert!(matches!(
            Image::parse(&bytes),
            Err(LoadError::Overlap { .. })
        ));
    }

    #[test]
    fn segments_outside_the_loadable_range_are_refused() {
        for vaddr in [0, 0x1000, IMAGE_BASE - 0x1000, MAX_MEMORY, u64::MAX - 8] {
            let bytes = elf_bytes(vaddr, &[text(vaddr)], Some(ABI_VERSION));
            assert!(
                matches!(
                    Image::parse(&bytes),
                    Err(LoadError::SegmentOutOfRange { .. })
                ),
                "{vaddr:#x}"
            );
        }
    }

    #[test]
    fn file_size_larger_than_memory_size_is_refused() {
        let bytes = elf_bytes(
            IMAGE_BASE,
            &[Seg(IMAGE_BASE, PF_R | PF_X, vec![0; 32], 16)],
            Some(ABI_VERSION),
        );
        assert!(matches!(
            Image::parse(&bytes),
            Err(LoadError::BadSegmentData { .. })
        ));
    }

    #[test]
    fn segment_data_past_the_end_of_the_file_is_refused() {
        let mut bytes = elf_bytes(IMAGE_BASE, &[text(IMAGE_BASE)], Some(ABI_VERSION));
        // Point the first segment's file offset far past the end.
        let offset = 64 + 8;
        bytes[offset..offset + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(Image::parse(&bytes).is_err());
    }

    #[test]
    fn entry_outside_executable_segments_is_refused() {
        let data = Seg(IMAGE_BASE + 0x1000, PF_R | PF_W, vec![0; 8], 8);
        for entry in [0, IMAGE_BASE + 0x1000, IMAGE_BASE + 16, u64::MAX] {
            let bytes = elf_bytes(
                entry,
                &[
                    text(IMAGE_BASE),
                    Seg(data.0, data.1, data.2.clone(), data.3),
                ],
                Some(ABI_VERSION),
            );
            assert!(
                matches!(Image::parse(&bytes), Err(LoadError::BadEntry(e)) if e == entry),
                "{entry:#x}"
            );
        }
    }

    #[test]
    fn wrong_kinds_of_file_are_refused() {
        assert!(matches!(
            Image::parse(b"not an elf"),
            Err(LoadError::Parse(_))
        ));
        assert!(matches!(Image::parse(&[]), Err(LoadError::Parse(_))));
        let good = elf_bytes(IMAGE_BASE, &[text(IMAGE_BASE)], Some(ABI_VERSION));
        let mut dynamic = good.clone();
        dynamic[16] = 3; // ET_DYN
        assert!(matches!(
            Image::parse(&dynamic),
            Err(LoadError::WrongKind(_))
        ));
        let mut arm = good.clone();
        arm[18] = 183; // EM_AARCH64
        assert!(matches!(Image::parse(&arm), Err(LoadError::WrongKind(_))));
        let mut truncated = good;
        truncated.truncate(100);
        assert!(Image::parse(&truncated).is_err());
    }

    #[test]
    fn too_many_segments_are_refused() {
        let segs: Vec<_> = (0..=MAX_SEGMENTS as u64)
            .map(|i| text(IMAGE_BASE + i * 0x1000))
            .collect();
        let bytes = elf_bytes(IMAGE_BASE, &segs, Some(ABI_VERSION));
        assert!(matches!(
            Image::parse(&bytes),
            Err(LoadError::TooManySegments(_))
        ));
    }
}
