//! Watching a guest's hypercalls, when asked for ([`Observe`]): latency
//! statistics per call number, a trace line per call in a file, or a
//! `tracing` event per call.
//!
//! A guest that is not watched has no [`Observer`], and the dispatcher's
//! only cost is the test for one (`docs/benchmarks.md` has the figures).
//! A watched guest's observer belongs to its runner, so recording takes no
//! lock but the one on its own statistics, which only snapshots contend.

use crate::clock::TscScale;
use crate::hypercall::Flow;
use crate::kvm::memory::GuestRam;
use shoal_abi::event::{CALL_TIMING_OFFSET, CallTiming};
use shoal_abi::hypercall::{CUSTOM_FIRST, CUSTOM_LAST};
use shoal_abi::layout::EVENT_PAGE;
use shoal_abi::{HypercallNr, features};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;
use zerocopy::{FromZeros, IntoBytes};

/// The first line of a trace file: its format, field by field (see
/// `docs/observe.md`).
pub const TRACE_HEADER: &str =
    "# shoal trace v1: start_ns\tguest\tnr\tname\thost_ns\tret\tflow\targs\n";

/// The `tracing` target of the per-call events ([`Observe::trace_events`]).
pub const TRACE_TARGET: &str = "shoal::hypercall";

/// What the host records about a guest's hypercalls. All off by default.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Observe {
    /// Keep per-number latency histograms: the host's time serving each
    /// call and, if the guest reports it (feature `CALL_TIMING`, offered
    /// only with this), the round trip the guest saw. They appear in
    /// [`crate::StatsSnapshot::calls`].
    pub call_stats: bool,
    /// Append one line per hypercall to this file, in the format of
    /// [`TRACE_HEADER`]. Lines are written in blocks per guest, so lines
    /// of different guests interleave out of time order: sort on the first
    /// field. The file must exist (or is created) and is never truncated.
    pub trace_file: Option<PathBuf>,
    /// Emit one `tracing` event per hypercall, target [`TRACE_TARGET`],
    /// level INFO, with the trace line's fields.
    pub trace_events: bool,
}

impl Observe {
    /// Whether anything is watched.
    pub fn any(&self) -> bool {
        self.call_stats || self.trace_file.is_some() || self.trace_events
    }
}

/// Sub-buckets per power of two: values are kept to within 1/8.
const SUB: u64 = 8;
/// Buckets: exact below `SUB`, then `SUB` per power of two up to 2^42 ns
/// (more than an hour).
const BUCKETS: usize = (SUB as usize) * 41;

/// A histogram of nanosecond values, kept to within an eighth (log-linear
/// buckets), that sends only its non-empty buckets over the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "Vec<(u16, u64)>", into = "Vec<(u16, u64)>")]
pub struct Histogram {
    /// Empty until the first value.
    counts: Vec<u64>,
}

impl Histogram {
    fn bucket(ns: u64) -> usize {
        if ns < SUB {
            return ns as usize;
        }
        let log = 63 - u64::from(ns.leading_zeros());
        let sub = (ns >> (log - 3)) & (SUB - 1);
        (((log - 2) * SUB + sub) as usize).min(BUCKETS - 1)
    }

    /// The middle of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let log = i / SUB + 2;
        let low = (SUB + i % SUB) << (log - 3);
        low + (1 << (log - 3)) / 2
    }

    /// Adds one value.
    pub fn record(&mut self, ns: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        self.counts[Self::bucket(ns)] += 1;
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        if other.counts.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
    }

    /// How many values.
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0, |sum, c| sum.saturating_add(*c))
    }

    /// The value at quantile `q` (0.5 for the median), to within an
    /// eighth; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        self.counts.iter().enumerate().find_map(|(i, &c)| {
            seen = seen.saturating_add(c);
            (seen >= rank).then(|| Self::value(i))
        })
    }
}

impl From<Vec<(u16, u64)>> for Histogram {
    fn from(buckets: Vec<(u16, u64)>) -> Self {
        let mut histogram = Histogram::default();
        for (i, count) in buckets {
            if usize::from(i) < BUCKETS && count > 0 {
                if histogram.counts.is_empty() {
                    histogram.counts = vec![0; BUCKETS];
                }
                let slot = &mut histogram.counts[usize::from(i)];
                *slot = slot.saturating_add(count);
            }
        }
        histogram
    }
}

impl From<Histogram> for Vec<(u16, u64)> {
    fn from(histogram: Histogram) -> Self {
        (0u16..)
            .zip(histogram.counts)
            .filter(|(_, c)| *c > 0)
            .collect()
    }
}

