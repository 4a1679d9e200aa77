//! TCP and UDP sockets for shoal guests: the `smoltcp` stack over the
//! guest SDK's network device ([`Nic`]).
//!
//! ```text
//! let mut stack = Stack::open()?;               // 10.x.y.z/8, gateway 10.0.0.1
//! let server = stack.tcp_listen(80, 16 << 10);  // a listening TCP socket
//! loop {
//!     stack.poll();                             // frames in and out
//!     let socket = stack.tcp(server);           // a smoltcp tcp::Socket
//!     if socket.can_recv() { /* read, answer */ }
//!     stack.wait(u64::MAX);                     // until there is more to do
//! }
//! ```
//!
//! The stack takes the guest's address by the host's convention
//! ([`Nic::ipv4`], in `10.0.0.0/8`) and routes everything else through
//! the host's end of the LAN, `10.0.0.1`. Sockets are smoltcp's own
//! ([`smoltcp::socket::tcp::Socket`], [`smoltcp::socket::udp::Socket`]),
//! with buffers on the guest's heap: the guest needs a global allocator
//! (`shoal_guest::heap`).
#![cfg_attr(not(test), no_std)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use shoal_abi::device::{FRAME_MAX, GATEWAY_IPV4};
use shoal_guest::net::{NetError, Nic, RxFrame, Sender};
use shoal_guest::time;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};

pub use smoltcp;

/// Local ports [`Stack::tcp_connect`] picks from: 49152 and up.
const EPHEMERAL_FIRST: u16 = 49152;

/// Datagrams a UDP socket from [`Stack::udp_bind`] keeps each way.
pub const UDP_DATAGRAMS: usize = 64;

/// A guest's TCP/IP stack: its interface, its sockets and its NIC.
pub struct Stack {
    nic: Phy,
    iface: Interface,
    sockets: SocketSet<'static>,
    next_port: u16,
}

/// The stack's clock: the monotonic clock in microseconds.
fn now() -> Instant {
    Instant::from_micros((time::monotonic_ns() / 1000) as i64)
}

impl Stack {
    /// A stack on the guest's first network device.
    pub fn open() -> Result<Self, NetError> {
        Nic::find().map(Self::new)
    }

