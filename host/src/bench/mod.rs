//! `shoal bench`: measurements of the hypercall path, each compared with
//! the floor it cannot beat, measured in the same run.
//!
//! Every figure is taken inside a guest with its own clock (TSC via the
//! clock page), over many operations, in several rounds that alternate
//! between the measurements so that drift of the machine affects each the
//! same way; the median round is reported.

mod blk;
mod net;
mod sched;
pub use sched::mem_available_kib;

use crate::builtin;
use crate::host::{GuestConfig, Host};
use crate::loader::LoadError;
use crate::mmu::Forget;
use shoal_abi::HypercallNr;
use std::time::Instant;

/// One measured figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// Stable name.
    pub name: &'static str,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// What it is compared with, if anything.
    pub floor: Option<f64>,
    /// `value / floor`.
    pub ratio: Option<f64>,
}

impl Figure {
    pub(crate) fn plain(name: &'static str, value: f64, unit: &'static str) -> Self {
        Self {
            name,
            value,
            unit,
            floor: None,
            ratio: None,
        }
    }

    /// A figure compared with `floor`, measured in the same run.
    pub(crate) fn versus(name: &'static str, value: f64, unit: &'static str, floor: f64) -> Self {
        Self {
            name,
            value,
            unit,
            floor: Some(floor),
            ratio: Some(value / floor),
        }
    }

