//! The host's gateway (`host/src/device/gateway.rs`): frames from a guest
//! on the LAN into the gateway's ARP answers and its smoltcp stack, with
//! or without a forwarded connection to the guest, through the public API
//! only (a fresh LAN and gateway, with its thread, per input).
//!
//! Input: byte 0 sets the scene (bit 0: a host program has connected to
//! a port forwarded to the guest's port 80, and the guest has accepted:
//! the harness answers the gateway's SYN). Then operations until the
//! input ends, each an op byte:
//! - 0: a frame from the guest (length, 2 bytes, then the bytes, cut or
//!   padded to 14..=1514 as the LAN's check leaves them; the source
//!   address is the guest's, as the LAN checks). With a connection, the
//!   sequence and acknowledgement numbers of a TCP segment count from the
//!   guest's and the gateway's initial ones;
//! - 1: the host program writes (length, 2 bytes) to its connection;
//! - 2: the host program closes its side;
//! - 3: wait until the gateway has taken every frame sent so far.
//!
//! Checks, besides the absence of panics and hangs: every frame the
//! gateway puts on the LAN is well formed (a legal length, the receive
//! header, from the gateway's addresses, to the address of the guest whose
//! IPv4 address it names, ARP replies and IPv4 packets with right
//! checksums), and another guest (whose address a frame may claim) gets
//! nothing at all.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_abi::device::{GATEWAY_IPV4, GATEWAY_MAC, guest_ipv4, guest_mac, mac_of_ipv4};
use shoal_fuzz::Input;
use shoal_fuzz::frames::{self, ARP, IPV4, Segment, checksum, tcp};
use shoal_host::device::net::{HEADER, receive_header};
use shoal_host::device::{Endpoint, Forward, Gateway, Lan, Lans, Mac};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;
use zerocopy::IntoBytes;

/// The guest whose frames the input is.
const GUEST: u64 = 2;
/// Another guest on the LAN.
const OTHER: u64 = 3;
/// The guest's initial sequence number.
const GUEST_ISN: u32 = 0x1000_0000;
/// How long the gateway may take to answer.
const PATIENCE: Duration = Duration::from_secs(10);

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let scene = input.u8();
    let mut net = Net::new(scene & 1 != 0);
    while !input.is_empty() {
        match input.u8() % 4 {
            0 => {
                let len = usize::from(input.u16() % 1600);
                let bytes = input.take(len).to_vec();
                net.send(bytes);
            }
            1 => {
                let len = usize::from(input.u16() % 4096);
                net.host_write(len);
            }
            2 => net.host_close(),
            _ => net.sync(),
        }
    }
    net.sync();
    net.stop();
});

/// A guest's end of the LAN: keeps what it receives.
#[derive(Debug)]
struct Sink {
    mac: Mac,
    got: Mutex<Vec<Vec<u8>>>,
    arrived: Condvar,
}

impl Endpoint for Sink {
    fn receive(&self, frame: Vec<u8>) -> bool {
        self.got.lock().expect("not poisoned").push(frame);
        self.arrived.notify_all();
        true
    }
}

impl Sink {
    fn new(mac: Mac) -> Arc<Self> {
        Arc::new(Self {
            mac,
            got: Mutex::default(),
            arrived: Condvar::new(),
        })
    }

    /// Waits for a frame `wanted` picks (and removes it); checks every
    /// frame on the way. Panics after [`PATIENCE`].
    fn wait_for<T>(&self, mut wanted: impl FnMut(&[u8]) -> Option<T>) -> T {
        let mut got = self.got.lock().expect("not poisoned");
        let mut checked = 0;
        loop {
            for frame in &got[checked..] {
                check_frame(frame, self.mac);
            }
            checked = got.len();
            if let Some(i) = got.iter().position(|f| wanted(&f[HEADER..]).is_some()) {
                let frame = got.remove(i);
                return wanted(&frame[HEADER..]).expect("picked");
            }
            let (next, timeout) = self
                .arrived
                .wait_timeout(got, PATIENCE)
                .expect("not poisoned");
            assert!(!timeout.timed_out(), "the gateway stopped answering");
            got = next;
        }
    }

