//! The example guests built from `guest-kernels/` and embedded in the host.

use crate::loader::{Image, LoadError};

include!(concat!(env!("OUT_DIR"), "/builtin_guests.rs"));

/// The ELF bytes of the built-in guest `name`.
pub fn elf(name: &str) -> Option<&'static [u8]> {
    GUESTS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, elf)| *elf)
}

/// The checked image of the built-in guest `name`.
pub fn image(name: &str) -> Option<Result<Image, LoadError>> {
    elf(name).map(Image::parse)
}

/// Names and descriptions of every built-in guest.
pub fn list() -> impl Iterator<Item = (&'static str, &'static str)> {
    GUESTS
        .iter()
        .map(|(name, description, _)| (*name, *description))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_guest_passes_the_loader() {
        for (name, _) in list() {
            let image = image(name)
                .expect("listed")
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(image.abi_version(), shoal_abi::ABI_VERSION);
            assert!(image.entry() >= shoal_abi::layout::IMAGE_BASE);
        }
    }
}
