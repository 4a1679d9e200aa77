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
    #[error("segments at {a:#x} and {b:#x} overlap")]
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
#[derive(Clone, Debug)]
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
#[derive(Clone, Debug)]
pub struct Image {
    /// Entry point.
    pub entry: u64,
    /// The ABI version from the note.
    pub abi_version: u32,
    /// Loadable segments, sorted by address.
    pub segments: Vec<Segment>,
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
        Ok(Image {
            entry,
            abi_version,
            segments,
        })
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
