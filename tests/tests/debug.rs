//! The GDB stub (`GuestConfig::gdb`), driven by the real `gdb` in batch
//! mode (`.ci/run` installs it from the OS packages where it is missing).

mod common;

use shoal_host::{GuestConfig, GuestEnd, GuestHandle, GuestReport, Host, builtin};
use std::net::TcpListener;
use std::process::Command;

/// A built-in guest's ELF in a temporary file, for gdb's symbols.
fn symbols(name: &str, dir: &tempfile::TempDir) -> String {
    let path = dir.path().join(format!("{name}.elf"));
    std::fs::write(&path, builtin::elf(name).expect("built in")).expect("writable");
    path.display().to_string()
}

/// Spawns `name` under a stub on a loopback port of its own.
fn debugged(host: &Host, name: &str, args: &[&str]) -> (GuestHandle, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = listener.local_addr().expect("bound").port();
    let guest = host
        .spawn(
            &common::image(name),
            GuestConfig {
                gdb: Some(listener),
                ..common::config(args)
            },
        )
        .expect("spawns");
    (guest, port)
}

/// Runs gdb in batch mode on `elf` with `commands` after connecting to
/// `port`; returns what it printed.
fn gdb(elf: &str, port: u16, commands: &[&str]) -> String {
    let mut command = Command::new("gdb");
    command.args(["-batch", "-nx", "-ex", "set confirm off"]);
    command.args(["-ex", &format!("target remote 127.0.0.1:{port}")]);
    for line in commands {
        command.args(["-ex", line]);
    }
    let out = command
        .arg(elf)
        .output()
        .expect("gdb runs (install it from the OS packages: apt-get install gdb)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "gdb failed:\n{text}");
    text
}

/// The value gdb printed for `$N = ...`.
fn printed(text: &str, n: u32) -> String {
    let prefix = format!("${n} = ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no ${n} in:\n{text}"))
        .trim()
        .to_string()
}

#[test]
fn gdb_stops_at_entry_reads_steps_breaks_writes_and_detaches() {
    let host = common::host();
    let dir = tempfile::tempdir().expect("temp dir");
    let elf = symbols("hello", &dir);
    let entry = common::image("hello").entry();
    let (guest, port) = debugged(&host, "hello", &["under gdb"]);
    let text = gdb(
        &elf,
        port,
        &[
            // 1: the first instruction, before anything ran.
            "p/x $pc",
            // 2: the stack pointer at entry; then the code at the entry
            // point, read through the guest's page tables.
            "p/x $rsp",
            "x/2xb $pc",
            "stepi",
            // 3: one instruction on.
            "p/x $pc",
            "rbreak ^shoal_guest::time::wall",
            "rbreak ^shoal_guest::exit",
            "continue",
            // 4: at the first breakpoint.
            "p/x $pc",
            "bt 2",
            "continue",
            // 5: at the second, after the guest printed its lines.
            "p/x $pc",
            "set var *(unsigned long *)($rsp - 64) = 0x1122334455667788",
            // 6: memory written and read back.
            "p/x *(unsigned long *)($rsp - 64)",
            "set $r12 = 0x77",
            // 7: a register written and read back.
            "p/x $r12",
            "delete",
            "stepi",
            // 8: a step from a breakpoint.
            "p/x $pc",
            // Host-reserved memory and the null page are out of reach.
            "x/2xb 0x4000",
            "x/2xb 0",
            "detach",
        ],
    );
    assert_eq!(printed(&text, 1), format!("{entry:#x}"), "{text}");
    assert_eq!(printed(&text, 2), "0x400000", "{text}");
    assert!(
        text.contains(&format!("{entry:#x} <_start>:\t0x31\t0xed")),
        "{text}"
    );
    let stepped = u64::from_str_radix(printed(&text, 3).trim_start_matches("0x"), 16).unwrap();
    assert!(stepped > entry && stepped < entry + 16, "{text}");
    let at_wall = printed(&text, 4);
    assert!(
        text.contains(&format!("Breakpoint 1 at {at_wall}")),
        "{text}"
    );
    assert!(text.contains("Breakpoint 1, 0x"), "{text}");
    assert!(text.contains("in shoal_guest::time::wall"), "{text}");
    assert!(text.contains("Breakpoint 2, 0x"), "{text}");
    let at_exit = printed(&text, 5);
    assert!(
        text.contains(&format!("Breakpoint 2 at {at_exit}")),
        "{text}"
    );
    assert_eq!(printed(&text, 6), "0x1122334455667788", "{text}");
    assert_eq!(printed(&text, 7), "0x77", "{text}");
    assert_ne!(printed(&text, 8), at_exit, "{text}");
    assert!(
        text.contains("Cannot access memory at address 0x4000"),
        "{text}"
    );
    assert!(
        text.contains("Cannot access memory at address 0x0"),
        "{text}"
    );
    assert!(text.contains("[Inferior 1 (process 1) detached]"), "{text}");
    // Detached, with its breakpoints taken out, it ran on to its end.
    let report = guest.wait();
    common::assert_hello(&report, "under gdb");
}

