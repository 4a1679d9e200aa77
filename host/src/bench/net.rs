//! The virtual LAN benchmarks: two `ping` guests on one LAN exchange
//! frames, a window of 32 in flight, with 64-byte and 1514-byte frames
//! (every data frame crosses the LAN twice, there and back), in one
//! process and with each guest in a shard process of its own; and a host
//! client talks TCP to guests through port forwards, against the same
//! client talking to a server in this process directly.

use super::{BenchError, Figure, builtin_image, median, parse_run};
use crate::host::{GuestConfig, Host, HostConfig};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

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
/// and 1514-byte frames, medians over `rounds`; and frames a second with
/// the two guests in two shard processes, against the same in one.
pub(super) fn net_figures(host: &Host, rounds: usize) -> Result<Vec<Figure>, BenchError> {
    let image = builtin_image("ping")?;
    let sharded = Host::with_config(HostConfig {
        shard_size: Some(1),
        pool: 1,
        ..HostConfig::default()
    })
    .map_err(BenchError::Host)?;
    let mut figures = Vec::new();
    for (size, rate, mbit, exits, across) in [
        (
            64,
            "net_frames_per_s_64",
            "net_mbit_s_64",
            "net_exits_per_frame_64",
            "net_shards_frames_per_s_64",
        ),
        (
            1514,
            "net_frames_per_s_1514",
            "net_mbit_s_1514",
            "net_exits_per_frame_1514",
            "net_shards_frames_per_s_1514",
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
        let runs = (0..rounds.max(1))
            .map(|_| pair_run(&sharded, &image, size).map(|r| r.0))
            .collect::<Result<Vec<_>, _>>()?;
        figures.push(Figure::versus(across, median(runs), "frames/s", per_s));
    }
    Ok(figures)
}

/// Bytes one throughput run sends.
const STREAM_BYTES: usize = 64 << 20;
/// Requests one kept-alive connection makes.
const REQUESTS: usize = 2_000;
/// Connections made one after another, a request each.
const CONNECTIONS: usize = 500;

/// Host to guest through a port forward, against the same client talking
/// to a server in this process directly on loopback: TCP throughput (to
/// the `echo` guest's discard port), HTTP requests a second on one
/// kept-alive connection and with a connection per request (to the
/// `http` guest), medians over `rounds`.
pub(super) fn forward_figures(host: &Host, rounds: usize) -> Result<Vec<Figure>, BenchError> {
    let lan = "bench-forward";
    let config = || GuestConfig {
        args: vec!["3600s".into()],
        net: Some(lan.into()),
        ..Default::default()
    };
    let sink = host
        .spawn(&builtin_image("echo")?, config())
        .map_err(BenchError::Spawn)?;
    let web = host
        .spawn(&builtin_image("http")?, config())
        .map_err(BenchError::Spawn)?;
    let to = |guest: &crate::GuestHandle, port| {
        SocketAddrV4::new(shoal_abi::device::guest_ipv4(guest.id()).into(), port)
    };
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let forward = |to| host.forward(lan, loopback, to).map_err(BenchError::Forward);
    let sink_port = forward(to(&sink, 9))?;
    let echo_port = forward(to(&sink, 7))?;
    let web_port = forward(to(&web, 80))?;
    let direct_sink = serve_directly(discard)?;
    let direct_web = serve_directly(answer_http)?;
    // The guests may not listen yet: wait for them.
    ready(web_port.local_addr())?;
    ready_echo(echo_port.local_addr())?;

    let mut figures = Vec::new();
    let measure = |f: &dyn Fn(SocketAddr) -> std::io::Result<f64>, addr| {
        (0..rounds.max(1))
            .map(|_| f(addr))
            .collect::<std::io::Result<Vec<f64>>>()
            .map(median)
            .map_err(BenchError::Io)
    };
    for (name, unit, client) in [
        (
            "forward_tcp_mbit_s",
            "Mbit/s",
            &stream as &dyn Fn(SocketAddr) -> std::io::Result<f64>,
        ),
        ("forward_requests_per_s", "requests/s", &kept_alive),
        ("forward_connections_per_s", "connections/s", &connections),
    ] {
        let (through, direct) = if unit == "Mbit/s" {
            (sink_port.local_addr(), direct_sink)
        } else {
            (web_port.local_addr(), direct_web)
        };
        let forwarded = measure(client, through)?;
        let baseline = measure(client, direct)?;
        figures.push(Figure::versus(name, forwarded, unit, baseline));
    }
    sink.kill();
    web.kill();
    Ok(figures)
}

/// Serves connections on a loopback port of this process, a thread each,
/// with `serve`, for as long as the process lives.
fn serve_directly(serve: fn(TcpStream) -> std::io::Result<()>) -> Result<SocketAddr, BenchError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(BenchError::Io)?;
    let addr = listener.local_addr().map_err(BenchError::Io)?;
    std::thread::Builder::new()
        .name("bench-direct".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_nodelay(true);
                std::thread::spawn(move || serve(stream));
            }
        })
        .map_err(BenchError::Io)?;
    Ok(addr)
}