    /// Checks and forgets every frame received so far.
    fn check_all(&self) {
        for frame in self.got.lock().expect("not poisoned").drain(..) {
            check_frame(&frame, self.mac);
        }
    }
}

/// Panics unless `frame` (receive header in place) is one the gateway may
/// send to `mac`.
fn check_frame(frame: &[u8], mac: Mac) {
    let len = frame.len().saturating_sub(HEADER);
    assert!((14..=1514).contains(&len), "a frame of {len} bytes");
    assert_eq!(
        frame[..HEADER],
        *receive_header().as_bytes(),
        "receive header"
    );
    let ethernet = &frame[HEADER..];
    assert_eq!(ethernet[..6], mac, "to another address");
    assert_eq!(ethernet[6..12], GATEWAY_MAC, "from another address");
    match [ethernet[12], ethernet[13]] {
        ARP => {
            let arp = &ethernet[14..];
            assert!(arp.len() >= 28, "a short ARP packet");
            assert_eq!(arp[..8], [0, 1, 8, 0, 6, 4, 0, 2], "not an ARP reply");
            assert_eq!(arp[8..14], GATEWAY_MAC);
            assert_eq!(arp[14..18], GATEWAY_IPV4);
            assert_eq!(arp[18..24], mac, "an ARP reply for another");
        }
        IPV4 => {
            let ip = &ethernet[14..];
            assert!(
                ip.len() >= 20 && ip[0] == 0x45,
                "IPv4 header {:x?}",
                &ip[..ip.len().min(20)]
            );
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            assert_eq!(total, ip.len(), "IPv4 total length");
            assert_eq!(checksum(&ip[..20], 0), 0, "IPv4 header checksum");
            assert_eq!(ip[12..16], GATEWAY_IPV4, "IPv4 source");
            let dst: [u8; 4] = ip[16..20].try_into().expect("4 bytes");
            assert_eq!(mac_of_ipv4(dst), Some(mac), "to {dst:?} at another address");
            if ip[9] == 6 {
                let mut pseudo = Vec::with_capacity(12);
                pseudo.extend_from_slice(&ip[12..20]);
                pseudo.extend_from_slice(&[0, 6]);
                pseudo.extend_from_slice(&((total - 20) as u16).to_be_bytes());
                let sum = checksum(&pseudo, 0);
                assert_eq!(checksum(&ip[20..], u32::from(!sum)), 0, "TCP checksum");
            }
        }
        other => panic!("ethertype {other:x?}"),
    }
}

/// A forwarded connection: the host program's stream and the gateway's
/// initial sequence number.
struct Connection {
    stream: TcpStream,
    isn: u32,
    _forward: Forward,
}

/// A LAN with the guest, another guest and the gateway.
struct Net {
    _lans: Lans,
    lan: Arc<Lan>,
    guest: Arc<Sink>,
    other: Arc<Sink>,
    gateway: Option<Arc<Gateway>>,
    connection: Option<Connection>,
    probes: u16,
}

impl Net {
    fn new(connect: bool) -> Self {
        let lans = Lans::default();
        let lan = lans.join("fuzz");
        let guest = Sink::new(guest_mac(GUEST));
        let other = Sink::new(guest_mac(OTHER));
        for sink in [&guest, &other] {
            let weak: Weak<dyn Endpoint> = Arc::downgrade(sink) as _;
            assert!(lan.attach(sink.mac, weak));
        }
        let gateway = lans.gateway("fuzz").expect("the gateway starts");
        let mut net = Self {
            _lans: lans,
            lan,
            guest,
            other,
            gateway: Some(gateway),
            connection: None,
            probes: 0,
        };
        if connect {
            net.connect();
        }
        net
    }

