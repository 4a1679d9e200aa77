//! The virtual LAN's checks (`host/src/device/net.rs`): a transmit chain
//! read into a frame (`read_frame`), the frame forwarded on a LAN with a
//! few ports (`Lan::forward_within`), and room made in a full backlog
//! (`make_room`).
//!
//! Input: byte 0 sets the scene (bit 0: the sender may flood; bit 1: the
//! LAN has an uplink; bit 2: the sender is guest 2, else guest 3). Byte 1
//! is the number of descriptors (up to 16), 5 bytes each: offset (2
//! bytes) of the buffer in 64 KiB of guest memory, length (2 bytes),
//! flags (bit 0: the chain ends here, bit 1: device-writable). Byte 2 on
//! from there: the backlog's senders (count, then one byte each) and the
//! newcomer's; the rest is the guest memory.
//!
//! Checks:
//! - `read_frame` gives exactly what the rules say: `Bad` for a writable
//!   buffer, a length outside 14..=1514 after the header, a header asking
//!   for anything; `Spoofed` for another source; else the bytes with the
//!   receive header in place, of a legal length;
//! - a frame goes where the LAN's rules say, whole, once per endpoint,
//!   never back to its sender; the flood share is asked exactly when the
//!   frame would be copied to every port;
//! - `make_room` drops the newest frame of the sender with the most
//!   waiting exactly when that sender has more than one frame beyond the
//!   newcomer's share.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_abi::device::{DESC_NEXT, DESC_WRITE, Descriptor, MAC_PREFIX, guest_mac};
use shoal_fuzz::Input;
use shoal_host::device::net::{HEADER, Refused, read_frame, receive_header};
use shoal_host::device::ring::Chain;
use shoal_host::device::{Endpoint, Lans, Mac, make_room};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

const BASE: u64 = 0x10_0000;
const LEN: usize = 0x1_0000;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let scene = input.u8();
    let descs: Vec<(u16, u16, u8)> = (0..input.u8() % 17)
        .map(|_| (input.u16(), input.u16(), input.u8()))
        .collect();
    let senders: Vec<u8> = (0..input.u8() % 32).map(|_| input.u8()).collect();
    let newcomer = input.u8();
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), LEN)]).expect("anonymous memory");
    let rest = input.take(LEN);
    mem.write_slice(rest, GuestAddress(BASE)).expect("inside");

    let lan = Net::new(scene);
    let mut chain = Vec::new();
    for (offset, len, flags) in descs {
        let ends = flags & 1 != 0;
        let write = if flags & 2 != 0 { DESC_WRITE } else { 0 };
        let next = if ends { 0 } else { DESC_NEXT };
        chain.push(Descriptor::new(
            BASE + u64::from(offset),
            u32::from(len),
            write | next,
            0,
        ));
        if ends {
            let chain = Chain {
                head: 0,
                descs: std::mem::take(&mut chain),
            };
            lan.send(&mem, &chain);
        }
    }
    check_make_room(&senders, newcomer);
});

/// A LAN endpoint that keeps what it receives.
#[derive(Debug, Default)]
struct Sink {
    got: Mutex<Vec<Vec<u8>>>,
}

impl Endpoint for Sink {
    fn receive(&self, frame: Vec<u8>) -> bool {
        self.got.lock().expect("not poisoned").push(frame);
        true
    }
}

impl Sink {
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.got.lock().expect("not poisoned"))
    }
}

/// A LAN with a sender, two receivers (the first also at a second
/// address, as a shard's port is), a guest gone, and maybe an uplink.
struct Net {
    _lans: Lans,
    lan: Arc<shoal_host::device::Lan>,
    sender: Arc<Sink>,
    sender_mac: Mac,
    ports: HashMap<Mac, Option<Arc<Sink>>>,
    uplink: Option<Arc<Sink>>,
    endpoints: Vec<Arc<Sink>>,
    may_flood: bool,
}

impl Net {
    fn new(scene: u8) -> Self {
        let lans = Lans::default();
        let lan = lans.join("fuzz");
        let (sender_mac, other) = if scene & 4 != 0 {
            (guest_mac(2), guest_mac(3))
        } else {
            (guest_mac(3), guest_mac(2))
        };
        let sender = Arc::new(Sink::default());
        let (first, second) = (Arc::new(Sink::default()), Arc::new(Sink::default()));
        let attach = |mac: Mac, sink: &Arc<Sink>| {
            let weak: Weak<dyn Endpoint> = Arc::downgrade(sink) as _;
            assert!(lan.attach(mac, weak), "address free");
        };
        attach(sender_mac, &sender);
        attach(other, &first);
        attach(guest_mac(4), &first);
        attach(guest_mac(5), &second);
        let gone = Arc::new(Sink::default());
        attach(guest_mac(6), &gone);
        drop(gone);
        let mut ports = HashMap::new();
        ports.insert(sender_mac, Some(Arc::clone(&sender)));
        ports.insert(other, Some(Arc::clone(&first)));
        ports.insert(guest_mac(4), Some(Arc::clone(&first)));
        ports.insert(guest_mac(5), Some(Arc::clone(&second)));
        ports.insert(guest_mac(6), None);
        let uplink = (scene & 2 != 0).then(|| {
            let uplink = Arc::new(Sink::default());
            lan.set_uplink(Arc::downgrade(&uplink) as Weak<dyn Endpoint>);
            uplink
        });
        let mut endpoints = vec![Arc::clone(&sender), first, second];
        endpoints.extend(uplink.clone());
        Self {
            _lans: lans,
            lan,
            sender,
            sender_mac,
            ports,
            uplink,
            endpoints,
            may_flood: scene & 1 != 0,
        }
    }

