//! Network services in guests, over smoltcp in the guest SDK: an `echo`
//! server answers UDP and TCP from another guest and TCP from the host
//! through a port forward; `curl` and a Rust client fetch the `http`
//! guest's page through a port forward; a hundred `http` guests on one LAN,
//! spread over three shard processes, each answer with their own id; the
//! host kernel reaches guests in two shard processes through a TAP device
//! bridged to their LAN.

mod common;

use shoal_abi::device::guest_ipv4;
use shoal_host::{Forward, GuestHandle, Host};
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// Forwards a free loopback port to `port` of `guest` on `lan`.
fn forward(host: &Host, lan: &str, guest: &GuestHandle, port: u16) -> Forward {
    let to = SocketAddrV4::new(guest_ipv4(guest.id()).into(), port);
    host.forward(lan, SocketAddr::from(([127, 0, 0, 1], 0)), to)
        .expect("a port forward")
}

/// How long a guest may take to start serving.
const PATIENCE: Duration = Duration::from_secs(20);

/// Calls `attempt` until it succeeds (the guest may not listen yet: the
/// forward then closes the connection at once), for [`PATIENCE`] at most.
fn retry<T>(what: &str, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(e) if started.elapsed() > PATIENCE => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// One HTTP/1.1 exchange on `stream`: the status line and the body.
fn exchange(stream: &mut TcpStream, path: &str, close: bool) -> Result<(String, String), String> {
    let connection = if close { "close" } else { "keep-alive" };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: guest\r\nConnection: {connection}\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => return Err("closed before an answer".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
    let head = String::from_utf8(head).map_err(|e| e.to_string())?;
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .ok_or("no Content-Length")?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).map_err(|e| e.to_string())?;
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `GET path` on a new connection to `addr`.
fn get(addr: SocketAddr, path: &str) -> Result<(String, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    exchange(&mut stream, path, true)
}

#[test]
fn echo_answers_udp_and_tcp_from_a_guest_and_tcp_from_the_host() {
    let host = common::host();
    let server = common::on_lan(&host, "echo", "echo", &["60s"]);
    let ip = guest_ipv4(server.id());
    let address = format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]);
    let client = common::on_lan(&host, "echo-client", "echo", &[&address, "200", "1048576"]).wait();
    common::assert_exited_0(&client);
    assert!(
        client
            .console_text()
            .contains("echo-client ok: 200 datagrams, 1048576 bytes over tcp"),
        "{}",
        client.console_text()
    );

    let port = forward(&host, "echo", &server, 7);
    let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + (i >> 12)) as u8).collect();
    let mut stream = retry("connect and echo a byte", || {
        let mut stream = TcpStream::connect(port.local_addr()).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        stream.write_all(b"?").map_err(|e| e.to_string())?;
        let mut back = [0u8; 1];
        stream.read_exact(&mut back).map_err(|e| e.to_string())?;
        Ok(stream)
    });
    let writer = {
        let mut stream = stream.try_clone().expect("a second handle");
        let sent = sent.clone();
        std::thread::spawn(move || {
            stream.write_all(&sent).expect("the guest takes every byte");
            stream
                .shutdown(std::net::Shutdown::Write)
                .expect("half-close");
        })
    };
    let mut back = Vec::new();
    stream
        .read_to_end(&mut back)
        .expect("the echo, then the guest's close");
    writer.join().expect("the writer");
    assert_eq!(back.len(), sent.len(), "every byte came back, then the end");
    assert!(back == sent, "the bytes came back in order, unchanged");
    server.kill();
    let report = server.wait();
    assert_eq!(report.stats.frames.dropped, 0, "{:?}", report.stats.frames);
}

#[test]
fn curl_and_a_rust_client_fetch_the_http_guests_page_through_a_port_forward() {
    let host = common::host();
    let server = common::on_lan(&host, "http", "web", &["60s"]);
    let port = forward(&host, "web", &server, 80);
    let url = format!("http://{}/", port.local_addr());
    let page = retry("curl", || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", &url])
            .output()
            .map_err(|e| format!("cannot run curl: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    });
    let expected = format!("guest {} up ", server.id());
    assert!(page.starts_with(&expected), "{page:?}");

    // Two requests on one kept-alive connection, then a 404 and a close.
    let mut stream = TcpStream::connect(port.local_addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for _ in 0..2 {
        let (status, body) = exchange(&mut stream, "/", false).expect("an answer");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.starts_with(&expected), "{body:?}");
    }
    let (status, _) = exchange(&mut stream, "/missing", true).expect("an answer");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("the guest closes");
    assert!(rest.is_empty());
    assert!(port.gateway().stats().connections >= 2);
}

#[test]
fn a_hundred_http_guests_on_one_lan_over_three_shards_each_answer_with_their_own_id() {
    let host = common::sharded_host(34);
    let guests: Vec<GuestHandle> = (0..100)
        .map(|_| common::on_lan(&host, "http", "hundred", &["100s", "2"]))
        .collect();
    let forwards: Vec<Forward> = guests
        .iter()
        .map(|guest| forward(&host, "hundred", guest, 80))
        .collect();
    for (guest, port) in guests.iter().zip(&forwards) {
        let (status, body) = retry("GET /", || get(port.local_addr(), "/"));
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            body.starts_with(&format!("guest {} up ", guest.id())),
            "guest {} answered {body:?}",
            guest.id()
        );
    }
    for guest in &guests {
        guest.kill();
    }
    for guest in guests {
        let report = guest.wait();
        assert_eq!(report.stats.frames.dropped, 0, "{:?}", report.stats.frames);
    }
}

/// Runs `ip ARGS`, failing the test with its error output.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip (iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of this test's, deleted when dropped.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn the_host_kernel_reaches_guests_in_two_shards_through_a_tap_device() {
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "this test bridges a TAP device and needs /dev/net/tun (and root)"
    );
    let host = common::sharded_host(1);
    let lan = "tapped";
    let guests = [
        common::on_lan(&host, "http", lan, &["100s", "2"]),
        common::on_lan(&host, "http", lan, &["100s", "2"]),
    ];
    let name = format!("shoal{}", std::process::id() % 1_000_000);
    let tap = host
        .tap(lan, &name)
        .expect("a TAP device (this test runs as root)");
    // The interface goes into a namespace of its own, so the test touches
    // none of the host's addresses or routes.
    ip(&["netns", "add", &name]);
    let namespace = Namespace(name.clone());
    ip(&["link", "set", &name, "netns", &namespace.0]);
    ip(&[
        "-n",
        &namespace.0,
        "addr",
        "add",
        "10.0.0.2/24",
        "dev",
        &name,
    ]);
    ip(&["-n", &namespace.0, "link", "set", &name, "up"]);
    for guest in &guests {
        let url = format!(
            "http://{}/",
            std::net::Ipv4Addr::from(guest_ipv4(guest.id()))
        );
        let page = retry("curl through the TAP device", || {
            let out = Command::new("ip")
                .args(["netns", "exec", &namespace.0])
                .args(["curl", "-sS", "--max-time", "5", &url])
                .output()
                .map_err(|e| format!("cannot run curl: {e}"))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        });
        let expected = format!("guest {} up ", guest.id());
        assert!(page.starts_with(&expected), "{page:?}");
    }
    assert_eq!(host.processes(), 2, "one guest in each shard");
    let stats = tap.stats();
    assert!(stats.frames_in >= 6 && stats.frames_out >= 6, "{stats:?}");
    drop(namespace);
    for guest in guests {
        guest.kill();
        let report = guest.wait();
        assert_eq!(report.stats.frames.dropped, 0, "{:?}", report.stats.frames);
    }
}