    /// One JSON object: `name`, `value`, `unit`, and `floor`/`ratio` when set.
    pub fn to_json(&self) -> String {
        let mut object = serde_json::json!({
            "name": self.name,
            "value": round(self.value),
            "unit": self.unit,
        });
        if let (Some(floor), Some(ratio)) = (self.floor, self.ratio) {
            object["floor"] = serde_json::json!(round(floor));
            object["ratio"] = serde_json::json!(round(ratio));
        }
        object.to_string()
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The bench guest is missing or broken.
    #[error("the built-in bench guest cannot be loaded")]
    Image(#[source] LoadError),
    /// Spawning failed.
    #[error("cannot spawn the bench guest")]
    Spawn(#[source] crate::guest::SpawnError),
    /// The guest did not report a result.
    #[error("bench guest ({mode}) did not report: {end}; console: {console}")]
    NoResult {
        /// Mode.
        mode: String,
        /// How it ended.
        end: String,
        /// Its output.
        console: String,
    },
    /// `--only` named a group that does not exist.
    #[error("no benchmark group {0:?} (groups: {groups})", groups = GROUPS.join(", "))]
    UnknownGroup(String),
    /// A scratch file could not be made.
    #[error("cannot make a scratch file")]
    Io(#[source] std::io::Error),
    /// A port forward could not be set up.
    #[error("cannot forward a port to a bench guest")]
    Forward(#[source] crate::host::ForwardError),
    /// A second host for comparison could not start.
    #[error("cannot start a host for comparison")]
    Host(#[source] crate::host::HostError),
    /// KVM refused a VM or vCPU the benchmark made itself.
    #[error("KVM: {0}")]
    Kvm(String),
}

/// What one bench guest run measured.
struct Run {
    nanos_per_op: f64,
    other_exits: u64,
    stats: crate::StatsSnapshot,
}

fn run_guest(host: &Host, image: &crate::Image, mode: &str, count: u64) -> Result<Run, BenchError> {
    let config = GuestConfig {
        args: vec![mode.to_string(), count.to_string()],
        ..Default::default()
    };
    run_guest_with(host, image, mode, config)
}

/// Runs the bench guest with `config` and reads its `result` line.
fn run_guest_with(
    host: &Host,
    image: &crate::Image,
    mode: &str,
    config: GuestConfig,
) -> Result<Run, BenchError> {
    let report = host.spawn(image, config).map_err(BenchError::Spawn)?.wait();
    parse_run(mode, report)
}

/// The `result MODE N NANOS` line of a bench-style guest's report, with
/// its counters; an error if the guest failed or printed none.
fn parse_run(mode: &str, report: crate::GuestReport) -> Result<Run, BenchError> {
    let text = report.console_text();
    let parsed = text.lines().find_map(|line| {
        let mut words = line.strip_prefix("result ")?.split_whitespace();
        let (_mode, n, nanos) = (words.next()?, words.next()?, words.next()?);
        Some((n.parse::<u64>().ok()?, nanos.parse::<u64>().ok()?))
    });
    match (parsed, report.end.is_success()) {
        (Some((n, nanos)), true) if n > 0 => {
            let reporting = report.stats.hypercall(HypercallNr::ConsoleWrite)
                + report.stats.hypercall(HypercallNr::Exit);
            Ok(Run {
                nanos_per_op: nanos as f64 / n as f64,
                other_exits: report.stats.exits.saturating_sub(reporting),
                stats: report.stats,
            })
        }
        _ => Err(BenchError::NoResult {
            mode: mode.to_string(),
            end: report.end.to_string(),
            console: text,
        }),
    }
}

/// The median over `rounds` runs of the bench guest (each configured by
/// `config`) of its time per operation, in microseconds.
fn median_us(
    host: &Host,
    image: &crate::Image,
    mode: &str,
    rounds: usize,
    config: impl Fn() -> GuestConfig,
) -> Result<f64, BenchError> {
    let runs = (0..rounds.max(1))
        .map(|_| Ok(run_guest_with(host, image, mode, config())?.nanos_per_op))
        .collect::<Result<Vec<_>, BenchError>>()?;
    Ok(median(runs) / 1000.0)
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Sizes of the scheduling and scale benchmarks.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Exits per round of the hypercall benchmarks.
    pub iterations: u64,
    /// Rounds of the hypercall benchmarks (the median is reported).
    pub rounds: usize,
    /// Guests spawned back to back for spawn latency and throughput.
    pub spawns: usize,
    /// Idle guests brought up through shards for the bring-up rate.
    pub bring_up: usize,
    /// Idle guests held at once for memory per guest.
    pub idle: usize,
    /// Spinning guests while wake-up latency is measured.
    pub busy: usize,
    /// Spinning guests whose CPU shares are compared.
    pub spinners: usize,
    /// Idle guests held at once for per-guest cost at scale (compared
    /// with 100).
    pub scale: usize,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            iterations: 20_000,
            rounds: 5,
            spawns: 1000,
            bring_up: 2000,
            idle: 1000,
            busy: 1000,
            spinners: 8,
            scale: 10_000,
        }
    }
}

fn builtin_image(name: &'static str) -> Result<crate::Image, BenchError> {
    builtin::image(name)
        .ok_or(BenchError::NoResult {
            mode: name.into(),
            end: "not built in".into(),
            console: String::new(),
        })?
        .map_err(BenchError::Image)
}

/// Benchmark groups, in the order they run.
pub const GROUPS: [&str; 9] = [
    "hypercall",
    "mmu",
    "blk",
    "net",
    "spawn",
    "memory",
    "wakeup",
    "fairness",
    "scale",
];

/// Runs the benchmark groups named in `only` (every group if empty).
pub fn run_all(host: &Host, sizes: Sizes, only: &[String]) -> Result<Vec<Figure>, BenchError> {
    if let Some(unknown) = only.iter().find(|g| !GROUPS.contains(&g.as_str())) {
        return Err(BenchError::UnknownGroup(unknown.clone()));
    }
    let wanted = |group: &str| only.is_empty() || only.iter().any(|g| g == group);
    let mut figures = Vec::new();
    if wanted("hypercall") {
        figures.extend(hypercall_figures(host, sizes.iterations, sizes.rounds)?);
    }
    if wanted("mmu") {
        figures.extend(mmu_figures(host, sizes.rounds)?);
        figures.extend(forget_figures(host, sizes.rounds)?);
    }
    if wanted("blk") {
        figures.extend(blk::blk_figures(host, sizes.rounds)?);
    }
    if wanted("net") {
        figures.extend(net::net_figures(host, sizes.rounds)?);
        figures.extend(net::forward_figures(host, sizes.rounds)?);
    }
    if wanted("spawn") {
        figures.extend(sched::vm_life(200)?);
        let bench = builtin_image("bench")?;
        figures.extend(sched::vm_reset(&bench, 200)?);
        let hello = builtin_image("hello")?;
        figures.extend(sched::spawn_figures(host, &bench, &hello, sizes.spawns)?);
        figures.extend(sched::bring_up(&builtin_image("idle")?, sizes.bring_up)?);
    }
    if wanted("memory") {
        figures.extend(sched::idle_memory(
            host,
            &builtin_image("idle")?,
            sizes.idle,
        )?);
    }
    if wanted("wakeup") {
        figures.extend(sched::wakeup(
            host,
            &builtin_image("spin")?,
            &builtin_image("sched")?,
            sizes.busy,
        )?);
    }
    if wanted("fairness") {
        figures.extend(sched::fairness(
            host,
            &builtin_image("spin")?,
            sizes.spinners,
            std::time::Duration::from_secs(2),
        )?);
    }
    if wanted("scale") {
        figures.extend(sched::scale(
            &builtin_image("idle")?,
            100.min(sizes.scale),
            1000.min(sizes.scale),
            sizes.scale,
        )?);
    }
    Ok(figures)
}

/// The same page-table changes made four ways, in rounds of N = 1 and
/// N = 64 pages, per change: (a) trap-and-emulate (each entry written
/// through the trapping window), (b) one `mmu_update` per change, (c) one
/// `mmu_update` per round, (d) one `multicall` of N single-change
/// `mmu_update`s per round; with each one's ratio to (a). Every change
/// remaps a page to another frame, so each takes a mapping away and the
/// host drops KVM's translations of the old frame.
fn mmu_figures(host: &Host, rounds: usize) -> Result<Vec<Figure>, BenchError> {
    let image = builtin_image("bench")?;
    let changes = 2048;
    const MODES: [&str; 4] = ["trapped", "single", "batched", "multicall"];
    const NAMES: [(u64, [&str; 4]); 2] = [
        (
            1,
            [
                "pt_trapped_n1",
                "pt_single_n1",
                "pt_batched_n1",
                "pt_multicall_n1",
            ],
        ),
        (
            64,
            [
                "pt_trapped_n64",
                "pt_single_n64",
                "pt_batched_n64",
                "pt_multicall_n64",
            ],
        ),
    ];
    let mut figures = Vec::new();
    for (n, names) in NAMES {
        let per_change = |mode: &str| {
            median_us(host, &image, mode, rounds, || GuestConfig {
                args: vec![mode.into(), changes.to_string(), n.to_string()],
                trapped_page_tables: mode == "trapped",
                // One way to drop translations for all four, the one
                // without a budget (the ways are compared in
                // `forget_figures`).
                forget: Forget::Notifier,
                ..Default::default()
            })
        };
        let trapped = per_change(MODES[0])?;
        figures.push(Figure::plain(names[0], trapped, "us"));
        for (mode, name) in MODES.iter().zip(names).skip(1) {
            figures.push(Figure::versus(name, per_change(mode)?, "us", trapped));
        }
    }
    Ok(figures)
}

/// Idle guests beside the guest measured by [`forget_figures`]: with
/// the pool's VMs, about as many VMs as a shard's process holds.
const NEIGHBOURS: usize = 99;

/// The two ways to drop stale translations, alone in the process and with
/// [`NEIGHBOURS`] idle guests: a change of one page (the exit and the
/// drop, per change), and the worst batch (512 pages remapped, each old
/// frame apart from the others, then every page read; per batch).
fn forget_figures(host: &Host, rounds: usize) -> Result<Vec<Figure>, BenchError> {
    let image = builtin_image("bench")?;
    let idle = builtin_image("idle")?;
    let run = |mode: &str, count: u64, forget: Forget| {
        median_us(host, &image, mode, rounds, || GuestConfig {
            args: vec![mode.into(), count.to_string(), "1".into()],
            mem_size: 16 << 20,
            forget,
            ..Default::default()
        })
    };
    let mut figures = Vec::new();
    for crowded in [false, true] {
        let neighbours = if crowded {
            (0..NEIGHBOURS)
                .map(|_| sched::spawn(host, &idle, &["3600s"]))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        sched::all_blocked(&neighbours);
        let names: [&'static str; 4] = if crowded {
            [
                "pt_n1_notifier_crowded",
                "pt_n1_slot_move_crowded",
                "pt_worst_notifier_crowded",
                "pt_worst_slot_move_crowded",
            ]
        } else {
            [
                "pt_n1_notifier",
                "pt_n1_slot_move",
                "pt_worst_notifier",
                "pt_worst_slot_move",
            ]
        };
        let notifier = run("single", 2048, Forget::Notifier)?;
        figures.push(Figure::plain(names[0], notifier, "us"));
        let slot_move = run("single", 2048, Forget::SlotMove)?;
        figures.push(Figure::versus(names[1], slot_move, "us", notifier));
        let notifier = run("scatter", 16, Forget::Notifier)?;
        figures.push(Figure::plain(names[2], notifier, "us"));
        let slot_move = run("scatter", 16, Forget::SlotMove)?;
        figures.push(Figure::versus(names[3], slot_move, "us", notifier));
        if crowded {
            figures.extend(stalls(host, &image)?);
        }
        sched::kill_all(neighbours);
    }
    Ok(figures)
}

/// A neighbour's wake-up lateness while two guests send worst batches
/// back to back, their stale translations dropped through the notifier
/// and the default way (the slot move for such batches); and beside two
/// guests that only spin, for reference.
fn stalls(host: &Host, image: &crate::Image) -> Result<Vec<Figure>, BenchError> {
    let sched_image = builtin_image("sched")?;
    let spin = builtin_image("spin")?;
    let spinners = (0..2)
        .map(|_| sched::spawn(host, &spin, &["forever"]))
        .collect::<Result<Vec<_>, _>>()?;
    let report = sched::spawn(host, &sched_image, &["300", "2000"])?.wait();
    sched::kill_all(spinners);
    let lateness = sched::Lateness::of(&report)?;
    let mut figures = vec![
        Figure::plain("wakeup_p99_beside_spinners", lateness.p99_us, "us"),
        Figure::plain("wakeup_max_beside_spinners", lateness.max_us, "us"),
    ];
    for (forget, p99, max) in [
        (
            Forget::Notifier,
            "wakeup_p99_beside_worst_notifier",
            "wakeup_max_beside_worst_notifier",
        ),
        (
            Forget::Auto,
            "wakeup_p99_beside_worst_auto",
            "wakeup_max_beside_worst_auto",
        ),
    ] {
        let senders = (0..2)
            .map(|_| {
                host.spawn(
                    image,
                    GuestConfig {
                        args: vec!["scatter".into(), "1000000".into()],
                        mem_size: 16 << 20,
                        forget,
                        ..Default::default()
                    },
                )
                .map_err(BenchError::Spawn)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let report = sched::spawn(host, &sched_image, &["300", "2000"])?.wait();
        sched::kill_all(senders);
        let lateness = sched::Lateness::of(&report)?;
        figures.push(Figure::plain(p99, lateness.p99_us, "us"));
        figures.push(Figure::plain(max, lateness.max_us, "us"));
    }
    Ok(figures)
}

/// The hypercall path: the exit floor, a hypercall against it, a clock read.
fn hypercall_figures(
    host: &Host,
    iterations: u64,
    rounds: usize,
) -> Result<Vec<Figure>, BenchError> {
    let image = builtin_image("bench")?;
    let iterations = iterations.max(1);
    let rounds = rounds.max(1);
    let (mut floor, mut hypercall, mut trap) = (Vec::new(), Vec::new(), Vec::new());
    let (mut with_stats, mut traced) = (Vec::new(), Vec::new());
    let trace = std::env::temp_dir().join(format!("shoal-bench-{}.trace", std::process::id()));
    let watched = |observe: crate::Observe| GuestConfig {
        args: vec!["hypercall".into(), iterations.to_string()],
        observe,
        ..Default::default()
    };
    for _ in 0..rounds {
        floor.push(run_guest(host, &image, "floor", iterations)?.nanos_per_op);
        hypercall.push(run_guest(host, &image, "hypercall", iterations)?.nanos_per_op);
        trap.push(run_guest(host, &image, "trap", iterations / 4)?.nanos_per_op);
        let stats = crate::Observe {
            call_stats: true,
            ..Default::default()
        };
        with_stats.push(run_guest_with(host, &image, "hypercall", watched(stats))?.nanos_per_op);
        crate::observe::start_trace_file(&trace).map_err(BenchError::Io)?;
        let to_file = crate::Observe {
            trace_file: Some(trace.clone()),
            ..Default::default()
        };
        traced.push(run_guest_with(host, &image, "hypercall", watched(to_file))?.nanos_per_op);
    }
    let _ = std::fs::remove_file(&trace);
    let floor_us = median(floor) / 1000.0;
    let hypercall_us = median(hypercall) / 1000.0;

    let clock_reads = 1_000_000;
    let clock = run_guest(host, &image, "clock", clock_reads)?;

    let mut lifecycle = Vec::new();
    for _ in 0..rounds.max(5) {
        let start = Instant::now();
        run_guest(host, &image, "floor", 1)?;
        lifecycle.push(start.elapsed().as_secs_f64() * 1e6);
    }

    Ok(vec![
        Figure::plain("pio_exit_floor", floor_us, "us"),
        Figure::versus("hypercall_round_trip", hypercall_us, "us", floor_us),
        // What watching costs, against the same call unwatched.
        Figure::versus(
            "hypercall_round_trip_stats",
            median(with_stats) / 1000.0,
            "us",
            hypercall_us,
        ),
        Figure::versus(
            "hypercall_round_trip_traced",
            median(traced) / 1000.0,
            "us",
            hypercall_us,
        ),
        // Two exits: the exception, and `trap_return`.
        Figure::versus("trap_round_trip", median(trap) / 1000.0, "us", floor_us),
        Figure::plain("clock_read", clock.nanos_per_op, "ns"),
        Figure::plain(
            "clock_read_exits_per_read",
            clock.other_exits as f64 / clock_reads as f64,
            "exits",
        ),
        Figure::plain("guest_lifecycle_p50", median(lifecycle), "us"),
    ])
}
