//! Per-guest limits beyond memory size and console bytes: run time, CPU
//! time and exit rate. A guest that exceeds one is stopped with the limit
//! as its reason.

use std::time::Duration;

/// Limits of one guest; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Longest life, from spawn, in real time.
    pub run_time: Option<Duration>,
    /// Most CPU time (time on a worker, hypercalls included).
    pub cpu_time: Option<Duration>,
    /// Most exits (hypercalls and null exits) in any one-second window.
    pub exit_rate: Option<u64>,
}

/// The limit a guest exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Limit {
    /// [`Limits::run_time`].
    #[error("run time of {0:?}")]
    RunTime(Duration),
    /// [`Limits::cpu_time`].
    #[error("CPU time of {0:?}")]
    CpuTime(Duration),
    /// [`Limits::exit_rate`].
    #[error("{0} exits per second")]
    ExitRate(u64),
}

/// Counts exits in one-second windows of guest time.
#[derive(Clone, Copy, Debug)]
pub struct RateWindow {
    limit: u64,
    window_start_ns: u64,
    count: u64,
}

impl RateWindow {
    /// A window allowing `limit` exits per second.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            window_start_ns: 0,
            count: 0,
        }
    }

    /// Counts one exit at guest time `now_ns`; false when it is one too many.
    pub fn allow(&mut self, now_ns: u64) -> bool {
        if now_ns.saturating_sub(self.window_start_ns) >= 1_000_000_000 {
            self.window_start_ns = now_ns;
            self.count = 0;
        }
        self.count += 1;
        self.count <= self.limit
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_window_allows_the_limit_per_second_then_refuses() {
        let mut window = RateWindow::new(3);
        assert!(window.allow(0) && window.allow(10) && window.allow(20));
        assert!(!window.allow(30));
        assert!(window.allow(1_000_000_000), "a new second starts afresh");
        assert!(window.allow(1_000_000_001) && window.allow(1_000_000_002));
        assert!(!window.allow(1_999_999_999));
    }
}
