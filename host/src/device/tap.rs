//! A TAP device bridged to a virtual LAN: the host kernel's own network
//! stack becomes one more endpoint on the LAN, so anything the host routes
//! to the TAP interface reaches guests by their addresses, without port
//! forwards.
//!
//! Making a TAP device needs `CAP_NET_ADMIN`, or a persistent device the
//! administrator made for this user (`ip tuntap add dev NAME mode tap user
//! USER`), which [`Tap::open`] then attaches to. Shoal does not address
//! the interface or bring it up: that is the host's network to configure
//! (`ip addr add 10.0.0.2/24 dev NAME; ip link set NAME up`).
//!
//! Frames from the kernel are checked as a guest's are (14 to 1514 bytes);
//! the kernel's addresses are learned from the frames it sends, but never
//! an address of the host-given kind (`02:73:68:…`), so the kernel cannot
//! take a guest's or the gateway's place on the LAN.

use super::net::{Endpoint, HEADER, Lan, Mac, receive_header};
use shoal_abi::device::{FRAME_MAX, FRAME_MIN, MAC_PREFIX};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use zerocopy::IntoBytes;

/// A TAP device on a LAN, until dropped (a device this made then goes).
#[derive(Debug)]
pub struct Tap {
    port: Arc<TapPort>,
    thread: Option<JoinHandle<()>>,
}

/// Frames a TAP device has passed and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapStats {
    /// Frames from the host kernel forwarded on the LAN.
    pub frames_in: u64,
    /// Frames from the LAN written to the host kernel.
    pub frames_out: u64,
    /// Frames dropped: from the kernel, too short or too long; to it,
    /// refused by the device.
    pub dropped: u64,
}

#[derive(Debug)]
struct TapPort {
    /// Itself, for the LAN's table.
    me: Weak<TapPort>,
    device: File,
    name: String,
    lan: Arc<Lan>,
    /// The kernel's addresses this port answers for on the LAN.
    learned: Mutex<Vec<Mac>>,
    stop: EventFd,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    dropped: AtomicU64,
}

impl Tap {
    /// Opens TAP device `name` (making it if it does not exist and this
    /// process may) and bridges it to `lan`.
    pub fn open(lan: Arc<Lan>, name: &str) -> io::Result<Self> {
        let device = open_tap(name)?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let port = Arc::new_cyclic(|me| TapPort {
            me: me.clone(),
            device,
            name: name.to_string(),
            lan,
            learned: Mutex::default(),
            stop,
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let reader = Arc::clone(&port);
        let thread = std::thread::Builder::new()
            .name(format!("shoal-tap-{name}"))
            .spawn(move || {
                crate::seccomp::confine_or_warn(crate::seccomp::Kind::Tap);
                reader.read_frames()
            })?;
        Ok(Self {
            port,
            thread: Some(thread),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.port.name
    }

    /// The LAN it is bridged to.
    pub fn lan(&self) -> &str {
        self.port.lan.name()
    }

    /// Frames passed and dropped so far.
    pub fn stats(&self) -> TapStats {
        TapStats {
            frames_in: self.port.frames_in.load(Ordering::Relaxed),
            frames_out: self.port.frames_out.load(Ordering::Relaxed),
            dropped: self.port.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = self.port.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let learned = std::mem::take(&mut *lock(&self.port.learned));
        for mac in learned {
            self.port.lan.detach(mac, &*self.port);
        }
    }
}

use crate::lock;

/// Opens `/dev/net/tun` as TAP device `name`: whole Ethernet frames, no
/// packet information before them, reads that never wait.
fn open_tap(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0', ' ']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name (1 to 15 bytes)"),
        ));
    }
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/net/tun: {e}")))?;
    // SAFETY: an all-zero `ifreq` is valid: an empty name, no flags.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *to = from as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: `TUNSETIFF` reads the `ifreq` given and writes the name
    // back into it; both live for the call.
    if unsafe { libc::ioctl(device.as_raw_fd(), libc::TUNSETIFF, &mut request) } == -1 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "cannot make or attach TAP device {name}: {e} (it needs CAP_NET_ADMIN, or a \
                 persistent device made for this user)"
            ),
        ));
    }
    Ok(device)
}

impl TapPort {
    /// The port's thread: forwards each frame the kernel sends over the
    /// LAN until the TAP is dropped.
    fn read_frames(&self) {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.device.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `poll` reads and writes the two entries of `fds`.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ready == -1 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                tracing::error!(tap = %self.name, "cannot wait on the TAP device; it stops");
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            loop {
                match (&self.device).read(&mut buf) {
                    Ok(n) => self.pass_in(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                        tracing::info!(tap = %self.name, "the TAP device was removed");
                        return;
                    }
                    Err(e) => {
                        tracing::error!(tap = %self.name, error = %e, "the TAP device failed; it stops");
                        return;
                    }
                }
            }
        }
    }

    /// One frame from the kernel: checked, its source learned, forwarded.
    fn pass_in(&self, frame: &[u8]) {
        if !(FRAME_MIN as usize..=FRAME_MAX as usize).contains(&frame.len()) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut src: Mac = [0; 6];
        src.copy_from_slice(&frame[6..12]);
        if src[0] & 1 == 1 || src[..3] == MAC_PREFIX {
            // Not an address the kernel may have on the LAN.
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.learn(src);
        let mut bytes = Vec::with_capacity(HEADER + frame.len());
        bytes.extend_from_slice(receive_header().as_bytes());
        bytes.extend_from_slice(frame);
        self.frames_in.fetch_add(1, Ordering::Relaxed);
        self.lan.forward(self, bytes);
    }

    fn learn(&self, mac: Mac) {
        let mut learned = lock(&self.learned);
        if !learned.contains(&mac) {
            // An address another endpoint holds stays theirs.
            if self.lan.attach(mac, self.me.clone() as Weak<dyn Endpoint>) {
                learned.push(mac);
            }
        }
    }
}

impl Endpoint for TapPort {
    /// A frame from the LAN: to the kernel, without its receive header.
    fn receive(&self, frame: Vec<u8>) -> bool {
        // A TAP device takes a frame whole or not at all.
        match (&self.device).write(&frame[HEADER..]) {
            Ok(n) if n == frame.len() - HEADER => {
                self.frames_out.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}
