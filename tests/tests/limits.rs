//! Per-guest limits stop exactly the guest that exceeds them, with the
//! limit as the reason, while a neighbour carries on.

mod common;

use shoal_host::{Crash, GuestConfig, GuestEnd, Limit, Limits};
use std::time::Duration;

fn limited(args: &[&str], limits: Limits) -> GuestConfig {
    GuestConfig {
        limits,
        ..common::config(args)
    }
}

/// Runs `name` with `limits` beside an unlimited `clock` guest; returns
/// the limited guest's report after checking the neighbour exited 0.
fn run_beside_a_neighbour(name: &str, args: &[&str], limits: Limits) -> shoal_host::GuestReport {
    let host = common::host();
    let neighbour = common::spawn(&host, "clock", &["5"]);
    let report = host
        .spawn(&common::image(name), limited(args, limits))
        .expect("spawns")
        .wait();
    common::assert_exited_0(&neighbour.wait());
    report
}

#[test]
fn run_time_limit_stops_blocked_and_spinning_guests() {
    let limit = Duration::from_millis(50);
    for (name, arg) in [("idle", "100s"), ("spin", "forever")] {
        let report = run_beside_a_neighbour(
            name,
            &[arg],
            Limits {
                run_time: Some(limit),
                ..Default::default()
            },
        );
        assert_eq!(
            report.end,
            GuestEnd::Crashed(Crash::LimitExceeded(Limit::RunTime(limit))),
            "{name}"
        );
    }
}

#[test]
fn cpu_time_limit_stops_a_spinner_after_its_budget() {
    let limit = Duration::from_millis(30);
    let report = run_beside_a_neighbour(
        "spin",
        &["forever"],
        Limits {
            cpu_time: Some(limit),
            ..Default::default()
        },
    );
    assert_eq!(
        report.end,
        GuestEnd::Crashed(Crash::LimitExceeded(Limit::CpuTime(limit)))
    );
    assert!(
        report.stats.cpu_ns >= limit.as_nanos() as u64,
        "{:?}",
        report.stats
    );
}

#[test]
fn cpu_time_limit_leaves_an_idle_guest_alone() {
    let report = run_beside_a_neighbour(
        "idle",
        &["30ms"],
        Limits {
            cpu_time: Some(Duration::from_millis(30)),
            ..Default::default()
        },
    );
    assert_eq!(report.end, GuestEnd::Exited(0));
}

#[test]
fn exit_rate_limit_stops_a_flood() {
    let report = run_beside_a_neighbour(
        "bench",
        &["floor", "1000000"],
        Limits {
            exit_rate: Some(500),
            ..Default::default()
        },
    );
    assert_eq!(
        report.end,
        GuestEnd::Crashed(Crash::LimitExceeded(Limit::ExitRate(500)))
    );
    assert_eq!(report.stats.exits, 501, "{:?}", report.stats);
}

#[test]
fn exit_rate_limit_allows_a_guest_under_it() {
    let report = run_beside_a_neighbour(
        "hello",
        &[],
        Limits {
            exit_rate: Some(100),
            ..Default::default()
        },
    );
    assert_eq!(report.end, GuestEnd::Exited(0));
}

#[test]
fn cpu_share_caps_a_spinner_without_stopping_it() {
    let wall = Duration::from_secs(1);
    let report = run_beside_a_neighbour(
        "spin",
        &["1s"],
        Limits {
            cpu_share: Some(20),
            ..Default::default()
        },
    );
    assert_eq!(report.end, GuestEnd::Exited(0), "{}", report.console_text());
    // 20% of one CPU over 1 s is 200 ms, give or take a period's edge
    // and the kick's delay; most of the rest of the second it waits out
    // its periods (the remainder it holds a worker that waits for a host
    // CPU, when other tests keep them busy).
    let cpu = Duration::from_nanos(report.stats.cpu_ns);
    let throttled = Duration::from_nanos(report.stats.throttled_ns);
    assert!(
        cpu >= wall / 12 && cpu <= wall * 3 / 10,
        "{cpu:?} of CPU: {:?}",
        report.stats
    );
    assert!(throttled >= wall * 4 / 10, "{throttled:?} throttled");
}
