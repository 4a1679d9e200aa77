//! Exit-level tests of the thin KVM layer with tiny hand-assembled guests.

mod common;

use shoal_abi::layout::{IMAGE_BASE, NULL_EXIT_PORT};
use shoal_host::boot::{descriptors, paging};
use shoal_host::kvm::vcpu::{CpuSetup, Exit};
use shoal_host::kvm::{GuestRam, Kvm};

/// Boots `code` at CPL3 with the host's GDT and TSS, identity-mapped page
/// tables, and the given IDT limit (0: no exception handlers at all).
fn boot(code: &[u8], idt_limit: u16) -> (shoal_host::kvm::Vcpu, shoal_host::kvm::Vm, GuestRam) {
    let _ = common::host();
    let kvm = Kvm::open().expect("KVM opens");
    let ram = GuestRam::new(4 << 20).expect("maps");
    descriptors::write(&ram).expect("system area");
    ram.write_host(IMAGE_BASE, code).expect("code");
    let mut pt = paging::PageTables::new();
    pt.map(IMAGE_BASE, IMAGE_BASE, paging::USER).expect("maps");
    pt.map(descriptors::GDT, descriptors::GDT, paging::WRITABLE)
        .expect("maps");
    pt.map(descriptors::IDT, descriptors::IDT, 0).expect("maps");
    pt.identity(
        descriptors::TSS,
        descriptors::TSS + 0x3000,
        paging::WRITABLE,
    )
    .expect("maps");
    pt.map(
        descriptors::KERNEL_STACK,
        descriptors::KERNEL_STACK,
        paging::WRITABLE,
    )
    .expect("maps");
    pt.write(&ram).expect("tables");
    let vm = kvm.create_vm(&ram).expect("VM");
    let mut vcpu = vm.create_vcpu().expect("vCPU");
    // As guests without a debugger start: registers loaded at the first
    // entry.
    vcpu.setup(
        &CpuSetup {
            gdt: (descriptors::GDT, descriptors::GDT_LIMIT),
            idt: (descriptors::IDT, idt_limit),
            tss: (descriptors::TSS, (descriptors::TSS_SIZE - 1) as u32),
            cr3: pt.root(),
            rip: IMAGE_BASE,
            rsp: 0,
            rdi: 0,
        },
        true,
    )
    .expect("setup");
    (vcpu, vm, ram)
}

const NULL_EXIT_THEN_UD2: [u8; 10] = [
    0x66,
    0xba,
    NULL_EXIT_PORT as u8,
    (NULL_EXIT_PORT >> 8) as u8, // mov dx, NULL_EXIT_PORT
    0xb8,
    0x2a,
    0,
    0,
    0,    // mov eax, 42
    0xef, // out dx, eax
];

#[test]
fn out_to_the_null_exit_port_reaches_the_host_with_its_value() {
    let mut code = NULL_EXIT_THEN_UD2.to_vec();
    code.extend([0x0f, 0x0b]); // ud2
    let (mut vcpu, _vm, _ram) = boot(&code, descriptors::IDT_LIMIT);
    assert_eq!(
        vcpu.run().expect("runs"),
        Exit::Out {
            port: NULL_EXIT_PORT,
            size: 4,
            value: 42
        }
    );
    // ud2 with the exception stubs: reported on the #UD port, with the
    // stub's stack pointer.
    let exit = vcpu.run().expect("runs");
    assert!(
        matches!(exit, Exit::Out { port, size: 1, .. } if port == shoal_abi::layout::EXCEPTION_PORT_BASE + 6),
        "{exit:?}"
    );
}

#[test]
fn an_exception_with_no_idt_is_a_triple_fault() {
    let (mut vcpu, _vm, _ram) = boot(&[0x0f, 0x0b], 0);
    assert_eq!(vcpu.run().expect("runs"), Exit::Shutdown);
}

#[test]
fn ports_outside_the_io_bitmap_fault_at_cpl3() {
    // mov dx, 0x60; out dx, al
    let (mut vcpu, _vm, _ram) = boot(&[0x66, 0xba, 0x60, 0x00, 0xee], descriptors::IDT_LIMIT);
    let exit = vcpu.run().expect("runs");
    assert!(
        matches!(exit, Exit::Out { port, .. } if port == shoal_abi::layout::EXCEPTION_PORT_BASE + 13),
        "{exit:?}"
    );
}

#[test]
fn string_io_to_the_hypercall_port_is_not_a_hypercall() {
    let code = [
        0x66, 0xba, 0x00, 0x05, // mov dx, 0x500
        0xb9, 0x04, 0x00, 0x00, 0x00, // mov ecx, 4
        0xbe, 0x00, 0x00, 0x10, 0x00, // mov esi, IMAGE_BASE
        0xf3, 0x6e, // rep outsb
    ];
    let (mut vcpu, _vm, _ram) = boot(&code, descriptors::IDT_LIMIT);
    // KVM may batch the repeats (a string exit) or deliver them one byte at
    // a time (PVM does); either way it is never a 32-bit hypercall `out`.
    let exit = vcpu.run().expect("runs");
    assert!(
        matches!(
            exit,
            Exit::StringIo { port: 0x500 }
                | Exit::Out {
                    port: 0x500,
                    size: 1,
                    ..
                }
        ),
        "{exit:?}"
    );
}
