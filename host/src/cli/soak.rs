//! `shoal soak`: a changing mix of every built-in guest, the hostile ones
//! included, with disks and LANs, spawned in rounds for a while, checking
//! as it goes that
//!
//! - every guest ends as its kind must (each end is counted by kind);
//! - no well-behaved guest fails;
//! - what a guest wrote to its disk and flushed is in the disk's file;
//! - file descriptors, threads and VMs do not grow from round to round,
//!   and once the host is gone they, and host memory, are back where
//!   they started.
//!
//! It prints a line per round and a summary, and exits 1 at the first
//! broken invariant (after the summary).

use anyhow::{Context, bail};
use shoal_host::{Crash, DiskSpec, GuestConfig, GuestEnd, GuestHandle, Host, Image, Limits};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How many guests a round starts (beside pairs on LANs).
const ROUND: usize = 120;

/// Bytes of each soak disk.
const DISK_BYTES: u64 = 1 << 20;

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long to soak: 2m, 30m.
    #[arg(long, default_value = "10m", value_parser = super::parse_duration)]
    duration: Duration,
    /// Seed of the mix (default: from the clock); the summary prints it.
    #[arg(long)]
    seed: Option<u64>,
}

/// How a guest of the mix must end.
#[derive(Clone, Copy, Debug)]
enum Must {
    /// Exit 0.
    Succeed,
    /// Panic.
    Panic,
    /// Be stopped with an exception of this vector.
    Fault(u8),
    /// Be stopped by its device for breaking a ring.
    BreakRing,
    /// Be stopped for running out of CPU time.
    RunOutOfCpu,
    /// Be killed from the host (the soak kills it).
    BeKilled,
}

/// One kind of guest in the mix.
struct Case {
    name: &'static str,
    args: &'static [&'static str],
    must: Must,
    /// Gets a disk of its own (a pattern it writes, flushes and the soak
    /// checks in the file afterwards, for `blk check`).
    disk: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "hello",
        args: &["soak"],
        must: Must::Succeed,
        disk: false,
    },
    Case {
        name: "idle",
        args: &["20ms"],
        must: Must::Succeed,
        disk: false,
    },
    Case {
        name: "mmu",
        args: &["heap"],
        must: Must::Succeed,
        disk: false,
    },
    Case {
        name: "mmu",
        args: &["catch"],
        must: Must::Succeed,
        disk: false,
    },
    Case {
        name: "demand",
        args: &[],
        must: Must::Succeed,
        disk: false,
    },
    Case {
        name: "mmu-attack",
        args: &[],
        must: Must::Succeed,
        disk: false,
    },
    Case {
        name: "residue",
        args: &["write"],
        must: Must::Succeed,
        disk: false,
    },
    Case {
        name: "residue",
        args: &["check"],
        must: Must::Succeed,
        disk: false,
    },
    Case {
        name: "residue",
        args: &["write", "tables"],
        must: Must::Succeed,
        disk: false,
    },
    Case {
        name: "blk",
        args: &["check"],
        must: Must::Succeed,
        disk: true,
    },
    Case {
        name: "panic",
        args: &[],
        must: Must::Panic,
        disk: false,
    },
    Case {
        name: "privileged",
        args: &[],
        must: Must::Fault(13),
        disk: false,
    },
    Case {
        name: "privileged",
        args: &["syscall"],
        must: Must::Fault(6),
        disk: false,
    },
    Case {
        name: "residue",
        args: &["poison"],
        must: Must::Fault(14),
        disk: false,
    },
    Case {
        name: "mmu",
        args: &["unmap-fault"],
        must: Must::Fault(14),
        disk: false,
    },
    Case {
        name: "triple-fault",
        args: &[],
        must: Must::Fault(14),
        disk: false,
    },
    Case {
        name: "ring-attack",
        args: &["loop"],
        must: Must::BreakRing,
        disk: true,
    },
    Case {
        name: "spin",
        args: &["forever"],
        must: Must::RunOutOfCpu,
        disk: false,
    },
    Case {
        name: "spin",
        args: &["forever"],
        must: Must::BeKilled,
        disk: false,
    },
];

/// A small, seeded generator for the mix (xorshift64*).
struct Mix(u64);

impl Mix {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below as u64) as usize
    }
}

/// What the process holds: file descriptors, KVM VMs among them, threads,
/// and host memory available (KiB).
#[derive(Clone, Copy, Debug)]
struct Held {
    fds: usize,
    vms: usize,
    threads: usize,
    available_kib: u64,
}

