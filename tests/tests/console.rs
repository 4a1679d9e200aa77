//! The console ring (feature `CONSOLE_RING`): guests print without an
//! exit, and the host takes the bytes at their next exit of any kind.

mod common;

use shoal_abi::HypercallNr;
use shoal_host::{Crash, GuestConfig, GuestEnd, Limits, Observe};
use std::time::Duration;

fn with_stats(args: &[&str], console_ring: bool) -> GuestConfig {
    GuestConfig {
        console_ring,
        observe: Observe {
            call_stats: true,
            ..Default::default()
        },
        ..common::config(args)
    }
}

#[test]
fn hello_prints_through_the_ring_with_no_console_write_and_the_same_output_without_it() {
    let ring = common::run_with("hello", with_stats(&["a", "b"], true));
    let calls = common::run_with("hello", with_stats(&["a", "b"], false));
    common::assert_exited_0(&ring);
    common::assert_exited_0(&calls);
    let text = ring.console_text();
    assert!(
        text.starts_with(&format!("hello from guest {}\n", ring.id)),
        "{text}"
    );
    assert!(text.ends_with("arg 0: a\narg 1: b\n2 args\n"), "{text}");
    // The same lines but the first two (the id and the time).
    let after_two = |text: String| text.lines().skip(2).map(String::from).collect::<Vec<_>>();
    assert_eq!(after_two(text), after_two(calls.console_text()));
    assert_eq!(ring.stats.hypercall(HypercallNr::ConsoleWrite), 0);
    assert_eq!(calls.stats.hypercall(HypercallNr::ConsoleWrite), 6);
    assert_eq!(ring.stats.console_bytes, ring.console.len() as u64);
}

#[test]
fn a_flood_larger_than_the_ring_arrives_whole_and_in_order() {
    let report = common::run_with("console-ring", with_stats(&["flood", "500"], true));
    common::assert_exited_0(&report);
    let text = report.console_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 500, "{text}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            *line,
            format!("line {i:05} of the flood, with no exit in between")
        );
    }
    // 500 lines of 48 bytes fill the 2 KiB ring many times over: the SDK
    // falls back to a hypercall when it is full, which empties it.
    let writes = report.stats.hypercall(HypercallNr::ConsoleWrite);
    assert!((1..500).contains(&writes), "{writes} console_write calls");
}

#[test]
fn a_guest_stopped_in_a_spin_keeps_what_it_put_in_the_ring() {
    let report = common::run_with(
        "console-ring",
        GuestConfig {
            limits: Limits {
                run_time: Some(Duration::from_millis(200)),
                ..Default::default()
            },
            ..common::config(&["spin"])
        },
    );
    assert!(
        matches!(report.end, GuestEnd::Crashed(Crash::LimitExceeded(_))),
        "{:?}",
        report.end
    );
    assert_eq!(report.console_text(), "in the ring before the spin\n");
}

#[test]
fn a_wrong_tail_written_by_the_guest_is_put_right_at_its_next_exit() {
    let report = common::run_with("console-ring", with_stats(&["tail", "20"], true));
    common::assert_exited_0(&report);
    let expected: String = (0..20)
        .map(|i| format!("line {i:05} after a wrong tail\n"))
        .collect();
    assert_eq!(report.console_text(), expected);
    // The first line finds no room and goes by hypercall; the host puts
    // the tail right at that exit, and the rest go through the ring.
    assert_eq!(report.stats.hypercall(HypercallNr::ConsoleWrite), 1);
}

#[test]
fn output_that_fills_the_ring_exactly_needs_no_hypercall() {
    let report = common::run_with("console-ring", with_stats(&["fill"], true));
    common::assert_exited_0(&report);
    let text = report.console_text();
    assert_eq!(text.len(), 2048);
    assert!(text.lines().all(|l| l.len() == 511), "{text}");
    assert_eq!(report.stats.hypercall(HypercallNr::ConsoleWrite), 0);
}

#[test]
fn a_guest_that_overruns_its_ring_is_stopped_with_the_reason_and_its_neighbour_is_not() {
    let host = common::host();
    let neighbour = common::spawn(&host, "hello", &["next door"]);
    let report = common::spawn(&host, "console-ring", &["overrun"]).wait();
    match &report.end {
        GuestEnd::Crashed(Crash::ConsoleRing { head, tail }) => {
            assert_eq!(head.wrapping_sub(*tail), 2049);
        }
        end => panic!("expected a console ring crash, got {end:?}"),
    }
    assert_eq!(report.console_text(), "handed over before the overrun\n");
    let neighbour = neighbour.wait();
    common::assert_exited_0(&neighbour);
    assert!(neighbour.console_text().contains("arg 0: next door"));
}
