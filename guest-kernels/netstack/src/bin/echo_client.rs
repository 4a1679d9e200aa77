//! echo-client: checks an `echo` server on the same virtual LAN. `shoal
//! run --net lan echo-client -- A.B.C.D [DATAGRAMS] [BYTES]` sends
//! DATAGRAMS (default 100) UDP datagrams of 1 to 1472 bytes one at a time
//! and checks each comes back intact, then sends BYTES (default 1 MiB)
//! over one TCP connection and checks they all come back in order.
//!
//! It waits up to five seconds for the server to answer the first time
//! (it may start later), sending again every 200 ms. It prints
//! `echo-client ok: N datagrams, B bytes over tcp` and exits 0, or says
//! what went wrong and exits 1.
#![no_std]
#![no_main]

extern crate alloc;

use shoal_guest::{boot, println, time};
use shoal_guest_net::Stack;
use shoal_guest_net::smoltcp::socket::tcp::State;
use shoal_guest_net::smoltcp::wire::{IpAddress, IpEndpoint, Ipv4Address};

shoal_guest::entry!(main);

#[global_allocator]
static HEAP: shoal_guest::heap::Heap = shoal_guest::heap::Heap::new();

const PORT: u16 = 7;
const LOCAL_PORT: u16 = 7007;
/// Largest UDP payload in one 1514-byte frame.
const DATAGRAM_MAX: usize = 1472;
const TCP_BUFFER: usize = 64 << 10;
const RESEND_NS: u64 = 200_000_000;
const PATIENCE_NS: u64 = 5_000_000_000;

/// Byte `i` of datagram or stream position `seq`.
fn pattern(seq: u64, i: usize) -> u8 {
    (seq as u8)
        .wrapping_mul(7)
        .wrapping_add(i as u8)
        .wrapping_add((i >> 8) as u8)
}

fn parse_ipv4(text: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = text.split('.');
    for byte in &mut ip {
        *byte = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

fn main() -> i32 {
    let mut args = boot::args();
    let Some(server) = args.next().and_then(parse_ipv4) else {
        println!("echo-client: usage: echo-client A.B.C.D [DATAGRAMS] [BYTES]");
        return 2;
    };
    let datagrams: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let bytes: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1 << 20);
    let mut stack = match Stack::open() {
        Ok(stack) => stack,
        Err(e) => {
            println!("echo-client: no network device ({e:?}); run with --net NAME");
            return 1;
        }
    };
    if let Err(why) = check_udp(&mut stack, server, datagrams) {
        println!("echo-client: udp: {why}");
        return 1;
    }
    if let Err(why) = check_tcp(&mut stack, server, bytes) {
        println!("echo-client: tcp: {why}");
        return 1;
    }
    println!("echo-client ok: {datagrams} datagrams, {bytes} bytes over tcp");
    0
}

fn check_udp(stack: &mut Stack, server: [u8; 4], datagrams: u64) -> Result<(), &'static str> {
    let udp = stack
        .udp_bind(LOCAL_PORT, 8 << 10)
        .map_err(|_| "cannot bind")?;
    let to = IpEndpoint::new(IpAddress::Ipv4(Ipv4Address::from(server)), PORT);
    let mut out = [0u8; DATAGRAM_MAX];
    let mut back = [0u8; DATAGRAM_MAX];
    for seq in 0..datagrams {
        let len = 1 + (seq as usize * 97) % DATAGRAM_MAX;
        for (i, b) in out[..len].iter_mut().enumerate() {
            *b = pattern(seq, i);
        }
        let give_up = time::monotonic_ns() + PATIENCE_NS;
        let mut resend = 0;
        loop {
            let now = time::monotonic_ns();
            if now >= give_up {
                return Err("a datagram got no answer in five seconds");
            }
            if now >= resend {
                stack
                    .udp(udp)
                    .send_slice(&out[..len], to)
                    .map_err(|_| "cannot send")?;
                resend = now + RESEND_NS;
            }
            stack.poll();
            if let Ok((n, _)) = stack.udp(udp).recv_slice(&mut back) {
                // An answer to an earlier datagram sent twice is skipped.
                if n == len && back[..n] == out[..len] {
                    break;
                }
                continue;
            }
            stack.wait(resend.min(give_up));
        }
    }
    stack.remove(udp);
    Ok(())
}

fn check_tcp(stack: &mut Stack, server: [u8; 4], bytes: u64) -> Result<(), &'static str> {
    let give_up = time::monotonic_ns() + PATIENCE_NS;
    let tcp = loop {
        let tcp = stack
            .tcp_connect(server, PORT, TCP_BUFFER)
            .map_err(|_| "cannot connect")?;
        loop {
            stack.poll();
            match stack.tcp(tcp).state() {
                State::Established => break,
                State::Closed => break,
                _ => stack.wait(give_up),
            }
            if time::monotonic_ns() >= give_up {
                return Err("no connection in five seconds");
            }
        }
        if stack.tcp(tcp).state() == State::Established {
            break tcp;
        }
        stack.remove(tcp);
        time::sleep(core::time::Duration::from_nanos(RESEND_NS));
    };
    let (mut sent, mut received) = (0u64, 0u64);
    let mut chunk = [0u8; 4096];
    let mut progress_at = time::monotonic_ns();
    while received < bytes {
        if time::monotonic_ns() - progress_at > PATIENCE_NS {
            let socket = stack.tcp(tcp);
            println!(
                "echo-client: tcp: stalled at {sent} bytes sent, {received} received ({:?}, {} queued to send, {} to read)",
                socket.state(),
                socket.send_queue(),
                socket.recv_queue()
            );
            return Err("no progress in five seconds");
        }
        stack.poll();
        let socket = stack.tcp(tcp);
        while sent < bytes && socket.can_send() {
            let n = (bytes - sent).min(chunk.len() as u64) as usize;
            for (i, b) in chunk[..n].iter_mut().enumerate() {
                let at = sent + i as u64;
                *b = pattern(at >> 12, at as usize);
            }
            let Ok(taken) = socket.send_slice(&chunk[..n]) else {
                return Err("connection lost while sending");
            };
            sent += taken as u64;
            progress_at = time::monotonic_ns();
        }
        while socket.can_recv() {
            let Ok(n) = socket.recv_slice(&mut chunk) else {
                break;
            };
            for (i, &b) in chunk[..n].iter().enumerate() {
                let at = received + i as u64;
                if b != pattern(at >> 12, at as usize) {
                    return Err("a byte came back changed");
                }
            }
            received += n as u64;
            progress_at = time::monotonic_ns();
        }
        if received == bytes {
            break;
        }
        if !socket.is_open() {
            return Err("the server closed the connection early");
        }
        stack.wait(progress_at + PATIENCE_NS);
    }
    stack.tcp(tcp).close();
    // Let the close go out, and the server's close come in.
    let until = time::monotonic_ns() + RESEND_NS;
    while stack.tcp(tcp).is_open() && time::monotonic_ns() < until {
        stack.poll();
        stack.wait(until);
    }
    Ok(())
}
