//! Hypercall statistics and traces (`GuestConfig::observe`), on real
//! guests.

mod common;

use shoal_abi::HypercallNr;
use shoal_host::observe::{CallLatency, TRACE_HEADER, TRACE_TARGET, start_trace_file};
use shoal_host::{GuestConfig, GuestReport, Host, HostConfig, Observe};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

fn stats_on() -> Observe {
    Observe {
        call_stats: true,
        ..Default::default()
    }
}

fn latency(report: &GuestReport, nr: HypercallNr) -> &CallLatency {
    report
        .stats
        .calls
        .iter()
        .find(|c| c.nr == nr as u32)
        .unwrap_or_else(|| panic!("no latencies for {nr:?}: {:?}", report.stats.calls))
}

#[test]
fn call_stats_time_every_call_on_the_host_and_as_the_guest_saw_it() {
    let report = common::run_with(
        "bench",
        GuestConfig {
            observe: stats_on(),
            // Its result line by hypercall, so that there is one to time.
            console_ring: false,
            ..common::config(&["hypercall", "1000"])
        },
    );
    common::assert_exited_0(&report);
    let info = latency(&report, HypercallNr::AbiInfo);
    assert_eq!(info.host.count(), 1000);
    // Every abi_info call is followed by another call, which carries its
    // round trip to the host.
    assert_eq!(info.guest.count(), 1000);
    let (host, guest) = (
        info.host.quantile(0.5).unwrap(),
        info.guest.quantile(0.5).unwrap(),
    );
    assert!(host > 0 && guest > host, "host {host} ns, guest {guest} ns");
    // The guest's exit never returns to it.
    let exit = latency(&report, HypercallNr::Exit);
    assert_eq!((exit.host.count(), exit.guest.count()), (1, 0));
    let writes = report.stats.hypercall(HypercallNr::ConsoleWrite);
    assert!(writes > 0);
    assert_eq!(
        latency(&report, HypercallNr::ConsoleWrite).host.count(),
        writes
    );
}

#[test]
fn nothing_is_recorded_unless_asked_for() {
    let report = common::run("bench", &["hypercall", "100"]);
    common::assert_exited_0(&report);
    assert!(report.stats.calls.is_empty());
    assert_eq!(report.stats.hypercall(HypercallNr::AbiInfo), 100);
}

#[test]
fn a_sharded_host_sends_the_histograms_back() {
    let host = common::sharded_host(1);
    let guests: Vec<_> = (0..2)
        .map(|_| {
            host.spawn(
                &common::image("bench"),
                GuestConfig {
                    observe: stats_on(),
                    ..common::config(&["hypercall", "500"])
                },
            )
            .expect("spawns")
        })
        .collect();
    for guest in guests {
        let report = guest.wait();
        common::assert_exited_0(&report);
        let info = latency(&report, HypercallNr::AbiInfo);
        assert_eq!((info.host.count(), info.guest.count()), (500, 500));
    }
}

/// One parsed trace line.
#[derive(Debug)]
struct Line {
    start_ns: u64,
    guest: u64,
    nr: u32,
    name: String,
    ret: String,
    flow: String,
    args: String,
}

fn parse_trace(text: &str) -> Vec<Line> {
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(TRACE_HEADER.trim_end()));
    lines
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 8, "{line:?}");
            let _host_ns: u64 = f[4].parse().expect("host_ns");
            Line {
                start_ns: f[0].parse().expect("start_ns"),
                guest: f[1].parse().expect("guest"),
                nr: f[2].parse().expect("nr"),
                name: f[3].into(),
                ret: f[5].into(),
                flow: f[6].into(),
                args: f[7].into(),
            }
        })
        .collect()
}

