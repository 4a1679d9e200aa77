//! The host's own end of a virtual LAN, and TCP port forwards through it.
//!
//! A [`Gateway`] is a port on the LAN at [`GATEWAY_MAC`] / [`GATEWAY_IPV4`]
//! with a TCP/IP stack (`smoltcp`) run by a thread of its own. A
//! [`Forward`] listens on a host TCP address (loopback, no privileges
//! needed); each connection a host program makes there is answered by a
//! connection the gateway opens from `10.0.0.1` to the guest's address and
//! port, and the bytes are copied between the two as they come, with
//! end-of-stream passed on in both directions. A guest that refuses or
//! resets the connection closes the host's one.
//!
//! The stack works on IP packets: the gateway puts on and takes off the
//! Ethernet headers itself, answers ARP for `10.0.0.1`, and finds a
//! guest's MAC address from its IPv4 address by the host's convention
//! ([`mac_of_ipv4`]), so reaching many guests costs no ARP.

use super::net::{Endpoint, HEADER, Lan, receive_header};
use shoal_abi::device::{GATEWAY_IPV4, GATEWAY_MAC, mac_of_ipv4};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as NetInstant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, HardwareAddress, IpAddress, IpCidr,
    Ipv4Address, Ipv4Packet,
};
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use zerocopy::IntoBytes;

/// Frames from the LAN the gateway keeps until its thread takes them;
/// more are dropped (TCP sends them again).
pub const INBOX_MAX: usize = 4096;

/// Bytes of each direction's buffer in the gateway's end of a forwarded
/// connection.
pub const SOCKET_BUFFER: usize = 256 << 10;

/// The epoll token of the wake-up eventfd.
const WAKE: u64 = 0;

/// What the gateway has counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// Connections accepted on forwarded ports.
    pub connections: u64,
    /// Frames from the LAN dropped because the inbox was full.
    pub missed: u64,
}

/// The shared part of a gateway: its LAN port and what its thread is asked.
#[derive(Debug)]
struct Shared {
    lan: Arc<Lan>,
    inbox: Mutex<VecDeque<Vec<u8>>>,
    wake: EventFd,
    requests: Mutex<Vec<Request>>,
    stop: AtomicBool,
    connections: AtomicU64,
    missed: AtomicU64,
}

impl Endpoint for Shared {
    fn receive(&self, frame: Vec<u8>) -> bool {
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if inbox.len() >= INBOX_MAX {
            self.missed.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let was_empty = inbox.is_empty();
        inbox.push_back(frame);
        drop(inbox);
        if was_empty {
            let _ = self.wake.write(1);
        }
        true
    }
}

impl Shared {
    fn ask(&self, request: Request) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request);
        let _ = self.wake.write(1);
    }
}

#[derive(Debug)]
enum Request {
    Listen {
        id: u64,
        listener: TcpListener,
        to: SocketAddrV4,
    },
    Unlisten(u64),
}

/// The host's end of one virtual LAN, while any [`Forward`] uses it.
#[derive(Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
    next_forward: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl Gateway {
    /// Puts the host on `lan` at `10.0.0.1` and starts its thread.
    pub fn start(lan: Arc<Lan>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            lan,
            inbox: Mutex::default(),
            wake: EventFd::new(EFD_NONBLOCK)?,
            requests: Mutex::default(),
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            missed: AtomicU64::new(0),
        });
        if !shared.lan.attach(GATEWAY_MAC, Arc::downgrade(&shared) as _) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "a guest has the gateway's address on this LAN",
            ));
        }
        let mut runner = Runner::new(Arc::clone(&shared))?;
        let thread = std::thread::Builder::new()
            .name("shoal-gateway".into())
            .spawn(move || {
                crate::seccomp::confine_or_warn(crate::seccomp::Kind::Gateway);
                runner.run()
            })?;

        Ok(Self {
            shared,
            next_forward: AtomicU64::new(1),
            thread: Some(thread),
        })
    }

    /// The LAN's name.
    pub fn lan(&self) -> &str {
        self.shared.lan.name()
    }

    /// What the gateway has counted.
    pub fn stats(&self) -> GatewayStats {
        GatewayStats {
            connections: self.shared.connections.load(Ordering::Relaxed),
            missed: self.shared.missed.load(Ordering::Relaxed),
        }
    }

    /// Forwards connections to host address `listen` (port 0: any free
    /// port) to `to` on the LAN.
    pub fn forward(
        self: &Arc<Self>,
        listen: SocketAddr,
        to: SocketAddrV4,
    ) -> std::io::Result<Forward> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let id = self.next_forward.fetch_add(1, Ordering::Relaxed);
        self.shared.ask(Request::Listen { id, listener, to });
        Ok(Forward {
            gateway: Arc::clone(self),
            id,
            addr,
            to,
        })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shared.lan.detach(GATEWAY_MAC, &*self.shared);
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A host TCP port forwarded to a guest's port; dropping it closes the
/// port (connections already made go on while the gateway lives).
#[derive(Debug)]
pub struct Forward {
    gateway: Arc<Gateway>,
    id: u64,
    addr: SocketAddr,
    to: SocketAddrV4,
}