    /// A stack on `nic`, at the guest's conventional address.
    pub fn new(nic: Nic) -> Self {
        let mut config = Config::new(EthernetAddress(nic.mac()).into());
        let mac = nic.mac();
        config.random_seed = time::monotonic_ns()
            ^ u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0]);
        let ip = Ipv4Address::from(nic.ipv4());
        let mut nic = Phy(nic);
        let mut iface = Interface::new(config, &mut nic, now());
        iface.update_ip_addrs(|addrs| {
            // The interface starts with no address: room for one.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ip), 8));
        });
        // Fails only when the route table is full; it starts empty.
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::from(GATEWAY_IPV4));
        let port_offset = (time::monotonic_ns() % 4096) as u16;
        Self {
            nic,
            iface,
            sockets: SocketSet::new(Vec::new()),
            next_port: EPHEMERAL_FIRST + port_offset,
        }
    }

    /// The guest's IPv4 address.
    pub fn ipv4(&self) -> [u8; 4] {
        self.nic.0.ipv4()
    }

    /// The NIC under the stack.
    pub fn nic(&mut self) -> &mut Nic {
        &mut self.nic.0
    }

    /// A new TCP socket with `buffer` bytes each way, listening on `port`.
    pub fn tcp_listen(&mut self, port: u16, buffer: usize) -> SocketHandle {
        let mut socket = tcp_socket(buffer);
        // Fails only for port 0 or a socket already open; it is new.
        let _ = socket.listen(port);
        self.sockets.add(socket)
    }

    /// A new TCP socket with `buffer` bytes each way, connecting to
    /// `addr`:`port` from a local port of its own.
    pub fn tcp_connect(
        &mut self,
        addr: [u8; 4],
        port: u16,
        buffer: usize,
    ) -> Result<SocketHandle, tcp::ConnectError> {
        let mut socket = tcp_socket(buffer);
        let local = self.next_port;
        self.next_port = self.next_port.checked_add(1).unwrap_or(EPHEMERAL_FIRST);
        let remote = IpEndpoint::new(IpAddress::Ipv4(Ipv4Address::from(addr)), port);
        socket.connect(self.iface.context(), remote, local)?;
        Ok(self.sockets.add(socket))
    }

    /// A new UDP socket bound to `port`, keeping [`UDP_DATAGRAMS`]
    /// datagrams and `buffer` bytes of them each way.
    pub fn udp_bind(&mut self, port: u16, buffer: usize) -> Result<SocketHandle, udp::BindError> {
        let meta = || vec![udp::PacketMetadata::EMPTY; UDP_DATAGRAMS];
        let mut socket = udp::Socket::new(
            udp::PacketBuffer::new(meta(), vec![0; buffer]),
            udp::PacketBuffer::new(meta(), vec![0; buffer]),
        );
        socket.bind(port)?;
        Ok(self.sockets.add(socket))
    }

    /// The TCP socket `handle`.
    ///
    /// Panics if `handle` is not a TCP socket of this stack.
    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut(handle)
    }

    /// The UDP socket `handle`.
    ///
    /// Panics if `handle` is not a UDP socket of this stack.
    pub fn udp(&mut self, handle: SocketHandle) -> &mut udp::Socket<'static> {
        self.sockets.get_mut(handle)
    }

    /// Removes socket `handle` (its buffers are freed).
    pub fn remove(&mut self, handle: SocketHandle) {
        self.sockets.remove(handle);
    }

    /// Takes in every frame waiting, runs the stack's timers and sends
    /// what the sockets have to send. True if a socket's state may have
    /// changed.
    pub fn poll(&mut self) -> bool {
        let result = self.iface.poll(now(), &mut self.nic, &mut self.sockets);
        result == smoltcp::iface::PollResult::SocketStateChanged
    }

    /// Blocks until a frame comes in, a transmit buffer comes back while
    /// all were out, the stack has a timer due, or the monotonic clock
    /// reaches `deadline_ns` (`u64::MAX`: no deadline of the caller's).
    pub fn wait(&mut self, deadline_ns: u64) {
        let tx_full = !self.nic.0.split().1.ready();
        let now_ns = time::monotonic_ns();
        let mut until = match self.iface.poll_delay(now(), &self.sockets) {
            Some(delay) => now_ns.saturating_add(delay.total_micros() * 1000),
            None => u64::MAX,
        };
        if tx_full && until <= now_ns {
            // A socket has something to send now, and no transmit buffer
            // is free: polling again would find none either, so wait for
            // one to come back (or a frame to come in).
            until = u64::MAX;
        }
        let until = until.min(deadline_ns);
        if until <= now_ns {
            return;
        }
        self.nic.0.wait_io(until, tx_full);
    }
}

fn tcp_socket(buffer: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; buffer]),
        tcp::SocketBuffer::new(vec![0; buffer]),
    )
}

/// The NIC as the stack's device.
struct Phy(Nic);

impl Device for Phy {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let (rx, tx) = self.0.split();
        Some((RxToken(rx.take()?), TxToken(tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        let (_, mut tx) = self.0.split();
        tx.ready().then_some(TxToken(tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = FRAME_MAX as usize;
        caps
    }
}

/// A received frame, handed to the stack; its buffer goes back to the
/// host when the token is dropped.
pub struct RxToken<'a>(RxFrame<'a>);

impl smoltcp::phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

/// Room for one frame to send.
pub struct TxToken<'a>(Sender<'a>);

impl smoltcp::phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, len: usize, f: F) -> R {
        // Every transmit buffer is with the host only when the stack
        // answers a received frame: wait for one.
        while !self.0.ready() {
            self.0.wait();
        }
        match self.0.frame(len) {
            Some(mut frame) => {
                let result = f(&mut frame);
                frame.send();
                result
            }
            // `ready` said a buffer is free; without one, the stack's
            // frame goes nowhere (as on a wire that dropped it).
            None => f(&mut [0u8; FRAME_MAX as usize][..len.min(FRAME_MAX as usize)]),
        }
    }
}
