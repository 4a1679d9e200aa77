//! `shoal bench`: measurements of the hypercall path, each compared with
//! the floor it cannot beat, measured in the same run.
//!
//! Every figure is taken inside a guest with its own clock (TSC via the
//! clock page), over many operations, in several rounds that alternate
//! between the measurements so that drift of the machine affects each the
//! same way; the median round is reported.

use crate::builtin;
use crate::host::{GuestConfig, Host};
use crate::loader::LoadError;
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
    fn plain(name: &'static str, value: f64, unit: &'static str) -> Self {
        Self {
            name,
            value,
            unit,
            floor: None,
            ratio: None,
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
}

/// What one bench guest run measured.
struct Run {
    nanos_per_op: f64,
    other_exits: u64,
}

fn run_guest(host: &Host, image: &crate::Image, mode: &str, count: u64) -> Result<Run, BenchError> {
    let config = GuestConfig {
        args: vec![mode.to_string(), count.to_string()],
        ..Default::default()
    };
    let report = host.spawn(image, config).map_err(BenchError::Spawn)?.wait();
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
            })
        }
        _ => Err(BenchError::NoResult {
            mode: mode.to_string(),
            end: report.end.to_string(),
            console: text,
        }),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs every benchmark. `iterations` is the number of exits per round.
pub fn run_all(host: &Host, iterations: u64, rounds: usize) -> Result<Vec<Figure>, BenchError> {
    let image = builtin::image("bench")
        .ok_or(BenchError::NoResult {
            mode: "load".into(),
            end: "not built in".into(),
            console: String::new(),
        })?
        .map_err(BenchError::Image)?;
    let iterations = iterations.max(1);
    let rounds = rounds.max(1);
    let (mut floor, mut hypercall) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        floor.push(run_guest(host, &image, "floor", iterations)?.nanos_per_op);
        hypercall.push(run_guest(host, &image, "hypercall", iterations)?.nanos_per_op);
    }
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
        Figure {
            name: "hypercall_round_trip",
            value: hypercall_us,
            unit: "us",
            floor: Some(floor_us),
            ratio: Some(hypercall_us / floor_us),
        },
        Figure::plain("clock_read", clock.nanos_per_op, "ns"),
        Figure::plain(
            "clock_read_exits_per_read",
            clock.other_exits as f64 / clock_reads as f64,
            "exits",
        ),
        Figure::plain("guest_lifecycle_p50", median(lifecycle), "us"),
    ])
}