impl Forward {
    /// The host address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The guest address and port it forwards to.
    pub fn target(&self) -> SocketAddrV4 {
        self.to
    }

    /// The gateway it goes through.
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.gateway.shared.ask(Request::Unlisten(self.id));
    }
}

/// One forwarded connection: the host program's stream and the gateway's
/// socket to the guest.
struct Conn {
    stream: TcpStream,
    socket: SocketHandle,
    /// The stream may have bytes to read (edge-triggered: until a read
    /// would block).
    readable: bool,
    /// The stream may take bytes.
    writable: bool,
    /// The host program closed its side; the guest was told.
    read_done: bool,
    /// The guest closed its side; the host program was told.
    write_done: bool,
}

/// The gateway's thread: the stack, the listeners and the connections.
struct Runner {
    shared: Arc<Shared>,
    epoll: Epoll,
    started: Instant,
    iface: Interface,
    phy: Phy,
    sockets: SocketSet<'static>,
    listeners: HashMap<u64, (TcpListener, SocketAddrV4)>,
    conns: HashMap<u64, Conn>,
    next_token: u64,
    next_port: u16,
}

/// Local ports of the gateway's connections: 49152 and up.
const PORT_FIRST: u16 = 49152;

/// Rounds of stack and copying before the gateway looks at new
/// connections and requests again.
const PUMP_ROUNDS: usize = 64;

/// How long the gateway's end of a connection waits for the guest to
/// acknowledge before it gives up (a guest gone, or not answering).
const ACK_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(10);

/// Listener tokens have this bit set; connection tokens count up from 1.
const LISTENER: u64 = 1 << 63;

