//! The guest's page tables, built and owned by the host.
//!
//! Four-level x86-64 tables with 4 KiB pages. Table frames come from the
//! page-table area, which is never mapped into the guest's address space,
//! so the guest can neither read nor write its own page tables. The host
//! keeps its own copy of every table and writes it to guest RAM.

use crate::kvm::memory::{GuestRam, MemoryError};
use shoal_abi::layout::{PAGE_SIZE, PAGE_TABLE_AREA_END, PAGE_TABLE_AREA_START};
use std::collections::BTreeMap;

/// Present.
pub const PRESENT: u64 = 1;
/// Writable.
pub const WRITABLE: u64 = 1 << 1;
/// Reachable from CPL3.
pub const USER: u64 = 1 << 2;
/// Accessed: set by the CPU (here, KVM's shadow-paging walker) on first use.
pub const ACCESSED: u64 = 1 << 5;
/// Dirty: set by the CPU on the first write through a leaf entry.
pub const DIRTY: u64 = 1 << 6;
/// Not executable.
pub const NO_EXECUTE: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Why a mapping could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// The page-table area is full.
    #[error("out of page-table frames")]
    OutOfFrames,
    /// Address not page-aligned or not canonical lower-half.
    #[error("address {0:#x} cannot be mapped")]
    BadAddress(u64),
    /// Writing the tables to guest RAM failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// A guest's page tables.
#[derive(Debug)]
pub struct PageTables {
    root: u64,
    next_frame: u64,
    tables: BTreeMap<u64, Box<[u64; 512]>>,
}

impl PageTables {
    /// Empty tables with a root in the first page-table frame.
    pub fn new() -> Self {
        let mut tables = BTreeMap::new();
        tables.insert(PAGE_TABLE_AREA_START, Box::new([0; 512]));
        Self {
            root: PAGE_TABLE_AREA_START,
            next_frame: PAGE_TABLE_AREA_START + PAGE_SIZE,
            tables,
        }
    }

    /// The guest-physical address of the root table (CR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Number of table frames in use.
    pub fn frames(&self) -> usize {
        self.tables.len()
    }

    fn alloc_table(&mut self) -> Result<u64, PagingError> {
        if self.next_frame >= PAGE_TABLE_AREA_END {
            return Err(PagingError::OutOfFrames);
        }
        let frame = self.next_frame;
        self.next_frame += PAGE_SIZE;
        self.tables.insert(frame, Box::new([0; 512]));
        Ok(frame)
    }

    /// Maps the page at `vaddr` to the frame at `paddr` with `flags`
    /// (PRESENT is implied). Intermediate tables allow everything; the leaf
    /// decides.
    ///
    /// Every entry is written already accessed, and writable leaves
    /// already dirty: otherwise KVM's walker sets those bits on the
    /// guest's first touch, a write to a table frame that every guest of
    /// a template shares copy-on-write, which copies the frame and calls
    /// every VM's MMU notifier in the process.
    pub fn map(&mut self, vaddr: u64, paddr: u64, flags: u64) -> Result<(), PagingError> {
        if !vaddr.is_multiple_of(PAGE_SIZE) || vaddr >= 1 << 47 {
            return Err(PagingError::BadAddress(vaddr));
        }
        if !paddr.is_multiple_of(PAGE_SIZE) || paddr & !ADDR_MASK != 0 {
            return Err(PagingError::BadAddress(paddr));
        }
        let mut table = self.root;
        for level in [39, 30, 21] {
            let index = ((vaddr >> level) & 511) as usize;
            let entry = self.tables.get(&table).map_or(0, |t| t[index]);
            table = if entry & PRESENT != 0 {
                entry & ADDR_MASK
            } else {
                let next = self.alloc_table()?;
                if let Some(t) = self.tables.get_mut(&table) {
                    t[index] = next | PRESENT | WRITABLE | USER | ACCESSED;
                }
                next
            };
        }
        let index = ((vaddr >> 12) & 511) as usize;
        let dirty = if flags & WRITABLE != 0 { DIRTY } else { 0 };
        if let Some(t) = self.tables.get_mut(&table) {
            t[index] = paddr | flags | PRESENT | ACCESSED | dirty;
        }
        Ok(())
    }

    /// Maps `start..end` (page-aligned) to itself.
    pub fn identity(&mut self, start: u64, end: u64, flags: u64) -> Result<(), PagingError> {
        (start..end)
            .step_by(PAGE_SIZE as usize)
            .try_for_each(|page| self.map(page, page, flags))
    }

    /// Looks up the leaf entry for `vaddr` (0 when unmapped).
    pub fn leaf(&self, vaddr: u64) -> u64 {
        let mut table = self.root;
        for level in [39, 30, 21] {
            let index = ((vaddr >> level) & 511) as usize;
            let entry = self.tables.get(&table).map_or(0, |t| t[index]);
            if entry & PRESENT == 0 {
                return 0;
            }
            table = entry & ADDR_MASK;
        }
        self.tables
            .get(&table)
            .map_or(0, |t| t[((vaddr >> 12) & 511) as usize])
    }

    /// Writes every table into guest RAM.
    pub fn write(&self, ram: &GuestRam) -> Result<(), PagingError> {
        for (frame, table) in &self.tables {
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
            ram.write_host(*frame, &bytes)?;
        }
        Ok(())
    }
}

impl Default for PageTables {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_builds_four_levels_from_the_page_table_area() {
        let mut pt = PageTables::new();
        pt.map(0x10_0000, 0x10_0000, USER).expect("maps");
        assert_eq!(pt.frames(), 4);
        assert_eq!(pt.leaf(0x10_0000), 0x10_0000 | USER | PRESENT | ACCESSED);
        assert_eq!(pt.leaf(0x10_1000), 0);
        pt.map(0x10_1000, 0x20_0000, WRITABLE | NO_EXECUTE)
            .expect("maps");
        assert_eq!(pt.frames(), 4, "same leaf table reused");
        assert_eq!(
            pt.leaf(0x10_1000),
            0x20_0000 | WRITABLE | NO_EXECUTE | PRESENT | ACCESSED | DIRTY
        );
    }

    #[test]
    fn map_refuses_unaligned_and_non_canonical_addresses() {
        let mut pt = PageTables::new();
        assert!(pt.map(0x1001, 0x1000, 0).is_err());
        assert!(pt.map(1 << 47, 0x1000, 0).is_err());
        assert!(pt.map(0x1000, 1 << 52, 0).is_err());
    }

    #[test]
    fn table_frames_run_out_instead_of_overflowing_the_area() {
        let mut pt = PageTables::new();
        // Every 2 MiB of address space needs a fresh leaf table.
        let result = (0..1000u64).try_for_each(|i| pt.map(i << 21, 0x1000, 0));
        assert!(matches!(result, Err(PagingError::OutOfFrames)));
        assert!(pt.frames() as u64 <= (PAGE_TABLE_AREA_END - PAGE_TABLE_AREA_START) / PAGE_SIZE);
    }
}
