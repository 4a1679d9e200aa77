//! Scheduling and scale figures: spawn latency and throughput, memory per
//! idle guest, wake-up latency under load, fairness.

use super::{BenchError, Figure, median};
use crate::host::{GuestConfig, GuestHandle, Host, HostConfig};
use crate::loader::Image;
use std::time::{Duration, Instant};

pub(crate) fn spawn(host: &Host, image: &Image, args: &[&str]) -> Result<GuestHandle, BenchError> {
    host.spawn(
        image,
        GuestConfig {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        },
    )
    .map_err(BenchError::Spawn)
}

/// Kills every guest first, then waits for them: killing and waiting one
/// at a time would wait for each queued spinner's turn in between.
pub(crate) fn kill_all(guests: Vec<GuestHandle>) {
    for guest in &guests {
        guest.kill();
    }
    drop(guests);
}

/// The kernel's estimate of memory available to new work, in KiB.
pub fn mem_available_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn percentiles(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let p99 = values
        .get((values.len().max(1) - 1) * 99 / 100)
        .copied()
        .unwrap_or(f64::NAN);
    (median(values), p99)
}

/// Spawns `count` guests that exit at once, one at a time: each waits for
/// the pool to have a VM ready (`warm`) or runs on a host without a pool.
/// With `between`, a guest of that image runs to its end before each
/// (untimed), so that the pool holds VMs of both. Returns spawn-call and
/// spawn-to-first-exit latencies in microseconds.
fn one_by_one(
    host: &Host,
    quick: &Image,
    count: usize,
    warm: bool,
    between: Option<&Image>,
) -> Result<[Vec<f64>; 2], BenchError> {
    let (mut spawn_us, mut start_us) = (Vec::with_capacity(count), Vec::with_capacity(count));
    let wait_ready = || {
        let give_up = Instant::now() + Duration::from_secs(1);
        while warm && host.pool().ready == 0 && Instant::now() < give_up {
            std::thread::sleep(Duration::from_micros(100));
        }
    };
    for _ in 0..count {
        if let Some(other) = between {
            wait_ready();
            spawn(host, other, &[])?.wait();
        }
        wait_ready();
        let t = Instant::now();
        let guest = spawn(host, quick, &["floor", "1"])?;
        spawn_us.push(t.elapsed().as_secs_f64() * 1e6);
        start_us.push(guest.wait().stats.first_exit_ns as f64 / 1e3);
    }
    Ok([spawn_us, start_us])
}

/// Spawn latency from the warm pool and cold (p50, p99; the spawn call,
/// and spawn to the guest's first exit), also with a guest of `other`
/// between each two (a pool of VMs last used by either image); and
/// throughput: `count` guests that exit at once, spawned back to back.
pub fn spawn_figures(
    host: &Host,
    quick: &Image,
    other: &Image,
    count: usize,
) -> Result<Vec<Figure>, BenchError> {
    let [spawn_us, start_us] = one_by_one(host, quick, count, true, None)?;
    let (spawn_p50, spawn_p99) = percentiles(spawn_us);
    let (start_p50, start_p99) = percentiles(start_us);
    let [_, mixed_us] = one_by_one(host, quick, count.min(200), true, Some(other))?;
    let mut figures = vec![
        Figure::plain("spawn_warm_p50", spawn_p50, "us"),
        Figure::plain("spawn_warm_p99", spawn_p99, "us"),
        Figure::plain("start_warm_p50", start_p50, "us"),
        Figure::plain("start_warm_p99", start_p99, "us"),
        Figure::plain("start_warm_mixed_p50", percentiles(mixed_us).0, "us"),
    ];
    let cold = Host::with_config(HostConfig {
        pool: 0,
        ..HostConfig::default()
    })
    .map_err(BenchError::Host)?;
    let [spawn_us, start_us] = one_by_one(&cold, quick, count.min(200), false, None)?;
    drop(cold);
    figures.push(Figure::plain(
        "spawn_cold_p50",
        percentiles(spawn_us).0,
        "us",
    ));
    figures.push(Figure::plain(
        "start_cold_p50",
        percentiles(start_us).0,
        "us",
    ));

    figures.push(Figure::plain(
        "spawn_throughput",
        throughput(host, quick, count)?,
        "guests/s",
    ));
    tracing::info!(pool = ?host.pool(), "after the throughput run");
    Ok(figures)
}

/// A failed KVM call (or mapping) in a bench that talks to KVM directly.
fn kvm_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Kvm(e.to_string())
}