impl Runner {
    fn new(shared: Arc<Shared>) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            shared.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        let mut phy = Phy {
            shared: Arc::clone(&shared),
            frames: VecDeque::new(),
        };
        let started = Instant::now();
        let mut config = Config::new(HardwareAddress::Ip);
        // From the OS's randomness (std's hasher keys), for sequence
        // numbers and ports a guest cannot guess.
        config.random_seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            std::process::id(),
        );
        let mut iface = Interface::new(config, &mut phy, NetInstant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(GATEWAY_IPV4.into()), 8));
        });
        Ok(Self {
            shared,
            epoll,
            started,
            iface,
            phy,
            sockets: SocketSet::new(Vec::new()),
            listeners: HashMap::new(),
            conns: HashMap::new(),
            next_token: WAKE + 1,
            next_port: PORT_FIRST,
        })
    }

    fn now(&self) -> NetInstant {
        NetInstant::from_micros(self.started.elapsed().as_micros() as i64)
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            self.take_requests();
            let more = self.pump();
            let now = self.now();
            let timeout = match self.iface.poll_delay(now, &self.sockets) {
                _ if more => 0,
                None => -1,
                Some(delay) => delay.total_millis().min(1000) as i32,
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "gateway cannot wait; forwards stop");
                    return;
                }
            };
            for event in &events[..n] {
                let token = event.data();
                if token == WAKE {
                    let _ = self.shared.wake.read();
                } else if self.listeners.contains_key(&token) {
                    self.accept(token);
                } else if let Some(conn) = self.conns.get_mut(&token) {
                    let set = event.event_set();
                    if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                        conn.readable = true;
                    }
                    if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                        conn.writable = true;
                    }
                }
            }
        }
    }

    fn take_requests(&mut self) {
        let requests = std::mem::take(
            &mut *self
                .shared
                .requests
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for request in requests {
            match request {
                Request::Listen { id, listener, to } => {
                    let added = self.epoll.ctl(
                        ControlOperation::Add,
                        listener.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, id | LISTENER),
                    );
                    match added {
                        Ok(()) => {
                            self.listeners.insert(id | LISTENER, (listener, to));
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot watch a forwarded port"),
                    }
                }
                Request::Unlisten(id) => {
                    if let Some((listener, _)) = self.listeners.remove(&(id | LISTENER)) {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            listener.as_raw_fd(),
                            EpollEvent::default(),
                        );
                    }
                }
            }
        }
    }

    /// Accepts every connection waiting on a listener and opens its
    /// guest side.
    fn accept(&mut self, token: u64) {
        loop {
            let Some((listener, to)) = self.listeners.get(&token) else {
                return;
            };
            let to = *to;
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!(error = %e, "accept on a forwarded port failed");
                    return;
                }
            };
            if let Err(e) = self.open(stream, to) {
                tracing::debug!(error = %e, "cannot forward a connection");
            }
        }
    }

    fn open(&mut self, stream: TcpStream, to: SocketAddrV4) -> std::io::Result<()> {
        stream.set_nonblocking(true)?;
        let _ = stream.set_nodelay(true);
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        socket.set_timeout(Some(ACK_TIMEOUT));
        let port = self.next_port;
        self.next_port = self.next_port.checked_add(1).unwrap_or(PORT_FIRST);
        let remote = (
            IpAddress::Ipv4(Ipv4Address::from(to.ip().octets())),
            to.port(),
        );
        socket
            .connect(self.iface.context(), remote, port)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let token = self.next_token;
        self.next_token += 1;
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP,
                token,
            ),
        )?;
        let socket = self.sockets.add(socket);
        self.conns.insert(
            token,
            Conn {
                stream,
                socket,
                readable: true,
                writable: true,
                read_done: false,
                write_done: false,
            },
        );
        self.shared.connections.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs the stack and moves bytes until neither does anything more,
    /// or for [`PUMP_ROUNDS`] rounds; true if there may be more to do.
    fn pump(&mut self) -> bool {
        for _ in 0..PUMP_ROUNDS {
            let now = self.now();
            self.iface.poll(now, &mut self.phy, &mut self.sockets);
            let moved = self.shuffle();
            let inbox_empty = self
                .shared
                .inbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
            if !moved && inbox_empty && self.phy.frames.is_empty() {
                return false;
            }
        }
        true
    }

    /// Moves bytes between each connection's stream and socket; closes
    /// what is done. True if anything moved.
    fn shuffle(&mut self) -> bool {
        let mut moved = false;
        let mut finished = Vec::new();
        for (&token, conn) in &mut self.conns {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.socket);
            let (progress, done) = conn.shuffle(socket);
            moved |= progress;
            if done {
                finished.push(token);
            }
        }
        for token in finished {
            if let Some(conn) = self.conns.remove(&token) {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                self.sockets.remove(conn.socket);
            }
        }
        moved
    }
}

