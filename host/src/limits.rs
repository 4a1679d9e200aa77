//! Per-guest limits beyond memory size and console bytes: run time, CPU
//! time, exit rate and CPU share. A guest that exceeds one of the first
//! three is stopped with the limit as its reason; a guest that uses up its
//! CPU share waits for the next period.

use std::time::Duration;

/// Limits of one guest; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Longest life, from spawn, in real time.
    pub run_time: Option<Duration>,
    /// Most CPU time (the guest running and the host serving its exits).
    pub cpu_time: Option<Duration>,
    /// Most exits (hypercalls and null exits) in any one-second window.
    pub exit_rate: Option<u64>,
    /// Most CPU the guest may use, in per cent of one CPU (1 to 100),
    /// over every [`SHARE_PERIOD`]: a guest that used its share is taken
    /// off its worker and waits, runnable again, for the next period
    /// (a cap in the manner of CFS bandwidth control). The guest is not
    /// stopped.
    pub cpu_share: Option<u8>,
}

/// The period over which [`Limits::cpu_share`] is counted.
pub const SHARE_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// Counts one guest's CPU use against its share, period by period. Times
/// are nanoseconds on any monotonic scale.
#[derive(Clone, Copy, Debug)]
pub struct CpuShare {
    quota_ns: u64,
    period_start_ns: u64,
    used_ns: u64,
}

impl CpuShare {
    /// A share of `percent` per cent of one CPU (clamped to 1..=100).
    pub fn new(percent: u8) -> Self {
        let period = SHARE_PERIOD.as_nanos() as u64;
        Self {
            quota_ns: period / 100 * u64::from(percent.clamp(1, 100)),
            period_start_ns: 0,
            used_ns: 0,
        }
    }

    fn roll(&mut self, now_ns: u64) {
        let period = SHARE_PERIOD.as_nanos() as u64;
        if now_ns.saturating_sub(self.period_start_ns) >= period {
            self.period_start_ns = now_ns - (now_ns - self.period_start_ns) % period;
            self.used_ns = 0;
        }
    }

    /// When the current period ends.
    pub fn period_end(&self) -> u64 {
        self.period_start_ns + SHARE_PERIOD.as_nanos() as u64
    }

    /// CPU time left in the period that contains `now_ns`.
    pub fn left(&mut self, now_ns: u64) -> u64 {
        self.roll(now_ns);
        self.quota_ns.saturating_sub(self.used_ns)
    }

    /// Charges `ran_ns` of CPU, ending at `now_ns`. Returns when the guest
    /// may run again if it used up its share, or `None`.
    pub fn charge(&mut self, ran_ns: u64, now_ns: u64) -> Option<u64> {
        let period_before = self.period_start_ns;
        self.roll(now_ns);
        // A run that crossed into this period counts only from its start.
        let ran_ns = if self.period_start_ns == period_before {
            ran_ns
        } else {
            ran_ns.min(now_ns - self.period_start_ns)
        };
        self.used_ns += ran_ns;
        (self.used_ns >= self.quota_ns).then(|| self.period_end())
    }
}

/// The limit a guest exceeded.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize,
)]
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
    window_ns: u64,
    window_start_ns: u64,
    count: u64,
}

impl RateWindow {
    /// A window allowing `limit` exits per second.
    pub fn new(limit: u64) -> Self {
        Self::per(limit, 1_000_000_000)
    }

    /// A window allowing `limit` in every `window_ns`.
    pub fn per(limit: u64, window_ns: u64) -> Self {
        Self {
            limit,
            window_ns,
            window_start_ns: 0,
            count: 0,
        }
    }

    /// Counts one exit at guest time `now_ns`; false when it is one too many.
    pub fn allow(&mut self, now_ns: u64) -> bool {
        self.allow_n(1, now_ns)
    }