    /// Reads `chain` as the device does, checks the outcome, and forwards
    /// an accepted frame.
    fn send(&self, mem: &GuestMemoryMmap<()>, chain: &Chain) {
        let got = read_frame(mem, chain, self.sender_mac);
        assert_eq!(
            got,
            expected_frame(mem, chain, self.sender_mac),
            "{chain:?}"
        );
        let Ok(frame) = got else {
            return;
        };
        let len = frame.len() - HEADER;
        assert!(
            (14..=1514).contains(&len),
            "a frame of {len} bytes accepted"
        );

        let mut asked = 0;
        let sent = self
            .lan
            .forward_within(&*self.sender, frame.clone(), &mut || {
                asked += 1;
                self.may_flood
            });
        let (want_sent, want_to, want_asked) = self.expected_route(&frame);
        assert_eq!(sent, want_sent, "forward's answer");
        assert_eq!(asked, want_asked, "times the flood share was asked");
        for endpoint in &self.endpoints {
            let got = endpoint.take();
            let wanted = want_to.iter().any(|e| Arc::ptr_eq(e, endpoint));
            if wanted {
                assert_eq!(got, [frame.clone()], "one whole copy");
            } else {
                assert!(got.is_empty(), "a frame where it must not go");
            }
        }
    }

    /// Whether the LAN says the frame was delivered, which endpoints get
    /// it, and how many times the flood share is asked.
    fn expected_route(&self, frame: &[u8]) -> (bool, Vec<Arc<Sink>>, u32) {
        let dst: Mac = frame[HEADER..HEADER + 6].try_into().expect("6 bytes");
        let flood = |asked: u32| {
            if !self.may_flood {
                return (false, Vec::new(), asked);
            }
            let to = self
                .endpoints
                .iter()
                .filter(|e| !Arc::ptr_eq(e, &self.sender))
                .cloned()
                .collect();
            (true, to, asked)
        };
        if dst[0] & 1 != 0 {
            return flood(1);
        }
        match self.ports.get(&dst) {
            Some(Some(port)) if Arc::ptr_eq(port, &self.sender) => (true, Vec::new(), 0),
            Some(Some(port)) => (true, vec![Arc::clone(port)], 0),
            Some(None) => (false, Vec::new(), 0),
            None => {
                let host_given = dst[..3] == MAC_PREFIX;
                if !host_given && !self.may_flood {
                    return (false, Vec::new(), 1);
                }
                let asked = u32::from(!host_given);
                if let Some(uplink) = &self.uplink {
                    return (true, vec![Arc::clone(uplink)], asked);
                }
                if host_given {
                    return (false, Vec::new(), 0);
                }
                flood(asked)
            }
        }
    }
}

/// What `read_frame` must answer, from the rules.
fn expected_frame(mem: &GuestMemoryMmap<()>, chain: &Chain, mac: Mac) -> Result<Vec<u8>, Refused> {
    let total: u64 = chain.descs.iter().map(|d| u64::from(d.len)).sum();
    if chain.descs.iter().any(|d| d.flags & DESC_WRITE != 0) {
        return Err(Refused::Bad);
    }
    if !(HEADER as u64 + 14..=HEADER as u64 + 1514).contains(&total) {
        return Err(Refused::Bad);
    }
    let mut bytes = Vec::new();
    for d in &chain.descs {
        let mut part = vec![0u8; d.len as usize];
        if mem.read_slice(&mut part, GuestAddress(d.addr)).is_err() {
            return Err(Refused::Bad);
        }
        bytes.extend_from_slice(&part);
    }
    if bytes[..HEADER].iter().any(|&b| b != 0) {
        return Err(Refused::Bad);
    }
    if bytes[HEADER + 6..HEADER + 12] != mac {
        return Err(Refused::Spoofed);
    }
    bytes[..HEADER].copy_from_slice(receive_header().as_bytes());
    Ok(bytes)
}

/// A frame from sender `n` (its address's last byte).
fn frame_from(n: u8) -> Vec<u8> {
    let mut frame = vec![0u8; HEADER + 14];
    frame[HEADER + 6..HEADER + 12].copy_from_slice(&[2, 0, 0, 0, 0, n]);
    frame
}

/// Makes room in a backlog of frames from `senders` (mod 4) for one from
/// `newcomer` (mod 4), and checks the outcome against the rule.
fn check_make_room(senders: &[u8], newcomer: u8) {
    let mut backlog: VecDeque<Vec<u8>> = senders.iter().map(|s| frame_from(s % 4)).collect();
    let before = backlog.clone();
    let newcomer = newcomer % 4;
    let mut counts = [0usize; 4];
    for s in senders {
        counts[usize::from(s % 4)] += 1;
    }
    let own = counts[usize::from(newcomer)];
    let most = counts.iter().copied().max().unwrap_or(0);
    let made = make_room(&mut backlog, &frame_from(newcomer));
    assert_eq!(
        made,
        most > own + 1,
        "room made for {newcomer} in {counts:?}"
    );
    if !made {
        assert_eq!(backlog, before);
        return;
    }
    assert_eq!(backlog.len() + 1, before.len());
    // The frame that went: the newest of a sender with the most waiting.
    let gone = (0..before.len())
        .find(|&i| i == backlog.len() || before[i] != backlog[i])
        .expect("one frame went");
    let hog = usize::from(before[gone][HEADER + 11]);
    assert_eq!(
        counts[hog], most,
        "the frame of a sender without the most waiting went"
    );
    assert!(
        before
            .iter()
            .skip(gone + 1)
            .all(|f| usize::from(f[HEADER + 11]) != hog),
        "not the hog's newest frame"
    );
}
