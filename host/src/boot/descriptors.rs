//! The guest's descriptor tables, TSS and exception stubs, in the
//! host-reserved system area (never mapped at a user-accessible address).
//!
//! - GDT: kernel code/data (for the stubs), user code/data (the guest), TSS.
//! - TSS: `rsp0` (the host's CPL0 stack for exception delivery) and an I/O
//!   permission bitmap that opens only the ABI's guest ports.
//! - IDT: 32 interrupt gates (DPL 0, so `int n` from the guest is a #GP) to
//!   16-byte stubs. Each stub runs at CPL0, which PVM emulates instruction
//!   by instruction, so it is one instruction: `out EXCEPTION_PORT_BASE +
//!   vector, al`, which changes no register. The host finds the exception
//!   frame at the stub's `rsp` in the registers KVM leaves in the `kvm_run`
//!   page, and either stops the guest or resumes it at CPL3 in its handler
//!   (the stub never runs further).

use crate::kvm::memory::{GuestRam, MemoryError};
use crate::kvm::vcpu::selector;
use shoal_abi::layout::{EXCEPTION_PORT_BASE, EXCEPTION_VECTORS, GUEST_PORTS};

/// Guest-physical address of the GDT.
pub const GDT: u64 = 0x4000;
/// Guest-physical address of the IDT.
pub const IDT: u64 = 0x5000;
/// Guest-physical address of the exception stubs (same page as the IDT).
pub const STUBS: u64 = 0x5200;
/// Bytes per stub.
pub const STUB_SIZE: u64 = 16;
/// Guest-physical address of the TSS (three pages with its I/O bitmap).
pub const TSS: u64 = 0x6000;
/// Size of the TSS: 104-byte header, 8 KiB bitmap, and the closing 0xff.
pub const TSS_SIZE: u64 = 104 + 8192 + 1;
/// The CPL0 stack page for exception delivery.
pub const KERNEL_STACK: u64 = 0x9000;
/// Top of that stack.
pub const KERNEL_STACK_TOP: u64 = KERNEL_STACK + 0x1000;

const GDT_ENTRIES: [u64; 5] = [
    0,
    0x00af_9a00_0000_ffff, // 0x08 kernel code, 64-bit, DPL 0
    0x00cf_9200_0000_ffff, // 0x10 kernel data
    0x00cf_f200_0000_ffff, // 0x18 user data, DPL 3
    0x00af_fa00_0000_ffff, // 0x20 user code, 64-bit, DPL 3
];

/// GDT limit (5 entries plus the 16-byte TSS descriptor, minus one).
pub const GDT_LIMIT: u16 = (GDT_ENTRIES.len() * 8 + 16 - 1) as u16;
/// IDT limit.
pub const IDT_LIMIT: u16 = EXCEPTION_VECTORS * 16 - 1;

fn tss_descriptor(base: u64, limit: u64) -> [u64; 2] {
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, 64-bit available TSS
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

fn gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(selector::KERNEL_CODE) << 16)
        | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

fn stub(vector: u16) -> [u8; STUB_SIZE as usize] {
    let port = u8::try_from(EXCEPTION_PORT_BASE + vector).expect("exception ports are below 256");
    [
        0xe6, port, // out port, al
        0xeb, 0xfe, // jmp $ (the host never resumes a stub)
        0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
    ]
}

/// The TSS with `rsp0` and an I/O bitmap opening exactly `GUEST_PORTS`.
pub fn tss_bytes() -> Vec<u8> {
    let mut tss = vec![0u8; TSS_SIZE as usize];
    tss[4..12].copy_from_slice(&KERNEL_STACK_TOP.to_le_bytes());
    tss[102..104].copy_from_slice(&104u16.to_le_bytes());
    tss[104..].fill(0xff);
    for port in GUEST_PORTS {
        tss[104 + usize::from(port / 8)] &= !(1 << (port % 8));
    }
    tss
}

