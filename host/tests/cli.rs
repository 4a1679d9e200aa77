//! The `shoal` command line, run as a user would (boots real guests).

use std::process::{Command, Output};

fn shoal(args: &[&str]) -> Output {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests boot real guests and need /dev/kvm, which this machine lacks"
    );
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("shoal runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_hello_streams_its_console_and_exits_0() {
    let out = shoal(&["run", "hello", "--", "one", "two"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("hello from guest 1\nwall clock: "),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("arg 0: one\narg 1: two\n2 args\n"),
        "{stdout}"
    );
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn run_reports_panics_and_crashes_on_stderr_with_distinct_statuses() {
    let out = shoal(&["run", "panic"]);
    assert_eq!(out.status.code(), Some(101));
    assert_eq!(text(&out.stdout), "about to panic\n");
    assert!(
        text(&out.stderr)
            .contains("panicked at panic/src/main.rs:12:5: deliberate panic, answer = 42"),
        "{}",
        text(&out.stderr)
    );
    let out = shoal(&["run", "privileged"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("crashed: #GP general protection fault"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn run_passes_the_guest_exit_code_through() {
    let out = shoal(&["run", "spin", "--", "not-a-duration"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("exited with code 2"));
}

#[test]
fn unknown_kernels_and_bad_images_are_refused() {
    let out = shoal(&["run", "no-such-guest"]);
    assert_eq!(out.status.code(), Some(126));
    assert!(
        text(&out.stderr).contains("no built-in guest of that name (built in: hello"),
        "{}",
        text(&out.stderr)
    );

    let dir = std::env::temp_dir().join(format!("shoal-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let not_elf = dir.join("not-elf");
    std::fs::write(&not_elf, b"#!/bin/sh\n").expect("writes");
    let out = shoal(&["run", not_elf.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(126));
    assert!(
        text(&out.stderr).contains("not a valid ELF file"),
        "{}",
        text(&out.stderr)
    );

    let mut elf = shoal_host::builtin::elf("hello")
        .expect("built in")
        .to_vec();
    let at = elf
        .windows(8)
        .position(|w| w == b"shoal\0\0\0")
        .expect("note")
        + 8;
    elf[at..at + 4].copy_from_slice(&2u32.to_le_bytes());
    let future = dir.join("future-abi");
    std::fs::write(&future, &elf).expect("writes");
    let out = shoal(&["run", future.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(126));
    assert!(
        text(&out.stderr).contains("guest was built for ABI v2, but this host speaks ABI v1"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inspect_shows_version_entry_segments_and_memory() {
    let out = shoal(&["inspect", "hello"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("ABI version: 1\nentry:       0x100000\nsegments:\n"),
        "{stdout}"
    );
    assert!(stdout.contains(" r-x "), "{stdout}");
    assert!(stdout.contains(" rw- "), "{stdout}");
    assert!(
        stdout.contains("memory:      at least 2048 KiB"),
        "{stdout}"
    );
}

#[test]
fn trace_logging_shows_every_hypercall() {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["run", "hello"])
        .env("RUST_LOG", "trace")
        .output()
        .expect("shoal runs");
    assert_eq!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    // hello makes one wall_clock call, console writes, and an exit.
    assert!(stderr.contains("hypercall{nr=3}"), "{stderr}");
    assert!(stderr.contains("hypercall{nr=2}"), "{stderr}");
    assert!(stderr.contains("guest{id=1}"), "{stderr}");
}

#[test]
fn run_stats_prints_each_calls_count_and_latencies() {
    let out = shoal(&["run", "--stats", "bench", "--", "hypercall", "500"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(
            "hypercall statistics, 1 guests:
  exits: "
        ),
        "{stderr}"
    );
    assert!(stderr.contains("  time: CPU "), "{stderr}");
    let row = stderr
        .lines()
        .find(|l| l.trim_start().starts_with("abi_info "))
        .unwrap_or_else(|| panic!("no abi_info row: {stderr}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    // name, count, then four latencies of two words each ("3.1 us").
    assert_eq!(cells.len(), 10, "{row}");
    assert_eq!(cells[1], "500", "{row}");
    assert!(cells[2..].iter().all(|c| *c != "-"), "{row}");

    let out = shoal(&["run", "-n", "3", "--stats=guests", "hello"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    for id in 1..=3 {
        assert!(
            stderr.contains(&format!("hypercall statistics, guest {id}:\n")),
            "{stderr}"
        );
    }
}

#[test]
fn run_trace_writes_a_line_per_hypercall() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("hello.trace");
    std::fs::write(&path, "stale contents\n").expect("writable");
    // Without the console ring, each line is a console_write.
    let out = shoal(&[
        "run",
        "--trace",
        path.to_str().unwrap(),
        "--no-console-ring",
        "hello",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let trace = std::fs::read_to_string(&path).expect("trace written");
    let mut lines = trace.lines();
    assert_eq!(
        lines.next(),
        Some(shoal_host::observe::TRACE_HEADER.trim_end())
    );
    let names: Vec<&str> = lines
        .map(|l| l.split('\t').nth(3).expect("a name"))
        .collect();
    // hello: the wall clock, its lines, then its exit.
    assert_eq!(names.first(), Some(&"wall_clock"), "{trace}");
    assert_eq!(names.last(), Some(&"exit"), "{trace}");
    assert_eq!(
        names.iter().filter(|n| **n == "console_write").count(),
        text(&out.stdout).lines().count(),
        "{trace}"
    );
}

#[test]
fn run_gdb_waits_for_the_debugger_and_says_how_to_connect() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["run", "--gdb", &port.to_string(), "hello", "--", "x"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("shoal runs");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("piped"));
    let mut hint = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut hint).expect("a line");
    let symbols = std::env::temp_dir().join("shoal-hello.elf");
    assert_eq!(
        hint,
        format!(
            "shoal: the guest waits for GDB on 127.0.0.1:{port}: gdb {} -ex 'target remote 127.0.0.1:{port}'\n",
            symbols.display()
        )
    );
    let gdb = Command::new("gdb")
        .args([
            "-batch",
            "-nx",
            "-ex",
            &format!("target remote 127.0.0.1:{port}"),
        ])
        .args(["-ex", "p/x $pc", "-ex", "continue"])
        .arg(&symbols)
        .output()
        .expect("gdb runs (apt-get install gdb)");
    let said = text(&gdb.stdout);
    assert!(said.contains("$1 = 0x100000"), "{said}");
    assert!(said.contains("exited normally"), "{said}");
    let out = child.wait_with_output().expect("shoal ends");
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).ends_with("arg 0: x\n1 args\n"));
}

#[test]
fn list_names_every_builtin_guest() {
    let out = shoal(&["list"]);
    let stdout = text(&out.stdout);
    for name in [
        "hello",
        "clock",
        "panic",
        "spin",
        "bench",
        "straddle",
        "triple-fault",
        "privileged",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(name)),
            "{name} missing: {stdout}"
        );
    }
}

#[test]
fn run_count_runs_many_guests_with_prefixed_output_and_a_summary() {
    let out = shoal(&["run", "--count", "20", "hello", "--", "x{i}"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for id in 1..=20 {
        assert!(
            stdout.contains(&format!("[{id}] hello from guest {id}\n")),
            "{stdout}"
        );
    }
    let mut args: Vec<_> = stdout
        .lines()
        .filter_map(|l| l.split_once("] arg 0: x").map(|(_, i)| i))
        .collect();
    args.sort_by_key(|i| i.parse::<u32>().unwrap_or(u32::MAX));
    assert_eq!(args, (0..20).map(|i| i.to_string()).collect::<Vec<_>>());
    assert!(
        stdout.contains(
            "20 guests: 20 exited 0, 0 exited non-zero, 0 panicked, 0 crashed, 0 killed\n"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("spawn p50 "), "{stdout}");
}

#[test]
fn run_count_reports_failures_and_fails() {
    let out = shoal(&["run", "--count", "3", "--console", "errors", "panic"]);
    assert_eq!(out.status.code(), Some(101));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.matches("] about to panic\n").count(), 3, "{stdout}");
    assert!(
        stdout.contains("3 guests: 0 exited 0, 0 exited non-zero, 3 panicked, 0 crashed, 0 killed"),
        "{stdout}"
    );
    let out = shoal(&["run", "--count", "3", "--console", "none", "hello"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).starts_with("3 guests: 3 exited 0"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn bench_json_prints_one_object_per_figure() {
    let out = shoal(&[
        "bench",
        "--json",
        "--iterations",
        "200",
        "--rounds",
        "1",
        "--spawns",
        "10",
        "--idle",
        "10",
        "--busy",
        "4",
        "--spinners",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let names: Vec<String> = stdout
        .lines()
        .map(|line| {
            assert!(
                line.starts_with('{') && line.ends_with('}'),
                "not a JSON object: {line}"
            );
            assert!(
                line.contains("\"value\":") && line.contains("\"unit\":"),
                "{line}"
            );
            let name = line
                .split("\"name\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next());
            name.unwrap_or_else(|| panic!("no name in {line}"))
                .to_string()
        })
        .collect();
    for expected in [
        "pio_exit_floor",
        "hypercall_round_trip",
        "clock_read",
        "spawn_warm_p50",
        "start_warm_p50",
        "spawn_cold_p50",
        "spawn_throughput",
        "memory_per_idle_guest",
        "wakeup_latency_p99",
        "fairness_max_deviation",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    let ratio_line = stdout
        .lines()
        .find(|l| l.contains("hypercall_round_trip"))
        .unwrap_or_default();
    assert!(
        ratio_line.contains("\"floor\":") && ratio_line.contains("\"ratio\":"),
        "{ratio_line}"
    );
}

#[test]
fn bench_only_runs_the_named_groups_and_refuses_unknown_ones() {
    let out = shoal(&["bench", "--json", "--only", "spawn", "--spawns", "5"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("\"spawn_warm_p50\""), "{stdout}");
    assert!(!stdout.contains("pio_exit_floor"), "{stdout}");
    let out = shoal(&["bench", "--only", "nope"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("fairness"),
        "{}",
        text(&out.stderr)
    );
}
