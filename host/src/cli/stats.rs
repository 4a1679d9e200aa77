//! `shoal run --stats`: what the guests' hypercalls cost, printed at the
//! end of a run.

use shoal_host::observe::{CallLatency, Histogram};
use shoal_host::{ExitReason, GuestReport, StatsSnapshot};
use std::fmt::Write;

/// For all guests together, or for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatsView {
    /// One table for the whole run.
    All,
    /// One table per guest.
    Guests,
}

/// The statistics of `reports` as text.
pub fn render(reports: &[GuestReport], view: StatsView) -> String {
    let mut out = String::new();
    match view {
        StatsView::All => {
            let _ = writeln!(out, "hypercall statistics, {} guests:", reports.len());
            let snapshots: Vec<&StatsSnapshot> = reports.iter().map(|r| &r.stats).collect();
            table(&mut out, &snapshots);
        }
        StatsView::Guests => {
            for report in reports {
                let _ = writeln!(out, "hypercall statistics, guest {}:", report.id);
                table(&mut out, &[&report.stats]);
            }
        }
    }
    out
}

fn table(out: &mut String, stats: &[&StatsSnapshot]) {
    let sum = |f: fn(&StatsSnapshot) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    let reasons: Vec<String> = ExitReason::ALL
        .iter()
        .map(|&reason| {
            (
                reason,
                stats.iter().map(|s| s.exits_for(reason)).sum::<u64>(),
            )
        })
        .filter(|(_, n)| *n > 0)
        .map(|(reason, n)| format!("{} {n}", reason.name()))
        .collect();
    let _ = writeln!(
        out,
        "  exits: {} ({}); host interruptions {}",
        sum(|s| s.exits),
        if reasons.is_empty() {
            "none".to_string()
        } else {
            reasons.join(", ")
        },
        sum(|s| s.kicks)
    );
    let _ = writeln!(
        out,
        "  time: CPU {}, blocked {}, preempted {} ({} preemptions), throttled {}",
        duration(sum(|s| s.cpu_ns)),
        duration(sum(|s| s.blocked_ns)),
        duration(sum(|s| s.preempted_ns)),
        sum(|s| s.preemptions),
        duration(sum(|s| s.throttled_ns)),
    );
    let calls = CallLatency::merge_all(stats.iter().flat_map(|s| &s.calls));
    if calls.is_empty() {
        let _ = writeln!(out, "  no hypercalls");
        return;
    }
    let _ = writeln!(
        out,
        "  {:<16} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "hypercall", "count", "host p50", "host p99", "guest p50", "guest p99"
    );
    for call in calls {
        let name = match call.name() {
            "custom" | "unknown" => format!("{} {:#x}", call.name(), call.nr),
            name => name.to_string(),
        };
        let _ = writeln!(
            out,
            "  {name:<16} {:>10} {:>10} {:>10} {:>10} {:>10}",
            call.host.count(),
            quantile(&call.host, 0.5),
            quantile(&call.host, 0.99),
            quantile(&call.guest, 0.5),
            quantile(&call.guest, 0.99),
        );
    }
}

fn quantile(histogram: &Histogram, q: f64) -> String {
    histogram.quantile(q).map_or_else(|| "-".into(), duration)
}

/// Nanoseconds in the unit that suits them.
fn duration(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} us", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.3} s", ns as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_pick_their_unit() {
        assert_eq!(duration(850), "850 ns");
        assert_eq!(duration(1_940), "1.9 us");
        assert_eq!(duration(10_100_000), "10.1 ms");
        assert_eq!(duration(1_234_000_000), "1.234 s");
    }
}
