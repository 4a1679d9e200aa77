//! A disk flush waits for the storage; the guest that asked for it waits
//! with it, and no other guest's devices do. In a test binary of its own:
//! it holds every disk sync of the process.

mod common;

use shoal_host::{DiskSpec, GuestConfig, GuestHandle};
use std::time::{Duration, Instant};

/// Waits up to a minute for `guest` to end; false if it has not.
fn ends_within_a_minute(guest: &GuestHandle) -> bool {
    let give_up = Instant::now() + Duration::from_secs(60);
    while guest.try_end().is_none() {
        if Instant::now() > give_up {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

#[test]
fn a_guest_waiting_for_its_flush_holds_up_no_other_guests_devices() {
    let host = common::host();
    let file = tempfile::NamedTempFile::new().expect("a scratch file");
    file.as_file().set_len(3 << 20).expect("sized");
    // Every sync waits until `hold` goes: storage that takes forever.
    let hold = shoal_host::device::hold_flushes();
    let flusher = host
        .spawn(
            &common::image("blk"),
            GuestConfig {
                disks: vec![DiskSpec {
                    path: file.path().to_path_buf(),
                    read_only: false,
                }],
                ..common::config(&["check", "3"])
            },
        )
        .expect("spawns");
    let give_up = Instant::now() + Duration::from_secs(30);
    while hold.waiting() == 0 {
        assert!(Instant::now() < give_up, "no flush reached the host");
        assert!(flusher.try_end().is_none(), "ended before its flush");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Two guests talk over a LAN, served by the same device thread, while
    // the flush is held.
    let pair = [
        common::on_lan(&host, "ping", "beside", &["2000", "64", "8"]),
        common::on_lan(&host, "ping", "beside", &["2000", "64", "8"]),
    ];
    let ended = pair.iter().all(ends_within_a_minute);
    let flushed_early = flusher.try_end().is_some();
    // Released before anything can fail: a device thread stuck in the
    // held sync would hold up the guests' ends too.
    drop(hold);
    assert!(
        ended,
        "a neighbour's frames waited for another guest's flush"
    );
    assert!(!flushed_early, "its flush was answered before the sync");
    for report in pair.map(GuestHandle::wait) {
        common::assert_exited_0(&report);
    }
    let report = flusher.wait();
    common::assert_exited_0(&report);
    assert!(
        report.console_text().contains("blk ok"),
        "{}",
        report.console_text()
    );
}
