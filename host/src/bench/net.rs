//! The virtual LAN benchmarks: two `ping` guests on one LAN exchange
//! frames, a window of 32 in flight, with 64-byte and 1514-byte frames.
//! Every data frame crosses the LAN twice (there and back).

use super::{BenchError, Figure, builtin_image, median, parse_run};
use crate::host::{GuestConfig, Host};

/// Data frames the sender sends per run.
const FRAMES: u64 = 20_000;
/// Frames in flight.
const WINDOW: u64 = 32;

/// One run of a ping pair with `size`-byte frames: frames forwarded a
/// second, and exits (to the host process and notifications, both guests)
/// per frame.
fn pair_run(host: &Host, image: &crate::Image, size: u64) -> Result<(f64, f64), BenchError> {
    let lan = format!("bench-{size}");
    let config = || GuestConfig {
        args: [FRAMES, size, WINDOW].map(|n| n.to_string()).to_vec(),
        net: Some(lan.clone()),
        ..Default::default()
    };
    let pair = [
        host.spawn(image, config()).map_err(BenchError::Spawn)?,
        host.spawn(image, config()).map_err(BenchError::Spawn)?,
    ];
    let reports = pair.map(crate::GuestHandle::wait);
    let exits: u64 = reports
        .iter()
        .map(|r| r.stats.exits + r.stats.notifications)
        .sum();
    let sender = reports
        .iter()
        .position(|r| r.console_text().contains("result ping"))
        .unwrap_or(0);
    let [first, second] = reports;
    let run = parse_run("ping", if sender == 0 { first } else { second })?;
    let forwarded = 2.0 * FRAMES as f64;
    let seconds = run.nanos_per_op * FRAMES as f64 / 1e9;
    Ok((forwarded / seconds, exits as f64 / forwarded))
}

/// Frames a second, megabits a second and exits per frame, for 64-byte
/// and 1514-byte frames, medians over `rounds`.
pub(super) fn net_figures(host: &Host, rounds: usize) -> Result<Vec<Figure>, BenchError> {
    let image = builtin_image("ping")?;
    let mut figures = Vec::new();
    for (size, rate, mbit, exits) in [
        (
            64,
            "net_frames_per_s_64",
            "net_mbit_s_64",
            "net_exits_per_frame_64",
        ),
        (
            1514,
            "net_frames_per_s_1514",
            "net_mbit_s_1514",
            "net_exits_per_frame_1514",
        ),
    ] {
        let runs = (0..rounds.max(1))
            .map(|_| pair_run(host, &image, size))
            .collect::<Result<Vec<_>, _>>()?;
        let per_s = median(runs.iter().map(|r| r.0).collect());
        figures.push(Figure::plain(rate, per_s, "frames/s"));
        figures.push(Figure::plain(
            mbit,
            per_s * size as f64 * 8.0 / 1e6,
            "Mbit/s",
        ));
        figures.push(Figure::plain(
            exits,
            median(runs.iter().map(|r| r.1).collect()),
            "exits",
        ));
    }
    Ok(figures)
}
