//! Small ELF images for the loader's seeds: an ELF64 x86-64 executable
//! header, the program headers (the loadable segments, then a `PT_NOTE`
//! with the shoal ABI note), the segments' bytes and the note.

/// A loadable segment: address, `p_flags`, file bytes, size in memory.
pub struct Segment {
    /// Guest address.
    pub vaddr: u64,
    /// `PF_R`, `PF_W`, `PF_X` bits.
    pub flags: u32,
    /// The bytes in the file.
    pub data: Vec<u8>,
    /// Size in memory (at least `data.len()` for a valid image).
    pub mem_size: u64,
}

/// `PF_X`.
pub const PF_X: u32 = 1;
/// `PF_W`.
pub const PF_W: u32 = 2;
/// `PF_R`.
pub const PF_R: u32 = 4;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// An executable entering at `entry` with `segments`, and the ABI note of
/// `version` if there is one.
pub fn image(entry: u64, segments: &[Segment], version: Option<u32>) -> Vec<u8> {
    let phnum = segments.len() + usize::from(version.is_some());
    let mut data_at = 64 + 56 * phnum as u64;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, phnum as u16, 64, 0, 0] {
        out.extend_from_slice(&half.to_le_bytes());
    }
    let mut payload = Vec::new();
    let mut phdr = |p_type: u32, flags: u32, vaddr: u64, bytes: &[u8], mem_size: u64| {
        out.extend_from_slice(&p_type.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        let align = if p_type == PT_NOTE { 4 } else { 0x1000 };
        let file_size = bytes.len() as u64;
        for word in [data_at, vaddr, vaddr, file_size, mem_size, align] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        data_at += file_size;
        payload.extend_from_slice(bytes);
    };
    for s in segments {
        phdr(PT_LOAD, s.flags, s.vaddr, &s.data, s.mem_size);
    }
    if let Some(version) = version {
        let note = shoal_abi::note::AbiNote::new(version);
        let mut bytes = Vec::new();
        for word in [note.namesz, note.descsz, note.n_type] {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes.extend_from_slice(&note.name);
        bytes.extend_from_slice(&note.version.to_le_bytes());
        let len = bytes.len() as u64;
        phdr(PT_NOTE, PF_R, 0, &bytes, len);
    }
    out.extend_from_slice(&payload);
    out
}