impl Conn {
    /// One round of copying both ways. Returns whether bytes or an end
    /// moved, and whether the connection is over.
    fn shuffle(&mut self, socket: &mut tcp::Socket) -> (bool, bool) {
        let mut moved = false;
        // Host program to guest.
        while self.readable && !self.read_done && socket.can_send() {
            let read = socket.send(|buf| match self.stream.read(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match read {
                Ok(Ok(0)) => {
                    socket.close();
                    self.read_done = true;
                    moved = true;
                }
                Ok(Ok(_)) => moved = true,
                Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                Ok(Err(_)) | Err(_) => {
                    socket.abort();
                    return (true, true);
                }
            }
        }
        // Guest to host program.
        while self.writable && socket.can_recv() {
            let written = socket.recv(|buf| match self.stream.write(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match written {
                Ok(Ok(_)) => moved = true,
                Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                Ok(Err(_)) | Err(_) => {
                    socket.abort();
                    return (true, true);
                }
            }
        }
        if !self.write_done && !socket.may_recv() && socket.recv_queue() == 0 {
            // The guest closed its side (or never opened it): pass the end
            // on once it is established that no more bytes come.
            if socket.state() != tcp::State::SynSent {
                let _ = self.stream.shutdown(Shutdown::Write);
                self.write_done = true;
                moved = true;
            }
        }
        let over = match socket.state() {
            tcp::State::Closed => true,
            // Both ends closed and every byte delivered: the gateway keeps
            // no TIME-WAIT (the LAN loses nothing to send again).
            tcp::State::TimeWait => self.write_done,
            _ => false,
        };
        (moved, over)
    }
}

/// Whether the IPv4 packet in `ethernet` is addressed to the gateway
/// itself. The stack would also take a broadcast (`255.255.255.255`,
/// `10.255.255.255`) as its own and answer it from the broadcast
/// address: the gateway serves no broadcast, so it never sees one.
fn for_the_gateway(ethernet: &[u8]) -> bool {
    ethernet.get(..6) == Some(&GATEWAY_MAC[..]) && ethernet.get(30..34) == Some(&GATEWAY_IPV4[..])
}

/// Whether the IPv4 packet in `ethernet` comes from the address its
/// sender's MAC address gives (the LAN checked that MAC): no guest may
/// speak for another in a forwarded connection.
fn sent_by_its_owner(ethernet: &[u8]) -> bool {
    let Some(source) = ethernet.get(26..30) else {
        return false;
    };
    let source: [u8; 4] = source.try_into().unwrap_or_default();
    mac_of_ipv4(source).is_some_and(|mac| mac[..] == ethernet[6..12])
}

/// The gateway's side of the stack's device: IP packets in and out of
/// Ethernet frames on the LAN.
struct Phy {
    shared: Arc<Shared>,
    /// Frames taken from the inbox, not yet given to the stack.
    frames: VecDeque<Vec<u8>>,
}

impl Phy {
    /// The next IPv4 frame for the gateway, answering ARP requests on the
    /// way; frames for others and other protocols are skipped.
    fn next_ip_frame(&mut self) -> Option<Vec<u8>> {
        loop {
            if self.frames.is_empty() {
                let mut inbox = self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
                std::mem::swap(&mut self.frames, &mut *inbox);
            }
            let frame = self.frames.pop_front()?;
            let ethernet = &frame[HEADER..];
            if ethernet.len() < 14 {
                continue;
            }
            match [ethernet[12], ethernet[13]] {
                [0x08, 0x00] if for_the_gateway(ethernet) && sent_by_its_owner(ethernet) => {
                    return Some(frame);
                }
                [0x08, 0x06] => {
                    if let Some(reply) = arp_reply(ethernet) {
                        self.shared.lan.forward(&*self.shared, reply);
                    }
                }
                _ => {}
            }
        }
    }
}

/// The answer to `ethernet` if it is an ARP request for the gateway's
/// address: to the frame's source, which the LAN checked, not to the
/// sender address inside the request, which it did not (a guest may not
/// have the gateway's answers sent to another).
fn arp_reply(ethernet: &[u8]) -> Option<Vec<u8>> {
    let source: [u8; 6] = ethernet.get(6..12)?.try_into().ok()?;
    let packet = ArpPacket::new_checked(ethernet.get(14..)?).ok()?;
    let Ok(ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_protocol_addr,
        target_protocol_addr,
        ..
    }) = ArpRepr::parse(&packet)
    else {
        return None;
    };
    if target_protocol_addr.octets() != GATEWAY_IPV4 {
        return None;
    }
    let reply = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(GATEWAY_MAC),
        source_protocol_addr: GATEWAY_IPV4.into(),
        target_hardware_addr: EthernetAddress(source),
        target_protocol_addr: source_protocol_addr,
    };
    let mut frame = frame_to(source, [0x08, 0x06], reply.buffer_len());
    let at = HEADER + 14;
    reply.emit(&mut ArpPacket::new_unchecked(&mut frame[at..]));
    Some(frame)
}

/// A frame of `len` payload bytes to `dst` from the gateway, receive
/// header in place, payload zeroed.
fn frame_to(dst: [u8; 6], ethertype: [u8; 2], len: usize) -> Vec<u8> {
    let mut frame = vec![0u8; HEADER + 14 + len];
    frame[..HEADER].copy_from_slice(receive_header().as_bytes());
    frame[HEADER..HEADER + 6].copy_from_slice(&dst);
    frame[HEADER + 6..HEADER + 12].copy_from_slice(&GATEWAY_MAC);
    frame[HEADER + 12..HEADER + 14].copy_from_slice(&ethertype);
    frame
}

impl Device for Phy {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: NetInstant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.next_ip_frame()?;
        Some((RxToken(frame), TxToken(&self.shared)))
    }

    fn transmit(&mut self, _: NetInstant) -> Option<TxToken<'_>> {
        Some(TxToken(&self.shared))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = shoal_abi::device::FRAME_MAX as usize - 14;
        caps
    }
}

