//! Helpers shared by the integration tests.
#![allow(dead_code)]

use shoal_host::console::ConsoleSink;
use shoal_host::{GuestConfig, GuestHandle, GuestReport, Host, Image, Limits, builtin};
use std::sync::mpsc::{Receiver, channel};

/// A host on `/dev/kvm`; fails the test with a clear message without one.
pub fn host() -> Host {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests boot real guests and need /dev/kvm, which this machine lacks"
    );
    Host::new().unwrap_or_else(|e| panic!("cannot open KVM: {e}"))
}

/// A host that runs its guests in shard processes of `shard_size`
/// guests each.
pub fn sharded_host(shard_size: usize) -> Host {
    host();
    Host::with_config(shoal_host::HostConfig {
        shard_size: Some(shard_size),
        pool: 4,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("cannot start a sharded host: {e}"))
}

/// The built-in guest `name`.
pub fn image(name: &str) -> Image {
    builtin::image(name)
        .unwrap_or_else(|| panic!("{name} is not built in"))
        .unwrap_or_else(|e| panic!("{name} does not load: {e}"))
}

/// The default configuration with `args`.
pub fn config(args: &[&str]) -> GuestConfig {
    GuestConfig {
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

/// Runs the built-in guest `name` with `args` to its end.
pub fn run(name: &str, args: &[&str]) -> GuestReport {
    run_with(name, config(args))
}

/// Runs the built-in guest `name` with `config` to its end.
pub fn run_with(name: &str, config: GuestConfig) -> GuestReport {
    host()
        .spawn(&image(name), config)
        .unwrap_or_else(|e| panic!("cannot spawn {name}: {e}"))
        .wait()
}

/// The address range of the built-in guest's executable segments.
pub fn text_range(name: &str) -> std::ops::Range<u64> {
    let image = image(name);
    let text = image
        .segments()
        .iter()
        .find(|s| s.executable)
        .expect("an executable segment");
    text.vaddr..text.end()
}

/// Starts the built-in guest `name` with `args` on `host`.
pub fn spawn(host: &Host, name: &str, args: &[&str]) -> shoal_host::GuestHandle {
    host.spawn(&image(name), config(args))
        .unwrap_or_else(|e| panic!("cannot spawn {name}: {e}"))
}

/// Runs the hostile built-in guest `name` to its end beside a `hello`
/// neighbour; asserts that it exited 0 (it checks every refusal itself)
/// and that the neighbour was unharmed.
pub fn attack_beside_a_neighbour(name: &str) -> GuestReport {
    let host = host();
    let neighbour = spawn(&host, "hello", &["next door"]);
    let report = spawn(&host, name, &[]).wait();
    assert_exited_0(&report);
    assert_hello(&neighbour.wait(), "next door");
    report
}

/// Asserts the guest exited with code 0, showing its console otherwise.
pub fn assert_exited_0(report: &GuestReport) {
    assert_eq!(
        report.end,
        shoal_host::GuestEnd::Exited(0),
        "console: {}",
        report.console_text()
    );
}

/// Waits (up to 30 s) until the guest is in `state`.
pub fn wait_for_state(guest: &shoal_host::GuestHandle, state: shoal_host::GuestState) {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while guest.state() != state {
        assert!(
            std::time::Instant::now() < give_up,
            "guest never reached {state:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Asserts a `hello` guest exited 0 after printing its own id and its one
/// argument, `arg`.
pub fn assert_hello(report: &GuestReport, arg: &str) {
    assert_exited_0(report);
    let text = report.console_text();
    assert!(
        text.starts_with(&format!("hello from guest {}\n", report.id)),
        "{text}"
    );
    assert!(text.ends_with(&format!("arg 0: {arg}\n1 args\n")), "{text}");
}

/// A console sink that sends each whole line the guest prints to the
/// receiver.
pub fn line_sink() -> (ConsoleSink, Receiver<String>) {
    let (tx, rx) = channel();
    let mut line = Vec::new();
    let sink: ConsoleSink = Box::new(move |_, bytes| {
        for &byte in bytes {
            if byte == b'\n' {
                let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
                line.clear();
            } else {
                line.push(byte);
            }
        }
    });
    (sink, rx)
}

/// The built-in guest `name` on virtual LAN `lan` with `args`, stopped
/// after two minutes at most.
pub fn on_lan(host: &Host, name: &str, lan: &str, args: &[&str]) -> GuestHandle {
    let config = GuestConfig {
        net: Some(lan.into()),
        limits: Limits {
            run_time: Some(std::time::Duration::from_secs(120)),
            ..Default::default()
        },
        ..config(args)
    };
    host.spawn(&image(name), config)
        .unwrap_or_else(|e| panic!("cannot spawn {name}: {e}"))
}

/// Whether this machine's KVM is PVM (guests in hardware ring 3 on the
/// host's CR4 and XCR0), where some instructions the ABI does not give a
/// guest behave as `docs/abi.md` says they do under PVM.
#[allow(dead_code)]
pub fn pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}