/// The latencies of one hypercall number.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CallLatency {
    /// The number (built-in, custom, or one the host does not know).
    pub nr: u32,
    /// Nanoseconds the host spent serving each call, from the exit to the
    /// call's result (a `block`'s wait is not in it; a `multicall`'s
    /// includes its calls, which are also counted on their own).
    pub host: Histogram,
    /// Nanoseconds from just before the guest's hypercall instruction to
    /// just after it, as the guest measured them (feature `CALL_TIMING`).
    /// Empty if the guest does not report them. A `block`'s include its
    /// wait.
    pub guest: Histogram,
}

impl CallLatency {
    /// The number's name: the built-in call's, `custom`, `unknown`, or
    /// `other` for [`OTHER_NUMBERS`].
    pub fn name(&self) -> &'static str {
        call_name(self.nr)
    }

    /// Merges `others` into one entry per number, in number order.
    pub fn merge_all<'a>(others: impl IntoIterator<Item = &'a CallLatency>) -> Vec<CallLatency> {
        let mut merged: Vec<CallLatency> = Vec::new();
        for call in others {
            match merged.iter_mut().find(|m| m.nr == call.nr) {
                Some(m) => {
                    m.host.merge(&call.host);
                    m.guest.merge(&call.guest);
                }
                None => merged.push(call.clone()),
            }
        }
        merged.sort_by_key(|c| c.nr);
        merged
    }
}

/// The name of hypercall number `nr`.
pub fn call_name(nr: u32) -> &'static str {
    match HypercallNr::try_from(nr) {
        Ok(nr) => nr.name(),
        Err(_) if (CUSTOM_FIRST..=CUSTOM_LAST).contains(&nr) => "custom",
        Err(_) if nr == OTHER_NUMBERS => "other",
        Err(_) => "unknown",
    }
}

/// Most hypercall numbers a guest's statistics keep apart.
pub const MOST_NUMBERS: usize = 64;

/// The row of the numbers past the first [`MOST_NUMBERS`] a guest
/// called.
pub const OTHER_NUMBERS: u32 = u32::MAX;

/// Live latency histograms of one guest.
#[derive(Debug, Default)]
pub struct CallStats {
    calls: Mutex<Vec<CallLatency>>,
}

impl CallStats {
    /// Counts `ns` for call `nr`: served by the host, or (`guest_side`) as
    /// the guest reported it. A guest picks the numbers it calls and
    /// reports, so it cannot make the host keep more than
    /// [`MOST_NUMBERS`] rows: numbers past those share the row
    /// [`OTHER_NUMBERS`], and a report for a number with no row of its
    /// own (never served, or folded into `other`) is not counted.
    fn record(&self, nr: u32, ns: u64, guest_side: bool) {
        let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        let row = match calls.iter().position(|c| c.nr == nr) {
            Some(i) => i,
            None if guest_side => return,
            None => {
                let nr = if calls.len() < MOST_NUMBERS {
                    nr
                } else {
                    OTHER_NUMBERS
                };
                let found = calls.iter().position(|c| c.nr == nr);
                found.unwrap_or_else(|| {
                    calls.push(CallLatency {
                        nr,
                        ..Default::default()
                    });
                    calls.len() - 1
                })
            }
        };
        let call = &mut calls[row];
        if guest_side {
            call.guest.record(ns);
        } else {
            call.host.record(ns);
        }
    }

    /// The histograms so far, in number order.
    pub fn snapshot(&self) -> Vec<CallLatency> {
        let calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        CallLatency::merge_all(calls.iter())
    }
}

/// What the dispatcher learned about the call being served.
#[derive(Debug, Default)]
struct Note {
    nr: u32,
    args: Option<String>,
    ret: Option<i64>,
}

/// The trace file lines of one guest, written in blocks.
#[derive(Debug)]
struct TraceOut {
    file: Arc<File>,
    lines: RefCell<Vec<u8>>,
}

/// Bytes of trace lines a guest gathers before one append.
const TRACE_BLOCK: usize = 32 << 10;

impl TraceOut {
    fn push(&self, line: std::fmt::Arguments<'_>) {
        let mut lines = self.lines.borrow_mut();
        let _ = lines.write_fmt(line);
        if lines.len() >= TRACE_BLOCK {
            self.flush(&mut lines);
        }
    }

    /// One `write` of whole lines: with `O_APPEND`, the blocks of guests in
    /// other threads and processes land whole.
    fn flush(&self, lines: &mut Vec<u8>) {
        if let Err(e) = (&*self.file).write_all(lines) {
            tracing::warn!("cannot write the hypercall trace: {e}");
        }
        lines.clear();
    }
}

