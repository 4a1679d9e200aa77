//! The ELF note every guest image carries.
//!
//! A note of type [`NOTE_TYPE_ABI_VERSION`] with name [`NOTE_NAME`] whose
//! descriptor is the little-endian `u32` ABI version the guest was built
//! for, in a section named [`NOTE_SECTION`] covered by a `PT_NOTE` program
//! header. The host refuses an image without it, or with a version it does
//! not speak.

/// Note name, NUL included.
pub const NOTE_NAME: &[u8] = b"shoal\0";
/// Note type of the ABI version note.
pub const NOTE_TYPE_ABI_VERSION: u32 = 1;
/// Section the SDK puts the note in.
pub const NOTE_SECTION: &str = ".note.shoal";

/// The whole note as it sits in the image: header, padded name, descriptor.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbiNote {
    /// Length of the name, NUL included (6).
    pub namesz: u32,
    /// Length of the descriptor (4).
    pub descsz: u32,
    /// [`NOTE_TYPE_ABI_VERSION`].
    pub n_type: u32,
    /// "shoal\0" padded to 8 bytes.
    pub name: [u8; 8],
    /// The ABI version.
    pub version: u32,
}
const _: () = assert!(core::mem::size_of::<AbiNote>() == 24);

impl AbiNote {
    /// The note for `version`.
    pub const fn new(version: u32) -> Self {
        Self {
            namesz: NOTE_NAME.len() as u32,
            descsz: 4,
            n_type: NOTE_TYPE_ABI_VERSION,
            name: *b"shoal\0\0\0",
            version,
        }
    }
}