/// A VM's life in the kernel: `KVM_CREATE_VM`, one vCPU, and the
/// teardown, in microseconds; through shoal's VM factory (no debugfs
/// entries, [`crate::kvm::factory`]) against plain `KVM_CREATE_VM`, in
/// alternating rounds of `count`; medians of the rounds.
pub fn vm_life(count: usize) -> Result<Vec<Figure>, BenchError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(kvm_err)?;
    let round = |factory: bool| -> Result<f64, BenchError> {
        let started = Instant::now();
        for _ in 0..count {
            let vm = if factory {
                crate::kvm::factory::create_vm(&kvm)
            } else {
                kvm.create_vm()
            }
            .map_err(kvm_err)?;
            drop(vm.create_vcpu(0).map_err(kvm_err)?);
        }
        Ok(started.elapsed().as_secs_f64() * 1e6 / count.max(1) as f64)
    };
    let (mut made, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        made.push(round(true)?);
        plain.push(round(false)?);
    }
    let (made, plain) = (median(made), median(plain));
    Ok(vec![
        Figure::plain("vm_life_plain_us", plain, "us"),
        Figure::versus("vm_life_us", made, "us", plain),
    ])
}

/// What readying an ended guest's VM for the next guest costs
/// ([`crate::pool::Toolstack::reset`], as the pool's filler does it),
/// against making and destroying a new one
/// ([`crate::pool::Toolstack::shell`]): wall time and the calling thread's
/// CPU time per VM, in microseconds, over `count` rounds each. Before each
/// reset the host writes to 16 pages of the VM's RAM, as a small guest
/// would. The reset is timed twice: after a guest that changed its page
/// tables (the RAM renewed, the slot moved), and after one of `image`
/// that did not (its template kept mapped, the shadow tables kept, the
/// 16 pages written back in place).
pub fn vm_reset(image: &Image, count: usize) -> Result<Vec<Figure>, BenchError> {
    use crate::boot::{BootParams, Template};
    use crate::pool::{Shadow, Toolstack};
    use shoal_abi::layout::{DEFAULT_MEMORY, IMAGE_BASE, PAGE_SIZE};
    let toolstack = Toolstack::new(crate::kvm::Kvm::open().map_err(kvm_err)?);
    let mut shell = toolstack.shell(DEFAULT_MEMORY).map_err(kvm_err)?;
    let template = Template::build(image, DEFAULT_MEMORY).map_err(kvm_err)?;
    let timed = |what: &mut dyn FnMut() -> Result<(), crate::guest::SpawnError>| {
        let (wall, cpu) = (Instant::now(), crate::sched::thread_cpu_ns());
        for _ in 0..count {
            what().map_err(kvm_err)?;
        }
        let per = |total: f64| total / count.max(1) as f64;
        Ok::<_, BenchError>((
            per(wall.elapsed().as_secs_f64() * 1e6),
            per((crate::sched::thread_cpu_ns() - cpu) as f64 / 1e3),
        ))
    };
    let reset = |shell: &mut crate::pool::Shell, shadow: Shadow| {
        for page in 0..16 {
            shell.ram.write_host(IMAGE_BASE + page * PAGE_SIZE, &[1])?;
        }
        shell.shadow = shadow;
        toolstack.reset(shell).map(drop)
    };
    let (reset_us, reset_cpu_us) = timed(&mut || reset(&mut shell, Shadow::Stale))?;
    let params = BootParams {
        guest_id: 1,
        features: 0,
        args: &[],
    };
    template.load(&mut shell.ram, &params).map_err(kvm_err)?;
    let kept = Shadow::Template(template.key());
    let (kept_us, kept_cpu_us) = timed(&mut || reset(&mut shell, kept))?;
    let (new_us, new_cpu_us) = timed(&mut || toolstack.shell(DEFAULT_MEMORY).map(drop))?;
    Ok(vec![
        Figure::plain("vm_new_us", new_us, "us"),
        Figure::versus("vm_reset_us", reset_us, "us", new_us),
        Figure::versus("vm_reset_kept_us", kept_us, "us", new_us),
        Figure::plain("vm_new_cpu_us", new_cpu_us, "us"),
        Figure::versus("vm_reset_cpu_us", reset_cpu_us, "us", new_cpu_us),
        Figure::versus("vm_reset_kept_cpu_us", kept_cpu_us, "us", new_cpu_us),
    ])
}

