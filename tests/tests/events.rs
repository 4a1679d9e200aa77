//! Events with real guests: raised from the host while the guest is
//! blocked, running or about to block, none is lost; masked events do not
//! wake a guest; sharded hosts deliver them too.

mod common;

use shoal_abi::HypercallNr;
use shoal_host::{GuestConfig, GuestHandle, GuestState, Host, HostConfig, Limits};
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// Spawns the `events` guest with `args`, its console lines sent to the
/// receiver.
fn spawn_events(host: &Host, args: &[&str]) -> (GuestHandle, Receiver<String>) {
    let (sink, rx) = common::line_sink();
    let config = GuestConfig {
        console_sink: Some(sink),
        // A lost wake-up leaves the guest blocked: end it rather than hang.
        limits: Limits {
            run_time: Some(Duration::from_secs(120)),
            ..Default::default()
        },
        ..common::config(args)
    };
    let guest = host
        .spawn(&common::image("events"), config)
        .expect("spawns");
    (guest, rx)
}

/// Raises event 0, waits for the answer, `rounds` times.
fn ping_pong(host: &Host, rounds: u64) {
    let rounds_arg = rounds.to_string();
    let (guest, lines) = spawn_events(host, &["ping", &rounds_arg]);
    for round in 0..rounds {
        guest.raise_events(1);
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no answer to event {round}: a lost wake-up"));
        assert_eq!(line, format!("pong {round}"));
    }
    let report = guest.wait();
    common::assert_exited_0(&report);
    let text = report.console_text();
    let summary = text.lines().last().unwrap_or_default();
    let counts: Vec<u64> = summary
        .strip_prefix("events ok: ")
        .unwrap_or_else(|| panic!("no summary: {summary}"))
        .split(", ")
        .map(|part| part.split(' ').next().unwrap().parse().unwrap())
        .collect();
    let (blocks, early) = (counts[0], counts[1]);
    // The host served every block the guest made, once.
    assert_eq!(report.stats.hypercall(HypercallNr::Block), blocks);
    // A block that returned with the event ended its round: one a round
    // at most (none when the event was already there).
    assert!(blocks - early <= rounds, "{blocks} blocks, {early} early");
    // The ABI lets the host return early, but it is rare: a host that
    // woke guests for nothing would make them spin.
    assert!(
        early <= rounds / 10,
        "{early} early returns in {rounds} rounds"
    );
}

#[test]
fn events_raised_around_a_blocking_guest_always_wake_it() {
    ping_pong(&common::host(), 2000);
}

#[test]
fn masked_events_stay_pending_without_waking_the_guest() {
    let host = common::host();
    let (guest, lines) = spawn_events(&host, &["mask", "1500"]);
    common::wait_for_state(&guest, GuestState::Blocked);
    guest.raise_events(0b10);
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("answers");
    assert_eq!(line, "timed out; pending 0x2");
    common::wait_for_state(&guest, GuestState::Blocked);
    guest.raise_events(0b101);
    let report = guest.wait();
    common::assert_exited_0(&report);
    assert!(
        report.console_text().ends_with("slept\n"),
        "{}",
        report.console_text()
    );
    // The wait and the sleep: neither was woken early by an event it
    // masked (a wake would make it block again).
    assert_eq!(report.stats.hypercall(HypercallNr::Block), 2);
}

#[test]
fn a_sharded_host_raises_events_in_its_shard_processes() {
    let host = Host::with_config(HostConfig {
        shard_size: Some(2),
        pool: 2,
        ..Default::default()
    })
    .expect("starts");
    ping_pong(&host, 200);
}

#[test]
fn raising_events_for_an_ended_guest_does_nothing() {
    let host = common::host();
    let (guest, _lines) = spawn_events(&host, &["nonsense"]);
    common::wait_for_state(&guest, GuestState::Ended);
    guest.raise_events(u64::MAX);
    assert_eq!(guest.wait().end, shoal_host::GuestEnd::Exited(2));
}
