//! The guest's page tables, built and owned by the host.
//!
//! Four-level x86-64 tables with 4 KiB pages. Table frames come from the
//! page-table area, which is never mapped into the guest's address space,
//! so the guest can neither read nor write its own page tables. The host
//! keeps its own copy of every table and writes it to guest RAM.

use crate::kvm::memory::{GuestRam, MemoryError};
use shoal_abi::layout::{PAGE_SIZE, PAGE_TABLE_AREA_END, PAGE_TABLE_AREA_START};
use std::collections::BTreeMap;

pub use shoal_abi::layout::pte::{ACCESSED, ADDR_MASK, DIRTY, NO_EXECUTE, PRESENT, USER, WRITABLE};

/// The guest-physical address of `vaddr` if the guest's user mode can
/// reach it, read from the tables at `cr3` in `ram` as the CPU would
/// walk them (2 MiB and 1 GiB pages included).
pub fn user_address(ram: &GuestRam, cr3: u64, vaddr: u64) -> Option<u64> {
    const HUGE: u64 = 1 << 7;
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let index = (vaddr >> shift) & 511;
        let mut entry = [0u8; 8];
        ram.read_host(table + index * 8, &mut entry).ok()?;
        let entry = u64::from_le_bytes(entry);
        if entry & PRESENT == 0 || entry & USER == 0 {
            return None;
        }
        if level == 0 || (level < 3 && entry & HUGE != 0) {
            let size = 1u64 << shift;
            return Some((entry & ADDR_MASK & !(size - 1)) | (vaddr & (size - 1)));
        }
        table = entry & ADDR_MASK;
    }
    None
}

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
#[derive(Clone, Debug)]
pub struct PageTables {
    root: u64,
    next_frame: u64,
    tables: BTreeMap<u64, Box<[u64; 512]>>,
    /// Entries changed by [`PageTables::set_leaf`] and not yet written.
    dirty: Vec<(u64, usize)>,
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
            dirty: Vec::new(),
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

    /// Table frames still free in the page-table area.
    pub fn frames_left(&self) -> u64 {
        PAGE_TABLE_AREA_END.saturating_sub(self.next_frame) / PAGE_SIZE
    }

    /// Tables a mapping at `vaddr` would have to create (0 to 3).
    pub fn tables_needed(&self, vaddr: u64) -> u64 {
        let mut table = self.root;
        for (needed, level) in [39, 30, 21]
            .into_iter()
            .enumerate()
            .map(|(i, l)| (3 - i, l))
        {
            let index = ((vaddr >> level) & 511) as usize;
            let entry = self.tables.get(&table).map_or(0, |t| t[index]);
            if entry & PRESENT == 0 {
                return needed as u64;
            }
            table = entry & ADDR_MASK;
        }
        0
    }

    /// Replaces the leaf entry of `vaddr` with `entry` (0 unmaps),
    /// creating the tables on the way if `entry` is present. Returns the
    /// old entry and the place written: (table frame, index).
    pub fn set_leaf(&mut self, vaddr: u64, entry: u64) -> Result<(u64, (u64, usize)), PagingError> {
        if !vaddr.is_multiple_of(PAGE_SIZE) || vaddr >= 1 << 47 {
            return Err(PagingError::BadAddress(vaddr));
        }
        let mut table = self.root;
        for level in [39, 30, 21] {
            let index = ((vaddr >> level) & 511) as usize;
            let next = self.tables.get(&table).map_or(0, |t| t[index]);
            table = if next & PRESENT != 0 {
                next & ADDR_MASK
            } else if entry & PRESENT == 0 {
                return Ok((0, (table, index)));
            } else {
                let frame = self.alloc_table()?;
                self.dirty.push((table, index));
                if let Some(t) = self.tables.get_mut(&table) {
                    t[index] = frame | PRESENT | WRITABLE | USER | ACCESSED;
                }
                frame
            };
        }
        let index = ((vaddr >> 12) & 511) as usize;
        let old = self.tables.get(&table).map_or(0, |t| t[index]);
        if let Some(t) = self.tables.get_mut(&table) {
            t[index] = entry;
        }
        self.dirty.push((table, index));
        Ok((old, (table, index)))
    }

    /// Writes the entries changed since the last call into guest RAM.
    pub fn write_dirty(&mut self, ram: &GuestRam) -> Result<(), PagingError> {
        for (table, index) in self.dirty.drain(..) {
            let entry = self.tables.get(&table).map_or(0, |t| t[index]);
            ram.write_host(table + index as u64 * 8, &entry.to_le_bytes())?;
        }
        Ok(())
    }

    /// Every present leaf: (virtual address, entry).
    pub fn leaves(&self) -> Vec<(u64, u64)> {
        let mut found = Vec::new();
        self.walk(self.root, 39, 0, &mut found);
        found
    }

    fn walk(&self, table: u64, level: u32, base: u64, found: &mut Vec<(u64, u64)>) {
        let Some(entries) = self.tables.get(&table) else {
            return;
        };
        for (index, entry) in entries.iter().enumerate() {
            if entry & PRESENT == 0 {
                continue;
            }
            let vaddr = base | ((index as u64) << level);
            if level == 12 {
                found.push((vaddr, *entry));
            } else {
                self.walk(entry & ADDR_MASK, level - 9, vaddr, found);
            }
        }
    }

    /// Every leaf table: (its frame, the first virtual address it maps).
    pub fn leaf_tables(&self) -> Vec<(u64, u64)> {
        let mut found = Vec::new();
        let mut upper = vec![(self.root, 39u32, 0u64)];
        while let Some((table, level, base)) = upper.pop() {
            let Some(entries) = self.tables.get(&table) else {
                continue;
            };
            for (index, entry) in entries.iter().enumerate() {
                if entry & PRESENT == 0 {
                    continue;
                }
                let vaddr = base | ((index as u64) << level);
                if level == 21 {
                    found.push((entry & ADDR_MASK, vaddr));
                } else {
                    upper.push((entry & ADDR_MASK, level - 9, vaddr));
                }
            }
        }
        found
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
    fn set_leaf_reports_the_old_entry_and_tables_needed() {
        let mut pt = PageTables::new();
        assert_eq!(pt.tables_needed(0x40_0000_0000), 3);
        let entry = 0x20_0000 | PRESENT | USER;
        let (old, _) = pt.set_leaf(0x40_0000_0000, entry).expect("maps");
        assert_eq!(old, 0);
        assert_eq!(pt.frames(), 4);
        assert_eq!(pt.tables_needed(0x40_0000_1000), 0);
        assert_eq!(pt.tables_needed(0x40_0020_0000), 1);
        let (old, _) = pt.set_leaf(0x40_0000_0000, 0).expect("unmaps");
        assert_eq!(old, entry);
        assert_eq!(pt.leaf(0x40_0000_0000), 0);
        // Unmapping where no table exists creates none.
        let (old, _) = pt.set_leaf(0x7f_0000_0000, 0).expect("no-op");
        assert_eq!((old, pt.frames()), (0, 4));
        assert_eq!(pt.leaves(), vec![]);
        pt.map(0x10_0000, 0x10_0000, USER).expect("maps");
        assert_eq!(
            pt.leaves(),
            vec![(0x10_0000, 0x10_0000 | USER | PRESENT | ACCESSED)]
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
