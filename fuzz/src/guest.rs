//! A guest without KVM, for the dispatcher and MMU targets: fresh RAM with
//! the `hello` guest's template mapped over it copy-on-write and its boot
//! info written, as a spawn makes it. And the checks both targets make on
//! that RAM afterwards: which bytes changed ([`Snapshot`]), and what the
//! page tables in RAM let the guest reach ([`check_tables`]).

use shoal_abi::layout::pte::{ACCESSED, ADDR_MASK, DIRTY, NO_EXECUTE, PRESENT, USER, WRITABLE};
use shoal_abi::layout::{
    BOOT_INFO_PAGE, CLOCK_PAGE, EVENT_PAGE, IMAGE_BASE, MIN_MEMORY, PAGE_SIZE, PAGE_TABLE_AREA_END,
    PAGE_TABLE_AREA_START, TRAPPED_TABLES_WINDOW,
};
use shoal_host::boot::{BootParams, Template};
use shoal_host::kvm::GuestRam;
use shoal_host::kvm::pagemap;
use shoal_host::mmu::{TABLES_ALIAS, TABLES_LEN};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

/// Guest RAM size: the smallest the host accepts.
pub const MEM: u64 = MIN_MEMORY;

/// Where a target writes its input into guest RAM: in the heap, past the
/// `hello` image and below the stack.
pub const INPUT_AT: u64 = IMAGE_BASE + 0x8_0000;

/// Most input bytes written at [`INPUT_AT`].
pub const INPUT_MAX: usize = 0x1_0000;

const PAGE: usize = PAGE_SIZE as usize;

static TEMPLATE: LazyLock<Template> = LazyLock::new(|| {
    let image = shoal_host::builtin::image("hello")
        .expect("hello is built in")
        .expect("hello passes the loader");
    assert!(image.end() <= INPUT_AT, "the hello image reaches INPUT_AT");
    Template::build(&image, MEM).expect("hello fits in MEM")
});

/// RAM as [`fresh_ram`] makes it, never written afterwards: what every
/// page of a fresh guest holds.
static REFERENCE: LazyLock<GuestRam> = LazyLock::new(fresh_ram);

/// The template's leaves, as [`leaves`] reads them from fresh RAM.
static TEMPLATE_LEAVES: LazyLock<Vec<Leaf>> = LazyLock::new(|| leaves(&REFERENCE));

/// The template's leaves without `USER`: the host's own mappings.
static HOST_LEAVES: LazyLock<Vec<Leaf>> = LazyLock::new(|| {
    let mut leaves = TEMPLATE_LEAVES.clone();
    leaves.retain(|[_, entry]| entry & USER == 0);
    leaves
});

/// The template every guest here starts from.
pub fn template() -> &'static Template {
    &TEMPLATE
}

/// Fresh RAM for guest 1, ready to run: the template mapped, the boot
/// info written.
pub fn fresh_ram() -> GuestRam {
    let mut ram = GuestRam::new(MEM).expect("guest RAM maps");
    let params = BootParams {
        guest_id: 1,
        features: 0,
        args: &[],
    };
    TEMPLATE
        .load(&mut ram, &params)
        .expect("the template loads");
    ram
}

/// Guest-physical addresses of the pages of `ram` that hold bytes of
/// their own: written since the RAM was mapped (neither the template
/// file's page nor the zero page). Every other page still reads as in a
/// fresh guest.
pub fn written_pages(ram: &GuestRam) -> BTreeSet<u64> {
    let base = ram.host_base();
    let mut pages = BTreeSet::new();
    pagemap::scan(base, ram.size(), |run, kinds| {
        let own = kinds & pagemap::PRESENT != 0 && kinds & (pagemap::FILE | pagemap::PFN_ZERO) == 0;
        if own {
            pages.extend((run.start - base..run.end - base).step_by(PAGE));
        }
    })
    .expect("PAGEMAP_SCAN works (Linux 6.7 or later)");
    pages
}

/// One page of RAM.
fn page(ram: &GuestRam, addr: u64) -> Box<[u8; PAGE]> {
    let mut bytes = Box::new([0u8; PAGE]);
    ram.read_host(addr, &mut bytes[..]).expect("inside RAM");
    bytes
}

/// The pages of a guest's RAM that differ from a fresh guest's, copied.
pub struct Snapshot {
    pages: BTreeMap<u64, Box<[u8; PAGE]>>,
}

impl Snapshot {
    /// Copies the pages of `ram` written so far.
    pub fn take(ram: &GuestRam) -> Self {
        let pages = written_pages(ram)
            .into_iter()
            .map(|addr| (addr, page(ram, addr)))
            .collect();
        Self { pages }
    }

