//! Builds the example guests (their own cargo workspace in `guest-kernels/`)
//! and embeds them in the host, so `shoal run hello` works anywhere.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Built-in guests: binary name and a one-line description.
const GUESTS: &[(&str, &str)] = &[
    (
        "hello",
        "prints its id, the wall-clock time and its arguments",
    ),
    (
        "clock",
        "sleeps and shows monotonic time advancing, never backwards",
    ),
    ("panic", "panics on purpose"),
    (
        "spin",
        "computes without hypercalls for a while (500ms, 2s, forever)",
    ),
    ("idle", "blocks for a while (2s, 500ms), then exits 0"),
    (
        "sched",
        "measures its own wake-up lateness (ROUNDS PERIOD_US)",
    ),
    ("bench", "the guest half of `shoal bench`"),
    (
        "custom",
        "calls custom hypercalls its host registered (add A B, shout TEXT, call NR; see host/examples/custom_hypercall.rs)",
    ),
    (
        "mmu",
        "maps, remaps, unmaps and protects pages through the host and checks each effect (catch: handles its own faults)",
    ),
    (
        "demand",
        "a demand-paged array bigger than its RAM: a page-fault handler maps frames as pages are touched",
    ),
    (
        "events",
        "waits for events the host raises (ping N: answers each; mask: ignores others until a deadline)",
    ),
    (
        "blk",
        "drives disk 0 (--disk FILE): check writes, flushes and reads back a pattern; fill, verify, refused, info",
    ),
    (
        "bad-pointer",
        "hostile: passes pointers the host must refuse",
    ),
    (
        "unknown-hypercall",
        "hostile: unknown hypercall numbers and lengths",
    ),
    (
        "straddle",
        "hostile: an argument block straddling the end of memory",
    ),
    (
        "triple-fault",
        "hostile: writes through a null pointer with no handler",
    ),
    ("privileged", "hostile: executes hlt at CPL3"),
    (
        "mmu-attack",
        "hostile: page-table requests the rules forbid (exhaust: runs out of table frames)",
    ),
    (
        "trap-attack",
        "hostile: bad trap tables, forged trap returns, a faulting handler",
    ),
    (
        "net-attack",
        "sends frames the LAN must drop (short, long, writable, offloads, spoofed, to a guest gone) and one good one",
    ),
    (
        "net-flood",
        "hostile: floods its LAN for DURATION with broadcast frames and frames to guests ID...",
    ),
    (
        "ring-attack",
        "hostile: breaks its disk's ring (loop, index, next, outside, past-end, rings, huge, indirect, ahead, cut, storm; setup: bad queue_setup calls)",
    ),
    (
        "console-ring",
        "uses and misuses the console ring (flood N, fill, spin, tail, overrun)",
    ),
    (
        "residue",
        "leaves a secret behind (write) or looks for one (check)",
    ),
    (
        "ping",
        "two guests on a virtual LAN exchange frames (reply; send N SIZE WINDOW) and measure round trips",
    ),
    (
        "echo",
        "UDP and TCP echo server on port 7, TCP discard on 9, on a virtual LAN (DURATION CONNECTIONS)",
    ),
    (
        "echo-client",
        "checks an echo server: A.B.C.D DATAGRAMS BYTES over UDP and TCP",
    ),
    (
        "http",
        "HTTP/1.1 server on port 80: GET / answers the guest id and uptime (DURATION CONNECTIONS)",
    ),
];

fn watch(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
}

fn watch_sources(root: &Path) {
    watch(&root.join("host").join("build.rs"));
    for file in [
        "abi/Cargo.toml",
        "abi/src",
        "guest-sdk/Cargo.toml",
        "guest-sdk/src",
        "guest-sdk/net/Cargo.toml",
        "guest-sdk/net/src",
    ] {
        watch(&root.join(file));
    }
    for file in ["guest-sdk/build/Cargo.toml", "guest-sdk/build/src"] {
        watch(&root.join(file));
    }
    let kernels = root.join("guest-kernels");
    watch(&kernels.join("Cargo.toml"));
    watch(&kernels.join("Cargo.lock"));
    let members = std::fs::read_dir(&kernels).expect("guest-kernels/ exists");
    for entry in members.flatten() {
        let dir = entry.path();
        if dir.join("Cargo.toml").exists() {
            for file in ["Cargo.toml", "build.rs", "src"] {
                watch(&dir.join(file));
            }
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("host/ is inside the workspace")
        .to_path_buf();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = root.join("target").join("guests");
    watch_sources(&root);

    // The guests are a separate build with their own flags: do not pass on
    // this build's flags, wrappers (clippy) or target directory.
    let mut command = Command::new(cargo);
    command
        .args(["build", "--release", "--manifest-path"])
        .arg(root.join("guest-kernels").join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
    ] {
        command.env_remove(var);
    }
    let status = command.status().expect("cargo runs");
    assert!(
        status.success(),
        "building the guest kernels in guest-kernels/ failed"
    );

    let mut table = String::from(
        "/// Built-in guests: (name, description, ELF image).\npub static GUESTS: &[(&str, &str, &[u8])] = &[\n",
    );
    for (name, description) in GUESTS {
        let built = target_dir.join("release").join(name);
        let copy = out.join(format!("{name}.elf"));
        std::fs::copy(&built, &copy).unwrap_or_else(|e| panic!("guest {name} was not built: {e}"));
        table.push_str(&format!(
            "    ({name:?}, {description:?}, include_bytes!({:?})),\n",
            copy.display().to_string()
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("builtin_guests.rs"), table).expect("OUT_DIR is writable");
}
