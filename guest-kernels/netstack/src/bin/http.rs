//! http: a tiny HTTP/1.1 server on port 80 of a virtual LAN. `shoal run
//! --net lan --forward 8080:0:80 http -- [DURATION] [CONNECTIONS]`, then
//! `curl http://127.0.0.1:8080/`.
//!
//! `GET /` answers `200 OK` with `guest ID up MS ms` (the guest's id and
//! the time since it started); other paths get `404`, other methods `405`,
//! a request head over 4 KiB `431`. Connections are kept open between
//! requests unless the client says `Connection: close` or speaks
//! HTTP/1.0. It serves for DURATION (default: until stopped), with up to
//! CONNECTIONS connections at once (default 8), and prints `http: serving
//! on A.B.C.D port 80` once its stack is up and the requests it answered
//! at the end.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::fmt::Write;
use shoal_guest::{boot, println, time};
use shoal_guest_net::smoltcp::iface::SocketHandle;
use shoal_guest_net::smoltcp::socket::tcp::{self, State};

shoal_guest::entry!(main);

#[path = "../server.rs"]
mod server;

#[global_allocator]
static HEAP: shoal_guest::heap::Heap = shoal_guest::heap::Heap::new();

const PORT: u16 = 80;
/// Bytes each way in a connection's buffers.
const TCP_BUFFER: usize = 16 << 10;
/// Longest request head kept.
const HEAD_MAX: usize = 4096;

/// One connection slot: its socket and the request head read so far.
struct Conn {
    socket: SocketHandle,
    head: Vec<u8>,
    /// Close once the answer is out.
    closing: bool,
}

fn main() -> i32 {
    let started = time::monotonic_ns();
    let server::Server {
        deadline,
        connections,
        mut stack,
    } = match server::start("http", 8) {
        Ok(server) => server,
        Err(code) => return code,
    };
    let mut conns: Vec<Conn> = (0..connections)
        .map(|_| Conn {
            socket: stack.tcp_listen(PORT, TCP_BUFFER),
            head: Vec::new(),
            closing: false,
        })
        .collect();
    let [a, b, c, d] = stack.ipv4();
    println!("http: serving on {a}.{b}.{c}.{d} port {PORT}");
    let mut answered = 0u64;
    while time::monotonic_ns() < deadline {
        stack.poll();
        for conn in &mut conns {
            answered += serve(stack.tcp(conn.socket), conn, started);
        }
        stack.wait(deadline);
    }
    println!("http: done, {answered} requests answered");
    0
}

/// Reads what came in on `conn`, answers each complete request, and
/// makes the slot listen again once its connection is over. Returns the
/// requests answered.
fn serve(socket: &mut tcp::Socket, conn: &mut Conn, started: u64) -> u64 {
    let mut answered = 0;
    while !conn.closing && socket.can_recv() {
        let head = &mut conn.head;
        let _ = socket.recv(|bytes| {
            // Take bytes up to the end of one head at most: what follows
            // is the next request.
            let room = HEAD_MAX + 1 - head.len().min(HEAD_MAX);
            let mut taken = 0;
            for &byte in bytes.iter().take(room) {
                head.push(byte);
                taken += 1;
                if head.ends_with(b"\r\n\r\n") {
                    break;
                }
            }
            (taken, ())
        });
        if conn.head.ends_with(b"\r\n\r\n") || conn.head.len() > HEAD_MAX {
            let (answer, close) = answer(&conn.head, started);
            // A small answer into an empty-enough buffer: a client that
            // pipelines more than the buffer holds loses the rest.
            let _ = socket.send_slice(answer.as_bytes());
            conn.head.clear();
            conn.closing = close;
            answered += 1;
        } else {
            break;
        }
    }
    if conn.closing && socket.send_queue() == 0 {
        socket.close();
    }
    match socket.state() {
        State::CloseWait if socket.recv_queue() == 0 => socket.close(),
        State::Closed | State::TimeWait => {
            // Ready for the next client (no TIME-WAIT here: the LAN loses
            // nothing to send again).
            socket.abort();
            let _ = socket.listen(PORT);
            conn.head.clear();
            conn.closing = false;
        }
        _ => {}
    }
    answered
}

/// The answer to a request head, and whether to close after it.
fn answer(head: &[u8], started: u64) -> (alloc::string::String, bool) {
    let text = core::str::from_utf8(head).unwrap_or("");
    let mut lines = text.split("\r\n");
    let mut request = lines.next().unwrap_or("").split(' ');
    let (method, path, version) = (
        request.next().unwrap_or(""),
        request.next().unwrap_or(""),
        request.next().unwrap_or(""),
    );
    let asks_close = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("connection")
                && value.trim().eq_ignore_ascii_case("close")
        })
    });
    let close = asks_close || version != "HTTP/1.1";
    let mut body = alloc::string::String::new();
    let status = if head.len() > HEAD_MAX {
        "431 Request Header Fields Too Large"
    } else if method != "GET" && method != "HEAD" {
        "405 Method Not Allowed"
    } else if path != "/" {
        "404 Not Found"
    } else {
        let up_ms = (time::monotonic_ns() - started) / 1_000_000;
        let _ = writeln!(body, "guest {} up {up_ms} ms", boot::guest_id());
        "200 OK"
    };
    if !status.starts_with("200") {
        let _ = writeln!(body, "{status}");
    }
    let mut out = alloc::string::String::new();
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        if close { "close" } else { "keep-alive" }
    );
    if method != "HEAD" {
        out.push_str(&body);
    }
    (out, close || head.len() > HEAD_MAX)
}
