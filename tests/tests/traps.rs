//! Exceptions a guest handles itself: the host bounces them to the
//! guest's handler with its state, the handler fixes what it can and
//! resumes the guest with `trap_return`; bad tables and forged returns are
//! refused, a faulting handler stops its guest precisely, and a guest
//! whose faults never end disturbs nobody.

mod common;

use shoal_abi::HypercallNr;
use shoal_host::{Crash, GuestEnd};
use std::time::{Duration, Instant};

#[test]
fn a_guest_catches_its_own_faults_and_every_access_completes() {
    let report = common::run("mmu", &["catch"]);
    common::assert_exited_0(&report);
    let text = report.console_text();
    assert!(
        text.ends_with("caught 4 exceptions, every access completed, registers kept\ncatch ok\n"),
        "{text}"
    );
    assert_eq!(report.stats.traps, 4);
    assert_eq!(report.stats.hypercall(HypercallNr::TrapReturn), 4);
}

#[test]
fn a_demand_paged_array_bigger_than_ram_fills_in_page_by_page() {
    let report = common::run("demand", &["300"]);
    common::assert_exited_0(&report);
    let text = report.console_text();
    assert!(
        text.contains("300 pages written across a 64 MiB array, 300 faults; 300 more read, 600 faults in all\ndemand ok\n"),
        "{text}"
    );
    assert_eq!(report.stats.traps, 600);
    assert!(report.stats.memory_bytes < 64 << 20);
}

#[test]
fn bad_trap_tables_and_forged_returns_are_refused() {
    let report = common::attack_beside_a_neighbour("trap-attack");
    let text = report.console_text();
    assert_eq!(text.matches("refused as documented").count(), 8, "{text}");
}

#[test]
fn a_fault_inside_the_handler_stops_the_guest_with_that_fault() {
    let report = common::run("trap-attack", &["nested"]);
    match report.end {
        GuestEnd::Crashed(Crash::Exception {
            vector: 14,
            fault_addr: Some(0x41_0000_0000),
            error_code: Some(4),
            ..
        }) => {}
        ref other => panic!("expected the handler's page fault, got {other}"),
    }
    assert_eq!(report.stats.traps, 1);
}

#[test]
fn a_guest_whose_faults_never_end_disturbs_nobody() {
    let host = common::host();
    let storm = common::spawn(&host, "trap-attack", &["storm"]);
    let start = Instant::now();
    while storm.stats().traps < 500 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the storm did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    common::assert_hello(
        &common::spawn(&host, "hello", &["in the storm"]).wait(),
        "in the storm",
    );
    storm.kill();
    let report = storm.wait();
    assert_eq!(report.end, GuestEnd::Killed);
    assert!(report.stats.traps >= 500);
}
