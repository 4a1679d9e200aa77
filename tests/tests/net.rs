//! Virtual LANs with real guests: two guests exchange 10,000 frames with
//! none lost or reordered; frames the LAN must drop are dropped and
//! counted, without stopping the sender or disturbing a conversation
//! beside it; a guest flooding the LAN does not stop two others talking;
//! and all of it holds with the guests in different shard processes.

mod common;

use shoal_host::{GuestHandle, Host};

/// Frames a guest may miss because they came before it opened its
/// network device (probes, a frame from a neighbour).
const EARLY: u64 = 10;

/// Runs a `ping` pair on `lan` to the end; asserts both succeeded and no
/// frame was dropped or missed. Returns the sender's console.
fn ping_pair(host: &Host, lan: &str, args: &[&str], frames: u64) -> String {
    let pair = [
        common::on_lan(host, "ping", lan, args),
        common::on_lan(host, "ping", lan, args),
    ];
    let reports = pair.map(GuestHandle::wait);
    for report in &reports {
        common::assert_exited_0(report);
        let counts = report.stats.frames;
        assert_eq!(counts.dropped, 0, "{counts:?}");
        // Only what came before the guest opened its device (the other's
        // first probes) may be missed: the guests check every data frame.
        assert!(counts.missed <= EARLY, "{counts:?}");
        assert!(
            counts.sent > frames && counts.received > frames,
            "{counts:?}"
        );
    }
    let texts = reports.map(|r| r.console_text());
    let sender = texts
        .iter()
        .find(|t| t.contains("ping ok"))
        .expect("one guest sent");
    let replier = texts
        .iter()
        .find(|t| t.contains("reply ok"))
        .expect("the other replied");
    assert!(
        replier.contains(&format!("reply ok: {frames} frames in order")),
        "{replier}"
    );
    assert!(
        sender.contains(&format!("ping ok: {frames} frames")),
        "{sender}"
    );
    sender.clone()
}

#[test]
fn two_guests_exchange_10000_frames_none_lost_or_reordered() {
    let host = common::host();
    ping_pair(&host, "pair", &["10000", "64", "32"], 10_000);
    let big = ping_pair(&host, "pair", &["2000", "1514", "16"], 2_000);
    assert!(big.contains("of 1514 bytes"), "{big}");
}

#[test]
fn frames_the_lan_must_drop_are_counted_and_a_conversation_beside_goes_on() {
    let host = common::host();
    let pair = [
        common::on_lan(&host, "ping", "shared", &["3000", "64", "8"]),
        common::on_lan(&host, "ping", "shared", &["3000", "64", "8"]),
    ];
    let attacker = common::on_lan(&host, "net-attack", "shared", &[]).wait();
    common::assert_exited_0(&attacker);
    assert!(
        attacker
            .console_text()
            .contains("sent 6 bad frames and a good one")
    );
    let counts = attacker.stats.frames;
    assert_eq!(counts.dropped, 6, "{counts:?}");
    assert_eq!(counts.sent, 1, "{counts:?}");
    for report in pair.map(GuestHandle::wait) {
        common::assert_exited_0(&report);
        assert!(report.stats.frames.missed <= EARLY);
    }
}

#[test]
fn guests_in_different_shard_processes_exchange_frames_none_lost_or_reordered() {
    let host = common::sharded_host(1);
    ping_pair(&host, "across", &["10000", "64", "32"], 10_000);
    assert_eq!(host.processes(), 2, "one guest in each shard");
    let big = ping_pair(&host, "across", &["2000", "1514", "16"], 2_000);
    assert!(big.contains("of 1514 bytes"), "{big}");
}

