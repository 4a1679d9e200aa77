//! Ending a guest frees what it held: file descriptors and threads return
//! to their starting level after many guests exit and crash. (Alone in its
//! test binary so no other test's guests are counted.)

mod common;

use shoal_host::{GuestConfig, GuestEnd};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn guests_that_exit_or_crash_leave_no_fds_or_threads_behind() {
    let host = common::host();
    let hello = common::image("hello");
    let crasher = common::image("triple-fault");
    // One guest first, so one-time setup (the kick handler, TSC scale) is
    // not counted as a leak.
    assert!(
        host.spawn(&hello, GuestConfig::default())
            .expect("spawns")
            .wait()
            .end
            .is_success()
    );
    let fds = count("/proc/self/fd");
    let threads = count("/proc/self/task");
    for round in 0..200 {
        let image = if round % 2 == 0 { &hello } else { &crasher };
        let report = host
            .spawn(image, GuestConfig::default())
            .expect("spawns")
            .wait();
        assert!(
            matches!(report.end, GuestEnd::Exited(0) | GuestEnd::Crashed(_)),
            "{}",
            report.end
        );
    }
    assert_eq!(count("/proc/self/fd"), fds, "file descriptors leaked");
    assert_eq!(count("/proc/self/task"), threads, "threads leaked");
}
