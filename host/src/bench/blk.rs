//! The disk benchmarks: sequential throughput of a guest's disk against
//! the host's own reads and writes of the same file in the same run,
//! exits per request at queue depth 1 and 32, the cost of a
//! notification against a hypercall exit, and a neighbour's throughput
//! beside guests that break their rings or storm just under the limit
//! (and, for comparison, beside guests that only spin), and the round
//! trips of two guests on a LAN beside guests that flush their disks
//! without pause, against the same pair alone.
//!
//! The disk is a 64 MiB file the host writes first, so that both the
//! guest and the host move data through the page cache: the figures
//! compare the I/O paths, not the storage under them.

use super::{BenchError, Figure, builtin_image, median, parse_run, run_guest_with};
use crate::device::DiskSpec;
use crate::host::{GuestConfig, Host};
use crate::{Crash, GuestEnd};
use shoal_abi::HypercallNr;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Instant;

/// Size of the benchmark disk.
const DISK_BYTES: u64 = 64 << 20;

/// One throughput comparison: request size, depth, and figure names.
struct Case {
    bytes: u64,
    depth: u64,
    write: bool,
    name: &'static str,
}

const CASES: [Case; 4] = [
    Case {
        bytes: 4096,
        depth: 32,
        write: false,
        name: "blk_seq_read_4k_mib_s",
    },
    Case {
        bytes: 4096,
        depth: 32,
        write: true,
        name: "blk_seq_write_4k_mib_s",
    },
    Case {
        bytes: 64 << 10,
        depth: 32,
        write: false,
        name: "blk_seq_read_64k_mib_s",
    },
    Case {
        bytes: 64 << 10,
        depth: 32,
        write: true,
        name: "blk_seq_write_64k_mib_s",
    },
];

/// The config of a `blk` guest with `args` and one writable disk.
fn blk_config(disk: &std::path::Path, args: &[String]) -> GuestConfig {
    GuestConfig {
        mem_size: 16 << 20,
        args: args.to_vec(),
        disks: vec![DiskSpec {
            path: disk.to_path_buf(),
            read_only: false,
        }],
        ..Default::default()
    }
}

/// A guest run of `blk bench`: MiB/s and exits per request.
struct GuestRun {
    mib_s: f64,
    exits_per_request: f64,
    notifications_per_request: f64,
}

fn guest_run(
    host: &Host,
    image: &crate::Image,
    disk: &std::path::Path,
    args: &[String],
) -> Result<GuestRun, BenchError> {
    let run = run_guest_with(host, image, "blk", blk_config(disk, args))?;
    guest_figures(&run)
}

fn guest_figures(run: &super::Run) -> Result<GuestRun, BenchError> {
    let stats = &run.stats;
    let requests = stats.device_requests.max(1) as f64;
    let setup = stats.hypercall(HypercallNr::DeviceInfo) + stats.hypercall(HypercallNr::QueueSetup);
    let exits = run.other_exits.saturating_sub(setup) + stats.notifications;
    Ok(GuestRun {
        mib_s: 1e9 / run.nanos_per_op / (1 << 20) as f64,
        exits_per_request: exits as f64 / requests,
        notifications_per_request: stats.notifications as f64 / requests,
    })
}

/// The host's own sequential throughput on `file` in MiB/s: `total`
/// bytes in `bytes` requests with `pread`/`pwrite`, wrapping at the end.
fn host_mib_s(file: &std::fs::File, bytes: u64, write: bool, total: u64) -> f64 {
    let mut buf = vec![0x5au8; bytes as usize];
    let start = Instant::now();
    let mut offset = 0;
    let mut moved = 0;
    while moved < total {
        if offset + bytes > DISK_BYTES {
            offset = 0;
        }
        let done = if write {
            file.write_all_at(&buf, offset)
        } else {
            file.read_exact_at(&mut buf, offset)
        };
        if done.is_err() {
            return f64::NAN;
        }
        offset += bytes;
        moved += bytes;
    }
    moved as f64 / start.elapsed().as_secs_f64() / (1 << 20) as f64
}

