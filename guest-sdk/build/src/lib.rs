//! Build support for shoal guests.
//!
//! A guest crate calls [`link`] from its `build.rs`:
//!
//! ```no_run
//! // build.rs of a guest kernel, whose body is this one call:
//! shoal_guest_build::link();
//! ```
//!
//! It writes the SDK's linker script to `OUT_DIR` and tells cargo to link
//! the crate's binaries with it as static, non-PIE executables without the C
//! runtime's start files or libraries. Code generation needs no flags: the
//! default position-independent code links fine into a static executable,
//! and the red zone is safe because the guest runs at CPL3, where every
//! exception switches to the host's CPL0 stack instead of pushing onto the
//! guest's.

use std::path::PathBuf;

/// The linker script: the image starts at the ABI's image base; text,
/// read-only data (with the ABI note) and read-write data go to three
/// page-aligned segments with W^X permissions.
pub const LINKER_SCRIPT: &str = include_str!("guest.ld");

/// Emits the link arguments for a shoal guest. Call it from `build.rs`.
///
/// # Panics
/// If `OUT_DIR` is not set or the script cannot be written: both mean the
/// function is not running inside a cargo build script.
pub fn link() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set in build scripts"));
    let script = out.join("shoal-guest.ld");
    std::fs::write(&script, LINKER_SCRIPT).expect("OUT_DIR is writable in build scripts");
    for arg in link_args(&script.display().to_string()) {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// The linker driver arguments for a guest linked with the script at `script`.
pub fn link_args(script: &str) -> Vec<String> {
    [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
        "-Wl,-z,max-page-size=4096",
    ]
    .into_iter()
    .map(String::from)
    .chain([format!("-Wl,-T,{script}")])
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_args_disable_pie_and_name_the_script() {
        let args = link_args("/x/guest.ld");
        assert!(args.iter().any(|a| a == "-no-pie"));
        assert!(args.iter().any(|a| a == "-nostartfiles"));
        assert_eq!(args.last().map(String::as_str), Some("-Wl,-T,/x/guest.ld"));
    }

    #[test]
    fn linker_script_keeps_the_abi_note_and_starts_at_image_base() {
        assert!(LINKER_SCRIPT.contains("KEEP(*(.note.shoal))"));
        assert!(LINKER_SCRIPT.contains("0x100000"));
        assert!(LINKER_SCRIPT.contains("*(.got .got.*)"));
    }
}
