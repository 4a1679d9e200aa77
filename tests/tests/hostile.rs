//! Guests that break the rules: each gets its documented error or is
//! stopped with a precise reason, and its console up to that point is kept.

mod common;

use shoal_abi::layout::DEFAULT_MEMORY;
use shoal_host::{Crash, ExitReason, GuestEnd};

#[test]
fn bad_pointers_get_documented_errors() {
    let report = common::run("bad-pointer", &[]);
    let text = report.console_text();
    assert_eq!(report.end, GuestEnd::Exited(0), "console: {text}");
    assert_eq!(text.lines().count(), 7, "{text}");
    assert_eq!(text.matches("refused as documented").count(), 7, "{text}");
    assert!(text.contains("address overflow: Err(Abi(Fault)) refused as documented\n"));
    assert!(text.contains("absurd length: Err(Abi(Invalid)) refused as documented\n"));
}

#[test]
fn unknown_hypercall_numbers_and_lengths_get_documented_errors() {
    let report = common::run("unknown-hypercall", &[]);
    let text = report.console_text();
    assert_eq!(report.end, GuestEnd::Exited(0), "console: {text}");
    assert!(
        text.contains("number 0xdead: ret -1 as documented\n"),
        "{text}"
    );
    assert!(
        text.contains("wall_clock with arg_len 32: ret -2 as documented\n"),
        "{text}"
    );
    assert_eq!(text.matches("as documented").count(), 5, "{text}");
    assert_eq!(report.stats.unknown_hypercalls, 3);
}

#[test]
fn argument_block_straddling_end_of_memory_stops_the_guest() {
    let report = common::run("straddle", &[]);
    let addr = DEFAULT_MEMORY - 8;
    assert_eq!(
        report.end,
        GuestEnd::Crashed(Crash::BadHypercallMemory { addr, len: 16 })
    );
    assert_eq!(
        report.console_text(),
        format!("hypercall with its block at {addr:#x}, 8 bytes before the end\n")
    );
}

#[test]
fn null_write_without_handler_is_reported_precisely() {
    let report = common::run("triple-fault", &[]);
    let GuestEnd::Crashed(Crash::Exception {
        vector,
        error_code,
        rip,
        fault_addr,
        ..
    }) = report.end
    else {
        panic!("expected an exception, got {}", report.end)
    };
    assert_eq!(vector, 14, "page fault");
    // Write (bit 1) from user mode (bit 2) to a page that is not present.
    assert_eq!(error_code, Some(0b110));
    assert_eq!(fault_addr, Some(0));
    assert!(
        common::text_range("triple-fault").contains(&rip),
        "rip {rip:#x}"
    );
    assert_eq!(report.console_text(), "writing to address 0\n");
    assert_eq!(report.end.exit_status(), 125);
}

#[test]
fn syscall_is_an_invalid_opcode_at_the_instruction() {
    let report = common::run("privileged", &["syscall"]);
    match report.end {
        GuestEnd::Crashed(Crash::Exception {
            vector: 6,
            error_code: None,
            rip,
            fault_addr: None,
            ..
        }) => assert!(
            common::text_range("privileged").contains(&rip),
            "rip {rip:#x}"
        ),
        ref other => panic!("expected #UD, got {other}"),
    }
    // A handler sees it at the instruction, and goes on past it.
    let caught = common::run("privileged", &["syscall-caught"]);
    common::assert_exited_0(&caught);
    assert!(
        caught
            .console_text()
            .ends_with("syscall: #UD at the instruction\n"),
        "{}",
        caught.console_text()
    );
}

#[test]
fn int3_and_int_n_stop_the_guest_with_the_documented_vectors() {
    // Under PVM `int3` is a breakpoint and `int n` an invalid opcode; on
    // hardware KVM both are general-protection faults (every gate is DPL
    // 0).
    let want = |pvm_vector, gp| if common::pvm() { pvm_vector } else { gp };
    for (mode, vector) in [("int3", want(3, 13)), ("int80", want(6, 13))] {
        let report = common::run("privileged", &[mode]);
        match report.end {
            GuestEnd::Crashed(Crash::Exception { vector: v, rip, .. }) if v == vector => assert!(
                common::text_range("privileged").contains(&rip),
                "{mode}: rip {rip:#x}"
            ),
            ref other => panic!("{mode}: expected vector {vector}, got {other}"),
        }
    }
}

#[test]
fn string_output_to_the_hypercall_port_is_as_documented() {
    let report = common::run("privileged", &["rep-out"]);
    let text = report.console_text();
    if common::pvm() {
        // PVM hands the host one element at a time, each a plain `out`:
        // two hypercalls, then the guest goes on.
        assert_eq!(report.end, GuestEnd::Exited(1), "{text}");
        assert!(
            text.ends_with("one\ntwo\nrep-out did not fault\n"),
            "{text}"
        );
    } else {
        assert!(
            matches!(
                report.end,
                GuestEnd::Crashed(Crash::BadPortAccess { size: 0, .. })
            ),
            "{}: {text}",
            report.end
        );
    }
}

#[test]
fn privileged_instruction_at_cpl3_is_a_general_protection_fault() {
    let report = common::run("privileged", &[]);
    let GuestEnd::Crashed(Crash::Exception {
        vector,
        error_code,
        rip,
        ..
    }) = report.end
    else {
        panic!("expected an exception, got {}", report.end)
    };
    assert_eq!((vector, error_code), (13, Some(0)));
    assert!(
        common::text_range("privileged").contains(&rip),
        "rip {rip:#x}"
    );
    assert_eq!(report.console_text(), "executing hlt at CPL3\n");
    // The line went into the console ring, and the exception stub's
    // report, the only exit, handed it over.
    assert_eq!(report.stats.exits_for(ExitReason::Hypercall), 0);
    assert_eq!(report.stats.exits_for(ExitReason::Exception), 1);
}
