//! Guests built for ABI v1 keep running as the host gains features.
//!
//! The images in `tests/fixtures/abi-v1/` were built once, from the commit
//! and with the recipe in that directory's README, and are never rebuilt.
//! The host has since gained features those guests do not know (feature
//! bits `CALL_TIMING`, the event page's `CallTiming` record, and
//! `CONSOLE_RING`, the event page's console ring); these tests run the old
//! images on today's host, with the new features offered.

mod common;

use shoal_abi::HypercallNr;
use shoal_host::{GuestConfig, GuestReport, Image, Observe};
use std::path::PathBuf;

/// The bits ABI v1 had when the fixtures were built (0 to 9).
const FIXTURE_FEATURES: u64 = (1 << 10) - 1;

fn fixture(name: &str) -> Image {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/abi-v1")
        .join(format!("{name}.elf"));
    Image::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs fixture `name` with `args`, offering every feature the host has
/// gained since that a guest can be offered.
fn run_old(name: &str, args: &[&str]) -> GuestReport {
    let report = common::host()
        .spawn(
            &fixture(name),
            GuestConfig {
                observe: Observe {
                    call_stats: true,
                    ..Default::default()
                },
                ..common::config(args)
            },
        )
        .expect("spawns")
        .wait();
    common::assert_exited_0(&report);
    report
}

#[test]
fn the_host_offers_features_the_fixtures_do_not_know() {
    assert_eq!(shoal_abi::features::ALL_V1 & !FIXTURE_FEATURES, 0);
    assert_ne!(shoal_abi::features::CALL_TIMING & !FIXTURE_FEATURES, 0);
    assert_ne!(shoal_abi::features::CONSOLE_RING & !FIXTURE_FEATURES, 0);
    // Today's guests take the new features up under the same
    // configuration (so they are offered: the console goes through the
    // ring, not `console_write`), and the old ones below run beside them.
    let today = common::run_with(
        "hello",
        GuestConfig {
            observe: Observe {
                call_stats: true,
                ..Default::default()
            },
            ..common::config(&["x"])
        },
    );
    assert!(today.stats.calls.iter().any(|c| c.guest.count() > 0));
    assert!(today.console_text().ends_with("arg 0: x\n1 args\n"));
    assert_eq!(today.stats.hypercall(HypercallNr::ConsoleWrite), 0);
}

#[test]
fn a_v1_hello_boots_reads_its_arguments_and_exits() {
    let report = run_old("hello", &["first", "with space"]);
    let text = report.console_text();
    assert!(
        text.starts_with(&format!("hello from guest {}\n", report.id)),
        "{text}"
    );
    assert!(text.contains("memory: 4096 KiB, abi v1\n"), "{text}");
    assert!(
        text.ends_with("arg 0: first\narg 1: with space\n2 args\n"),
        "{text}"
    );
    // The old guest wrote its console by hypercall, one per line.
    assert_eq!(report.stats.hypercall(HypercallNr::ConsoleWrite), 6);
    // The host timed its calls; the old guest reported no round trips.
    assert!(report.stats.calls.iter().all(|c| c.guest.count() == 0));
    assert!(report.stats.calls.iter().any(|c| c.host.count() > 0));
}

#[test]
fn a_v1_clock_guest_sleeps_on_the_clock_page() {
    let report = run_old("clock", &["3"]);
    assert!(
        report.console_text().ends_with("never backwards\n"),
        "{}",
        report.console_text()
    );
    assert_eq!(report.stats.hypercall(HypercallNr::Block), 3);
}

#[test]
fn a_v1_mmu_guest_remaps_and_batches() {
    let report = run_old("mmu", &[]);
    assert!(report.console_text().ends_with("mmu ok\n"));
    assert!(report.stats.hypercall(HypercallNr::MmuUpdate) > 1000);
}

#[test]
fn a_v1_guest_handles_its_own_page_faults() {
    let report = run_old("demand", &[]);
    assert!(report.console_text().ends_with("demand ok\n"));
    assert_eq!(report.stats.traps, 512);
    assert_eq!(report.stats.hypercall(HypercallNr::TrapReturn), 512);
}
