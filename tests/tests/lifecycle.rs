//! A guest's life from the embedding API: states, kill, limits, errors.

mod common;

use shoal_abi::HypercallNr;
use shoal_host::guest::SpawnError;
use shoal_host::{ExitReason, GuestConfig, GuestEnd, GuestState};
use std::time::{Duration, Instant};

#[test]
fn killing_a_blocked_guest_ends_it_and_keeps_its_console() {
    let host = common::host();
    let guest = common::spawn(&host, "clock", &["100000"]);
    common::wait_for_state(&guest, GuestState::Blocked);
    guest.kill();
    let report = guest.wait();
    assert_eq!(report.end, GuestEnd::Killed);
    assert!(report.stats.hypercall(HypercallNr::Block) >= 1);
}

#[test]
fn killing_a_spinning_guest_interrupts_it() {
    let host = common::host();
    let guest = common::spawn(&host, "spin", &["forever"]);
    // Wait until it printed, i.e. is inside its hypercall-free loop.
    let give_up = Instant::now() + Duration::from_secs(30);
    while guest.console() != b"spinning\n" {
        assert!(Instant::now() < give_up, "spin never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(guest.state(), GuestState::Running);
    guest.kill();
    let report = guest.wait();
    assert_eq!(report.end, GuestEnd::Killed);
    assert_eq!(report.console_text(), "spinning\n");
}

#[test]
fn a_spinning_guest_that_finishes_exits_normally() {
    let report = common::run("spin", &["20ms"]);
    assert_eq!(report.end, GuestEnd::Exited(0));
    assert!(report.console_text().starts_with("spinning\nspun, 0x"));
    // The flush of the first line and the exit (the second line goes
    // through the console ring): spinning and reading the clock cost no
    // exits at all.
    assert_eq!(report.stats.exits, 2, "{:?}", report.stats);
    assert_eq!(report.stats.exits_for(ExitReason::Hypercall), 2);
    assert_eq!(report.stats.exits_for(ExitReason::NullExit), 0);
    assert!(report.stats.first_exit_ns > 0, "{:?}", report.stats);
}

#[test]
fn kill_after_the_end_changes_nothing() {
    let host = common::host();
    let guest = host
        .spawn(&common::image("hello"), GuestConfig::default())
        .expect("spawns");
    common::wait_for_state(&guest, GuestState::Ended);
    guest.kill();
    assert_eq!(guest.wait().end, GuestEnd::Exited(0));
}

#[test]
fn console_limit_truncates_output_but_not_the_guest() {
    let report = common::run_with(
        "hello",
        GuestConfig {
            console_limit: 10,
            ..Default::default()
        },
    );
    assert_eq!(report.end, GuestEnd::Exited(0));
    assert_eq!(report.console_text(), "hello from");
    assert_eq!(report.stats.console_bytes, 10);
}

#[test]
fn console_is_streamed_to_the_sink_as_written() {
    let (tx, rx) = std::sync::mpsc::channel();
    let report = common::run_with(
        "hello",
        GuestConfig {
            args: vec!["streamed".into()],
            console_sink: Some(Box::new(move |id, bytes| {
                let _ = tx.send((id, bytes.to_vec()));
            })),
            ..Default::default()
        },
    );
    let streamed: Vec<u8> = rx
        .try_iter()
        .inspect(|(id, _)| assert_eq!(*id, report.id))
        .flat_map(|(_, b)| b)
        .collect();
    assert_eq!(streamed, report.console);
}

#[test]
fn bad_configurations_are_refused_before_the_guest_runs() {
    let host = common::host();
    let image = common::image("hello");
    let spawn = |config| host.spawn(&image, config).map(|_| ()).expect_err("refused");
    let too_small = spawn(GuestConfig {
        mem_size: 1 << 20,
        ..Default::default()
    });
    assert!(matches!(too_small, SpawnError::Memory(_)), "{too_small}");
    let unaligned = spawn(GuestConfig {
        mem_size: (4 << 20) + 1,
        ..Default::default()
    });
    assert!(matches!(unaligned, SpawnError::Memory(_)), "{unaligned}");
    let long_args = spawn(GuestConfig {
        args: vec!["x".repeat(5000)],
        ..Default::default()
    });
    assert!(
        long_args
            .to_string()
            .contains("guest arguments take 5001 bytes"),
        "{long_args}"
    );
}

#[test]
fn abi_version_mismatch_is_refused_with_both_versions() {
    let mut elf = shoal_host::builtin::elf("hello")
        .expect("built in")
        .to_vec();
    let note = shoal_abi::note::AbiNote::new(shoal_abi::ABI_VERSION);
    let name_at = elf
        .windows(8)
        .position(|w| w == note.name)
        .expect("the ABI note is in the image");
    let version_at = name_at + 8;
    elf[version_at..version_at + 4].copy_from_slice(&7u32.to_le_bytes());
    let err = shoal_host::Image::parse(&elf).expect_err("refused");
    assert_eq!(
        err.to_string(),
        format!(
            "guest was built for ABI v7, but this host speaks ABI v{}",
            shoal_abi::ABI_VERSION
        )
    );
}

#[test]
fn dropping_a_handle_kills_the_guest() {
    let host = common::host();
    let guest = common::spawn(&host, "spin", &["forever"]);
    common::wait_for_state(&guest, GuestState::Running);
    // Returns only once the guest's thread has ended.
    drop(guest);
}

#[test]
fn a_panicking_console_sink_ends_only_its_own_guest() {
    let host = common::host();
    let image = common::image("hello");
    let bad = host
        .spawn(
            &image,
            GuestConfig {
                console_sink: Some(Box::new(|_, _| panic!("embedder's sink fails"))),
                ..Default::default()
            },
        )
        .expect("spawns");
    let good = common::spawn(&host, "hello", &[]);
    let bad = bad.wait();
    assert!(
        matches!(&bad.end, GuestEnd::Crashed(shoal_host::Crash::Internal(why)) if why.contains("host panicked")),
        "{}",
        bad.end
    );
    common::assert_exited_0(&good.wait());
    // The workers survived: the host still runs guests.
    common::assert_exited_0(&common::spawn(&host, "hello", &[]).wait());
}

#[test]
fn stats_report_guest_memory_and_what_is_resident() {
    let host = common::host();
    let guest = common::spawn(&host, "idle", &["10s"]);
    common::wait_for_state(&guest, GuestState::Blocked);
    let live = guest.stats();
    assert_eq!(live.memory_bytes, shoal_abi::layout::DEFAULT_MEMORY);
    // Lazily backed: an idle guest has touched a few pages of its 4 MiB.
    assert!(
        live.resident_bytes > 0 && live.resident_bytes < live.memory_bytes / 4,
        "{live:?}"
    );
    guest.kill();
    let report = guest.wait();
    assert_eq!(report.stats.memory_bytes, live.memory_bytes);
    assert!(
        report.stats.resident_bytes >= live.resident_bytes,
        "{report:?}"
    );
}