#[test]
fn a_trace_file_has_a_line_per_call_from_guests_in_several_processes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("calls.trace");
    start_trace_file(&path).expect("trace file");
    let observe = Observe {
        trace_file: Some(path.clone()),
        ..Default::default()
    };
    let host = common::sharded_host(2);
    let guests: Vec<_> = (0..4)
        .map(|i| {
            host.spawn(
                &common::image("clock"),
                GuestConfig {
                    observe: observe.clone(),
                    // Output by hypercall, so that the trace shows it.
                    console_ring: false,
                    ..common::config(&[&(i + 2).to_string()])
                },
            )
            .expect("spawns")
        })
        .collect();
    let reports: Vec<GuestReport> = guests.into_iter().map(|g| g.wait()).collect();
    drop(host);
    let lines = parse_trace(&std::fs::read_to_string(&path).expect("trace"));
    for (i, report) in reports.iter().enumerate() {
        common::assert_exited_0(report);
        let mine: Vec<&Line> = lines.iter().filter(|l| l.guest == report.id).collect();
        let served: u64 = report.stats.hypercalls.iter().map(|(_, n)| n).sum();
        assert_eq!(mine.len() as u64, served, "guest {}", report.id);
        // In time order within a guest, the sleeps blocking, and the exit
        // last, ending the guest with no result.
        assert!(mine.windows(2).all(|w| w[0].start_ns <= w[1].start_ns));
        let blocks: Vec<_> = mine.iter().filter(|l| l.name == "block").collect();
        assert_eq!(blocks.len(), i + 2);
        assert!(blocks.iter().all(|l| l.flow == "block" && l.ret == "-"));
        assert!(blocks[0].args.starts_with("Block { deadline_ns: "));
        let last = mine.last().expect("lines");
        assert_eq!(
            (
                last.nr,
                last.name.as_str(),
                last.ret.as_str(),
                last.flow.as_str()
            ),
            (HypercallNr::Exit as u32, "exit", "-", "end")
        );
        let write = mine
            .iter()
            .find(|l| l.name == "console_write")
            .expect("writes");
        assert_eq!(write.flow, "resume");
        assert!(write.ret.parse::<u64>().expect("a length") > 0);
    }
}

#[test]
fn a_trace_file_that_cannot_be_opened_refuses_the_spawn() {
    let error = common::host()
        .spawn(
            &common::image("hello"),
            GuestConfig {
                observe: Observe {
                    trace_file: Some("/nonexistent-dir/calls.trace".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .expect_err("refused");
    assert!(error.to_string().contains("trace"), "{error}");
}

/// Counts `shoal::hypercall` events by (guest, name).
#[derive(Default, Clone)]
struct Counter(Arc<Mutex<HashMap<(u64, String), u64>>>);

struct Fields {
    guest: u64,
    name: String,
}

impl tracing::field::Visit for Fields {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "guest" {
            self.guest = value;
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "name" {
            self.name = value.into();
        }
    }
    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Counter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != TRACE_TARGET {
            return;
        }
        let mut fields = Fields {
            guest: 0,
            name: String::new(),
        };
        event.record(&mut fields);
        *self
            .0
            .lock()
            .unwrap()
            .entry((fields.guest, fields.name))
            .or_default() += 1;
    }
}

#[test]
fn trace_events_reach_an_embedders_tracing_subscriber() {
    use tracing_subscriber::layer::SubscriberExt;
    let counter = Counter::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(counter.clone()))
        .expect("the only subscriber in this test binary");
    let host = Host::with_config(HostConfig {
        pool: 2,
        ..Default::default()
    })
    .expect("host");
    let traced = host
        .spawn(
            &common::image("bench"),
            GuestConfig {
                observe: Observe {
                    trace_events: true,
                    ..Default::default()
                },
                ..common::config(&["hypercall", "300"])
            },
        )
        .expect("spawns");
    let quiet = common::spawn(&host, "bench", &["hypercall", "300"]);
    let (traced, quiet) = (traced.wait(), quiet.wait());
    common::assert_exited_0(&traced);
    common::assert_exited_0(&quiet);
    let counts = counter.0.lock().unwrap().clone();
    assert_eq!(counts.get(&(traced.id, "abi_info".into())), Some(&300));
    assert_eq!(counts.get(&(traced.id, "exit".into())), Some(&1));
    assert!(
        counts.keys().all(|(guest, _)| *guest == traced.id),
        "{counts:?}"
    );
}

#[test]
fn a_preempted_guest_counts_the_time_it_waited() {
    let host = Host::with_config(HostConfig {
        workers: 1,
        pool: 2,
        ..Default::default()
    })
    .expect("host");
    let spinners: Vec<_> = (0..2)
        .map(|_| common::spawn(&host, "spin", &["1s"]))
        .collect();
    for spinner in spinners {
        let report = spinner.wait();
        common::assert_exited_0(&report);
        assert!(report.stats.preemptions > 0);
        // Two spinners on one worker: each waits about as long as it runs.
        assert!(
            report.stats.preempted_ns > 50_000_000,
            "waited {} ns",
            report.stats.preempted_ns
        );
    }
}
