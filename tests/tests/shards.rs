//! A sharded host spreads guests over shard processes yet behaves as one
//! host: ids, arguments, console, stats, kill and limits all cross the
//! process boundary, and losing a shard ends only its own guests.

mod common;

use shoal_abi::HypercallNr;
use shoal_host::{Crash, GuestConfig, GuestEnd, GuestState, Host, HostConfig, Limit, Limits};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Tests here count and kill this process's shard processes, so they run
/// one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn sharded(shard_size: usize) -> (MutexGuard<'static, ()>, Host) {
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    common::host();
    let host = Host::with_config(HostConfig {
        shard_size: Some(shard_size),
        pool: 4,
        ..Default::default()
    })
    .expect("starts");
    (guard, host)
}

/// Pids of this process's children whose command line starts with
/// `shoal-shard`.
fn shard_pids() -> Vec<i32> {
    let mut pids = Vec::new();
    let tasks = std::fs::read_dir("/proc/self/task").expect("readable");
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with(b"shoal-shard") {
                pids.push(pid);
            }
        }
    }
    pids
}

#[test]
fn guests_spread_over_shards_each_with_its_own_id_arguments_and_console() {
    let (_one, host) = sharded(20);
    // Guests that stay fill two shards; the others spread over them.
    let stayers: Vec<_> = (0..30)
        .map(|_| common::spawn(&host, "idle", &["100s"]))
        .collect();
    let guests: Vec<_> = (0..70)
        .map(|i| common::spawn(&host, "hello", &[&format!("guest-number-{i}")]))
        .collect();
    assert!(host.processes() >= 2, "{} shards", host.processes());
    let mut ids = std::collections::HashSet::new();
    for (i, guest) in guests.into_iter().enumerate() {
        let report = guest.wait();
        common::assert_hello(&report, &format!("guest-number-{i}"));
        assert_eq!(report.stats.hypercall(HypercallNr::Exit), 1, "{report:?}");
        assert!(report.stats.cpu_ns > 0 && report.stats.memory_bytes > 0);
        assert!(ids.insert(report.id));
    }
    // Every guest had a VM made ahead of demand, made on demand, or
    // reset after an earlier guest.
    let pool = host.pool();
    assert!(pool.created + pool.misses + pool.reused >= 100, "{pool:?}");
    drop(stayers);
}

#[test]
fn kill_state_and_live_stats_cross_to_the_shard() {
    let (_one, host) = sharded(8);
    let guest = common::spawn(&host, "clock", &["100000"]);
    common::wait_for_state(&guest, GuestState::Blocked);
    let live = guest.stats();
    assert!(live.hypercall(HypercallNr::Block) >= 1, "{live:?}");
    assert!(live.resident_bytes > 0, "{live:?}");
    guest.kill();
    let report = guest.wait();
    assert_eq!(report.end, GuestEnd::Killed);
    assert!(report.stats.hypercall(HypercallNr::Block) >= live.hypercall(HypercallNr::Block));
}

#[test]
fn limits_stop_exactly_the_guest_that_exceeds_them_in_a_shard() {
    let (_one, host) = sharded(8);
    let neighbour = common::spawn(&host, "clock", &["5"]);
    let limit = Duration::from_millis(30);
    let spinner = host
        .spawn(
            &common::image("spin"),
            GuestConfig {
                args: vec!["forever".into()],
                limits: Limits {
                    cpu_time: Some(limit),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .expect("spawns");
    assert_eq!(
        spinner.wait().end,
        GuestEnd::Crashed(Crash::LimitExceeded(Limit::CpuTime(limit)))
    );
    common::assert_exited_0(&neighbour.wait());
}

#[test]
fn a_lost_shard_ends_its_own_guests_and_no_others() {
    let (_one, host) = sharded(1);
    let doomed = common::spawn(&host, "idle", &["100s"]);
    common::wait_for_state(&doomed, GuestState::Blocked);
    let before = shard_pids();
    let survivor = common::spawn(&host, "idle", &["200ms"]);
    let victim = *before.first().expect("a shard process");
    // SAFETY: `kill` sends a signal to our own child; no memory involved.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    match doomed.wait().end {
        GuestEnd::Crashed(Crash::Internal(why)) => assert!(why.contains("exited"), "{why}"),
        other => panic!("{other}"),
    }
    common::assert_exited_0(&survivor.wait());
    // The host carries on with a new shard for the next guest.
    common::assert_exited_0(&common::spawn(&host, "hello", &[]).wait());
}

#[test]
fn dropping_a_sharded_host_ends_every_shard_process() {
    let (_one, host) = sharded(2);
    let guests: Vec<_> = (0..5)
        .map(|_| common::spawn(&host, "idle", &["100s"]))
        .collect();
    assert_eq!(shard_pids().len(), 3);
    drop(guests);
    drop(host);
    assert!(shard_pids().is_empty(), "{:?}", shard_pids());
}

#[test]
fn a_pool_keeps_no_more_vms_waiting_than_its_room() {
    use shoal_host::pool::{Pool, Toolstack};
    common::host();
    let toolstack =
        std::sync::Arc::new(Toolstack::new(shoal_host::kvm::Kvm::open().expect("opens")));
    let pool = Pool::start(&toolstack, 4, shoal_abi::layout::DEFAULT_MEMORY).expect("starts");
    let settles_at = |ready: usize| {
        let give_up = Instant::now() + Duration::from_secs(30);
        while pool.status().ready != ready {
            assert!(Instant::now() < give_up, "{:?}, not {ready}", pool.status());
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    settles_at(4);
    pool.set_room(1);
    settles_at(1);
    pool.set_room(0);
    settles_at(0);
    // More room is filled at the next spawn, not before.
    pool.set_room(3);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(pool.status().ready, 0);
    let template = shoal_host::boot::Template::build(
        &common::image("hello"),
        shoal_abi::layout::DEFAULT_MEMORY,
    )
    .expect("builds");
    assert!(pool.take(&std::sync::Arc::new(template)).is_none());
    settles_at(3);
    assert_eq!(pool.status().created, 7);
    // Those were made ready for the template the spawn asked for.
    assert_eq!(pool.status().primed, 3);
}

#[test]
fn a_panicking_console_sink_ends_only_its_own_guest_in_a_shard() {
    let (_one, host) = sharded(8);
    let bad = host
        .spawn(
            &common::image("hello"),
            GuestConfig {
                console_sink: Some(Box::new(|_, _| panic!("embedder's sink fails"))),
                ..Default::default()
            },
        )
        .expect("spawns");
    let good = common::spawn(&host, "hello", &[]);
    match bad.wait().end {
        GuestEnd::Crashed(Crash::Internal(why)) => assert!(why.contains("host panicked"), "{why}"),
        other => panic!("{other}"),
    }
    common::assert_exited_0(&good.wait());
    common::assert_exited_0(&common::spawn(&host, "hello", &[]).wait());
}