    /// Counts `n` at `now_ns`; false when the window's count passes the
    /// limit.
    pub fn allow_n(&mut self, n: u64, now_ns: u64) -> bool {
        if now_ns.saturating_sub(self.window_start_ns) >= self.window_ns {
            self.window_start_ns = now_ns;
            self.count = 0;
        }
        self.count = self.count.saturating_add(n);
        self.count <= self.limit
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// A rate with room for bursts (a token bucket): `rate` a second on
/// average and up to `burst` ahead of it. Each count is taken to have come
/// over the time since the one before, as a count read off an eventfd has,
/// so a counter that is read late is not mistaken for a faster rate; and
/// unlike a fixed window, a pause made up at once is not either, up to
/// `burst`.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    /// Per second.
    rate: u64,
    /// Room, in counts times 10^9 (so that a nanosecond refills `rate`).
    room: u64,
    capacity: u64,
    last_ns: u64,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64) -> Self {
        let capacity = burst.saturating_mul(NS_PER_S);
        Self {
            rate,
            room: capacity,
            capacity,
            last_ns: 0,
        }
    }

    /// Counts `n`, come since the last count, at `now_ns`; false when they
    /// outran the rate by more than the room left (which is then used up).
    pub fn allow_n(&mut self, n: u64, now_ns: u64) -> bool {
        let refill = now_ns
            .saturating_sub(self.last_ns)
            .saturating_mul(self.rate);
        self.last_ns = self.last_ns.max(now_ns);
        let room = self.room.saturating_add(refill);
        match room.checked_sub(n.saturating_mul(NS_PER_S)) {
            Some(left) => {
                self.room = left.min(self.capacity);
                true
            }
            None => {
                self.room = 0;
                false
            }
        }
    }
}

const NS_PER_S: u64 = 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_share_throttles_at_its_quota_until_the_next_period() {
        const MS: u64 = 1_000_000;
        let mut share = CpuShare::new(20);
        assert_eq!(share.left(0), 20 * MS);
        assert_eq!(share.charge(15 * MS, 15 * MS), None);
        assert_eq!(share.left(16 * MS), 5 * MS);
        assert_eq!(share.charge(5 * MS, 21 * MS), Some(100 * MS));
        assert_eq!(share.left(99 * MS), 0);
        assert_eq!(share.period_end(), 100 * MS);
        assert_eq!(share.left(100 * MS), 20 * MS, "a new period starts afresh");
        assert_eq!(share.charge(30 * MS, 350 * MS), Some(400 * MS));
        // 20 ms from 390 to 410: only the 10 ms after 400 count in the
        // new period.
        assert_eq!(share.charge(20 * MS, 410 * MS), None);
        assert_eq!(share.left(410 * MS), 10 * MS);
    }

    #[test]
    fn rate_window_allows_the_limit_per_second_then_refuses() {
        let mut window = RateWindow::new(3);
        assert!(window.allow(0) && window.allow(10) && window.allow(20));
        assert!(!window.allow(30));
        assert!(window.allow(1_000_000_000), "a new second starts afresh");
        assert!(window.allow(1_000_000_001) && window.allow(1_000_000_002));
        assert!(!window.allow(1_999_999_999));
    }

    #[test]
    fn a_shorter_window_counts_afresh_when_it_ends() {
        let mut window = RateWindow::per(2, 100);
        assert!(window.allow_n(2, 0));
        assert!(!window.allow(99));
        assert!(window.allow_n(2, 100), "the next window starts afresh");
        assert!(!window.allow_n(1, 150));
    }

    #[test]
    fn a_bucket_allows_a_catch_up_at_the_average_rate_but_not_a_faster_rate() {
        const MS: u64 = 1_000_000;
        // 20 a millisecond at most on average, 200 at once.
        let mut bucket = Bucket::new(20_000, 200);
        assert!(bucket.allow_n(200, 0), "a full bucket holds a burst");
        assert!(!bucket.allow_n(1, 0), "then it is empty");
        // 15 a millisecond, with a 10 ms pause made up at once: allowed.
        let mut bucket = Bucket::new(20_000, 200);
        for ms in 0..50 {
            assert!(bucket.allow_n(15, ms * MS));
        }
        assert!(bucket.allow_n(150, 60 * MS));
        // A count read 100 ms late, at the average rate: allowed.
        assert!(bucket.allow_n(1_500, 160 * MS));
        assert!(!bucket.allow_n(2_201, 260 * MS), "but not one 201 past it");
        // 25 a millisecond: refused once the burst room is used up.
        let mut bucket = Bucket::new(20_000, 200);
        let refused = (0..100).find(|ms| !bucket.allow_n(25, ms * MS));
        assert_eq!(refused, Some(36), "room 200 + 20 per ms, less 25 per ms");
        // A time before the last one refills nothing.
        assert!(!bucket.allow_n(1, 0));
    }
}
