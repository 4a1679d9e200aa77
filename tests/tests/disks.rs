//! Disks with real guests: what a guest writes and flushes is in the host
//! file, byte for byte, even if it is killed right after; read-only disks
//! refuse writes and are shared; writable disks are exclusive; hostile
//! rings stop exactly their guest, with the reason, while a neighbour's
//! disk keeps working.

mod common;

use shoal_host::{Crash, DiskSpec, GuestConfig, GuestEnd, Host, HostConfig, Limits};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// The word at word index `index` of a disk the `blk` guest filled with
/// `seed` (the guest's `pattern`).
fn pattern(seed: u64, index: u64) -> u64 {
    (index ^ seed.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed
}

/// A scratch disk file of `len` bytes, zeroed.
fn scratch(len: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.as_file().set_len(len).expect("sized");
    file
}

/// A scratch disk already holding the pattern of `seed`.
fn patterned(len: u64, seed: u64) -> tempfile::NamedTempFile {
    let mut file = scratch(0);
    let bytes: Vec<u8> = (0..len / 8)
        .flat_map(|i| pattern(seed, i).to_le_bytes())
        .collect();
    file.write_all(&bytes).expect("written");
    file
}

/// Asserts that the file holds the pattern of `seed` from start to end.
fn assert_pattern(path: &Path, seed: u64) {
    let bytes = std::fs::read(path).expect("readable");
    assert!(!bytes.is_empty());
    for (i, word) in bytes.chunks_exact(8).enumerate() {
        let want = pattern(seed, i as u64).to_le_bytes();
        assert_eq!(word, want, "word {i} (byte {}) of the host file", i * 8);
    }
}

fn disk(path: &Path, read_only: bool) -> DiskSpec {
    DiskSpec {
        path: path.to_path_buf(),
        read_only,
    }
}

/// The `blk` guest with `args` and these disks.
fn blk(args: &[&str], disks: Vec<DiskSpec>) -> GuestConfig {
    GuestConfig {
        disks,
        limits: Limits {
            run_time: Some(Duration::from_secs(120)),
            ..Default::default()
        },
        ..common::config(args)
    }
}

fn spawn_blk(host: &Host, config: GuestConfig) -> shoal_host::GuestHandle {
    host.spawn(&common::image("blk"), config)
        .unwrap_or_else(|e| panic!("cannot spawn blk: {e}"))
}

#[test]
fn a_flushed_pattern_is_in_the_host_file_byte_for_byte() {
    let file = scratch(3 << 20);
    let report = spawn_blk(
        &common::host(),
        blk(&["check", "7"], vec![disk(file.path(), false)]),
    )
    .wait();
    common::assert_exited_0(&report);
    assert!(report.console_text().contains("blk ok: 6144 sectors"));
    assert_pattern(file.path(), 7);
    // Requests travel in batches of 16: the event index spares most
    // notifications (a notification per request would be 1:1).
    let stats = &report.stats;
    assert!(stats.device_requests > 2 * 48, "{stats:?}");
    assert!(
        stats.notifications * 4 <= stats.device_requests,
        "{} notifications for {} requests",
        stats.notifications,
        stats.device_requests
    );
}

#[test]
fn a_guest_killed_right_after_its_flush_loses_none_of_the_flushed_data() {
    let file = scratch(2 << 20);
    let host = common::host();
    let (sink, lines) = common::line_sink();
    let guest = spawn_blk(
        &host,
        GuestConfig {
            console_sink: Some(sink),
            ..blk(&["fill", "11"], vec![disk(file.path(), false)])
        },
    );
    let line = lines
        .recv_timeout(Duration::from_secs(60))
        .expect("the guest reports its flush");
    assert_eq!(line, "flushed");
    guest.kill();
    assert_eq!(guest.wait().end, GuestEnd::Killed);
    assert_pattern(file.path(), 11);
}

#[test]
fn read_only_disks_refuse_writes_and_out_of_range_requests_get_an_error() {
    let file = patterned(1 << 20, 3);
    let report = spawn_blk(
        &common::host(),
        blk(&["refused"], vec![disk(file.path(), true)]),
    )
    .wait();
    common::assert_exited_0(&report);
    assert!(report.console_text().contains("refused ok"));
    assert_pattern(file.path(), 3);
    let info = spawn_blk(
        &common::host(),
        blk(&["info"], vec![disk(file.path(), true)]),
    )
    .wait();
    common::assert_exited_0(&info);
    let name = file.path().file_name().unwrap().to_string_lossy();
    let id: String = name.chars().take(20).collect();
    assert!(
        info.console_text()
            .contains(&format!("disk 0: 2048 sectors, read-only, id {id:?}")),
        "{}",
        info.console_text()
    );
}

#[test]
fn many_guests_share_one_read_only_disk() {
    let file = patterned(1 << 20, 5);
    let host = common::host();
    let guests: Vec<_> = (0..40)
        .map(|_| spawn_blk(&host, blk(&["verify", "5"], vec![disk(file.path(), true)])))
        .collect();
    for guest in guests {
        let report = guest.wait();
        common::assert_exited_0(&report);
        assert!(report.console_text().contains("verified 2048 sectors"));
    }
}

#[test]
fn a_writable_disk_belongs_to_one_guest_at_a_time() {
    let file = scratch(1 << 20);
    let host = common::host();
    let holder = spawn_blk(
        &host,
        GuestConfig {
            mem_size: 4 << 20,
            ..blk(&["fill", "1"], vec![disk(file.path(), false)])
        },
    );
    for read_only in [false, true] {
        let refused = host
            .spawn(
                &common::image("blk"),
                blk(&["info"], vec![disk(file.path(), read_only)]),
            )
            .expect_err("the disk is in use");
        assert!(refused.to_string().contains("in use"), "{refused}");
    }
    holder.kill();
    holder.wait();
    // Free again once its guest is gone.
    let report = spawn_blk(&host, blk(&["info"], vec![disk(file.path(), false)])).wait();
    common::assert_exited_0(&report);
}

#[test]
fn a_guest_without_that_disk_file_does_not_start() {
    let error = common::host()
        .spawn(
            &common::image("blk"),
            blk(
                &["info"],
                vec![disk(Path::new("/nonexistent/disk.img"), true)],
            ),
        )
        .expect_err("no such file");
    assert!(error.to_string().contains("cannot open disk"), "{error}");
}

#[test]
fn queue_setup_refuses_bad_rings() {
    let file = scratch(1 << 20);
    let report = common::run_with(
        "ring-attack",
        blk(&["setup"], vec![disk(file.path(), false)]),
    );
    common::assert_exited_0(&report);
    assert!(report.console_text().contains("setup refusals ok"));
}

/// Each way of breaking a ring, with what the host's reason says.
const ATTACKS: [(&str, &str); 11] = [
    ("loop", "loops or is longer than the queue"),
    ("index", "descriptor index 1000 is past the queue"),
    ("next", "descriptor index 999 is past the queue"),
    ("outside", "outside guest-owned memory"),
    ("past-end", "outside guest-owned memory"),
    ("rings", "at the queue's own rings"),
    ("huge", "declares more than"),
    ("indirect", "indirect descriptor"),
    ("ahead", "available ring"),
    ("cut", "has no status byte"),
    ("storm", "notification storm"),
];

#[test]
fn every_broken_ring_stops_its_guest_with_the_reason_and_a_neighbour_keeps_its_disk() {
    let host = common::host();
    let neighbour_disk = scratch(4 << 20);
    let neighbour = spawn_blk(
        &host,
        blk(&["check", "9"], vec![disk(neighbour_disk.path(), false)]),
    );
    let files: Vec<_> = ATTACKS.iter().map(|_| scratch(1 << 20)).collect();
    let attackers: Vec<_> = ATTACKS
        .iter()
        .zip(&files)
        .map(|((mode, _), file)| {
            let config = blk(&[mode], vec![disk(file.path(), false)]);
            host.spawn(&common::image("ring-attack"), config)
                .expect("spawns")
        })
        .collect();
    for ((mode, reason), attacker) in ATTACKS.iter().zip(attackers) {
        let report = attacker.wait();
        match &report.end {
            GuestEnd::Crashed(Crash::Device {
                device: 0,
                reason: got,
            }) => {
                assert!(got.contains(reason), "{mode}: stopped for {got:?}")
            }
            other => panic!(
                "{mode}: ended {other:?}; console: {}",
                report.console_text()
            ),
        }
        assert!(report.console_text().contains(&format!("sending {mode}")));
    }
    let report = neighbour.wait();
    common::assert_exited_0(&report);
    assert_pattern(neighbour_disk.path(), 9);
}

#[test]
fn notifying_under_the_storm_limit_is_not_an_attack() {
    let file = scratch(1 << 20);
    let report = common::run_with(
        "ring-attack",
        blk(&["storm", "15000", "300ms"], vec![disk(file.path(), false)]),
    );
    common::assert_exited_0(&report);
    assert!(
        report
            .console_text()
            .contains("storm at 15000/s not stopped")
    );
    assert!(report.stats.notifications >= 4000, "{:?}", report.stats);
}

#[test]
fn disks_work_in_shard_processes() {
    let file = scratch(1 << 20);
    let host = Host::with_config(HostConfig {
        shard_size: Some(1),
        ..Default::default()
    })
    .expect("a sharded host");
    let report = spawn_blk(&host, blk(&["check", "4"], vec![disk(file.path(), false)])).wait();
    common::assert_exited_0(&report);
    assert_pattern(file.path(), 4);
    assert!(report.stats.device_requests > 0);
}
