//! The `shoal` command line: a thin layer over the `shoal_host` library.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use shoal_abi::device::guest_ipv4;
use shoal_host::console::ConsoleSink;
use shoal_host::mmu::Forget;
use shoal_host::{DiskSpec, Forward, GuestConfig, Host, Image, Limits, Observe, Tap, builtin};
use std::io::{IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

mod many;
mod soak;
mod stats;

/// shoal: run tiny paravirtualized guest kernels on KVM.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest kernel (or many) and stream its console.
    ///
    /// Exit status: the guest's exit code when it exits (a non-zero code
    /// that truncates to 0 gives 1), 101 when it panics, 125 when the host
    /// stops it for breaking a rule or a limit, 126 when it cannot be
    /// started. With --count, the status of the first guest that failed.
    Run(RunArgs),
    /// Show a guest image: ABI version, entry point, segments, memory needed.
    Inspect {
        /// A guest ELF file, or the name of a built-in guest.
        kernel: String,
    },
    /// List the built-in guests.
    List,
    /// Measure the hypercall path against the raw exit floor.
    Bench(BenchArgs),
    /// Run a changing mix of every built-in guest, hostile ones included,
    /// with disks and LANs, for a while, checking that every guest ends
    /// as it must, flushed disk data is intact, and nothing leaks.
    Soak(soak::SoakArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest memory, in bytes or with a K/M/G suffix (2M to 256M).
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    mem: u64,
    /// Most console bytes the guest may write; the rest is dropped.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    console_limit: u64,
    /// Do not stream the guest's console (its end is still reported).
    #[arg(long, short)]
    quiet: bool,
    /// Stop the guest (status 125) after this much real time: 500ms, 2s.
    #[arg(long, value_parser = parse_duration)]
    run_time: Option<Duration>,
    /// Stop the guest after this much CPU time: 500ms, 2s.
    #[arg(long, value_parser = parse_duration)]
    cpu_time: Option<Duration>,
    /// Stop the guest if it makes more exits than this in one second.
    #[arg(long)]
    exit_rate: Option<u64>,
    /// Cap the guest's CPU at this many per cent of one CPU (1 to 100),
    /// counted every 100 ms; a guest over its share waits.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    cpu_share: Option<u8>,
    /// Run this many guests of the kernel at once. `{i}` in the
    /// arguments becomes each guest's index (from 0; its id may differ,
    /// as guests are started from several threads).
    #[arg(long, short = 'n', default_value_t = 1)]
    count: usize,
    /// With --count: put at most this many guests in each host process
    /// (0: all in this one). Default: 100 when --count is larger, else
    /// all in this process.
    #[arg(long)]
    shard_size: Option<usize>,
    /// With --count: print every line prefixed by its guest id (all),
    /// only the output of guests that failed (errors), or nothing.
    /// Default: all up to 100 guests, errors above.
    #[arg(long, value_enum)]
    console: Option<many::ConsoleMode>,
    /// Run without the host's sandbox: by default every thread shoal
    /// starts (workers, device, pool, shard processes, ...) may make only
    /// the system calls its kind needs (seccomp; docs/threat-model.md).
    #[arg(long)]
    no_seccomp: bool,
    /// Experiment: show the guest its page tables at a window where each
    /// write traps to the host, which checks and applies it
    /// (trap-and-emulate; feature TRAPPED_PAGE_TABLES).
    #[arg(long)]
    trapped_page_tables: bool,
    /// Do not offer the console ring (feature CONSOLE_RING): the guest's
    /// SDK then makes one console_write hypercall, one exit, per print
    /// (per 512 bytes of it).
    #[arg(long)]
    no_console_ring: bool,
    /// How the host makes KVM forget the translations a page-table change
    /// takes away: the MMU notifier for small changes and the slot move
    /// for large ones (auto), or always one of them (for measuring).
    #[arg(long, value_enum, default_value_t)]
    forget: Forget,
    /// Give the guest a disk: a host file, `PATH` or `PATH,rw`
    /// (read-write, one guest at a time) or `PATH,ro` (read-only; many
    /// guests may share it). Repeat for more
    /// disks; device `i` is the `i`-th. `{i}` in the path becomes the
    /// guest's index.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<DiskSpec>,
    /// Put every guest on the virtual LAN NAME: each gets a network device
    /// (after its disks) with its own MAC address (`02:73:68:..`) and, by
    /// convention, IPv4 address (`10.x.y.z`). The LAN spans shard
    /// processes.
    #[arg(long, value_name = "NAME")]
    net: Option<String>,
    /// With --net: bridge the TAP device IFNAME to the LAN (made if it
    /// does not exist, which needs CAP_NET_ADMIN). Address it and bring
    /// it up yourself, e.g. `ip addr add 10.0.0.2/24 dev IFNAME; ip link
    /// set IFNAME up`; then guest `i` is at its 10.x address.
    #[arg(long, value_name = "IFNAME")]
    tap: Option<String>,
    /// With --net: forward a host TCP port to a guest's port through the
    /// host's end of the LAN (10.0.0.1): `PORT:GUEST:GUEST_PORT` or
    /// `ADDR:PORT:GUEST:GUEST_PORT` (ADDR defaults to 127.0.0.1). GUEST
    /// is a guest's index in this run (0 for the first), or `*` for every
    /// guest, guest `i` at host port `PORT + i`. Repeat for more.
    #[arg(long = "forward", value_name = "[ADDR:]PORT:GUEST:GUEST_PORT", value_parser = parse_forward)]
    forwards: Vec<ForwardSpec>,
    /// At the end, print (on stderr) exits by reason, time blocked and
    /// preempted, and each hypercall number's count and latency p50/p99,
    /// as the host served it and as the guest saw it: for all guests
    /// together (`--stats`) or for each guest (`--stats=guests`).
    #[arg(long, value_enum, value_name = "all|guests", num_args = 0..=1, require_equals = true, default_missing_value = "all")]
    stats: Option<stats::StatsView>,
    /// Append a line per hypercall to FILE (emptied first): start_ns,
    /// guest, nr, name, host_ns, ret, flow, args, tab-separated (see
    /// docs/observe.md).
    #[arg(long, value_name = "FILE")]
    trace: Option<std::path::PathBuf>,
    /// Stop the guest before its first instruction and wait for GDB on
    /// 127.0.0.1:PORT (`target remote :PORT`); one guest only.
    #[arg(long, value_name = "PORT", conflicts_with_all = ["count", "shard_size"])]
    gdb: Option<u16>,
    /// A guest ELF file, or the name of a built-in guest (see `shoal list`).
    kernel: String,
    /// Arguments passed to the guest (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

impl RunArgs {
    /// The configuration of guest number `index`: `{i}` in the arguments
    /// becomes the index.
    fn config(&self, index: usize, console_sink: Option<ConsoleSink>) -> GuestConfig {
        GuestConfig {
            mem_size: self.mem,
            args: self
                .args
                .iter()
                .map(|a| a.replace("{i}", &index.to_string()))
                .collect(),
            console_limit: self.console_limit,
            console_sink,
            limits: Limits {
                run_time: self.run_time,
                cpu_time: self.cpu_time,
                exit_rate: self.exit_rate,
                cpu_share: self.cpu_share,
            },
            trapped_page_tables: self.trapped_page_tables,
            console_ring: !self.no_console_ring,
            forget: self.forget,
            disks: self
                .disks
                .iter()
                .map(|disk| DiskSpec {
                    path: disk
                        .path
                        .to_string_lossy()
                        .replace("{i}", &index.to_string())
                        .into(),
                    read_only: disk.read_only,
                })
                .collect(),
            net: self.net.clone(),
            observe: Observe {
                call_stats: self.stats.is_some(),
                trace_file: self.trace.clone(),
                trace_events: false,
            },
            gdb: None,
        }
    }
}

/// A `--forward` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ForwardSpec {
    listen: SocketAddr,
    /// The guest's index in the run; `None`: every guest.
    guest: Option<usize>,
    port: u16,
}

fn parse_forward(text: &str) -> Result<ForwardSpec, String> {
    let bad = || format!("not a forward ([ADDR:]PORT:GUEST:GUEST_PORT): {text:?}");
    let mut parts = text.rsplitn(3, ':');
    let port = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let guest = match parts.next().ok_or_else(bad)? {
        "*" => None,
        index => Some(index.parse().map_err(|_| bad())?),
    };
    let listen = parts.next().ok_or_else(bad)?;
    let listen = match listen.parse::<u16>() {
        Ok(port) => SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Err(_) => listen.parse().map_err(|_| bad())?,
    };
    Ok(ForwardSpec {
        listen,
        guest,
        port,
    })
}

/// The host's ways into a run's LAN, kept for the run.
struct HostEnds {
    _forwards: Vec<Forward>,
    _tap: Option<Tap>,
}

/// Bridges the run's TAP device and sets up its port forwards to its
/// guests (`ids[i]` is guest `i`'s id), saying each on stderr.
fn host_ends(host: &Host, run: &RunArgs, ids: &[u64]) -> anyhow::Result<HostEnds> {
    let tap = match (&run.tap, &run.net) {
        (None, _) => None,
        (Some(_), None) => bail!("--tap needs --net"),
        (Some(name), Some(lan)) => {
            let tap = host.tap(lan, name).context("--tap")?;
            eprintln!("shoal: TAP device {name} bridged to LAN {lan}");
            Some(tap)
        }
    };
    Ok(HostEnds {
        _forwards: forward(host, run, ids)?,
        _tap: tap,
    })
}

/// Sets up the run's port forwards to its guests (`ids[i]` is guest
/// `i`'s id) and says each on stderr.
fn forward(host: &Host, run: &RunArgs, ids: &[u64]) -> anyhow::Result<Vec<Forward>> {
    let mut forwards = Vec::new();
    if run.forwards.is_empty() {
        return Ok(forwards);
    }
    let Some(lan) = &run.net else {
        bail!("--forward needs --net");
    };
    for spec in &run.forwards {
        let targets: Vec<(usize, u64)> = match spec.guest {
            Some(index) => match ids.get(index) {
                Some(&id) => vec![(0, id)],
                None => bail!("--forward: no guest {index} (the run has {})", ids.len()),
            },
            None => ids.iter().copied().enumerate().collect(),
        };
        for (offset, id) in targets {
            let mut listen = spec.listen;
            let port = u16::try_from(offset)
                .ok()
                .and_then(|offset| listen.port().checked_add(offset))
                .context("--forward: host ports run past 65535")?;
            listen.set_port(port);
            let to = SocketAddrV4::new(guest_ipv4(id).into(), spec.port);
            let forward = host
                .forward(lan, listen, to)
                .with_context(|| format!("cannot forward {listen}"))?;
            eprintln!(
                "shoal: forwarding {} to guest {id} at {to}",
                forward.local_addr()
            );
            forwards.push(forward);
        }
    }
    Ok(forwards)
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
    /// Exits per measurement round.
    #[arg(long, default_value_t = 20_000)]
    iterations: u64,
    /// Rounds per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Guests spawned back to back for spawn latency and throughput.
    #[arg(long, default_value_t = 1000)]
    spawns: usize,
    /// Idle guests brought up through shard processes for the bring-up
    /// rate.
    #[arg(long, default_value_t = 2000)]
    bring_up: usize,
    /// Idle guests held at once for memory per guest.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Spinning guests while wake-up latency is measured.
    #[arg(long, default_value_t = 1000)]
    busy: usize,
    /// Spinning guests whose CPU shares are compared.
    #[arg(long, default_value_t = 8)]
    spinners: usize,
    /// Idle guests held at once for the per-guest cost at scale (in
    /// shard processes), compared with 100.
    #[arg(long, default_value_t = 10_000)]
    scale: usize,
    /// Run only these groups (comma-separated): hypercall, spawn, memory,
    /// wakeup, fairness, scale.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let lower = text.to_ascii_lowercase();
    let lower = lower.trim_end_matches("ib").trim_end_matches('b');
    let (digits, shift) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 10),
        Some('m') => (&lower[..lower.len() - 1], 20),
        Some('g') => (&lower[..lower.len() - 1], 30),
        _ => (lower, 0),
    };
    let value: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {text:?}"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("size too large: {text:?}"))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, unit): (&str, fn(u64) -> Duration) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, Duration::from_millis)
    } else if let Some(us) = text.strip_suffix("us") {
        (us, Duration::from_micros)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, Duration::from_secs)
    } else if let Some(m) = text.strip_suffix('m') {
        (m, |n| Duration::from_secs(n.saturating_mul(60)))
    } else if let Some(h) = text.strip_suffix('h') {
        (h, |n| Duration::from_secs(n.saturating_mul(3600)))
    } else {
        return Err(format!("not a duration (500ms, 2s, 10m, 1h): {text:?}"));
    };
    digits
        .parse()
        .map(unit)
        .map_err(|_| format!("not a duration (500ms, 2s, 10m, 1h): {text:?}"))
}