/// Floods LAN `lan` of `host` while a `ping` pair on it exchanges 20,000
/// frames; asserts that the pair finished first and that the flooder's
/// broadcasts over its limit were dropped.
fn flood_beside_a_pair(host: &Host, lan: &str) {
    let pair = [
        common::on_lan(host, "ping", lan, &["20000", "64", "8"]),
        common::on_lan(host, "ping", lan, &["20000", "64", "8"]),
    ];
    let victims = pair.each_ref().map(|g| g.id().to_string());
    let started = std::time::Instant::now();
    let flood = common::on_lan(host, "net-flood", lan, &["110s", &victims[0], &victims[1]]);
    for report in pair.map(GuestHandle::wait) {
        common::assert_exited_0(&report);
        let text = report.console_text();
        assert!(
            text.contains("ping ok: 20000 frames")
                || text.contains("reply ok: 20000 frames in order"),
            "{text}"
        );
    }
    // The pair finished while the flood went on.
    assert!(flood.try_end().is_none(), "the flood ended first");
    flood.kill();
    let flood = flood.wait();
    let windows = started.elapsed().as_millis() as u64 / 100 + 1;
    let counts = flood.stats.frames;
    assert!(counts.sent > 20_000, "a flood: {counts:?}");
    // Every third frame is a broadcast: past its share over the run (on
    // a loaded machine the flood may not get there), some were dropped.
    let share = windows * shoal_host::device::net::BROADCAST_LIMIT;
    let broadcasts = (counts.sent + counts.dropped) / 3;
    assert!(
        broadcasts <= share || counts.dropped > 0,
        "{broadcasts} broadcasts against a share of {share}, none dropped: {counts:?}"
    );
}

#[test]
fn a_flooding_guest_does_not_stop_the_others() {
    flood_beside_a_pair(&common::host(), "flooded");
}

#[test]
fn a_flooding_guest_in_another_shard_does_not_stop_the_others() {
    let host = common::sharded_host(1);
    flood_beside_a_pair(&host, "flooded");
    assert_eq!(host.processes(), 3, "each guest in its own shard");
}

#[test]
fn frames_to_an_unknown_address_are_flooded_only_within_the_broadcast_share() {
    let host = common::host();
    let lan = "unknown";
    let listener = common::on_lan(&host, "net-flood", lan, &["3s", "listen"]);
    let started = std::time::Instant::now();
    let flood = common::on_lan(&host, "net-flood", lan, &["1s", "unknown"]).wait();
    let windows = started.elapsed().as_millis() as u64 / 100 + 1;
    common::assert_exited_0(&flood);
    let listened = listener.wait();
    common::assert_exited_0(&listened);
    let counts = flood.stats.frames;
    // Every frame of the flood is flooded: the listener gets at most the
    // broadcast share of each 100 ms window the flood ran in. Counted
    // against the frame limit alone, a flood of 64-byte frames reaches
    // tens of thousands a second.
    let arrived = listened.stats.frames.received + listened.stats.frames.missed;
    let share = windows * shoal_host::device::net::BROADCAST_LIMIT;
    assert!(arrived > 0, "{counts:?}");
    assert!(
        arrived <= share,
        "{arrived} frames flooded to a bystander, over {share}: {counts:?}"
    );
    // Past its share (on a loaded machine it may not get there), the rest
    // was dropped.
    assert!(
        counts.sent + counts.dropped <= share || counts.dropped > 0,
        "none dropped: {counts:?}"
    );
}

#[test]
fn frames_across_shards_to_a_guest_that_is_gone_are_dropped_and_counted() {
    let host = common::sharded_host(1);
    let lan = "gone";
    let report = common::on_lan(&host, "net-flood", lan, &["500ms", "999"]).wait();
    common::assert_exited_0(&report);
    // The guest's shard sent them on; the supervisor found no guest 999.
    assert!(
        report.stats.frames.sent > 1_000,
        "{:?}",
        report.stats.frames
    );
    // The supervisor's trunk thread counts them as it reads them, which
    // may be a little after the guest has ended.
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while host.lan_lost(lan) <= 1_000 && std::time::Instant::now() < give_up {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(host.lan_lost(lan) > 1_000, "{}", host.lan_lost(lan));
}

#[test]
fn a_guest_without_a_lan_has_no_network_device() {
    let report = common::run("ping", &["10"]);
    assert_eq!(report.end, shoal_host::GuestEnd::Exited(2));
    assert!(report.console_text().contains("no network device"));
}