impl Held {
    fn now() -> anyhow::Result<Self> {
        let mut fds = 0;
        let mut vms = 0;
        for entry in std::fs::read_dir("/proc/self/fd")? {
            fds += 1;
            let target = std::fs::read_link(entry?.path()).unwrap_or_default();
            if target.to_string_lossy() == "anon_inode:kvm-vm" {
                vms += 1;
            }
        }
        let threads = std::fs::read_dir("/proc/self/task")?.count();
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let available_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .context("no MemAvailable in /proc/meminfo")?;
        Ok(Self {
            fds,
            vms,
            threads,
            available_kib,
        })
    }
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} fds ({} VMs), {} threads, {} MiB available",
            self.fds,
            self.vms,
            self.threads,
            self.available_kib / 1024
        )
    }
}

/// Word `index` of a disk `blk` filled with `seed` (as the guest computes
/// it).
fn pattern(seed: u64, index: u64) -> u64 {
    (index ^ seed.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed
}

/// Whether the file at `path` holds the pattern of `seed` throughout.
fn holds_pattern(path: &Path, seed: u64) -> anyhow::Result<bool> {
    let bytes = std::fs::read(path)?;
    Ok(bytes
        .chunks_exact(8)
        .enumerate()
        .all(|(i, word)| word == pattern(seed, i as u64).to_le_bytes()))
}

/// Whether `end` is what `must` asks.
fn as_it_must(end: &GuestEnd, must: Must) -> bool {
    match (must, end) {
        (Must::Succeed, GuestEnd::Exited(0)) => true,
        (Must::Panic, GuestEnd::Panicked(_)) => true,
        (Must::Fault(want), GuestEnd::Crashed(Crash::Exception { vector, .. })) => *vector == want,
        (Must::BreakRing, GuestEnd::Crashed(Crash::Device { .. })) => true,
        (
            Must::RunOutOfCpu,
            GuestEnd::Crashed(Crash::LimitExceeded(shoal_host::Limit::CpuTime(_))),
        ) => true,
        (Must::BeKilled, GuestEnd::Killed) => true,
        _ => false,
    }
}

/// The kind of an end, for the tally.
fn kind_of(end: &GuestEnd) -> String {
    match end {
        GuestEnd::Exited(0) => "exited 0".into(),
        GuestEnd::Exited(_) => "exited non-zero".into(),
        GuestEnd::Panicked(_) => "panicked".into(),
        GuestEnd::Killed => "killed".into(),
        GuestEnd::Crashed(Crash::Exception { vector, .. }) => format!("exception {vector}"),
        GuestEnd::Crashed(Crash::LimitExceeded(_)) => "limit exceeded".into(),
        GuestEnd::Crashed(crash) => {
            let text = crash.to_string();
            let kind = text.split(':').next().unwrap_or("crashed").to_string();
            format!("crashed ({kind})")
        }
    }
}

/// One guest of a round, and how it must end.
struct Running {
    guest: GuestHandle,
    what: String,
    must: Must,
    /// Its disk and seed, to check after it ends.
    disk: Option<(PathBuf, u64)>,
}

/// The soak's state: images, the disks' directory, tallies.
struct Soak {
    host: Host,
    images: BTreeMap<&'static str, Image>,
    dir: tempfile::TempDir,
    ends: BTreeMap<String, u64>,
    guests: u64,
    next_disk: u64,
}

impl Soak {
    fn image(&self, name: &str) -> anyhow::Result<&Image> {
        self.images
            .get(name)
            .with_context(|| format!("no built-in guest {name}"))
    }

    fn spawn(&self, name: &str, config: GuestConfig) -> anyhow::Result<GuestHandle> {
        self.host
            .spawn(self.image(name)?, config)
            .with_context(|| format!("cannot start {name}"))
    }

    /// Starts one guest of `case`.
    fn start(&mut self, case: &Case) -> anyhow::Result<Running> {
        let mut config = GuestConfig {
            args: case.args.iter().map(|a| a.to_string()).collect(),
            console_limit: 64 << 10,
            ..Default::default()
        };
        let mut disk = None;
        if case.disk {
            self.next_disk += 1;
            let seed = self.next_disk;
            let path = self.dir.path().join(format!("disk-{seed}"));
            std::fs::File::create(&path)?.set_len(DISK_BYTES)?;
            config.disks = vec![DiskSpec {
                path: path.clone(),
                read_only: false,
            }];
            if case.name == "blk" {
                config.args.push(seed.to_string());
                disk = Some((path, seed));
            }
        }
        if let Must::RunOutOfCpu = case.must {
            config.limits = Limits {
                cpu_time: Some(Duration::from_millis(20)),
                ..Default::default()
            };
        }
        let guest = self.spawn(case.name, config)?;
        Ok(Running {
            guest,
            what: format!("{} {}", case.name, case.args.join(" ")),
            must: case.must,
            disk,
        })
    }

    /// Starts a pair of `ping` guests on a LAN of their own, and, every
    /// other round, a flooder beside them.
    fn start_lan(&mut self, round: u64) -> anyhow::Result<Vec<Running>> {
        let lan = format!("soak-{round}");
        let on_lan = |args: &[&str]| GuestConfig {
            args: args.iter().map(|a| a.to_string()).collect(),
            net: Some(lan.clone()),
            ..Default::default()
        };
        let mut running = Vec::new();
        for _ in 0..2 {
            running.push(Running {
                guest: self.spawn("ping", on_lan(&["2000", "64", "8"]))?,
                what: "ping 2000 64 8".into(),
                must: Must::Succeed,
                disk: None,
            });
        }
        if round % 2 == 1 {
            running.push(Running {
                guest: self.spawn("net-flood", on_lan(&["300ms", "unknown"]))?,
                what: "net-flood 300ms unknown".into(),
                must: Must::Succeed,
                disk: None,
            });
        }
        Ok(running)
    }

    /// Waits for `guest` and checks its end (and disk); an error names the
    /// guest and what went wrong.
    fn finish(&mut self, running: Running) -> anyhow::Result<()> {
        if let Must::BeKilled = running.must {
            running.guest.kill();
        }
        let report = running.guest.wait();
        self.guests += 1;
        *self.ends.entry(kind_of(&report.end)).or_default() += 1;
        if !as_it_must(&report.end, running.must) {
            bail!(
                "{} ended {} (it must {:?}): {}",
                running.what,
                report.end,
                running.must,
                report.console_text()
            );
        }
        if let Some((path, seed)) = running.disk {
            if !holds_pattern(&path, seed)? {
                bail!(
                    "{}: the flushed pattern is not in {}",
                    running.what,
                    path.display()
                );
            }
            std::fs::remove_file(&path)?;
        }
        Ok(())
    }
}

pub fn run(args: &SoakArgs) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    let before = Held::now()?;
    println!(
        "soak for {:?}, seed {seed}; at the start: {before}",
        args.duration
    );
    let mut images = BTreeMap::new();
    for case in CASES {
        images.entry(case.name).or_insert(super::load(case.name)?);
    }
    for name in ["ping", "net-flood"] {
        images.insert(name, super::load(name)?);
    }
    let mut soak = Soak {
        host: Host::new().context("cannot start the host")?,
        images,
        dir: tempfile::tempdir()?,
        ends: BTreeMap::new(),
        guests: 0,
        next_disk: 0,
    };
    let mut mix = Mix(seed);
    let started = Instant::now();
    let mut first: Option<Held> = None;
    let mut failure = None;
    let mut round = 0;
    while started.elapsed() < args.duration && failure.is_none() {
        round += 1;
        let outcome = (|| -> anyhow::Result<Held> {
            let mut running = soak.start_lan(round)?;
            for _ in 0..ROUND {
                let case = &CASES[mix.next(CASES.len())];
                running.push(soak.start(case)?);
            }
            // Ended one by one: each must end as its kind must.
            let mut broken = None;
            for guest in running {
                if let Err(e) = soak.finish(guest) {
                    broken.get_or_insert(e);
                }
            }
            if let Some(e) = broken {
                return Err(e);
            }
            Held::now()
        })();
        match outcome {
            Ok(held) => {
                println!("round {round}: {} guests so far; {held}", soak.guests);
                // From the first round on (the pool full), nothing grows.
                let first = *first.get_or_insert(held);
                if held.vms > first.vms + 8
                    || held.fds > first.fds + 32
                    || held.threads > first.threads + 4
                {
                    failure = Some(anyhow::anyhow!(
                        "the host holds more after round {round} ({held}) than after round 1 ({first})"
                    ));
                }
            }
            Err(e) => failure = Some(e),
        }
    }
    let ends = std::mem::take(&mut soak.ends);
    let guests = soak.guests;
    drop(soak);
    // Threads the process keeps once it has run a guest: the VM factory.
    std::thread::sleep(Duration::from_millis(200));
    let after = Held::now()?;
    println!(
        "{guests} guests in {round} rounds over {:.0} s, seed {seed}",
        started.elapsed().as_secs_f64()
    );
    for (kind, count) in &ends {
        println!("  {kind}: {count}");
    }
    println!("at the start: {before}\nat the end:   {after}");
    if failure.is_none()
        && (after.vms > 0
            || after.fds > before.fds + 4
            || after.threads > before.threads + 2
            || after.available_kib + (256 << 10) < before.available_kib)
    {
        failure = Some(anyhow::anyhow!("the host did not give everything back"));
    }
    match failure {
        Some(e) => {
            eprintln!("shoal soak: FAILED: {e:#}");
            Ok(ExitCode::FAILURE)
        }
        None => {
            println!("soak ok");
            Ok(ExitCode::SUCCESS)
        }
    }
}