    /// Every guest-physical address whose byte in `ram` differs from the
    /// snapshot, in order.
    pub fn changed(&self, ram: &GuestRam) -> Vec<u64> {
        let mut pages = written_pages(ram);
        pages.extend(self.pages.keys());
        let mut changed = Vec::new();
        for addr in pages {
            let before = match self.pages.get(&addr) {
                Some(bytes) => bytes.clone(),
                None => page(&REFERENCE, addr),
            };
            let after = page(ram, addr);
            if before == after {
                continue;
            }
            // Line by line, then byte by byte in the lines that differ:
            // each byte looked at costs the fuzzer's hooks.
            let lines = before.chunks_exact(64).zip(after.chunks_exact(64));
            for (line, (old, new)) in lines.enumerate() {
                if old != new {
                    let at = addr + line as u64 * 64;
                    changed.extend((0..64).filter(|&i| old[i] != new[i]).map(|i| at + i as u64));
                }
            }
        }
        changed
    }
}

/// A present leaf: virtual address, entry.
pub type Leaf = [u64; 2];

/// Every present leaf of the page tables in `ram`, in address order,
/// read as the CPU reads them from the template's root. Panics if an
/// upper-level entry leaves the page-table area, is not present but not
/// zero either, or maps a large page: the host never writes one.
pub fn leaves(ram: &GuestRam) -> Vec<Leaf> {
    let mut found = Vec::new();
    walk(ram, TEMPLATE.tables().root(), 39, 0, &mut found);
    found
}

fn walk(ram: &GuestRam, table: u64, shift: u32, base: u64, found: &mut Vec<Leaf>) {
    let bytes = page(ram, table);
    // Whole zero lines are skipped with one comparison: most of a table
    // is empty, and each entry looked at costs the fuzzer's hooks.
    for (line, entries) in bytes.chunks_exact(64).enumerate() {
        if entries == [0u8; 64] {
            continue;
        }
        for (i, entry) in entries.chunks_exact(8).enumerate() {
            let index = line * 8 + i;
            let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            if entry & PRESENT == 0 {
                assert_eq!(
                    entry, 0,
                    "a not-present entry with bits in table {table:#x}"
                );
                continue;
            }
            let vaddr = base | ((index as u64) << shift);
            if shift == 12 {
                found.push([vaddr, entry]);
                continue;
            }
            let next = entry & ADDR_MASK;
            assert!(
                (PAGE_TABLE_AREA_START..PAGE_TABLE_AREA_END).contains(&next),
                "an upper-level entry for {vaddr:#x} points outside the page-table area: {entry:#x}"
            );
            assert_eq!(
                entry & (1 << 7),
                0,
                "a large page at {vaddr:#x}: {entry:#x}"
            );
            walk(ram, next, shift - 9, vaddr, found);
        }
    }
}

/// Panics unless every leaf keeps the host's rules: only known bits; the
/// host's own leaves (no `USER`) exactly as the template has them; a
/// user leaf maps a guest-owned frame, or the boot info or clock page
/// read-only at its own address, or the event page at its own address,
/// or (with the trapped-tables window open) the window's page of the
/// page-table area's alias, read-only to the guest's data accesses
/// through KVM's read-only slot; writable leaves are dirty; no user leaf
/// below [`IMAGE_BASE`] but the template's.
pub fn check_tables(leaves: &[Leaf], window: bool) {
    if leaves == TEMPLATE_LEAVES.as_slice() {
        return;
    }
    let known = PRESENT | WRITABLE | USER | ACCESSED | DIRTY | NO_EXECUTE | ADDR_MASK;
    let host_now: Vec<Leaf> = leaves
        .iter()
        .filter(|[_, entry]| entry & USER == 0)
        .copied()
        .collect();
    assert_eq!(host_now, *HOST_LEAVES, "the host's own leaves changed");
    for &[vaddr, entry] in leaves {
        assert_eq!(
            entry & !known,
            0,
            "unknown bits in the leaf of {vaddr:#x}: {entry:#x}"
        );
        if entry & USER == 0 {
            continue;
        }
        let frame = entry & ADDR_MASK;
        let writable = entry & WRITABLE != 0;
        if writable {
            assert_ne!(entry & DIRTY, 0, "a writable leaf not dirty at {vaddr:#x}");
        }
        let in_window =
            (TRAPPED_TABLES_WINDOW..TRAPPED_TABLES_WINDOW + TABLES_LEN).contains(&vaddr);
        if window && in_window {
            assert_eq!(
                frame,
                TABLES_ALIAS + (vaddr - TRAPPED_TABLES_WINDOW),
                "window leaf {vaddr:#x}"
            );
            assert_ne!(
                entry & NO_EXECUTE,
                0,
                "an executable window leaf at {vaddr:#x}"
            );
            continue;
        }
        if frame < IMAGE_BASE {
            let shared = [BOOT_INFO_PAGE, CLOCK_PAGE, EVENT_PAGE].contains(&frame);
            assert!(
                shared && vaddr == frame,
                "the guest reaches host frame {frame:#x} at {vaddr:#x}: {entry:#x}"
            );
            assert!(
                frame == EVENT_PAGE || !writable,
                "the guest may write shared page {frame:#x}"
            );
            assert_ne!(entry & NO_EXECUTE, 0, "shared page {frame:#x} executable");
            continue;
        }
        assert!(
            frame < MEM,
            "the guest reaches {frame:#x}, past its RAM, at {vaddr:#x}"
        );
        assert!(
            vaddr >= IMAGE_BASE,
            "a guest frame mapped in the host's area at {vaddr:#x}"
        );
    }
}
