//! The trunk between the supervisor's virtual LANs and one shard's: a
//! `SOCK_SEQPACKET` socket pair, one Ethernet frame per packet, each
//! packet the LAN's number (4 bytes, little-endian) and then the frame
//! with its receive header, as [`crate::device::Lan::forward`] takes it.
//!
//! A frame is data, not control: the control socket stays free of it.
//! Each end is a switch port: sending never waits. What the socket cannot
//! take yet waits in the end's outbox, up to [`OUTBOX_MAX`] frames, shared
//! fairly between senders as a guest's receive backlog is
//! ([`crate::device::make_room`]): so a guest flooding one shard's guests
//! from another does not crowd out the frames of the rest, even when the
//! other side falls behind. The end's thread ([`Trunk::serve`]) reads
//! packets and sends what waits.

use crate::device::{Endpoint, Lan, make_room};
use shoal_abi::device::{FRAME_MAX, NET_HEADER_LEN};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Bytes before the frame in a packet.
const NUMBER: usize = 4;

/// Largest packet: the number, the receive header and a full frame.
const PACKET_MAX: usize = NUMBER + NET_HEADER_LEN as usize + FRAME_MAX as usize;

/// Bytes the kernel may hold in flight from each end: about 600 full
/// frames, or a few thousand small ones.
const BUFFER: libc::c_int = 1 << 20;

/// Frames an end keeps waiting for room in the socket; past that, the
/// frame of the sender with the most waiting goes.
pub(crate) const OUTBOX_MAX: usize = 1024;

/// A frame waiting in an outbox, with its LAN's number.
struct Packet {
    number: u32,
    frame: Vec<u8>,
}

impl AsRef<[u8]> for Packet {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

/// One end of a trunk.
pub(crate) struct Trunk {
    fd: OwnedFd,
    outbox: Mutex<VecDeque<Packet>>,
    /// Tells the end's thread that the outbox has frames.
    wake: EventFd,
    /// Frames dropped here: the socket closed, or the outbox full.
    dropped: AtomicU64,
}

impl std::fmt::Debug for Trunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trunk")
            .field("fd", &self.fd)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

/// What became of a packet offered to the socket.
enum Sent {
    Done,
    Full,
    Closed,
}

impl Trunk {
    /// A connected pair: the supervisor's end and the shard's.
    pub(crate) fn pair() -> io::Result<(Self, Self)> {
        let mut fds = [0; 2];
        // SAFETY: `socketpair` writes two descriptors into `fds`, which
        // are ours alone from here on.
        let made = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if made == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both were just made and are owned by nothing else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (a, b) = (Self::new(a)?, Self::new(b)?);
        a.set_buffer(libc::SO_SNDBUF)?;
        b.set_buffer(libc::SO_SNDBUF)?;
        Ok((a, b))
    }

    fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self {
            fd,
            outbox: Mutex::default(),
            wake: EventFd::new(EFD_NONBLOCK)?,
            dropped: AtomicU64::new(0),
        })
    }

    /// The end a shard process inherited as `fd`.
    ///
    /// # Safety
    /// `fd` must be an open trunk end that nothing else owns.
    pub(crate) unsafe fn from_raw_fd(fd: RawFd) -> io::Result<Self> {
        // SAFETY: as the caller promised.
        Self::new(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn set_buffer(&self, option: libc::c_int) -> io::Result<()> {
        // SAFETY: `setsockopt` reads one `c_int` from the pointer given.
        let set = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&BUFFER as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `frame` for LAN `number` without waiting: now, or from the
    /// outbox when the socket has room. False if it is dropped: the trunk
    /// is closed, or the outbox is full and its sender has at least as
    /// many frames waiting as any other. (A frame that makes room for it
    /// is dropped and counted here.)
    pub(crate) fn send(&self, number: u32, frame: Vec<u8>) -> bool {
        let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        if outbox.is_empty() {
            match self.offer(number, &frame) {
                Sent::Done => return true,
                Sent::Closed => return self.drop_one(),
                Sent::Full => {}
            }
        }
        if outbox.len() >= OUTBOX_MAX {
            if !make_room(&mut outbox, &frame) {
                return self.drop_one();
            }
            self.drop_one();
        }
        if outbox.is_empty() {
            let _ = self.wake.write(1);
        }
        outbox.push_back(Packet { number, frame });
        true
    }

    fn drop_one(&self) -> bool {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Frames dropped at this end.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Offers one packet to the socket.
    fn offer(&self, number: u32, frame: &[u8]) -> Sent {
        let number = number.to_le_bytes();
        let mut parts = [
            libc::iovec {
                iov_base: number.as_ptr().cast_mut().cast(),
                iov_len: NUMBER,
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: a zeroed `msghdr` is valid (no address, no control
        // data); the two parts point at buffers that outlive the call,
        // which only reads them.
        let sent = unsafe {
            let mut message: libc::msghdr = std::mem::zeroed();
            message.msg_iov = parts.as_mut_ptr();
            message.msg_iovlen = parts.len() as _;
            libc::sendmsg(
                self.fd.as_raw_fd(),
                &message,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if sent >= 0 {
            return Sent::Done;
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Sent::Full,
            _ => Sent::Closed,
        }
    }

    /// Sends what waits in the outbox until the socket is full. True if
    /// the outbox is empty after.
    fn flush(&self) -> bool {
        let _ = self.wake.read();
        let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(packet) = outbox.front() {
            match self.offer(packet.number, &packet.frame) {
                Sent::Done => {}
                Sent::Full => return false,
                Sent::Closed => {
                    self.dropped
                        .fetch_add(outbox.len() as u64, Ordering::Relaxed);
                    outbox.clear();
                    return true;
                }
            }
            outbox.pop_front();
        }
        true
    }

    /// The end's thread: hands each packet that arrives to `deliver` (its
    /// LAN's number and its frame) and sends what waits in the outbox,
    /// until the other end closes or [`Trunk::shut_down`].
    pub(crate) fn serve(&self, mut deliver: impl FnMut(u32, &[u8])) {
        let mut packet = vec![0; PACKET_MAX];
        let mut waiting = false;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN | if waiting { libc::POLLOUT } else { 0 },
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `poll` reads and writes the two entries of `fds`.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } == -1 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[1].revents != 0 || fds[0].revents & libc::POLLOUT != 0 {
                waiting = !self.flush();
            }
            if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                && !self.read_some(&mut packet, &mut deliver)
            {
                return;
            }
        }
    }

    /// Reads and delivers the packets that have come, a bounded number at
    /// a time. False once the other end is closed.
    fn read_some(&self, packet: &mut [u8], deliver: &mut impl FnMut(u32, &[u8])) -> bool {
        for _ in 0..OUTBOX_MAX {
            // SAFETY: `recv` writes at most `packet.len()` bytes into it.
            let got = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    packet.as_mut_ptr().cast(),
                    packet.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match got {
                0 => return false,
                n if n > NUMBER as isize => {
                    let number = u32::from_le_bytes([packet[0], packet[1], packet[2], packet[3]]);
                    deliver(number, &packet[NUMBER..n as usize]);
                }
                // Too short to carry a number: not a packet of ours.
                n if n > 0 => {}
                _ => {
                    return matches!(
                        io::Error::last_os_error().kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    );
                }
            }
        }
        true
    }

    /// Ends both directions: the threads serving either end return.
    pub(crate) fn shut_down(&self) {
        // SAFETY: `shutdown` only acts on the descriptor we own.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// The descriptor, for a shard process to inherit.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// One LAN's end of a trunk, an endpoint on that LAN: frames for the
/// other side go down the trunk.
#[derive(Debug)]
pub(crate) struct Port {
    number: u32,
    trunk: Arc<Trunk>,
}

impl Endpoint for Port {
    fn receive(&self, frame: Vec<u8>) -> bool {
        self.trunk.send(self.number, frame)
    }
}

/// The LANs on one end of a trunk, by number, each with its port.
#[derive(Debug, Default)]
pub(crate) struct LanPorts(Mutex<HashMap<u32, LanPort>>);

/// A LAN and its port on a trunk.
type LanPort = (Arc<Lan>, Arc<Port>);

impl LanPorts {
    /// LAN `number` and its port on `trunk`: the LAN `lan` gives, the
    /// first time.
    pub(crate) fn port(
        &self,
        trunk: &Arc<Trunk>,
        number: u32,
        lan: impl FnOnce() -> Arc<Lan>,
    ) -> (Arc<Lan>, Arc<Port>) {
        let mut ports = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (lan, port) = ports.entry(number).or_insert_with(|| {
            let port = Port {
                number,
                trunk: Arc::clone(trunk),
            };
            (lan(), Arc::new(port))
        });
        (Arc::clone(lan), Arc::clone(port))
    }

    /// Serves `trunk` ([`Trunk::serve`]): each frame that arrives goes
    /// over its LAN, from that LAN's port. A frame for a LAN this end was
    /// never given is dropped.
    pub(crate) fn serve(&self, trunk: &Trunk) {
        trunk.serve(|number, frame| {
            let entry = self
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&number)
                .cloned();
            if let Some((lan, port)) = entry {
                lan.forward(&*port, frame.to_vec());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn frame_from(sender: u8, len: usize) -> Vec<u8> {
        let mut frame = vec![0; len];
        frame[NET_HEADER_LEN as usize + 11] = sender;
        frame
    }

    /// Serves `end` on a thread, passing what arrives to the receiver.
    fn collect(
        end: Trunk,
    ) -> (
        std::sync::mpsc::Receiver<(u32, Vec<u8>)>,
        std::thread::JoinHandle<()>,
    ) {
        let (tx, rx) = channel();
        let thread = std::thread::spawn(move || {
            end.serve(|number, frame| {
                let _ = tx.send((number, frame.to_vec()));
            });
        });
        (rx, thread)
    }

    #[test]
    fn frames_cross_whole_with_their_lan_number() {
        let (a, b) = Trunk::pair().expect("a pair");
        let (arrived, thread) = collect(b);
        assert!(a.send(7, vec![1, 2, 3]));
        assert!(a.send(0, vec![9; 1526]));
        assert_eq!(arrived.recv().expect("the first"), (7, vec![1, 2, 3]));
        let (number, frame) = arrived.recv().expect("the second");
        assert_eq!((number, frame.len()), (0, 1526));
        drop(a);
        thread.join().expect("ends when the other end closes");
    }

    #[test]
    fn a_full_trunk_keeps_a_fair_share_for_each_sender_and_sends_it_later() {
        let (a, b) = Trunk::pair().expect("a pair");
        // Nobody reads yet: the flooder fills the socket, then the outbox.
        let flooded = (0..100_000)
            .take_while(|_| a.send(1, frame_from(1, 1526)))
            .count();
        assert!(flooded > OUTBOX_MAX && flooded < 100_000, "{flooded}");
        assert!(!a.send(1, frame_from(1, 1526)), "the flooder gets no more");
        for _ in 0..10 {
            assert!(a.send(1, frame_from(2, 100)), "another sender gets room");
        }
        // Two of the flooder's refused, ten of its waiting frames gone.
        assert_eq!(a.dropped(), 12);
        let (arrived, _thread) = collect(b);
        // The sending end's thread sends what waits in its outbox.
        let a = std::sync::Arc::new(a);
        let sender = std::sync::Arc::clone(&a);
        std::thread::spawn(move || sender.serve(|_, _| {}));
        let mut from_2 = 0;
        for _ in 0..flooded {
            let (_, frame) = arrived.recv().expect("everything queued arrives");
            from_2 += usize::from(frame[NET_HEADER_LEN as usize + 11] == 2);
        }
        assert_eq!(from_2, 10);
    }
}