/// Every disk figure, medians over `rounds`.
pub(super) fn blk_figures(host: &Host, rounds: usize) -> Result<Vec<Figure>, BenchError> {
    let image = builtin_image("blk")?;
    let mut disk = tempfile::NamedTempFile::new().map_err(BenchError::Io)?;
    disk.write_all(&vec![0xa5; DISK_BYTES as usize])
        .map_err(BenchError::Io)?;
    let path = disk.path().to_path_buf();
    let rounds = rounds.max(1);
    let mut figures = Vec::new();
    for case in &CASES {
        let total = if case.bytes >= 64 << 10 {
            256 << 20
        } else {
            32 << 20
        };
        let args = |depth: u64| {
            [
                "bench",
                if case.write { "write" } else { "read" },
                &case.bytes.to_string(),
                &depth.to_string(),
                &total.to_string(),
            ]
            .map(String::from)
            .to_vec()
        };
        let mut guest = Vec::new();
        let mut own = Vec::new();
        for _ in 0..rounds {
            guest.push(guest_run(host, &image, &path, &args(case.depth))?.mib_s);
            own.push(host_mib_s(disk.as_file(), case.bytes, case.write, total));
        }
        figures.push(Figure::versus(
            case.name,
            median(guest),
            "MiB/s",
            median(own),
        ));
    }
    for (depth, exits, notes) in [
        (
            1,
            "blk_exits_per_request_qd1",
            "blk_notifications_per_request_qd1",
        ),
        (
            32,
            "blk_exits_per_request_qd32",
            "blk_notifications_per_request_qd32",
        ),
    ] {
        let args = [
            "bench",
            "read",
            "4096",
            &depth.to_string(),
            &(8u64 << 20).to_string(),
        ]
        .map(String::from)
        .to_vec();
        let runs = (0..rounds)
            .map(|_| guest_run(host, &image, &path, &args))
            .collect::<Result<Vec<_>, _>>()?;
        figures.push(Figure::plain(
            exits,
            median(runs.iter().map(|r| r.exits_per_request).collect()),
            "exits",
        ));
        figures.push(Figure::plain(
            notes,
            median(runs.iter().map(|r| r.notifications_per_request).collect()),
            "notifications",
        ));
    }
    figures.push(notify_cost(host, &image, &path, rounds)?);
    figures.extend(neighbour(host, &image, &path, rounds)?);
    figures.push(flush_neighbour(host, &image, rounds)?);
    Ok(figures)
}

/// Guests flushing beside the pair in [`flush_neighbour`].
const FLUSHERS: usize = 4;

