//! The paravirtual MMU with real guests: changes are visible the moment
//! `mmu_update` returns (never a stale page), faults on what was taken
//! away are reported precisely, and every rule holds against a guest that
//! tries to break it.

mod common;

use shoal_abi::HypercallNr;
use shoal_host::mmu::Forget;
use shoal_host::{Crash, GuestEnd, GuestReport};

/// Where the `mmu` guest remaps and faults.
const WINDOW: u64 = 0x50_0000_0000;

fn mmu_updates(report: &GuestReport) -> u64 {
    report.stats.hypercall(HypercallNr::MmuUpdate)
}

fn run_forgetting(args: &[&str], forget: Forget) -> GuestReport {
    common::run_with(
        "mmu",
        shoal_host::GuestConfig {
            forget,
            ..common::config(args)
        },
    )
}

#[test]
fn remapping_a_live_address_thousands_of_times_never_reads_a_stale_page() {
    for forget in [Forget::Auto, Forget::Notifier, Forget::SlotMove] {
        let report = run_forgetting(&["check", "5000"], forget);
        common::assert_exited_0(&report);
        let text = report.console_text();
        assert!(
            text.contains("remapped 5000 times, never stale\n"),
            "{forget:?}: {text}"
        );
        assert!(
            text.ends_with("batch of 64 and scrubbed frames ok\nmmu ok\n"),
            "{forget:?}: {text}"
        );
        assert!(mmu_updates(&report) > 5000, "{:?}", report.stats.hypercalls);
        let (notifier, slot_moves) = (report.stats.notifier_calls, report.stats.slot_moves);
        match forget {
            Forget::Notifier => assert_eq!(slot_moves, 0),
            Forget::SlotMove => assert_eq!(notifier, 0),
            // Single remaps, 500 a second through the notifier; they
            // come faster than that (30 ms for 500 alone), so the budget
            // runs out and the rest move the slot.
            Forget::Auto => {
                assert!(notifier > 0 && slot_moves > 0, "{:?}", report.stats);
                assert!(notifier + slot_moves >= 5000, "{:?}", report.stats);
            }
        }
    }
}

#[test]
fn batches_that_drop_many_separate_frames_are_never_stale() {
    for forget in [Forget::Auto, Forget::Notifier, Forget::SlotMove] {
        let report = run_forgetting(&["scatter", "300"], forget);
        common::assert_exited_0(&report);
        let text = report.console_text();
        assert!(
            text.contains("remapped 64 pages 300 times in batches, never stale\n"),
            "{forget:?}: {text}"
        );
        assert!(
            text.ends_with("64 separate frames given back came back zeroed\nscatter ok\n"),
            "{forget:?}: {text}"
        );
        // Each batch of 64 separate old frames is over the notifier's
        // per-batch limit: the slot moves, once per batch.
        if forget == Forget::Auto {
            assert!(report.stats.slot_moves >= 299, "{:?}", report.stats);
        }
    }
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
    let report = common::attack_beside_a_neighbour("mmu-attack");
    let text = report.console_text();
    assert_eq!(text.matches("refused as documented").count(), 18, "{text}");
    assert!(!text.contains("WRONG"), "{text}");
}

#[test]
fn running_out_of_page_table_frames_is_a_limit_not_a_crash() {
    let report = common::run("mmu-attack", &["exhaust"]);
    let text = report.console_text();
    assert_eq!(report.end, GuestEnd::Exited(0), "{text}");
    assert!(text.contains("table frames ran out after"), "{text}");
}

fn trapped(args: &[&str]) -> GuestReport {
    common::run_with(
        "mmu",
        shoal_host::GuestConfig {
            trapped_page_tables: true,
            ..common::config(args)
        },
    )
}

#[test]
fn trap_and_emulate_writes_change_the_mapping_and_are_never_stale() {
    let report = trapped(&["trapped", "2000"]);
    common::assert_exited_0(&report);
    let text = report.console_text();
    assert!(
        text.contains(
            "remapped 2000 times by trapped writes, never stale; unmapped: entry 0x0\ntrapped ok\n"
        ),
        "{text}"
    );
    assert_eq!(
        report
            .stats
            .exits_for(shoal_host::ExitReason::PageTableWrite),
        2001
    );
}

#[test]
fn a_trapped_write_the_rules_refuse_stops_the_guest() {
    let report = trapped(&["trapped-forbidden"]);
    match report.end {
        GuestEnd::Crashed(Crash::PageTableWrite {
            ref error, value, ..
        }) => {
            assert_eq!(error, "Denied");
            assert_eq!(value & 0x000f_ffff_ffff_f000, 0x1_0000);
        }
        ref other => panic!("expected a refused page-table write, got {other}"),
    }
    // Without the experiment there is no window to write to.
    let report = common::run("mmu", &["trapped"]);
    assert_eq!(report.end, GuestEnd::Exited(1));
}

#[test]
fn a_multicall_makes_many_mmu_updates_in_one_exit() {
    let report = common::run("bench", &["multicall", "256", "64"]);
    common::assert_exited_0(&report);
    assert_eq!(report.stats.hypercall(HypercallNr::Multicall), 4);
    // 256 inside the multicalls; two to set up (taking frames from the
    // heap, mapping the pages first).
    assert_eq!(mmu_updates(&report), 258);
    let exits = report.stats.exits_for(shoal_host::ExitReason::Hypercall);
    assert!(exits < 20, "{exits} hypercall exits for 256 changes");
}

#[test]
fn the_sdk_heap_grows_by_mapping_frames() {
    let report = common::run("mmu", &["heap"]);
    common::assert_exited_0(&report);
    let text = report.console_text();
    assert!(
        text.contains("KiB; 100000 values and 5000 names right\nheap ok\n"),
        "{text}"
    );
    let grown: u64 = text
        .split("heap grew ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a growth count");
    assert!(grown > 1, "{text}");
    assert!(
        mmu_updates(&report) >= 2 * grown,
        "{:?}",
        report.stats.hypercalls
    );
}
