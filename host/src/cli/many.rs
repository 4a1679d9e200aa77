//! `shoal run --count N`: many guests from one image, with their console
//! prefixed, summarized or silenced, a progress line on a terminal, and a
//! final summary.

use super::RunArgs;
use anyhow::Context;
use shoal_host::{DEFAULT_SHARD_SIZE, GuestEnd, GuestReport, Host, HostConfig, Image};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// What to do with the guests' console output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsoleMode {
    /// Every line, prefixed with `[guest id]`, as it is written.
    All,
    /// Only the output of guests that did not exit 0, at the end.
    Errors,
    /// Nothing.
    None,
}

/// Writes complete lines prefixed with the guest id; keeps partial lines.
fn prefixing_sink() -> shoal_host::console::ConsoleSink {
    let mut pending = Vec::new();
    Box::new(move |id, bytes| {
        pending.extend_from_slice(bytes);
        if let Some(last) = pending.iter().rposition(|b| *b == b'\n') {
            let mut out = std::io::stdout().lock();
            for line in pending[..last].split(|b| *b == b'\n') {
                let _ = write!(out, "[{id}] ");
                let _ = out.write_all(line);
                let _ = out.write_all(b"\n");
            }
            pending.drain(..=last);
        }
    })
}

/// The part of a console after its last newline.
fn partial_line(console: &[u8]) -> &[u8] {
    let start = console
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    &console[start..]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// A progress line on a terminal, and the host memory used at its peak
/// (the largest drop in MemAvailable since the start: the shoal process,
/// its shards and the kernel's memory for their VMs together), sampled
/// every 100 ms.
struct Progress {
    terminal: bool,
    last: Instant,
    available_at_start: Option<u64>,
    lowest_available: Option<u64>,
}

impl Progress {
    fn new() -> Self {
        let available = shoal_host::bench::mem_available_kib();
        Self {
            terminal: std::io::stderr().is_terminal(),
            last: Instant::now(),
            available_at_start: available,
            lowest_available: available,
        }
    }

    fn show(&mut self, spawned: usize, ended: usize, total: usize) {
        if self.last.elapsed() < Duration::from_millis(100) && ended != total {
            return;
        }
        self.last = Instant::now();
        let now = shoal_host::bench::mem_available_kib();
        self.lowest_available = self.lowest_available.min(now).or(now);
        if self.terminal {
            eprint!("\rspawned {spawned}/{total}, ended {ended}/{total}   ");
            if ended == total {
                eprintln!();
            }
        }
    }

    fn peak_used_mib(&self) -> u64 {
        match (self.available_at_start, self.lowest_available) {
            (Some(start), Some(lowest)) => start.saturating_sub(lowest) / 1024,
            _ => 0,
        }
    }
}

/// How often the progress line and the memory figure are refreshed while
/// waiting.
const POLL: Duration = Duration::from_millis(20);

/// Runs `run.count` guests of `image` and prints the summary.
pub fn run(image: &Image, run: &RunArgs) -> anyhow::Result<ExitCode> {
    let count = run.count;
    let console = run.console.unwrap_or(if count <= 100 {
        ConsoleMode::All
    } else {
        ConsoleMode::Errors
    });
    let mut progress = Progress::new();
    let shard_size = match run.shard_size {
        Some(0) => None,
        Some(size) => Some(size),
        None => (count > DEFAULT_SHARD_SIZE).then_some(DEFAULT_SHARD_SIZE),
    };
    let host = Host::with_config(HostConfig {
        shard_size,
        seccomp: !run.no_seccomp,
        ..Default::default()
    })
    .context("cannot start the host")?;
    let started = Instant::now();
    let showing = std::sync::Mutex::new(&mut progress);
    let (guests, mut spawn_times): (Vec<_>, Vec<_>) = host
        .spawn_many(image, count, |i| {
            if let Ok(mut progress) = showing.lock() {
                progress.show(i, 0, count);
            }
            run.config(i, (console == ConsoleMode::All).then(prefixing_sink))
        })
        .map_err(|(i, e)| {
            anyhow::Error::new(e).context(format!("cannot start guest {} of {count}", i + 1))
        })?
        .into_iter()
        .unzip();
    let ids: Vec<u64> = guests.iter().map(|guest| guest.id()).collect();
    let _ends = super::host_ends(&host, run, &ids)?;
    // Count ends as they come, in whatever order, sampling memory all
    // the while; then collect the reports (at once: every guest is over).
    loop {
        let ended = guests.iter().filter(|g| g.try_end().is_some()).count();
        progress.show(count, ended, count);
        if ended == count {
            break;
        }
        std::thread::sleep(POLL);
    }
    let reports: Vec<GuestReport> = guests.into_iter().map(|guest| guest.wait()).collect();
    let wall = started.elapsed();

    let mut out = std::io::stdout().lock();
    for report in &reports {
        let show = match console {
            ConsoleMode::All => {
                let rest = partial_line(&report.console);
                if !rest.is_empty() {
                    let _ = write!(out, "[{}] ", report.id);
                    let _ = out.write_all(rest);
                    let _ = writeln!(out);
                }
                false
            }
            ConsoleMode::Errors => !report.end.is_success(),
            ConsoleMode::None => false,
        };
        if show {
            for line in report.console_text().lines() {
                let _ = writeln!(out, "[{}] {line}", report.id);
            }
        }
        if !report.end.is_success() && console != ConsoleMode::None {
            let _ = writeln!(out, "[{}] {}", report.id, report.end);
        }
    }

    let count = |f: fn(&GuestEnd) -> bool| reports.iter().filter(|r| f(&r.end)).count();
    let exited_0 = count(|e| *e == GuestEnd::Exited(0));
    let exited_other = count(|e| matches!(e, GuestEnd::Exited(c) if *c != 0));
    let panicked = count(|e| matches!(e, GuestEnd::Panicked(_)));
    let crashed = count(|e| matches!(e, GuestEnd::Crashed(_)));
    let killed = count(|e| *e == GuestEnd::Killed);
    spawn_times.sort();
    let _ = writeln!(
        out,
        "{} guests: {exited_0} exited 0, {exited_other} exited non-zero, {panicked} panicked, {crashed} crashed, {killed} killed",
        reports.len()
    );
    let _ = writeln!(
        out,
        "spawn p50 {:.0} us, p99 {:.0} us; wall time {:.3} s; peak host memory used {} MiB; {} processes of {} workers",
        percentile(&spawn_times, 0.5).as_secs_f64() * 1e6,
        percentile(&spawn_times, 0.99).as_secs_f64() * 1e6,
        wall.as_secs_f64(),
        progress.peak_used_mib(),
        host.processes(),
        host.workers()
    );
    let pool = host.pool();
    let _ = writeln!(
        out,
        "VMs made ahead of demand: {} ({} made ready for the image), made on demand: {}, reused: {} (shadow page tables kept: {})",
        pool.created, pool.primed, pool.misses, pool.reused, pool.tables_kept
    );
    drop(out);
    if let Some(view) = run.stats {
        eprint!("{}", super::stats::render(&reports, view));
    }
    let status = reports
        .iter()
        .map(|r| r.end.exit_status())
        .find(|s| *s != 0)
        .unwrap_or(0);
    Ok(ExitCode::from(status as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_line_is_what_follows_the_last_newline() {
        assert_eq!(partial_line(b"a\nb\nc"), b"c");
        assert_eq!(partial_line(b"a\n"), b"");
        assert_eq!(partial_line(b"abc"), b"abc");
    }

    #[test]
    fn percentiles_pick_from_sorted_samples() {
        let samples: Vec<_> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 0.5), Duration::from_micros(51));
        assert_eq!(percentile(&samples, 0.99), Duration::from_micros(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
