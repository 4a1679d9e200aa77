//! A guest's VM runs a later guest: the pool resets it in between, and
//! nothing of the first guest reaches the second.

mod common;

use shoal_host::{Crash, DiskSpec, GuestConfig, GuestEnd, Host};
use std::time::{Duration, Instant};

/// Where the `residue` guest maps the page it stamps.
const WINDOW: u64 = 0x50_0000_0000;

/// The CPU features `residue check` must report it checked on this
/// machine. Under PVM a guest runs in hardware ring 3 with the host's
/// CR4 and XCR0, so everything the host kernel enabled is the guest's to
/// change; on hardware KVM the guest's own CR4 decides, and none of
/// these is required.
fn cpu_features_residue_must_check() -> Vec<&'static str> {
    if !common::pvm() {
        return Vec::new();
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags"))
        .map(|rest| {
            rest.trim_start_matches([' ', '\t', ':'])
                .split(' ')
                .collect()
        })
        .unwrap_or_default();
    [
        ("xsave", "xsave"),
        ("avx", "avx"),
        ("avx512f", "avx512"),
        ("amx_tile", "amx"),
        ("ospke", "pku"),
        ("fsgsbase", "fsgsbase"),
    ]
    .into_iter()
    .filter(|(flag, _)| flags.contains(flag))
    .map(|(_, checked)| checked)
    .collect()
}

/// Asserts that `residue check` found nothing and checked every piece of
/// CPU state this machine lets a guest change.
fn assert_clean(report: &shoal_host::GuestReport) {
    let text = report.console_text();
    let checked = text
        .lines()
        .find_map(|line| line.strip_prefix("clean: "))
        .unwrap_or_else(|| panic!("not clean: {text}"));
    let checked: Vec<&str> = checked
        .split_once("checked:")
        .map(|(_, names)| names.split_whitespace().collect())
        .unwrap_or_default();
    for feature in cpu_features_residue_must_check() {
        assert!(checked.contains(&feature), "{feature} not checked: {text}");
    }
}