/// The round-trip p99 of a `ping` pair on a LAN (5,000 64-byte frames, one
/// in flight) beside [`FLUSHERS`] guests that write and flush their own
/// disks without pause, against the pair alone: a flush waits for the
/// storage, and must not make the device thread that also serves the LAN
/// wait with it. Medians over `rounds`.
fn flush_neighbour(host: &Host, image: &crate::Image, rounds: usize) -> Result<Figure, BenchError> {
    let ping = builtin_image("ping")?;
    let disks = (0..FLUSHERS)
        .map(|_| {
            let file = tempfile::NamedTempFile::new()?;
            file.as_file().set_len(8 << 20)?;
            Ok(file)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(BenchError::Io)?;
    let pair_p99 = |lan: &str| -> Result<f64, BenchError> {
        let config = || GuestConfig {
            args: ["5000", "64", "1"].map(String::from).to_vec(),
            net: Some(lan.to_string()),
            ..Default::default()
        };
        let pair = [
            host.spawn(&ping, config()).map_err(BenchError::Spawn)?,
            host.spawn(&ping, config()).map_err(BenchError::Spawn)?,
        ];
        let reports = pair.map(crate::GuestHandle::wait);
        reports
            .iter()
            .find_map(|r| rtt_p99_us(&r.console_text()))
            .ok_or_else(|| BenchError::NoResult {
                mode: "ping".into(),
                end: reports[0].end.to_string(),
                console: reports[0].console_text(),
            })
    };
    let mut quiet = Vec::new();
    let mut beside = Vec::new();
    for round in 0..rounds.max(1) {
        quiet.push(pair_p99(&format!("quiet-{round}"))?);
        let flushers = disks
            .iter()
            .map(|disk| {
                let config = blk_config(disk.path(), &["flushes".to_string()]);
                host.spawn(image, config).map_err(BenchError::Spawn)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let p99 = pair_p99(&format!("flushed-{round}"));
        for flusher in flushers {
            flusher.kill();
            let report = flusher.wait();
            if report.end != GuestEnd::Killed {
                return Err(BenchError::NoResult {
                    mode: "flushes".into(),
                    end: report.end.to_string(),
                    console: report.console_text(),
                });
            }
        }
        beside.push(p99?);
    }
    Ok(Figure::versus(
        "blk_flush_neighbour_rtt_p99",
        median(beside),
        "us",
        median(quiet),
    ))
}

/// The p99 round trip in a `ping ok: .. rtt p50 X p99 Y us` line.
fn rtt_p99_us(console: &str) -> Option<f64> {
    let line = console.lines().find(|l| l.starts_with("ping ok:"))?;
    let (_, rest) = line.split_once(" p99 ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// A notification's cost to the guest (an `out` KVM hands to the device
/// thread in the kernel) against a null exit to the host process. 10,000
/// per run, in rounds of 1,000 the guest spaces out to stay under the
/// storm limit (these notifications have nothing to do).
fn notify_cost(
    host: &Host,
    image: &crate::Image,
    disk: &std::path::Path,
    rounds: usize,
) -> Result<Figure, BenchError> {
    let bench = builtin_image("bench")?;
    let mut notify = Vec::new();
    let mut null = Vec::new();
    for _ in 0..rounds {
        let args = ["notify", "10000"].map(String::from).to_vec();
        let config = blk_config(disk, &args);
        notify.push(run_guest_with(host, image, "notify", config)?.nanos_per_op / 1000.0);
        null.push(super::run_guest(host, &bench, "floor", 10_000)?.nanos_per_op / 1000.0);
    }
    Ok(Figure::versus(
        "blk_notify_us",
        median(notify),
        "us",
        median(null),
    ))
}

/// The `ring-attack` modes that break a ring (each stops its guest).
const ATTACKS: [&str; 10] = [
    "loop", "index", "next", "outside", "past-end", "rings", "huge", "indirect", "ahead", "cut",
];

/// How many noisy guests (or spinners) run beside the neighbour.
const COMPANY: usize = 2;

/// Who runs beside the neighbour.
#[derive(Clone, Copy)]
enum Company {
    /// [`COMPANY`] guests notifying 15,000 times a second with nothing to
    /// do (under the storm limit, so never stopped) for the whole run (up
    /// to 10 minutes, so that a slow run does not outlast them; killed
    /// after it), one notifying as fast as it can (stopped for a storm
    /// once it outruns the limit, which on a busy machine it may never
    /// do: then it storms for the whole run), and the ten ring-breaking
    /// attacks at its start (each stopped).
    Hostile,
    /// [`COMPANY`] `spin` guests: the same number of guests that only
    /// take CPU, for comparison.
    Spinners,
}

/// A well-behaved guest's 4 KiB reads at depth 32 (512 MiB), beside
/// hostile guests and beside spinners, each against the same guest alone.
fn neighbour(
    host: &Host,
    image: &crate::Image,
    disk: &std::path::Path,
    rounds: usize,
) -> Result<Vec<Figure>, BenchError> {
    let args = ["bench", "read", "4096", "32", &(512u64 << 20).to_string()]
        .map(String::from)
        .to_vec();
    // The attackers share one read-only disk; the neighbour's is its own.
    let shared = tempfile::NamedTempFile::new().map_err(BenchError::Io)?;
    shared.as_file().set_len(1 << 20).map_err(BenchError::Io)?;
    let company = Images {
        attack: builtin_image("ring-attack")?,
        spin: builtin_image("spin")?,
        shared: shared.path(),
    };
    let mut alone = Vec::new();
    let mut hostile = Vec::new();
    let mut spinners = Vec::new();
    for _ in 0..rounds {
        alone.push(guest_run(host, image, disk, &args)?.mib_s);
        let run = |who| beside(host, image, disk, &args, &company, who);
        hostile.push(run(Company::Hostile)?);
        spinners.push(run(Company::Spinners)?);
    }
    let alone = median(alone);
    Ok(vec![
        Figure::versus(
            "blk_neighbour_read_4k_mib_s",
            median(hostile),
            "MiB/s",
            alone,
        ),
        Figure::versus(
            "blk_neighbour_spin_read_4k_mib_s",
            median(spinners),
            "MiB/s",
            alone,
        ),
    ])
}

/// What the company beside the neighbour is made from.
struct Images<'a> {
    attack: crate::Image,
    spin: crate::Image,
    /// The read-only disk the attackers share.
    shared: &'a std::path::Path,
}

/// One run of the neighbour (`blk` with `args` on `disk`) beside `company`:
/// its MiB/s. An error if an attacker was not stopped for its ring, or a
/// noisy guest was.
fn beside(
    host: &Host,
    image: &crate::Image,
    disk: &std::path::Path,
    args: &[String],
    images: &Images<'_>,
    company: Company,
) -> Result<f64, BenchError> {
    let attacker = |args: &[&str]| {
        let config = GuestConfig {
            args: args.iter().map(|a| a.to_string()).collect(),
            disks: vec![DiskSpec {
                path: images.shared.to_path_buf(),
                read_only: true,
            }],
            ..Default::default()
        };
        host.spawn(&images.attack, config)
            .map_err(BenchError::Spawn)
    };
    let unexpected = |mode: &str, report: crate::GuestReport| BenchError::NoResult {
        mode: mode.into(),
        end: report.end.to_string(),
        console: report.console_text(),
    };
    let (company, wave, flood) = match company {
        Company::Hostile => (
            (0..COMPANY)
                .map(|_| attacker(&["storm", "15000", "600s"]))
                .collect::<Result<Vec<_>, _>>()?,
            ATTACKS
                .iter()
                .map(|mode| attacker(&[mode]))
                .collect::<Result<Vec<_>, _>>()?,
            Some(attacker(&["storm"])?),
        ),
        Company::Spinners => {
            let config = || GuestConfig {
                args: vec!["forever".into()],
                ..Default::default()
            };
            (
                (0..COMPANY)
                    .map(|_| {
                        host.spawn(&images.spin, config())
                            .map_err(BenchError::Spawn)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                Vec::new(),
                None,
            )
        }
    };
    let neighbour = host
        .spawn(image, blk_config(disk, args))
        .map_err(BenchError::Spawn)?;
    for (mode, guest) in ATTACKS.iter().zip(wave) {
        let report = guest.wait();
        if !matches!(report.end, GuestEnd::Crashed(Crash::Device { .. })) {
            return Err(unexpected(mode, report));
        }
    }
    let run = parse_run("bench", neighbour.wait())?;
    if let Some(flood) = flood
        && let Some(end) = flood.try_end()
        && !matches!(end, GuestEnd::Crashed(Crash::Device { .. }))
    {
        return Err(unexpected("storm", flood.wait()));
    }
    for guest in company {
        if guest.try_end().is_some() {
            return Err(unexpected("company", guest.wait()));
        }
    }
    Ok(guest_figures(&run)?.mib_s)
}
