//! The guest-physical memory layout and the I/O ports of ABI v1.
//!
//! Guest RAM starts at guest-physical address 0. The host identity-maps it
//! (virtual address == physical address) before the first instruction, so a
//! guest pointer into its own RAM is also the guest-physical address that
//! hypercalls take.
//!
//! ```text
//! 0x0000_0000  null page            never mapped
//! 0x0000_1000  boot info page       user read-only   (BootInfo + arguments)
//! 0x0000_2000  clock page           user read-only   (ClockPage)
//! 0x0000_3000  event page           user read-write  (EventPage)
//! 0x0000_4000  host-reserved        never mapped to the guest (GDT, IDT,
//!  ..                               exception stubs, TSS, kernel stack)
//! 0x0001_0000  page-table frames    never mapped to the guest
//! 0x0010_0000  guest image          as the ELF segments say (R, RW, RX)
//!   ...        free memory          user read-write, no-execute ("heap")
//!   ...        guard page           never mapped
//!   ...        stack                user read-write, no-execute, grows down
//! mem_size     end of RAM
//! ```

/// Size of a page, the unit of every mapping.
pub const PAGE_SIZE: u64 = 4096;

/// The boot info page ([`crate::BootInfo`] followed by the arguments).
pub const BOOT_INFO_PAGE: u64 = 0x1000;
/// The clock page ([`crate::ClockPage`]).
pub const CLOCK_PAGE: u64 = 0x2000;
/// The event page ([`crate::EventPage`]).
pub const EVENT_PAGE: u64 = 0x3000;
/// Start of the host-reserved system area (descriptor tables, exception
/// stubs, TSS, the CPL0 stack). Never mapped at a user-accessible address.
pub const SYSTEM_AREA_START: u64 = 0x4000;
/// Start of the frames the host uses for the guest's page tables.
pub const PAGE_TABLE_AREA_START: u64 = 0x1_0000;
/// End (exclusive) of the page-table frames.
pub const PAGE_TABLE_AREA_END: u64 = IMAGE_BASE;
/// Lowest address a guest image may load at.
pub const IMAGE_BASE: u64 = 0x10_0000;

/// Default guest RAM size.
pub const DEFAULT_MEMORY: u64 = 4 << 20;
/// Smallest guest RAM size the host accepts.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Largest guest RAM size the host accepts in ABI v1.
pub const MAX_MEMORY: u64 = 256 << 20;
/// The stack the host gives the guest, at the top of RAM.
pub const STACK_SIZE: u64 = 128 << 10;

/// The hypercall port. A hypercall is `out dx, eax` with `dx` =
/// `HYPERCALL_PORT` and `eax` = the guest-physical address of the argument
/// block (a [`crate::HypercallHeader`] followed by the call's arguments).
/// Only 32-bit `out` is a hypercall.
pub const HYPERCALL_PORT: u16 = 0x500;

/// The null-exit port: a 32-bit `out` here exits to the host, which does
/// nothing and resumes the guest. It measures the raw exit floor that every
/// hypercall pays, and lets experimenters time an exit with no work.
pub const NULL_EXIT_PORT: u16 = 0x504;

/// The ports open to the guest in its TSS I/O bitmap: the hypercall,
/// null-exit and device notification ([`crate::device::NOTIFY_PORT`])
/// ports with the three ports after each (a 32-bit access checks four port
/// bits). Any other `in`/`out` faults with #GP.
pub const GUEST_PORTS: core::ops::Range<u16> = HYPERCALL_PORT..crate::device::NOTIFY_PORT + 4;

/// Ports the host's exception stubs use (`EXCEPTION_PORT_BASE + vector`,
/// below 256 so that a stub's `out imm8, al` touches no register). Closed
/// to the guest by the I/O bitmap.
pub const EXCEPTION_PORT_BASE: u16 = 0xe0;

/// Number of exception vectors the host reports (0..32).
pub const EXCEPTION_VECTORS: u16 = 32;

/// Where the trap-and-emulate experiment (feature `TRAPPED_PAGE_TABLES`)
/// shows the guest its page tables: the page-table area, page by page
/// from [`PAGE_TABLE_AREA_START`], so the root table is the window's first
/// page and a table at guest-physical `p` is at `window + p -
/// PAGE_TABLE_AREA_START`. Reads see the tables; an aligned 8-byte write
/// of a leaf entry traps to the host, which checks it by the rules of
/// `mmu_update` and applies it, or stops the guest. `mmu_update` cannot
/// map over the window.
pub const TRAPPED_TABLES_WINDOW: u64 = 0x7f00_0000_0000;

/// The bits of an x86-64 page-table entry that shoal's tables use: what a
/// guest reads, and writes, through [`TRAPPED_TABLES_WINDOW`].
pub mod pte {
    /// Present.
    pub const PRESENT: u64 = 1;
    /// Writable.
    pub const WRITABLE: u64 = 1 << 1;
    /// Reachable from CPL3 (set in every entry a guest can use).
    pub const USER: u64 = 1 << 2;
    /// Accessed: set by the CPU (here, KVM's shadow-paging walker) on first
    /// use. The host writes entries with it already set.
    pub const ACCESSED: u64 = 1 << 5;
    /// Dirty: set by the CPU on the first write through a leaf entry. The
    /// host writes writable leaves with it already set.
    pub const DIRTY: u64 = 1 << 6;
    /// Not executable.
    pub const NO_EXECUTE: u64 = 1 << 63;
    /// The frame address bits of an entry.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
}