/// Waits until the pool has reset at least `recycled` VMs in all.
fn wait_for_recycled(host: &Host, recycled: u64) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while host.pool().recycled < recycled {
        assert!(
            Instant::now() < give_up,
            "no VM was reset: {:?}",
            host.pool()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn nothing_of_a_guest_reaches_the_next_guest_on_its_vm() {
    let host = common::host();
    let residue = common::image("residue");
    let (recycled, kept) = (host.pool().recycled, host.pool().tables_kept);
    let wrote = host
        .spawn(&residue, common::config(&["write"]))
        .expect("spawns")
        .wait();
    common::assert_exited_0(&wrote);
    // The one VM reset is the one `write` ran on (no other guest ended),
    // and the next spawn takes it before any new one.
    wait_for_recycled(&host, recycled + 1);
    // `write` changed its page tables: KVM's shadow of them was dropped.
    assert_eq!(host.pool().tables_kept, kept, "{:?}", host.pool());
    let reused = host.pool().reused;
    let checked = host
        .spawn(&residue, common::config(&["check", "touch"]))
        .expect("spawns")
        .wait();
    assert_eq!(host.pool().reused, reused + 1, "{:?}", host.pool());
    assert_clean(&checked);
    let text = checked.console_text();
    // Its first touch of the page the last guest mapped faults: no
    // translation of the old guest's survived the reset.
    match checked.end {
        GuestEnd::Crashed(Crash::Exception {
            vector: 14,
            fault_addr: Some(WINDOW),
            ..
        }) => {}
        ref other => panic!("expected a page fault at {WINDOW:#x}, got {other}: {text}"),
    }
}

#[test]
fn a_vm_whose_guest_left_its_page_tables_alone_keeps_their_shadow_for_the_same_image_only() {
    let host = common::host();
    let residue = common::image("residue");
    let run_next = |args: &[&str], image: &shoal_host::Image| {
        let (recycled, kept, reused) = {
            let pool = host.pool();
            (pool.recycled, pool.tables_kept, pool.reused)
        };
        let report = host
            .spawn(image, common::config(args))
            .expect("spawns")
            .wait();
        // Its VM is reset with the shadow tables kept, and the next guest
        // takes that VM.
        wait_for_recycled(&host, recycled + 1);
        assert_eq!(host.pool().tables_kept, kept + 1, "{:?}", host.pool());
        (report, reused)
    };
    // The same image next: nothing dropped at spawn, and no secret in
    // memory that reads as the template again.
    let check = || {
        let (checked, reused) = run_next(&["check"], &residue);
        assert_eq!(host.pool().reused, reused + 1, "{:?}", host.pool());
        common::assert_exited_0(&checked);
        assert_clean(&checked);
        assert_eq!(checked.stats.slot_moves, 0);
    };
    // All of the heap written: more than the reset puts right in place.
    let (wrote, _) = run_next(&["write", "tables"], &residue);
    common::assert_exited_0(&wrote);
    check();
    // A few pages written, and a string `in` the host refused: KVM
    // completes it at the reset, into the memory of the guest that made
    // it, before the reset puts that memory right.
    let (refused, _) = run_next(&["write", "ins"], &residue);
    assert!(
        matches!(refused.end, GuestEnd::Crashed(Crash::BadPortAccess { .. })),
        "{}",
        refused.end
    );
    assert_eq!(refused.console_text(), "");
    check();
    // Another image on that VM: its spawn drops residue's shadow tables.
    let reused = host.pool().reused;
    let hello = host
        .spawn(&common::image("hello"), common::config(&["after residue"]))
        .expect("spawns")
        .wait();
    assert_eq!(host.pool().reused, reused + 1, "{:?}", host.pool());
    common::assert_exited_0(&hello);
    assert!(
        hello
            .console_text()
            .ends_with("arg 0: after residue\n1 args\n")
    );
    assert_eq!(hello.stats.slot_moves, 1);
}

#[test]
fn a_guest_that_opens_the_trapped_window_on_a_vm_with_kept_tables_drops_them_first() {
    let host = common::host();
    let bench = common::image("bench");
    let recycled = host.pool().recycled;
    let plain = host
        .spawn(&bench, common::config(&["floor", "1"]))
        .expect("spawns")
        .wait();
    common::assert_exited_0(&plain);
    wait_for_recycled(&host, recycled + 1);
    assert_eq!(host.pool().tables_kept, 1, "{:?}", host.pool());
    let reused = host.pool().reused;
    let trapped = host
        .spawn(
            &bench,
            GuestConfig {
                trapped_page_tables: true,
                // Changes dropped through the notifier only: the one slot
                // move is the spawn's.
                forget: shoal_host::mmu::Forget::Notifier,
                ..common::config(&["trapped", "10", "4"])
            },
        )
        .expect("spawns")
        .wait();
    assert_eq!(host.pool().reused, reused + 1, "{:?}", host.pool());
    common::assert_exited_0(&trapped);
    assert_eq!(trapped.stats.slot_moves, 1, "{:?}", trapped.stats);
}

#[test]
fn a_vm_whose_guest_had_a_disk_or_the_trapped_tables_runs_the_next_one() {
    let host = common::host();
    // A port KVM still routed to the last guest's device would make the
    // next guest's registration of the same port fail, or its requests
    // go unheard; a slot left over would be the next guest's to reuse.
    let disk = || {
        let file = tempfile::NamedTempFile::new().expect("a scratch file");
        file.as_file().set_len(3 << 20).expect("sized");
        file
    };
    let with_disk = |file: &tempfile::NamedTempFile, seed: &str| GuestConfig {
        disks: vec![DiskSpec {
            path: file.path().to_path_buf(),
            read_only: false,
        }],
        ..common::config(&["check", seed])
    };
    let trapped = || GuestConfig {
        trapped_page_tables: true,
        ..common::config(&["trapped", "10"])
    };
    let (first, second) = (disk(), disk());
    let rounds = [
        ("blk", with_disk(&first, "7"), "blk ok"),
        ("blk", with_disk(&second, "8"), "blk ok"),
        ("mmu", trapped(), "trapped ok"),
        ("mmu", trapped(), "trapped ok"),
    ];
    let recycled = host.pool().recycled;
    for (round, (name, config, ok)) in rounds.into_iter().enumerate() {
        // Every guest before this one left its VM.
        wait_for_recycled(&host, recycled + round as u64);
        let reused = host.pool().reused;
        let report = host
            .spawn(&common::image(name), config)
            .expect("spawns")
            .wait();
        common::assert_exited_0(&report);
        assert!(
            report.console_text().contains(ok),
            "{}",
            report.console_text()
        );
        // Each but the first runs on the VM the one before it left.
        let want = reused + u64::from(round > 0);
        assert_eq!(host.pool().reused, want, "round {round}: {:?}", host.pool());
    }
}

#[test]
fn a_vm_whose_guest_crashed_or_was_killed_runs_the_next_guest() {
    // A triple fault, a page fault stopped in an exception stub (at CPL0,
    // on an `out`), a guest killed in the middle of its loop, a guest
    // stopped in the middle of a split MMIO write, a guest that took
    // every access right to its own pages away through PKRU and faulted:
    // the reset VM runs `hello` as a new one would.
    let host = common::host();
    let hello = common::image("hello");
    let trapped = |args: &[&str]| GuestConfig {
        trapped_page_tables: true,
        ..common::config(args)
    };
    let ends = [
        ("triple-fault", common::config(&[]), false),
        ("mmu", common::config(&["unmap-fault"]), false),
        ("spin", common::config(&["forever"]), true),
        // Stopped at the first of three pieces of one MMIO write: the
        // other two must not reach the next guest as its first exits.
        ("mmu", trapped(&["trapped-split"]), false),
        // Left as it was, that PKRU would stop the next guest at its
        // first stack push.
        ("residue", common::config(&["poison"]), false),
    ];
    // Every guest here leaves a reusable VM: once as many are reset as
    // guests ended, the one reset VM is the last guest's.
    let mut ended = host.pool().recycled;
    for (name, config, kill) in ends {
        // It takes the last `hello`'s VM, and leaves its own the only one.
        wait_for_recycled(&host, ended);
        let guest = host.spawn(&common::image(name), config).expect("spawns");
        if kill {
            // Killed in the middle of its hypercall-free loop.
            let give_up = Instant::now() + Duration::from_secs(30);
            while guest.console().is_empty() {
                assert!(Instant::now() < give_up, "{name} never started");
                std::thread::sleep(Duration::from_millis(1));
            }
            guest.kill();
        }
        let end = guest.wait().end;
        assert!(
            matches!(end, GuestEnd::Crashed(_) | GuestEnd::Killed),
            "{name}: {end}"
        );
        ended += 1;
        wait_for_recycled(&host, ended);
        let reused = host.pool().reused;
        let arg = format!("after-{name}");
        let report = host
            .spawn(&hello, common::config(&[&arg]))
            .expect("spawns")
            .wait();
        assert_eq!(host.pool().reused, reused + 1, "{:?}", host.pool());
        common::assert_hello(&report, &arg);
        ended += 1;
    }
}

#[test]
fn new_vms_made_ready_for_the_last_image_run_a_guest_of_it_or_of_another() {
    let host = common::host();
    let idle = common::image("idle");
    // Held, so that no VM comes back to the pool: the next spawns take
    // new VMs, which the filler makes ready for `idle` from now on.
    let first = host.spawn(&idle, common::config(&["60s"])).expect("spawns");
    let give_up = Instant::now() + Duration::from_secs(30);
    while host.pool().primed == 0 || host.pool().ready == host.pool().ready_reset {
        assert!(
            Instant::now() < give_up,
            "none made ready: {:?}",
            host.pool()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // One of them runs another `idle` guest to its first block.
    let second = host.spawn(&idle, common::config(&["60s"])).expect("spawns");
    common::wait_for_state(&second, shoal_host::GuestState::Blocked);
    // Another image on one: its RAM is remapped, and nothing of the VM's
    // shadow tables needs dropping.
    let hello = host
        .spawn(&common::image("hello"), common::config(&["after idle"]))
        .expect("spawns")
        .wait();
    common::assert_exited_0(&hello);
    let text = hello.console_text();
    assert!(text.ends_with("arg 0: after idle\n1 args\n"), "{text}");
    assert_eq!(hello.stats.slot_moves, 0);
    assert_eq!(host.pool().reused, 0, "{:?}", host.pool());
    for guest in [first, second] {
        guest.kill();
        assert!(matches!(guest.wait().end, GuestEnd::Killed));
    }
}
