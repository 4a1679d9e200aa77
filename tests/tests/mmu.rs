//! The paravirtual MMU with real guests: changes are visible the moment
//! `mmu_update` returns (never a stale page), faults on what was taken
//! away are reported precisely, and every rule holds against a guest that
//! tries to break it.

mod common;

use shoal_abi::HypercallNr;
use shoal_host::{Crash, GuestEnd, GuestReport};

/// Where the `mmu` guest remaps and faults.
const WINDOW: u64 = 0x50_0000_0000;

fn mmu_updates(report: &GuestReport) -> u64 {
    report
        .stats
        .hypercalls
        .iter()
        .find(|(nr, _)| *nr == HypercallNr::MmuUpdate)
        .map_or(0, |(_, n)| *n)
}

#[test]
fn remapping_a_live_address_thousands_of_times_never_reads_a_stale_page() {
    let report = common::run("mmu", &["check", "5000"]);
    common::assert_exited_0(&report);
    let text = report.console_text();
    assert!(
        text.contains("remapped 5000 times, never stale\n"),
        "{text}"
    );
    assert!(
        text.ends_with("batch of 64 and scrubbed frames ok\nmmu ok\n"),
        "{text}"
    );
    assert!(mmu_updates(&report) > 5000, "{:?}", report.stats.hypercalls);
}

#[test]
fn many_guests_remap_at_once_without_disturbing_each_other() {
    let host = common::host();
    let guests: Vec<_> = (0..16)
        .map(|_| common::spawn(&host, "mmu", &["check", "500"]))
        .collect();
    for guest in guests {
        let report = guest.wait();
        common::assert_exited_0(&report);
        assert!(report.console_text().ends_with("mmu ok\n"));
    }
}

fn fault_of(report: &GuestReport) -> (u8, Option<u64>, Option<u64>) {
    match report.end {
        GuestEnd::Crashed(Crash::Exception {
            vector,
            error_code,
            fault_addr,
            ..
        }) => (vector, error_code, fault_addr),
        ref other => panic!("expected a fault, got {other}: {}", report.console_text()),
    }
}

#[test]
fn touching_an_unmapped_page_is_a_precise_page_fault() {
    let report = common::run("mmu", &["unmap-fault"]);
    // #PF, user-mode read of a not-present page.
    assert_eq!(fault_of(&report), (14, Some(0x4), Some(WINDOW)));
    assert!(
        report
            .console_text()
            .ends_with(&format!("touching {WINDOW:#x} again\n"))
    );
}

#[test]
fn writing_a_page_made_read_only_is_a_precise_page_fault() {
    let report = common::run("mmu", &["protect-fault"]);
    // #PF, user-mode write to a present page.
    assert_eq!(fault_of(&report), (14, Some(0x7), Some(WINDOW)));
}

#[test]
fn forbidden_page_table_requests_are_refused_and_a_neighbour_is_unharmed() {
    let host = common::host();
    let neighbour = common::spawn(&host, "hello", &["next door"]);
    let report = common::spawn(&host, "mmu-attack", &[]).wait();
    let text = report.console_text();
    assert_eq!(report.end, GuestEnd::Exited(0), "{text}");
    assert_eq!(text.matches("refused as documented").count(), 18, "{text}");
    assert!(!text.contains("WRONG"), "{text}");
    common::assert_hello(&neighbour.wait(), "next door");
}

#[test]
fn running_out_of_page_table_frames_is_a_limit_not_a_crash() {
    let report = common::run("mmu-attack", &["exhaust"]);
    let text = report.console_text();
    assert_eq!(report.end, GuestEnd::Exited(0), "{text}");
    assert!(text.contains("table frames ran out after"), "{text}");
}
