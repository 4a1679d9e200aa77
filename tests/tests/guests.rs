//! The example guests, booted on KVM, with exact checks of what they print
//! and how they end.

mod common;

use shoal_host::{GuestConfig, GuestEnd};
use std::time::{SystemTime, UNIX_EPOCH};

#[test]
fn hello_prints_its_id_wall_clock_and_arguments_then_exits_0() {
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let report = common::run("hello", &["first", "with space", "ünïcode"]);
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    common::assert_exited_0(&report);
    let text = report.console_text();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines[0], format!("hello from guest {}", report.id));
    let wall: u64 = lines[1]
        .strip_prefix("wall clock: ")
        .and_then(|rest| rest.split('.').next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("no wall clock in {:?}", lines[1]));
    assert!(
        (before..=after).contains(&wall),
        "{wall} not in {before}..={after}"
    );
    assert_eq!(lines[2], "memory: 4096 KiB, abi v1");
    assert_eq!(
        &lines[3..],
        [
            "arg 0: first",
            "arg 1: with space",
            "arg 2: ünïcode",
            "3 args"
        ]
    );
}

#[test]
fn hello_sees_the_memory_size_it_was_given() {
    let report = common::run_with(
        "hello",
        GuestConfig {
            mem_size: 16 << 20,
            ..Default::default()
        },
    );
    assert_eq!(report.end, GuestEnd::Exited(0));
    assert!(
        report
            .console_text()
            .contains("memory: 16384 KiB, abi v1\n")
    );
    assert!(report.console_text().ends_with("0 args\n"));
}

#[test]
fn guest_ids_are_unique_per_host() {
    let host = common::host();
    let image = common::image("hello");
    let a = host.spawn(&image, GuestConfig::default()).expect("spawns");
    let b = host.spawn(&image, GuestConfig::default()).expect("spawns");
    assert_ne!(a.id(), b.id());
    let (a, b) = (a.wait(), b.wait());
    assert!(
        a.console_text()
            .starts_with(&format!("hello from guest {}\n", a.id))
    );
    assert!(
        b.console_text()
            .starts_with(&format!("hello from guest {}\n", b.id))
    );
}

#[test]
fn clock_advances_across_sleeps_and_never_goes_backwards() {
    let report = common::run("clock", &["4"]);
    common::assert_exited_0(&report);
    let text = report.console_text();
    for round in 1..=4 {
        assert!(
            text.contains(&format!(
                "sleep {round}: slept >= 10 ms, monotonic advancing\n"
            )),
            "{text}"
        );
    }
    let elapsed_ms: u64 = text
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("4 sleeps done, "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary in {text}"));
    assert!(elapsed_ms >= 40, "four 10 ms sleeps took {elapsed_ms} ms");
    // Sleeping is blocking in the host, not spinning in the guest: a handful
    // of block hypercalls, each followed by time spent parked.
    let stats = report.stats;
    assert!(stats.hypercall(shoal_abi::HypercallNr::Block) >= 4);
    assert!(
        stats.blocked_ns >= 35_000_000,
        "blocked only {} ns",
        stats.blocked_ns
    );
}

#[test]
fn panic_is_reported_with_message_and_location() {
    let report = common::run("panic", &[]);
    let GuestEnd::Panicked(panic) = &report.end else {
        panic!("expected a panic, got {}", report.end)
    };
    assert_eq!(panic.message, "deliberate panic, answer = 42");
    assert_eq!(panic.file, "panic/src/main.rs");
    assert_eq!((panic.line, panic.column), (12, 5));
    assert_eq!(report.console_text(), "about to panic\n");
    assert_eq!(report.end.exit_status(), 101);
}

#[test]
fn many_guests_run_at_once_each_with_its_own_id_and_arguments() {
    let host = common::host();
    let guests: Vec<_> = (0..32)
        .map(|i| common::spawn(&host, "hello", &[&format!("guest-number-{i}")]))
        .collect();
    let mut ids = std::collections::HashSet::new();
    for (i, guest) in guests.into_iter().enumerate() {
        let report = guest.wait();
        common::assert_hello(&report, &format!("guest-number-{i}"));
        assert!(ids.insert(report.id));
    }
}
