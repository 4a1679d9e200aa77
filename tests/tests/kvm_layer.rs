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
    let setup = lay_out(&ram, code, idt_limit, &[]);
    let vm = kvm.create_vm(&ram).expect("VM");
    let mut vcpu = vm.create_vcpu().expect("vCPU");
    // As guests without a debugger start: registers loaded at the first
    // entry.
    vcpu.setup(&setup, true).expect("setup");
    (vcpu, vm, ram)
}

/// Writes the system area, `code` at `IMAGE_BASE` and identity-mapped
/// page tables into `ram`, with the pages of `writable` mapped writable
/// too; returns the CPU state that starts `code`.
fn lay_out(ram: &GuestRam, code: &[u8], idt_limit: u16, writable: &[u64]) -> CpuSetup {
    descriptors::write(ram).expect("system area");
    ram.write_host(IMAGE_BASE, code).expect("code");
    let mut pt = paging::PageTables::new();
    pt.map(IMAGE_BASE, IMAGE_BASE, paging::USER).expect("maps");
    for &page in writable {
        pt.map(page, page, paging::USER | paging::WRITABLE)
            .expect("maps");
    }
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
    pt.write(ram).expect("tables");
    CpuSetup {
        gdt: (descriptors::GDT, descriptors::GDT_LIMIT),
        idt: (descriptors::IDT, idt_limit),
        tss: (descriptors::TSS, (descriptors::TSS_SIZE - 1) as u32),
        cr3: pt.root(),
        rip: IMAGE_BASE,
        rsp: 0,
        rdi: 0,
    }
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
fn preparing_the_first_entry_runs_no_guest_instruction_and_leaves_no_signal_behind() {
    let mut code = NULL_EXIT_THEN_UD2.to_vec();
    code.extend([0x0f, 0x0b]); // ud2
    let (mut vcpu, _vm, _ram) = boot(&code, descriptors::IDT_LIMIT);
    let mask = || {
        // SAFETY: the set is written by the kernel before it is read;
        // nothing of the thread's state changes.
        unsafe {
            let (mut blocked, mut pending) = (std::mem::zeroed(), std::mem::zeroed());
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut blocked);
            libc::sigpending(&mut pending);
            let bits = |set: &libc::sigset_t| {
                (1..=64)
                    .filter(|&n| libc::sigismember(set, n) == 1)
                    .collect::<Vec<_>>()
            };
            (bits(&blocked), bits(&pending))
        }
    };
    let before = mask();
    vcpu.prepare_entry().expect("returns before the guest runs");
    vcpu.prepare_entry().expect("and again");
    assert_eq!(mask(), before);
    // The first instruction is still to run: its exit comes first.
    assert_eq!(
        vcpu.run().expect("runs"),
        Exit::Out {
            port: NULL_EXIT_PORT,
            size: 4,
            value: 42
        }
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

/// The first of eight template pages [`TOUCH_PAGES`] reads.
const DATA: u64 = IMAGE_BASE + 0x1000;
/// A page past the template that [`TOUCH_PAGES`] writes.
const ANON: u64 = 0x30_0000;

/// Adds up a word of each of the eight pages at [`DATA`] and one of
/// [`ANON`], writes `0x66` to [`ANON`] and `0x55` to [`DATA`], then makes
/// a null exit of the sum.
const TOUCH_PAGES: [u8; 62] = [
    0x31, 0xf6, // xor esi, esi
    0xbb, 0x00, 0x10, 0x10, 0x00, // mov ebx, DATA
    0xb9, 0x08, 0x00, 0x00, 0x00, // mov ecx, 8
    0x48, 0x03, 0x33, // 1: add rsi, [rbx]
    0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, // add rbx, 0x1000
    0xff, 0xc9, // dec ecx
    0x75, 0xf2, // jnz 1b
    0xbb, 0x00, 0x00, 0x30, 0x00, // mov ebx, ANON
    0x48, 0x03, 0x33, // add rsi, [rbx]
    0x48, 0xc7, 0x03, 0x66, 0x00, 0x00, 0x00, // mov qword [rbx], 0x66
    0xbb, 0x00, 0x10, 0x10, 0x00, // mov ebx, DATA
    0x48, 0xc7, 0x03, 0x55, 0x00, 0x00, 0x00, // mov qword [rbx], 0x55
    0x66, 0xba, 0x04, 0x05, // mov dx, NULL_EXIT_PORT
    0x89, 0xf0, // mov eax, esi
    0xef, // out dx, eax
    0x0f, 0x0b, // ud2
];

fn word_at(ram: &GuestRam, addr: u64) -> u64 {
    let mut word = [0u8; 8];
    ram.read_host(addr, &mut word).expect("reads");
    u64::from_le_bytes(word)
}

#[test]
fn a_guest_on_ram_cleared_for_the_same_template_finds_its_pages_translated_already() {
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::Arc;
    let _ = common::host();
    let kvm = Kvm::open().expect("KVM opens");
    let size = 4 << 20;
    // The template: the layout, and each data page stamped with its number.
    let file: Arc<OwnedFd> = Arc::new(shoal_host::boot::memfd(size).expect("creates"));
    let template = GuestRam::shared(file.as_fd(), size).expect("maps");
    let data: Vec<u64> = (0..8).map(|i| DATA + i * 0x1000).collect();
    let setup = lay_out(
        &template,
        &TOUCH_PAGES,
        descriptors::IDT_LIMIT,
        &[data.clone(), vec![ANON]].concat(),
    );
    for (i, page) in data.iter().enumerate() {
        template
            .write_host(*page, &(i as u64 + 1).to_le_bytes())
            .expect("stamps");
    }
    drop(template);
    let mut ram = GuestRam::new(size).expect("maps");
    ram.overlay(&file, DATA + 0x8000, 1, &Arc::from([]))
        .expect("overlays");
    let vm = kvm.create_vm(&ram).expect("VM");
    let mut vcpu = vm.create_vcpu().expect("vCPU");
    let pristine = vcpu.pristine().expect("pristine");
    let faults = |vcpu: &shoal_host::kvm::Vcpu| {
        vcpu.kvm_stat("pf_taken")
            .expect("KVM's statistics read")
            .expect("KVM counts page faults")
    };
    // The template's stamps, 1 to 8, and a zero: what the guest reads
    // through KVM's translations, kept or not.
    let null_exit = Exit::Out {
        port: NULL_EXIT_PORT,
        size: 4,
        value: 36,
    };
    vcpu.setup(&setup, true).expect("setup");
    assert_eq!(vcpu.run().expect("runs"), null_exit);
    let first = faults(&vcpu);
    assert_eq!((word_at(&ram, DATA), word_at(&ram, ANON)), (0x55, 0x66));
    // Eleven at least: the code, eight pages of data (the first twice, a
    // read and then a write), the page past the template.
    assert!(first >= 11, "the first run took {first} page faults");
    vcpu.reset(&pristine).expect("resets");
    ram.clear().expect("clears");
    assert_eq!((word_at(&ram, DATA), word_at(&ram, ANON)), (1, 0));
    vcpu.setup(&setup, true).expect("setup");
    assert_eq!(vcpu.run().expect("runs"), null_exit);
    let second = faults(&vcpu) - first;
    assert_eq!((word_at(&ram, DATA), word_at(&ram, ANON)), (0x55, 0x66));
    assert!(
        second == 0,
        "the second run took {second} page faults (the first {first}): KVM lost its translations"
    );
}