#[test]
fn gdb_sees_the_guest_exit_and_a_crash() {
    let host = common::host();
    let dir = tempfile::tempdir().expect("temp dir");
    let (guest, port) = debugged(&host, "hello", &[]);
    let text = gdb(&symbols("hello", &dir), port, &["continue"]);
    assert!(
        text.contains("[Inferior 1 (process 1) exited normally]"),
        "{text}"
    );
    assert_eq!(guest.wait().end, GuestEnd::Exited(0));

    let (guest, port) = debugged(&host, "privileged", &[]);
    let text = gdb(&symbols("privileged", &dir), port, &["continue"]);
    assert!(
        text.contains("Program terminated with signal SIGSEGV"),
        "{text}"
    );
    assert!(matches!(guest.wait().end, GuestEnd::Crashed(_)));
}

#[test]
fn a_guest_waiting_for_a_debugger_can_be_killed_and_others_run() {
    let host = common::host();
    let (waiting, _port) = debugged(&host, "hello", &[]);
    let other: GuestReport = common::spawn(&host, "hello", &["beside"]).wait();
    common::assert_hello(&other, "beside");
    waiting.kill();
    assert_eq!(waiting.wait().end, GuestEnd::Killed);
}

#[test]
fn a_sharded_host_refuses_a_debugged_guest() {
    let host = common::sharded_host(10);
    let listener = TcpListener::bind("127.0.0.1:0").expect("a port");
    let error = host
        .spawn(
            &common::image("hello"),
            GuestConfig {
                gdb: Some(listener),
                ..Default::default()
            },
        )
        .expect_err("refused");
    assert!(error.to_string().contains("debugger"), "{error}");
}

/// A GDB remote-protocol packet.
fn packet(data: &str) -> Vec<u8> {
    let sum = data.bytes().fold(0u8, |s, b| s.wrapping_add(b));
    format!("${data}#{sum:02x}").into_bytes()
}

/// A reply's data with its run-length encoding (`X*N`: N - 29 more X)
/// undone.
fn unpack(data: &str) -> String {
    let mut out = String::new();
    let mut chars = data.chars();
    while let Some(c) = chars.next() {
        match c {
            '#' => break,
            '*' => {
                let last = out.chars().last().expect("a run repeats something");
                let more = chars.next().expect("a run length") as usize - 29;
                out.extend(std::iter::repeat_n(last, more));
            }
            c => out.push(c),
        }
    }
    out
}

/// Reads from `stream` until the reply holds `want` and the packet it is
/// in has ended (`#` and the two checksum digits), so that nothing of it
/// is left for the next read; returns what came.
fn read_until(stream: &mut std::net::TcpStream, want: &str) -> String {
    use std::io::Read;
    let ended = |got: &str| {
        got.find(want)
            .and_then(|at| got[at..].find('#').map(|end| at + end + 3))
            .is_some_and(|end| got.len() >= end)
    };
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !ended(&got) {
        let n = stream.read(&mut buf).expect("the stub answers");
        assert!(n > 0, "the stub hung up; got {got:?}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}

#[test]
fn an_interrupt_stops_a_blocked_guest_where_it_is() {
    use std::io::Write;
    let host = common::host();
    let (guest, port) = debugged(&host, "idle", &["3s"]);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connects");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&packet("?")).unwrap();
    read_until(&mut stream, "$T05");
    stream.write_all(b"+").unwrap();
    stream.write_all(&packet("c")).unwrap();
    // Time to reach its `block`, where it sleeps for 3 s (a debugged
    // guest runs on the stub's thread, outside the scheduler, so its
    // state does not show the block).
    std::thread::sleep(std::time::Duration::from_millis(200));
    stream.write_all(&[0x03]).unwrap();
    // SIGINT, while the guest sleeps in `block`.
    read_until(&mut stream, "$S02");
    stream.write_all(b"+").unwrap();
    stream.write_all(&packet("g")).unwrap();
    let regs = read_until(&mut stream, "$");
    let hex = unpack(regs.trim_start_matches('+').trim_start_matches('$'));
    // rip follows the 16 general registers, little-endian.
    let rip: Vec<u8> = (0..8)
        .map(|i| u8::from_str_radix(&hex[256 + 2 * i..258 + 2 * i], 16).unwrap())
        .collect();
    let rip = u64::from_le_bytes(rip.try_into().unwrap());
    let text = common::text_range("idle");
    assert!(text.contains(&rip), "rip {rip:#x} outside {text:x?}");
    stream.write_all(b"+").unwrap();
    stream.write_all(&packet("D")).unwrap();
    read_until(&mut stream, "$OK");
    let report = guest.wait();
    common::assert_exited_0(&report);
}