fn load(kernel: &str) -> anyhow::Result<Image> {
    let path = Path::new(kernel);
    if path.exists() {
        return Image::from_file(path).with_context(|| format!("cannot load {kernel}"));
    }
    match builtin::image(kernel) {
        Some(image) => image.with_context(|| format!("built-in guest {kernel} is broken")),
        None => {
            let names: Vec<_> = builtin::list().map(|(name, _)| name).collect();
            bail!(
                "no file named {kernel:?} and no built-in guest of that name (built in: {})",
                names.join(", ")
            )
        }
    }
}

fn run(mut run: RunArgs) -> anyhow::Result<ExitCode> {
    let image = load(&run.kernel)?;
    if let Some(path) = &run.trace {
        // Absolute: shard processes open it too.
        let path = std::path::absolute(path).context("--trace")?;
        shoal_host::observe::start_trace_file(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        run.trace = Some(path);
    }
    if run.count > 1 {
        return many::run(&image, &run);
    }
    let sink: Option<ConsoleSink> = (!run.quiet).then(|| -> ConsoleSink {
        Box::new(|_, bytes| {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        })
    });
    let host = Host::with_config(shoal_host::HostConfig {
        seccomp: !run.no_seccomp,
        ..shoal_host::HostConfig::default()
    })
    .context("cannot start the host")?;
    let mut config = run.config(0, sink);
    if let Some(port) = run.gdb {
        config.gdb = Some(gdb_listener(&run.kernel, port)?);
    }
    let guest = host
        .spawn(&image, config)
        .context("cannot start the guest")?;
    let _ends = host_ends(&host, &run, &[guest.id()])?;
    let report = guest.wait();
    let status = report.end.exit_status();
    if status != 0 {
        eprintln!("shoal: guest {} {}", report.id, report.end);
    }
    if let Some(view) = run.stats {
        eprint!("{}", stats::render(std::slice::from_ref(&report), view));
    }
    Ok(ExitCode::from(status as u8))
}

/// Listens for GDB on loopback `port` and says how to connect; for a
/// built-in guest, writes its ELF out for GDB to read symbols from.
fn gdb_listener(kernel: &str, port: u16) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .with_context(|| format!("--gdb: cannot listen on 127.0.0.1:{port}"))?;
    let symbols = match builtin::elf(kernel) {
        Some(elf) if !Path::new(kernel).exists() => {
            let path = std::env::temp_dir().join(format!("shoal-{kernel}.elf"));
            std::fs::write(&path, elf)
                .with_context(|| format!("cannot write {}", path.display()))?;
            path.display().to_string()
        }
        _ => kernel.to_string(),
    };
    eprintln!(
        "shoal: the guest waits for GDB on 127.0.0.1:{port}: gdb {symbols} -ex 'target remote 127.0.0.1:{port}'",
        port = listener.local_addr()?.port()
    );
    Ok(listener)
}