/// Reads and throws away everything, then closes.
fn discard(mut stream: TcpStream) -> std::io::Result<()> {
    std::io::copy(&mut stream, &mut std::io::sink())?;
    Ok(())
}

/// Answers HTTP/1.1 requests as the `http` guest does.
fn answer_http(stream: TcpStream) -> std::io::Result<()> {
    let started = Instant::now();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let Some(close) = read_head(&mut reader)? else {
            return Ok(());
        };
        let body = format!("guest 0 up {} ms\n", started.elapsed().as_millis());
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        )?;
        if close {
            return Ok(());
        }
    }
}

/// Reads a request head; whether it asks to close, `None` at the end of
/// the stream.
fn read_head(reader: &mut impl BufRead) -> std::io::Result<Option<bool>> {
    let mut close = false;
    let mut first = true;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if line == "\r\n" && !first {
            return Ok(Some(close));
        }
        first = false;
        close |= line.eq_ignore_ascii_case("connection: close\r\n");
    }
}

/// Reads a response: its head and as many body bytes as it says.
fn read_response(reader: &mut impl BufRead) -> std::io::Result<()> {
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some(value) = line.strip_prefix("Content-Length: ") {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let mut body = vec![0; length.ok_or(std::io::ErrorKind::InvalidData)?];
    reader.read_exact(&mut body)
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// Waits until `addr` answers a request (a guest starting up).
fn ready(addr: SocketAddr) -> Result<(), BenchError> {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = (|| {
            let mut stream = TcpStream::connect(addr)?;
            stream.write_all(REQUEST_CLOSE)?;
            read_response(&mut BufReader::new(stream))
        })();
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > give_up => return Err(BenchError::Io(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Waits until `addr` echoes a byte (the `echo` guest up: its discard
/// port is up with it).
fn ready_echo(addr: SocketAddr) -> Result<(), BenchError> {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = (|| {
            let mut stream = TcpStream::connect(addr)?;
            stream.write_all(b"?")?;
            stream.read_exact(&mut [0u8; 1])
        })();
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > give_up => return Err(BenchError::Io(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Sends [`STREAM_BYTES`] and waits for the server to close after reading
/// them: megabits a second.
fn stream(addr: SocketAddr) -> std::io::Result<f64> {
    let chunk = vec![0x5a; 64 << 10];
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr)?;
    for _ in 0..STREAM_BYTES / chunk.len() {
        stream.write_all(&chunk)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    Ok(STREAM_BYTES as f64 * 8.0 / 1e6 / started.elapsed().as_secs_f64())
}

/// [`REQUESTS`] requests one after another on one connection: requests a
/// second.
fn kept_alive(addr: SocketAddr) -> std::io::Result<f64> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let started = Instant::now();
    for _ in 0..REQUESTS {
        writer.write_all(REQUEST)?;
        read_response(&mut reader)?;
    }
    Ok(REQUESTS as f64 / started.elapsed().as_secs_f64())
}

/// [`CONNECTIONS`] connections one after another, a request each:
/// connections a second.
fn connections(addr: SocketAddr) -> std::io::Result<f64> {
    let started = Instant::now();
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.write_all(REQUEST_CLOSE)?;
        let mut reader = BufReader::new(stream);
        read_response(&mut reader)?;
    }
    Ok(CONNECTIONS as f64 / started.elapsed().as_secs_f64())
}