impl Drop for TraceOut {
    fn drop(&mut self) {
        let mut lines = std::mem::take(self.lines.get_mut());
        if !lines.is_empty() {
            self.flush(&mut lines);
        }
    }
}

/// The trace file at `path`, opened once per process for appending.
fn trace_file(path: &Path) -> std::io::Result<Arc<File>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Arc<File>>>> = OnceLock::new();
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(file) = open.get(path) {
        return Ok(Arc::clone(file));
    }
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)?,
    );
    open.insert(path.to_path_buf(), Arc::clone(&file));
    Ok(file)
}

/// Creates (or empties) a trace file and writes its header line: what a
/// program does once before it spawns guests that trace into it.
pub fn start_trace_file(path: &Path) -> std::io::Result<()> {
    std::fs::write(path, TRACE_HEADER)
}

/// Host CLOCK_MONOTONIC, in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Watches one guest's hypercalls. Owned by the guest's runner.
#[derive(Debug)]
pub struct Observer {
    guest: u64,
    stats: Option<Arc<CallStats>>,
    trace: Option<TraceOut>,
    events: bool,
    /// The guest's time-stamp counter rate, for its reported round trips.
    scale: TscScale,
    note: RefCell<Note>,
}

impl Observer {
    /// An observer for guest `guest` as `observe` asks, recording into
    /// `stats`; `None` if nothing is watched.
    pub fn new(
        guest: u64,
        observe: &Observe,
        stats: Option<Arc<CallStats>>,
        scale: TscScale,
    ) -> std::io::Result<Option<Self>> {
        if !observe.any() {
            return Ok(None);
        }
        let trace = match &observe.trace_file {
            Some(path) => Some(TraceOut {
                file: trace_file(path)?,
                lines: RefCell::new(Vec::with_capacity(TRACE_BLOCK + 512)),
            }),
            None => None,
        };
        Ok(Some(Self {
            guest,
            stats: stats.filter(|_| observe.call_stats),
            trace,
            events: observe.trace_events,
            scale,
            note: RefCell::default(),
        }))
    }

    /// The feature bits this observer adds to the guest's.
    pub fn features(&self) -> u64 {
        if self.stats.is_some() {
            features::CALL_TIMING
        } else {
            0
        }
    }

    /// Whether argument summaries are wanted.
    pub fn wants_args(&self) -> bool {
        self.trace.is_some() || self.events
    }

    /// Serves one hypercall with `serve`, and records it.
    pub fn call(&self, serve: impl FnOnce() -> Flow) -> Flow {
        let start_ns = if self.wants_args() { monotonic_ns() } else { 0 };
        let outer = self.note.take();
        let started = Instant::now();
        let flow = serve();
        let host_ns = started.elapsed().as_nanos() as u64;
        let note = self.note.replace(outer);
        if let Some(stats) = &self.stats {
            stats.record(note.nr, host_ns, false);
        }
        if self.wants_args() {
            self.trace_call(start_ns, host_ns, &note, &flow);
        }
        flow
    }

    fn trace_call(&self, start_ns: u64, host_ns: u64, note: &Note, flow: &Flow) {
        // A block's result is written when it wakes, after this line.
        let ret = Shown(note.ret.filter(|_| !matches!(flow, Flow::Block { .. })));
        let flow = match flow {
            Flow::Resume => "resume",
            Flow::Block { .. } => "block",
            Flow::Yield => "yield",
            Flow::Return(_) => "return",
            Flow::End(_) => "end",
        };
        let args = note.args.as_deref().unwrap_or("-");
        let (guest, nr, name) = (self.guest, note.nr, call_name(note.nr));
        if let Some(trace) = &self.trace {
            trace.push(format_args!(
                "{start_ns}\t{guest}\t{nr}\t{name}\t{host_ns}\t{ret}\t{flow}\t{args}\n"
            ));
        }
        if self.events {
            tracing::info!(
                target: TRACE_TARGET,
                start_ns,
                guest,
                nr,
                name,
                host_ns,
                %ret,
                flow,
                args,
            );
        }
    }

    /// The call's number, once its header is read.
    pub fn note_nr(&self, nr: u32) {
        self.note.borrow_mut().nr = nr;
    }

    /// The call's arguments, as the guest passed them.
    pub fn note_args(&self, args: &dyn std::fmt::Debug) {
        if self.wants_args() {
            self.note.borrow_mut().args = Some(format!("{args:?}"));
        }
    }

