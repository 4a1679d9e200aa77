//! echo: a UDP and TCP echo server (port 7), and a TCP discard server
//! (port 9), on a virtual LAN. `shoal run --net lan echo -- [DURATION]
//! [CONNECTIONS]` serves for DURATION (`30s`; default: until stopped), with
//! CONNECTIONS TCP connections at once on each port (default 4).
//!
//! Every UDP datagram to port 7 goes back to its sender as it is; every
//! byte on a TCP connection to port 7 goes back on it; bytes to port 9 are
//! read and thrown away. The server closes its side of a connection when
//! the client closed its own and every byte was echoed or read. The guest
//! prints `echo: serving on A.B.C.D port 7 (udp, tcp), discard on 9` once
//! its stack is up, and at the end the datagrams and bytes it echoed and
//! discarded.
#![no_std]
#![no_main]

extern crate alloc;

use shoal_guest::{println, time};
use shoal_guest_net::smoltcp::socket::tcp::{self, State};

shoal_guest::entry!(main);

#[path = "../server.rs"]
mod server;

#[global_allocator]
static HEAP: shoal_guest::heap::Heap = shoal_guest::heap::Heap::new();

const PORT: u16 = 7;
const DISCARD_PORT: u16 = 9;
/// Bytes each way in a TCP connection's buffers.
const TCP_BUFFER: usize = 64 << 10;
/// Bytes of datagrams kept each way.
const UDP_BUFFER: usize = 32 << 10;

fn main() -> i32 {
    let server::Server {
        deadline,
        connections,
        mut stack,
    } = match server::start("echo", 4) {
        Ok(server) => server,
        Err(code) => return code,
    };
    let Ok(udp) = stack.udp_bind(PORT, UDP_BUFFER) else {
        println!("echo: cannot bind udp port {PORT}");
        return 1;
    };
    let tcp: alloc::vec::Vec<_> = (0..connections)
        .map(|_| stack.tcp_listen(PORT, TCP_BUFFER))
        .collect();
    let discard: alloc::vec::Vec<_> = (0..connections)
        .map(|_| stack.tcp_listen(DISCARD_PORT, TCP_BUFFER))
        .collect();
    let [a, b, c, d] = stack.ipv4();
    println!("echo: serving on {a}.{b}.{c}.{d} port {PORT} (udp, tcp), discard on {DISCARD_PORT}");
    let (mut datagrams, mut bytes, mut discarded) = (0u64, 0u64, 0u64);
    let mut chunk = [0u8; 2048];
    while time::monotonic_ns() < deadline {
        stack.poll();
        let socket = stack.udp(udp);
        while socket.can_send() {
            let Ok((n, meta)) = socket.recv_slice(&mut chunk) else {
                break;
            };
            // The send buffer has room (`can_send`); a datagram too large
            // for it is dropped, as on any echo server.
            let _ = socket.send_slice(&chunk[..n], meta.endpoint);
            datagrams += 1;
        }
        for &handle in &tcp {
            let socket = stack.tcp(handle);
            while socket.can_recv() && socket.can_send() {
                let room = socket.send_capacity() - socket.send_queue();
                let want = room.min(chunk.len());
                let Ok(n) = socket.recv_slice(&mut chunk[..want]) else {
                    break;
                };
                // `room` bytes fit in the send buffer.
                let _ = socket.send_slice(&chunk[..n]);
                bytes += n as u64;
            }
            recycle(socket, PORT);
        }
        for &handle in &discard {
            let socket = stack.tcp(handle);
            while let Ok(n) = socket.recv(|bytes| (bytes.len(), bytes.len())) {
                if n == 0 {
                    break;
                }
                discarded += n as u64;
            }
            recycle(socket, DISCARD_PORT);
        }
        stack.wait(deadline);
    }
    println!(
        "echo: done, {datagrams} datagrams and {bytes} tcp bytes echoed, {discarded} discarded"
    );
    0
}

/// Closes `socket`'s side once the client closed its own and every byte
/// was read; makes it listen on `port` again once the connection is over.
fn recycle(socket: &mut tcp::Socket, port: u16) {
    match socket.state() {
        State::CloseWait if socket.recv_queue() == 0 => socket.close(),
        State::Closed | State::TimeWait => {
            // Ready for the next client (no TIME-WAIT here: the LAN loses
            // nothing to send again).
            socket.abort();
            let _ = socket.listen(port);
        }
        _ => {}
    }
}