/// Bring-up rate: `count` idle guests spawned back to back
/// ([`Host::spawn_many`]) on a sharded host, as `shoal run --count`
/// spawns more than a shard's worth, until
/// every one has blocked; the median of three rounds, the first after the
/// machine has settled from earlier runs. Shards keep each process's VMs
/// few, and so the MMU-notifier calls every VM adds to its process's page
/// faults and mapping changes.
pub fn bring_up(idle: &Image, count: usize) -> Result<Vec<Figure>, BenchError> {
    let host = Host::with_config(HostConfig {
        shard_size: Some(crate::host::DEFAULT_SHARD_SIZE),
        ..HostConfig::default()
    })
    .map_err(BenchError::Host)?;
    let mut rates = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(2));
        let started = Instant::now();
        let guests: Vec<GuestHandle> = host
            .spawn_many(idle, count, |_| GuestConfig {
                args: vec!["3600s".into()],
                ..Default::default()
            })
            .map_err(|(_, e)| BenchError::Spawn(e))?
            .into_iter()
            .map(|(guest, _)| guest)
            .collect();
        all_blocked(&guests);
        rates.push(count as f64 / started.elapsed().as_secs_f64());
        kill_all(guests);
    }
    Ok(vec![
        Figure::plain("bring_up_guests", count as f64, "guests"),
        Figure::plain("bring_up_throughput", median(rates), "guests/s"),
    ])
}