fn inspect(kernel: &str) -> anyhow::Result<()> {
    let image = load(kernel)?;
    println!("ABI version: {}", image.abi_version());
    println!("entry:       {:#x}", image.entry());
    println!("segments:");
    for s in image.segments() {
        let flags = format!(
            "r{}{}",
            if s.writable { "w" } else { "-" },
            if s.executable { "x" } else { "-" }
        );
        println!(
            "  {:#010x}..{:#010x} {flags} {:>8} bytes in memory, {:>8} from the file",
            s.vaddr,
            s.end(),
            s.mem_size,
            s.data.len()
        );
    }
    let image_end = image.end();
    let min = (image_end + shoal_abi::layout::PAGE_SIZE + shoal_abi::layout::STACK_SIZE)
        .max(shoal_abi::layout::MIN_MEMORY);
    println!(
        "image:       {:#x}..{:#x} ({} KiB)",
        image.start(),
        image_end,
        (image_end - image.start()) / 1024
    );
    println!(
        "memory:      at least {} KiB (stack {} KiB, one guard page)",
        min.div_ceil(1024),
        shoal_abi::layout::STACK_SIZE / 1024
    );
    Ok(())
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let json = args.json;
    let sizes = shoal_host::bench::Sizes {
        iterations: args.iterations,
        rounds: args.rounds,
        spawns: args.spawns,
        bring_up: args.bring_up,
        idle: args.idle,
        busy: args.busy,
        spinners: args.spinners,
        scale: args.scale,
    };
    let host = Host::new().context("cannot start the host")?;
    let figures = shoal_host::bench::run_all(&host, sizes, &args.only)?;
    for figure in figures {
        if json {
            println!("{}", figure.to_json());
        } else {
            let comparison = match (figure.floor, figure.ratio) {
                (Some(floor), Some(ratio)) => {
                    format!("  (against {floor:.3} {}, ratio {ratio:.3})", figure.unit)
                }
                _ => String::new(),
            };
            println!(
                "{:<28} {:>12.3} {}{comparison}",
                figure.name, figure.value, figure.unit
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Inspect { kernel } => inspect(&kernel).map(|()| ExitCode::SUCCESS),
        Command::List => {
            for (name, description) in builtin::list() {
                println!("{name:<20} {description}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => bench(args).map(|()| ExitCode::SUCCESS),
        Command::Soak(args) => soak::run(&args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("shoal: error: {e:#}");
        ExitCode::from(126)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn forwards_parse_with_and_without_an_address() {
        let local = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        assert_eq!(
            parse_forward("8080:0:80"),
            Ok(ForwardSpec {
                listen: local(8080),
                guest: Some(0),
                port: 80
            })
        );
        assert_eq!(
            parse_forward("0.0.0.0:18000:*:80"),
            Ok(ForwardSpec {
                listen: "0.0.0.0:18000".parse().unwrap(),
                guest: None,
                port: 80
            })
        );
        assert!(parse_forward("8080:80").is_err());
        assert!(parse_forward("8080:x:80").is_err());
        assert!(parse_forward("8080:0:99999").is_err());
    }
}
