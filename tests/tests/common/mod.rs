//! Helpers shared by the integration tests.
#![allow(dead_code)]

use shoal_host::{GuestConfig, GuestReport, Host, Image, builtin};

/// A host on `/dev/kvm`; fails the test with a clear message without one.
pub fn host() -> Host {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests boot real guests and need /dev/kvm, which this machine lacks"
    );
    Host::new().unwrap_or_else(|e| panic!("cannot open KVM: {e}"))
}

/// The built-in guest `name`.
pub fn image(name: &str) -> Image {
    builtin::image(name)
        .unwrap_or_else(|| panic!("{name} is not built in"))
        .unwrap_or_else(|e| panic!("{name} does not load: {e}"))
}

/// Runs the built-in guest `name` with `args` to its end.
pub fn run(name: &str, args: &[&str]) -> GuestReport {
    run_with(
        name,
        GuestConfig {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        },
    )
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
    host.spawn(
        &image(name),
        GuestConfig {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("cannot spawn {name}: {e}"))
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