    /// The call's result, as written back to the guest.
    pub fn note_ret(&self, ret: i64) {
        self.note.borrow_mut().ret = Some(ret);
    }

    /// Counts the round trip the guest reported for its last call, if it
    /// left one in its event page, and clears it.
    pub fn take_guest_timing(&self, ram: &GuestRam) {
        let Some(stats) = &self.stats else { return };
        let at = EVENT_PAGE + CALL_TIMING_OFFSET;
        let mut record = CallTiming::new_zeroed();
        if ram.read_host(at, record.as_mut_bytes()).is_err() || record.ticks == 0 {
            return;
        }
        stats.record(record.nr, self.scale.ticks_to_ns(record.ticks), true);
        let _ = ram.write_host(at, CallTiming::new_zeroed().as_bytes());
    }
}

/// A result, or `-` for a call that ended the guest.
struct Shown(Option<i64>);

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ret) => write!(f, "{ret}"),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_keeps_values_within_an_eighth() {
        for ns in [
            0,
            1,
            7,
            8,
            9,
            15,
            16,
            100,
            1_000,
            3_333,
            29_000,
            1 << 40,
            u64::MAX,
        ] {
            let mut h = Histogram::default();
            h.record(ns);
            let got = h.quantile(0.5).unwrap();
            if ns < (1 << 41) {
                assert!(got.abs_diff(ns) <= ns / 8, "{ns} came back as {got}");
            }
        }
    }

    #[test]
    fn histogram_quantiles_merge_and_cross_the_wire() {
        let mut a = Histogram::default();
        for ns in 1..=99 {
            a.record(ns * 1_000);
        }
        let mut b = Histogram::default();
        b.record(1_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 100);
        let p50 = a.quantile(0.5).unwrap();
        assert!((44_000..=56_000).contains(&p50), "{p50}");
        assert!(a.quantile(0.99).unwrap() < 110_000);
        assert!(a.quantile(1.0).unwrap() > 900_000);
        let wire: Vec<(u16, u64)> = a.clone().into();
        assert!(wire.len() < 60);
        assert_eq!(Histogram::from(wire), a);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn counts_from_the_wire_saturate_instead_of_overflowing() {
        // A shard may send any counts (found by the shard_wire fuzz target).
        let mut a = Histogram::from(vec![(3, u64::MAX), (3, 1), (9, u64::MAX)]);
        assert_eq!(a.count(), u64::MAX);
        a.merge(&Histogram::from(vec![(3, 5)]));
        assert_eq!(a.count(), u64::MAX);
        assert_eq!(a.quantile(0.5), Some(Histogram::value(3)));
        assert_eq!(a.quantile(1.0), Some(Histogram::value(3)));
    }

    #[test]
    fn a_guest_cannot_make_the_host_keep_unbounded_rows() {
        let stats = CallStats::default();
        for nr in 0..10_000u32 {
            stats.record(nr + 100, 1_000, false);
            stats.record(nr + 1_000_000, 1_000, true);
        }
        let calls = stats.snapshot();
        assert_eq!(calls.len(), MOST_NUMBERS + 1);
        let other = calls.iter().find(|c| c.nr == OTHER_NUMBERS).unwrap();
        assert_eq!(other.host.count(), 10_000 - MOST_NUMBERS as u64);
        assert!(calls.iter().all(|c| c.guest.count() == 0));
        assert_eq!(call_name(OTHER_NUMBERS), "other");
    }

    #[test]
    fn nested_calls_are_noted_apart() {
        let observe = Observe {
            call_stats: true,
            ..Default::default()
        };
        let stats = Arc::new(CallStats::default());
        let observer = Observer::new(1, &observe, Some(Arc::clone(&stats)), TscScale::from_hz(1))
            .unwrap()
            .unwrap();
        let flow = observer.call(|| {
            observer.note_nr(HypercallNr::Multicall as u32);
            observer.call(|| {
                observer.note_nr(HypercallNr::Yield as u32);
                Flow::Resume
            });
            observer.note_ret(1);
            Flow::Resume
        });
        assert_eq!(flow, Flow::Resume);
        let calls = stats.snapshot();
        let nrs: Vec<u32> = calls.iter().map(|c| c.nr).collect();
        let mut expected = vec![HypercallNr::Multicall as u32, HypercallNr::Yield as u32];
        expected.sort();
        assert_eq!(nrs, expected);
        assert!(
            calls
                .iter()
                .all(|c| c.host.count() == 1 && c.guest.count() == 0)
        );
    }
}
