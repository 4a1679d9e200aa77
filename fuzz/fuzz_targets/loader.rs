//! The ELF loader and its ABI note check (`host/src/loader.rs`) on any
//! file, and for an image it accepts, the template the host lays out from
//! it (`host/src/boot`).
//!
//! Checks, besides the absence of panics: an accepted image is what the
//! loader promises (the host's ABI version; 1 to `MAX_SEGMENTS` segments,
//! sorted, each inside `IMAGE_BASE..MAX_MEMORY` with no more file bytes
//! than memory and no page shared with another; the entry point in an
//! executable segment; the same fingerprint when parsed again). Its
//! template either does not fit the memory size, or maps every page of
//! every segment at its own address with the segment's permissions, and
//! nothing the guest can reach outside its RAM and its shared pages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_abi::layout::pte::{ADDR_MASK, NO_EXECUTE, USER, WRITABLE};
use shoal_abi::layout::{
    BOOT_INFO_PAGE, CLOCK_PAGE, DEFAULT_MEMORY, EVENT_PAGE, IMAGE_BASE, MAX_MEMORY, PAGE_SIZE,
};
use shoal_host::boot::{BootError, Template};
use shoal_host::loader::{Image, MAX_SEGMENTS, page_end, page_start};

fuzz_target!(|data: &[u8]| {
    let Ok(image) = Image::parse(data) else {
        return;
    };
    assert_eq!(image.abi_version(), shoal_abi::ABI_VERSION);
    let segments = image.segments();
    assert!(!segments.is_empty() && segments.len() <= MAX_SEGMENTS);
    for s in segments {
        assert!(s.vaddr >= IMAGE_BASE && s.mem_size > 0, "{s:?}");
        assert!(
            s.end() <= MAX_MEMORY,
            "segment past MAX_MEMORY: {:#x}",
            s.vaddr
        );
        assert!(s.data.len() as u64 <= s.mem_size);
    }
    for pair in segments.windows(2) {
        assert!(
            page_end(pair[0].end()) <= page_start(pair[1].vaddr),
            "segments share a page"
        );
    }
    let entry = image.entry();
    assert!(
        segments
            .iter()
            .any(|s| s.executable && (s.vaddr..s.end()).contains(&entry))
    );
    let again = Image::parse(data).expect("accepted once");
    assert_eq!(again.fingerprint(), image.fingerprint());

    // Only images that fit a small guest: a larger memory file costs the
    // target time, and the layout is the same.
    let template = match Template::build(&image, DEFAULT_MEMORY) {
        Ok(template) => template,
        Err(BootError::TooSmall { .. }) => return,
        Err(other) => panic!("an accepted image fails to lay out: {other}"),
    };
    let leaves = template.tables().leaves();
    for s in segments {
        for page in (page_start(s.vaddr)..page_end(s.end())).step_by(PAGE_SIZE as usize) {
            let (_, leaf) = leaves
                .iter()
                .find(|(vaddr, _)| *vaddr == page)
                .unwrap_or_else(|| panic!("page {page:#x} of a segment not mapped"));
            assert_eq!(
                leaf & ADDR_MASK,
                page,
                "segment page {page:#x} not at its own address"
            );
            assert_ne!(leaf & USER, 0);
            assert_eq!(leaf & WRITABLE != 0, s.writable, "page {page:#x}");
            assert_eq!(leaf & NO_EXECUTE == 0, s.executable, "page {page:#x}");
        }
    }
    for (vaddr, leaf) in &leaves {
        if leaf & USER == 0 {
            continue;
        }
        let frame = leaf & ADDR_MASK;
        assert_eq!(
            frame, *vaddr,
            "a template maps every page at its own address"
        );
        let shared = [BOOT_INFO_PAGE, CLOCK_PAGE, EVENT_PAGE].contains(&frame);
        assert!(
            shared || (IMAGE_BASE..DEFAULT_MEMORY).contains(&frame),
            "the guest reaches {frame:#x}"
        );
    }
});