    /// A host program connects to a port forwarded to the guest's port 80;
    /// the guest accepts.
    fn connect(&mut self) {
        let gateway = self.gateway.as_ref().expect("running");
        let to = SocketAddrV4::new(guest_ipv4(GUEST).into(), 80);
        let forward = gateway
            .forward("127.0.0.1:0".parse().expect("an address"), to)
            .expect("the port opens");
        let stream = TcpStream::connect(forward.local_addr()).expect("connects");
        // Closed with a reset: no TIME-WAIT left behind per input.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid option value of the size given, for a socket
        // this function owns.
        let set = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_LINGER");
        stream.set_nonblocking(true).expect("nonblocking");
        let syn = self.guest.wait_for(|f| {
            frames::parse_tcp(f).filter(|s| s.flags & tcp::SYN != 0 && s.dport == 80)
        });
        let reply = Segment {
            src: syn.dst,
            dst: syn.src,
            sport: syn.dport,
            dport: syn.sport,
            seq: GUEST_ISN,
            ack: syn.seq.wrapping_add(1),
            flags: tcp::SYN | tcp::ACK,
            window: 65535,
        };
        let frame = frames::tcp_frame(GATEWAY_MAC, self.guest.mac, &reply, &[]);
        self.lan.forward(&*self.guest, frames::with_header(&frame));
        self.connection = Some(Connection {
            stream,
            isn: syn.seq,
            _forward: forward,
        });
    }

    /// Puts `frame` on the LAN from the guest, as the LAN's check leaves
    /// it, its TCP numbers made absolute if there is a connection.
    fn send(&mut self, mut frame: Vec<u8>) {
        frame.resize(frame.len().clamp(14, 1514), 0);
        frame[6..12].copy_from_slice(&self.guest.mac);
        if let Some(connection) = &self.connection {
            make_absolute(&mut frame, connection.isn.wrapping_add(1));
        }
        self.lan.forward(&*self.guest, frames::with_header(&frame));
    }

    fn host_write(&mut self, len: usize) {
        if let Some(connection) = &mut self.connection {
            let _ = connection.stream.write(&vec![b'h'; len]);
        }
    }

    fn host_close(&mut self) {
        if let Some(connection) = &self.connection {
            let _ = connection.stream.shutdown(Shutdown::Write);
        }
    }

    /// Waits until the gateway has taken every frame sent so far: it
    /// answers an ARP request sent after them only then. Checks what came
    /// meanwhile.
    fn sync(&mut self) {
        self.probes = self.probes.wrapping_add(1);
        let [hi, lo] = self.probes.to_be_bytes();
        let tag = [10, 255, hi, lo];
        let mut probe = frames::arp_request(self.guest.mac, tag, GATEWAY_IPV4);
        // To the gateway alone: a broadcast would reach the other guest.
        probe[..6].copy_from_slice(&GATEWAY_MAC);
        self.lan.forward(&*self.guest, frames::with_header(&probe));
        self.guest
            .wait_for(|f| (f[12..14] == ARP && f.get(38..42) == Some(&tag[..])).then_some(()));
        if let Some(connection) = &mut self.connection {
            let mut buf = [0u8; 4096];
            while matches!(connection.stream.read(&mut buf), Ok(n) if n > 0) {}
        }
        self.check_all();
    }

    /// Checks what each guest got: the guest's frames are well formed;
    /// the other guest gets nothing from the gateway (it may get the
    /// guest's own broadcasts).
    fn check_all(&self) {
        self.guest.check_all();
        let mut other = self.other.got.lock().expect("not poisoned");
        for frame in other.drain(..) {
            assert_ne!(
                frame[HEADER + 6..HEADER + 12],
                GATEWAY_MAC,
                "another guest got a frame from the gateway"
            );
        }
    }

    /// Closes the connection, stops the gateway and checks what it sent
    /// last.
    fn stop(&mut self) {
        self.connection = None;
        self.gateway = None;
        self.check_all();
    }
}

/// Adds the guest's and the gateway's initial sequence numbers to the
/// numbers of the TCP segment in `frame`, if it carries one.
fn make_absolute(frame: &mut [u8], gateway_next: u32) {
    if frame.len() < 34 || frame[12..14] != IPV4 {
        return;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let at = 14 + ihl;
    if frame[14 + 9] != 6 || frame.len() < at + 20 {
        return;
    }
    let add = |field: &mut [u8], base: u32| {
        let n = u32::from_be_bytes(field.try_into().expect("4 bytes")).wrapping_add(base);
        field.copy_from_slice(&n.to_be_bytes());
    };
    add(&mut frame[at + 4..at + 8], GUEST_ISN);
    add(&mut frame[at + 8..at + 12], gateway_next);
}