/// Guests per second: `count` guests that exit at once, spawned back to
/// back, until the last has ended.
fn throughput(host: &Host, quick: &Image, count: usize) -> Result<f64, BenchError> {
    let started = Instant::now();
    let guests = (0..count)
        .map(|_| spawn(host, quick, &["floor", "1"]))
        .collect::<Result<Vec<_>, _>>()?;
    for guest in guests {
        guest.wait();
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Host memory per idle guest: MemAvailable before and with `count` idle
/// guests blocked at once.
pub fn idle_memory(host: &Host, idle: &Image, count: usize) -> Result<Vec<Figure>, BenchError> {
    let before = mem_available_kib().unwrap_or(0);
    let guests = (0..count)
        .map(|_| spawn(host, idle, &["3600s"]))
        .collect::<Result<Vec<_>, _>>()?;
    all_blocked(&guests);
    let during = mem_available_kib().unwrap_or(0);
    kill_all(guests);
    Ok(vec![
        Figure::plain("idle_guests", count as f64, "guests"),
        Figure::plain(
            "memory_per_idle_guest",
            before.saturating_sub(during) as f64 / count.max(1) as f64,
            "KiB",
        ),
    ])
}

/// Wake-up lateness of the `sched` guest while `busy` guests spin.
pub fn wakeup(
    host: &Host,
    spin: &Image,
    sched: &Image,
    busy: usize,
) -> Result<Vec<Figure>, BenchError> {
    let spinners = (0..busy)
        .map(|_| spawn(host, spin, &["forever"]))
        .collect::<Result<Vec<_>, _>>()?;
    let report = spawn(host, sched, &["300", "2000"])?.wait();
    kill_all(spinners);
    let lateness = Lateness::of(&report)?;
    Ok(vec![
        Figure::plain("wakeup_busy_guests", busy as f64, "guests"),
        Figure::plain("wakeup_latency_p50", lateness.p50_us, "us"),
        Figure::plain("wakeup_latency_p99", lateness.p99_us, "us"),
    ])
}

/// The wake-up lateness the `sched` guest reported.
pub(crate) struct Lateness {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Lateness {
    /// Reads the `sched` guest's report.
    pub(crate) fn of(report: &crate::GuestReport) -> Result<Self, BenchError> {
        let text = report.console_text();
        let words: Vec<&str> = text.split_whitespace().collect();
        let value = |name: &str| {
            words
                .iter()
                .position(|w| *w == name)
                .and_then(|i| words.get(i + 1))
                .and_then(|v| v.parse::<f64>().ok())
                .map(|ns| ns / 1000.0)
        };
        match (value("p50"), value("p99"), value("max")) {
            (Some(p50_us), Some(p99_us), Some(max_us)) => Ok(Self {
                p50_us,
                p99_us,
                max_us,
            }),
            _ => Err(BenchError::NoResult {
                mode: "sched".into(),
                end: report.end.to_string(),
                console: text,
            }),
        }
    }
}

/// CPU shares of `count` spinners over `span`: the largest deviation from
/// the mean, as a fraction of it.
pub fn fairness(
    host: &Host,
    spin: &Image,
    count: usize,
    span: Duration,
) -> Result<Vec<Figure>, BenchError> {
    let spinners = (0..count)
        .map(|_| spawn(host, spin, &["forever"]))
        .collect::<Result<Vec<_>, _>>()?;
    let start: Vec<u64> = spinners.iter().map(|s| s.stats().cpu_ns).collect();
    std::thread::sleep(span);
    let shares: Vec<f64> = spinners
        .iter()
        .zip(start)
        .map(|(s, before)| s.stats().cpu_ns.saturating_sub(before) as f64)
        .collect();
    kill_all(spinners);
    let mean = shares.iter().sum::<f64>() / shares.len().max(1) as f64;
    let spread = shares
        .iter()
        .map(|s| (s - mean).abs() / mean.max(1.0))
        .fold(0.0, f64::max);
    Ok(vec![
        Figure::plain("fairness_spinners", count as f64, "guests"),
        Figure::plain("fairness_max_deviation", spread * 100.0, "%"),
    ])
}

/// Guests whose spawn and start are timed at each scale.
const MARGINAL: usize = 100;

/// Per-guest costs with `count` idle guests held at once in a sharded
/// host, for the last [`MARGINAL`] guests, spawned once the others are
/// blocked and the pools refilled, one at a time (each waits for the one
/// before to block, so no guest queues behind another): the spawn call
/// and the start-up latency; and host memory per guest, the MemAvailable
/// drop over all `count` (measured from a settled machine: memory freed
/// by earlier runs returns to MemAvailable over a second or two).
#[derive(Clone, Copy)]
struct ScaleCosts {
    spawn_p50_us: f64,
    start_p50_us: f64,
    memory_kib: f64,
}

/// Waits until every guest in `guests` has blocked.
pub(crate) fn all_blocked(guests: &[GuestHandle]) {
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut waiting: Vec<&GuestHandle> = guests.iter().collect();
    while !waiting.is_empty() && Instant::now() < give_up {
        waiting.retain(|g| g.state() != crate::GuestState::Blocked);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn scale_costs(idle: &Image, count: usize) -> Result<ScaleCosts, BenchError> {
    let host = Host::with_config(HostConfig {
        shard_size: Some(crate::host::DEFAULT_SHARD_SIZE),
        ..HostConfig::default()
    })
    .map_err(BenchError::Host)?;
    std::thread::sleep(Duration::from_secs(2));
    let before = mem_available_kib().unwrap_or(0);
    let mut guests = (0..count.saturating_sub(MARGINAL))
        .map(|_| spawn(&host, idle, &["3600s"]))
        .collect::<Result<Vec<_>, _>>()?;
    all_blocked(&guests);
    std::thread::sleep(Duration::from_secs(1));
    let mut spawn_us = Vec::with_capacity(MARGINAL);
    let first_timed = guests.len();
    while guests.len() < count {
        let spawned = Instant::now();
        guests.push(spawn(&host, idle, &["3600s"])?);
        spawn_us.push(spawned.elapsed().as_secs_f64() * 1e6);
        all_blocked(&guests[guests.len() - 1..]);
    }
    let during = mem_available_kib().unwrap_or(0);
    let start_us: Vec<f64> = guests[first_timed..]
        .iter()
        .map(|g| g.stats().first_exit_ns as f64 / 1000.0)
        .collect();
    kill_all(guests);
    drop(host);
    Ok(ScaleCosts {
        spawn_p50_us: percentiles(spawn_us).0,
        start_p50_us: percentiles(start_us).0,
        memory_kib: before.saturating_sub(during) as f64 / count.max(1) as f64,
    })
}

/// Per-guest costs at `small` and at `large` concurrent idle guests, each
/// figure at `large` with the same figure at `small` as its floor: the
/// ratio says how flat the cost per guest stays. The small case, noisier,
/// is the median of three runs. Memory per guest is compared with
/// `memory_small` guests instead: with only 100 guests, the MemAvailable
/// drop (a few tens of MiB) is within what the kernel hands back from
/// memory freed by earlier runs without MemAvailable ever showing it.
pub fn scale(
    idle: &Image,
    small: usize,
    memory_small: usize,
    large: usize,
) -> Result<Vec<Figure>, BenchError> {
    let at_memory_small = scale_costs(idle, memory_small)?;
    let small_runs = (0..3)
        .map(|_| scale_costs(idle, small))
        .collect::<Result<Vec<_>, _>>()?;
    let at_large = scale_costs(idle, large)?;
    let small_median = |pick: fn(&ScaleCosts) -> f64| median(small_runs.iter().map(pick).collect());
    Ok(vec![
        Figure::plain("scale_guests", large as f64, "guests"),
        Figure::versus(
            "scale_spawn_p50",
            at_large.spawn_p50_us,
            "us",
            small_median(|c| c.spawn_p50_us),
        ),
        Figure::versus(
            "scale_start_p50",
            at_large.start_p50_us,
            "us",
            small_median(|c| c.start_p50_us),
        ),
        Figure::versus(
            "scale_memory_per_guest",
            at_large.memory_kib,
            "KiB",
            at_memory_small.memory_kib,
        ),
    ])
}