struct RxToken(Vec<u8>);

impl smoltcp::phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0[HEADER + 14..])
    }
}

struct TxToken<'a>(&'a Arc<Shared>);

impl smoltcp::phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = frame_to([0; 6], [0x08, 0x00], len);
        let result = f(&mut frame[HEADER + 14..]);
        let dst = Ipv4Packet::new_checked(&frame[HEADER + 14..])
            .ok()
            .and_then(|packet| mac_of_ipv4(packet.dst_addr().octets()));
        if let Some(mac) = dst {
            frame[HEADER..HEADER + 6].copy_from_slice(&mac);
            self.0.lan.forward(&**self.0, frame);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_abi::device::{guest_ipv4, guest_mac};

    /// An Ethernet frame with an IPv4 header from `mac` claiming `ip`.
    fn ip_frame(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![0; 34];
        frame[..6].copy_from_slice(&GATEWAY_MAC);
        frame[6..12].copy_from_slice(&mac);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[26..30].copy_from_slice(&ip);
        frame
    }

    /// An ARP request from `mac` (Ethernet source) whose payload names
    /// `sender` as the sender, for `target`.
    fn arp_request(mac: [u8; 6], sender: [u8; 6], target: [u8; 4]) -> Vec<u8> {
        let request = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(sender),
            source_protocol_addr: guest_ipv4(5).into(),
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target.into(),
        };
        let mut frame = vec![0; 14 + request.buffer_len()];
        frame[..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&mac);
        frame[12..14].copy_from_slice(&[0x08, 0x06]);
        request.emit(&mut ArpPacket::new_unchecked(&mut frame[14..]));
        frame
    }

    #[test]
    fn arp_is_answered_to_the_frames_source_whatever_the_request_claims() {
        let (asker, victim) = (guest_mac(5), guest_mac(6));
        for sender in [asker, victim] {
            let reply = arp_reply(&arp_request(asker, sender, GATEWAY_IPV4)).expect("an answer");
            let ethernet = &reply[HEADER..];
            assert_eq!(ethernet[..6], asker);
            let packet = ArpPacket::new_checked(&ethernet[14..]).expect("ARP");
            match ArpRepr::parse(&packet).expect("a reply") {
                ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Reply,
                    source_hardware_addr,
                    target_hardware_addr,
                    ..
                } => {
                    assert_eq!(source_hardware_addr.0, GATEWAY_MAC);
                    assert_eq!(target_hardware_addr.0, asker);
                }
                other => panic!("{other:?}"),
            }
        }
        // Not for the gateway: no answer.
        assert!(arp_reply(&arp_request(asker, asker, guest_ipv4(7))).is_none());
        assert!(arp_reply(&arp_request(asker, asker, GATEWAY_IPV4)[..20]).is_none());
    }

    #[test]
    fn only_packets_to_the_gateways_own_address_reach_its_stack() {
        let mut frame = ip_frame(guest_mac(5), guest_ipv4(5));
        frame[30..34].copy_from_slice(&GATEWAY_IPV4);
        assert!(for_the_gateway(&frame));
        for dst in [[255; 4], [10, 255, 255, 255], guest_ipv4(6)] {
            frame[30..34].copy_from_slice(&dst);
            assert!(!for_the_gateway(&frame), "{dst:?}");
        }
        assert!(!for_the_gateway(&frame[..32]));
    }

    #[test]
    fn a_guest_may_not_speak_for_another_address() {
        assert!(sent_by_its_owner(&ip_frame(guest_mac(5), guest_ipv4(5))));
        assert!(!sent_by_its_owner(&ip_frame(guest_mac(5), guest_ipv4(6))));
        assert!(!sent_by_its_owner(&ip_frame(guest_mac(5), [192, 0, 2, 1])));
        assert!(!sent_by_its_owner(
            &ip_frame(guest_mac(5), guest_ipv4(5))[..20]
        ));
    }
}