// The system area's pieces fit between the shared pages and the page tables.
const _: () = assert!(GDT >= shoal_abi::layout::SYSTEM_AREA_START);
const _: () = assert!(STUBS + STUB_SIZE * EXCEPTION_VECTORS as u64 <= TSS);
const _: () = assert!(TSS + TSS_SIZE <= KERNEL_STACK);
const _: () = assert!(KERNEL_STACK_TOP <= shoal_abi::layout::PAGE_TABLE_AREA_START);

/// Writes GDT, IDT, stubs and TSS into guest RAM.
pub fn write(ram: &GuestRam) -> Result<(), MemoryError> {
    let mut gdt: Vec<u8> = GDT_ENTRIES.iter().flat_map(|e| e.to_le_bytes()).collect();
    gdt.extend(
        tss_descriptor(TSS, TSS_SIZE - 1)
            .iter()
            .flat_map(|e| e.to_le_bytes()),
    );
    ram.write_host(GDT, &gdt)?;
    for vector in 0..EXCEPTION_VECTORS {
        let handler = STUBS + u64::from(vector) * STUB_SIZE;
        let entry: Vec<u8> = gate(handler).iter().flat_map(|e| e.to_le_bytes()).collect();
        ram.write_host(IDT + u64::from(vector) * 16, &entry)?;
        ram.write_host(handler, &stub(vector))?;
    }
    ram.write_host(TSS, &tss_bytes())
}

/// The invalid-opcode exception (`#UD`).
pub const INVALID_OPCODE: u8 = 6;

/// Whether the CPU pushes an error code for `vector`.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Mnemonic of an exception vector.
pub fn exception_name(vector: u8) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE divide error",
        "#DB debug",
        "NMI",
        "#BP breakpoint",
        "#OF overflow",
        "#BR bound range",
        "#UD invalid opcode",
        "#NM device not available",
        "#DF double fault",
        "coprocessor segment overrun",
        "#TS invalid TSS",
        "#NP segment not present",
        "#SS stack fault",
        "#GP general protection fault",
        "#PF page fault",
        "reserved",
        "#MF x87 floating-point error",
        "#AC alignment check",
        "#MC machine check",
        "#XM SIMD floating-point error",
        "#VE virtualization exception",
        "#CP control protection",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "#HV hypervisor injection",
        "#VC VMM communication",
        "#SX security exception",
        "reserved",
    ];
    NAMES.get(usize::from(vector)).copied().unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_abi::layout::{HYPERCALL_PORT, NULL_EXIT_PORT};

    fn port_open(tss: &[u8], port: u16) -> bool {
        tss[104 + usize::from(port / 8)] & (1 << (port % 8)) == 0
    }

    #[test]
    fn io_bitmap_opens_only_the_guest_ports() {
        use shoal_abi::device::NOTIFY_PORT;
        let tss = tss_bytes();
        for port in HYPERCALL_PORT..HYPERCALL_PORT + 4 {
            assert!(port_open(&tss, port));
        }
        assert!(port_open(&tss, NULL_EXIT_PORT + 3));
        assert!(port_open(&tss, NOTIFY_PORT + 3));
        assert!(!port_open(&tss, HYPERCALL_PORT - 1));
        assert!(!port_open(&tss, NOTIFY_PORT + 4));
        assert!(!port_open(&tss, EXCEPTION_PORT_BASE));
        assert!(!port_open(&tss, 0x60));
        assert_eq!(*tss.last().expect("non-empty"), 0xff);
        let open = (0..=u16::MAX).filter(|p| port_open(&tss, *p)).count();
        assert_eq!(open, GUEST_PORTS.len());
    }

    #[test]
    fn stubs_report_their_vector_on_their_port() {
        let code = stub(14);
        assert_eq!(u16::from(code[1]), EXCEPTION_PORT_BASE + 14);
        assert!(has_error_code(14) && has_error_code(13) && !has_error_code(6));
        assert_eq!(exception_name(14), "#PF page fault");
    }
}
