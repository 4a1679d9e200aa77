//! Custom hypercalls: a host adds calls with typed handlers, the built-in
//! `custom` guest calls them through the SDK, a handler works on the
//! caller's memory through the checked door, a number without a handler
//! answers "unknown", and a handler that fails or panics stops only its
//! caller, with the reason.

mod common;

use shoal_host::{Caller, Crash, GuestEnd, Host, RegisterError};

/// Runs the `custom` guest on `host` with `args` to its end.
fn custom(host: &Host, args: &[&str]) -> shoal_host::GuestReport {
    common::spawn(host, "custom", args).wait()
}

/// Registers 0x1001: upper-cases the caller's bytes at `[addr, len]` in
/// place and answers the length.
fn register_shout(host: &Host) {
    host.register_hypercall(0x1001, |caller: &Caller<'_>, [addr, len]: [u64; 2]| {
        let mut text = vec![0; usize::try_from(len).map_err(|_| "too long")?];
        caller.read(addr, &mut text).map_err(|e| e.to_string())?;
        text.make_ascii_uppercase();
        caller.write(addr, &text).map_err(|e| e.to_string())?;
        Ok::<u64, String>(len)
    })
    .expect("registers");
}

#[test]
fn a_guest_calls_a_hypercall_its_host_added() {
    let host = common::host();
    host.register_hypercall(0x1000, |_caller: &Caller<'_>, [a, b]: [u64; 2]| {
        a.checked_add(b).ok_or("the sum overflows")
    })
    .expect("registers");
    let report = custom(&host, &["add", "2", "40"]);
    common::assert_exited_0(&report);
    assert!(
        report.console_text().contains("sum: 42"),
        "{}",
        report.console_text()
    );
    assert_eq!(report.stats.custom_hypercalls, 1);
}

#[test]
fn a_custom_handler_works_on_the_callers_memory() {
    let host = common::host();
    register_shout(&host);
    let report = custom(&host, &["shout", "hello, shoal"]);
    common::assert_exited_0(&report);
    assert!(
        report.console_text().contains("shouted: HELLO, SHOAL"),
        "{}",
        report.console_text()
    );
}

#[test]
fn a_number_without_a_handler_is_answered_unknown() {
    let host = common::host();
    register_shout(&host);
    let report = custom(&host, &["call", "0x1fff"]);
    assert_eq!(report.end, GuestEnd::Exited(1));
    assert!(
        report
            .console_text()
            .contains("answer: error: Abi(UnknownHypercall)"),
        "{}",
        report.console_text()
    );
    assert_eq!(report.stats.unknown_hypercalls, 1);
    // The shout handler expects [addr, len] and answers 8 bytes, as the
    // `call` mode's request does: the sizes match, the address does not.
    let report = custom(&host, &["call", "0x1001"]);
    assert!(
        matches!(&report.end, GuestEnd::Crashed(Crash::CustomHypercall { nr: 0x1001, reason })
            if reason.contains("outside guest memory")),
        "{:?}",
        report.end
    );
}

#[test]
fn a_handler_that_fails_or_panics_stops_only_its_caller_with_the_reason() {
    let host = common::host();
    host.register_hypercall(0x1002, |_: &Caller<'_>, _: [u64; 2]| {
        Err::<u64, _>("the experiment says no")
    })
    .expect("registers");
    host.register_hypercall(
        0x1003,
        |_: &Caller<'_>, [a, b]: [u64; 2]| -> Result<u64, String> {
            panic!("the handler broke on {a} and {b}")
        },
    )
    .expect("registers");
    let bystander = common::spawn(&host, "idle", &["1s"]);
    let refused = custom(&host, &["call", "0x1002"]);
    assert_eq!(
        refused.end,
        GuestEnd::Crashed(Crash::CustomHypercall {
            nr: 0x1002,
            reason: "the experiment says no".into()
        })
    );
    let broke = custom(&host, &["call", "0x1003"]);
    assert_eq!(
        broke.end,
        GuestEnd::Crashed(Crash::CustomHypercall {
            nr: 0x1003,
            reason: "the handler panicked: the handler broke on 1 and 2".into()
        })
    );
    common::assert_exited_0(&bystander.wait());
    register_shout(&host);
    common::assert_exited_0(&custom(&host, &["shout", "still here"]));
}

#[test]
fn a_handler_that_opens_a_file_or_runs_a_program_is_stopped_by_the_sandbox() {
    let host = common::host();
    // Each reaches for what a worker thread may not do, and says what
    // happened if it returns at all.
    host.register_hypercall(0x1004, |_: &Caller<'_>, _: [u64; 2]| {
        std::fs::File::open("/etc/hostname")
            .map(|_| 0u64)
            .map_err(|e| format!("open failed: {e}"))
    })
    .expect("registers");
    host.register_hypercall(0x1005, |_: &Caller<'_>, _: [u64; 2]| {
        let program = c"/bin/true";
        let argv = [program.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: a valid path and null-terminated argument and
        // environment lists; were it to succeed, the test process would
        // become `/bin/true` and the test fail.
        unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Err::<u64, _>(format!("exec failed: {}", std::io::Error::last_os_error()))
    })
    .expect("registers");
    // Starting a process starts with a `clone` the sandbox refuses too
    // (with EPERM, unnamed: C libraries make it with signals blocked).
    host.register_hypercall(0x1006, |_: &Caller<'_>, _: [u64; 2]| {
        std::process::Command::new("/bin/true")
            .status()
            .map(|_| 0u64)
            .map_err(|e| format!("spawn failed: {e}"))
    })
    .expect("registers");
    let report = custom(&host, &["call", "0x1006"]);
    match &report.end {
        GuestEnd::Crashed(Crash::CustomHypercall { nr: 0x1006, reason })
            if reason.contains("spawn failed") && reason.contains("not permitted") => {}
        other => panic!("expected the spawn refused, got {other:?}"),
    }
    for (nr, call) in [(0x1004, "openat"), (0x1005, "execve")] {
        let report = custom(&host, &["call", &format!("{nr:#x}")]);
        match &report.end {
            GuestEnd::Crashed(Crash::CustomHypercall { nr: n, reason })
                if *n == nr && reason.contains(&format!("system call {call},")) => {}
            other => panic!("{nr:#x}: expected a stop naming {call}, got {other:?}"),
        }
    }
    // The host and its other guests go on.
    register_shout(&host);
    common::assert_exited_0(&custom(&host, &["shout", "still here"]));
}

#[test]
fn numbers_outside_the_custom_range_and_sharded_hosts_are_refused() {
    let host = common::host();
    let handler = |_: &Caller<'_>, x: u64| Ok::<u64, String>(x);
    assert!(matches!(
        host.register_hypercall(1, handler),
        Err(RegisterError::NotCustom(1))
    ));
    let sharded = common::sharded_host(10);
    assert!(matches!(
        sharded.register_hypercall(0x1000, handler),
        Err(RegisterError::Sharded)
    ));
}
