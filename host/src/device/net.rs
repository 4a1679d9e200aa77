//! Virtual LANs: each guest on a LAN (`shoal run --net NAME`) has a
//! virtio-net device, and the LAN is a learning switch that the device
//! thread runs.
//!
//! A frame a guest transmits is checked (a header with no offloads, 14 to
//! [`FRAME_MAX`] bytes, the guest's own source address, under its frame
//! rate), copied out of the guest's memory and forwarded: to the port that
//! last sent from its destination address, to every other port if the
//! destination is a group address or unknown (counted against the
//! sender's broadcast share either way), and nowhere if it is a
//! host-given guest address that has no port (the guest is gone). Each
//! port keeps up to [`BACKLOG_MAX`] frames waiting for receive buffers;
//! past that, frames for it are dropped. Every drop is counted in the
//! guest's statistics: the sender's `frames_dropped` (bad, spoofed, over
//! the rate, for a guest gone), the receiver's `frames_missed` (no room).

use super::SlotState;
use super::gateway::Gateway;
use super::ring::{Chain, Ring, RingError};
use shoal_abi::device::{DESC_WRITE, FRAME_MAX, FRAME_MIN, MAC_PREFIX, NET_HEADER_LEN, NetHeader};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

/// An Ethernet address.
pub type Mac = [u8; 6];

/// `mac` as people write it: `02:73:68:00:00:11`.
pub fn format_mac(mac: &Mac) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Frames a port keeps waiting for receive buffers; more are dropped.
pub const BACKLOG_MAX: usize = 256;

/// Frames a guest may send in one [`FRAME_WINDOW`] (250,000 a second);
/// more are dropped.
pub const FRAME_LIMIT: u64 = 25_000;

/// Frames a guest may send in one [`FRAME_WINDOW`] (10,000 a second) that
/// the LAN copies to every port: to a broadcast or multicast address, or
/// to a unicast address no port has; more are dropped. A guest's share of
/// these is kept lower than its share of frames.
pub const BROADCAST_LIMIT: u64 = 1_000;

/// The window [`FRAME_LIMIT`] and [`BROADCAST_LIMIT`] count over.
pub const FRAME_WINDOW: Duration = Duration::from_millis(100);

/// The virtual LANs of this process, by name, and the host's end of each
/// that has one.
#[derive(Debug, Default)]
pub struct Lans {
    lans: Mutex<HashMap<String, Weak<Lan>>>,
    gateways: Mutex<HashMap<String, Weak<Gateway>>>,
}

impl Lans {
    /// The LAN `name`, made when its first guest joins.
    pub fn join(&self, name: &str) -> Arc<Lan> {
        let mut lans = self.lans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lan) = lans.get(name).and_then(Weak::upgrade) {
            return lan;
        }
        lans.retain(|_, lan| lan.strong_count() > 0);
        let lan = Arc::new(Lan::new(name));
        lans.insert(name.to_string(), Arc::downgrade(&lan));
        lan
    }

    /// LAN `name`, if it has anything on it.
    pub fn get(&self, name: &str) -> Option<Arc<Lan>> {
        let lans = self.lans.lock().unwrap_or_else(|e| e.into_inner());
        lans.get(name).and_then(Weak::upgrade)
    }

    /// The host's end of LAN `name` (which it keeps), started with the
    /// first port forward to the LAN.
    pub fn gateway(&self, name: &str) -> std::io::Result<Arc<Gateway>> {
        let mut gateways = self.gateways.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(gateway) = gateways.get(name).and_then(Weak::upgrade) {
            return Ok(gateway);
        }
        gateways.retain(|_, gateway| gateway.strong_count() > 0);
        let gateway = Arc::new(Gateway::start(self.join(name))?);
        gateways.insert(name.to_string(), Arc::downgrade(&gateway));
        Ok(gateway)
    }
}

/// Something on a LAN that takes frames: a guest's network device, or
/// the host's own end ([`super::Gateway`]).
pub trait Endpoint: Send + Sync + std::fmt::Debug {
    /// Takes `frame`: a receive header, then the frame. False if it was
    /// dropped on the way for want of room (a receiver that misses it for
    /// want of buffers counts it itself and says true). Called with the
    /// LAN's table locked; must not lock it again.
    fn receive(&self, frame: Vec<u8>) -> bool;
}

/// One virtual LAN: which endpoint has each address, and the way to the
/// rest of the LAN if part of it is in other processes.
#[derive(Debug)]
pub struct Lan {
    name: String,
    table: Mutex<Table>,
    lost: AtomicU64,
}

#[derive(Debug, Default)]
struct Table {
    ports: HashMap<Mac, Weak<dyn Endpoint>>,
    /// Where frames go whose destination is not here: a shard's trunk to
    /// the supervisor. The supervisor's own LANs have none.
    uplink: Option<Weak<dyn Endpoint>>,
}

impl Lan {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            table: Mutex::default(),
            lost: AtomicU64::new(0),
        }
    }

    /// The LAN's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Puts `endpoint` on the LAN at `mac`. One endpoint may have many
    /// addresses (the supervisor's port to a shard has one per guest in
    /// it); it still gets one copy of each flooded frame. False, and
    /// nothing changes, if another endpoint on the LAN holds `mac` (guest
    /// addresses repeat every 2^24 ids, and one falls on the gateway's).
    #[must_use]
    pub fn attach(&self, mac: Mac, endpoint: Weak<dyn Endpoint>) -> bool {
        let mut table = self.lock();
        let held = table.ports.get(&mac).and_then(Weak::upgrade);
        if held.is_some_and(|held| !std::ptr::addr_eq(Arc::as_ptr(&held), endpoint.as_ptr())) {
            return false;
        }
        table.ports.insert(mac, endpoint);
        true
    }

    /// Takes `mac` off the LAN if `endpoint` holds it: frames to it are
    /// dropped from now on.
    pub fn detach(&self, mac: Mac, endpoint: &dyn Endpoint) {
        let mut table = self.lock();
        let held = table.ports.get(&mac).map(Weak::as_ptr);
        if held.is_some_and(|held| std::ptr::addr_eq(held, endpoint)) {
            table.ports.remove(&mac);
        }
    }

    /// Sends frames for addresses not on this LAN, and a copy of every
    /// flooded frame, to `uplink`.
    pub fn set_uplink(&self, uplink: Weak<dyn Endpoint>) {
        self.lock().uplink = Some(uplink);
    }

    /// Frames to one guest that this LAN dropped: the guest is gone, or
    /// there was no room on the way. (Their senders count them too.)
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forwards `frame` (a receive header and a checked frame, from
    /// [`read_frame`]) that `from` sent. False if it was for one guest and
    /// dropped: the guest is gone, or there was no room on the way.
    pub fn forward(&self, from: &dyn Endpoint, frame: Vec<u8>) -> bool {
        self.forward_within(from, frame, &mut || true)
    }

    /// Forwards `frame` as [`Lan::forward`] does, but asks `may_flood`
    /// first whenever the frame is to be copied to every port: it goes to
    /// a group address, or to an address no port has and that is not a
    /// host-given guest address (here or, through the uplink, in the
    /// process above, which floods it there). False from `may_flood`
    /// drops the frame (and so does this). A sender's share of flooded
    /// frames is kept to its broadcast share this way, whatever address
    /// it makes up.
    pub fn forward_within(
        &self,
        from: &dyn Endpoint,
        frame: Vec<u8>,
        may_flood: &mut dyn FnMut() -> bool,
    ) -> bool {
        if frame.len() < HEADER + FRAME_MIN as usize {
            return self.lose();
        }
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[HEADER..HEADER + 6]);
        let is_from = |target: &Arc<dyn Endpoint>| std::ptr::addr_eq(&**target, from);
        // Targets take the frame with the table locked: nothing locks the
        // table while it holds a slot.
        let table = self.lock();
        if dst[0] & 1 == 0 {
            match table.ports.get(&dst).map(Weak::upgrade) {
                Some(Some(target)) => {
                    return is_from(&target) || target.receive(frame) || self.lose();
                }
                Some(None) => return self.lose(),
                None => {
                    let host_given = dst[..3] == MAC_PREFIX;
                    if !host_given && !may_flood() {
                        return false;
                    }
                    let uplink = table.uplink.as_ref().and_then(Weak::upgrade);
                    if let Some(uplink) = uplink.filter(|u| !is_from(u)) {
                        return uplink.receive(frame) || self.lose();
                    }
                    if host_given {
                        return self.lose();
                    }
                }
            }
        } else if !may_flood() {
            return false;
        }
        let mut seen = HashSet::new();
        let targets: Vec<Arc<dyn Endpoint>> = table
            .ports
            .values()
            .chain(&table.uplink)
            .filter_map(Weak::upgrade)
            .filter(|target| !is_from(target) && seen.insert(Arc::as_ptr(target).cast::<()>()))
            .collect();
        if let Some((last, rest)) = targets.split_last() {
            for target in rest {
                target.receive(frame.clone());
            }
            last.receive(frame);
        }
        true
    }

    fn lose(&self) -> bool {
        self.lost.fetch_add(1, Ordering::Relaxed);
        false
    }
}

/// A network device's own part: its address and LAN.
#[derive(Debug)]
pub struct Port {
    /// The guest's address.
    pub mac: Mac,
    /// The LAN it is on.
    pub lan: Arc<Lan>,
}

/// Why a transmitted chain is not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a frame: a device-writable buffer, a header with offloads, or
    /// a length outside 14..=1514.
    Bad,
    /// Its source is not the guest's address.
    Spoofed,
}

/// Bytes of the virtio-net header before each frame.
pub const HEADER: usize = NET_HEADER_LEN as usize;

/// Whether `frame` (receive header in place) goes to a group address
/// (broadcast or multicast).
pub fn is_group(frame: &[u8]) -> bool {
    frame.get(HEADER).is_some_and(|b| b & 1 == 1)
}

/// The sender of `frame` (receive header in place).
fn source(frame: &[u8]) -> &[u8] {
    &frame[HEADER + 6..HEADER + 12]
}

/// Makes room in a full backlog for `frame`, fairly: if another sender has
/// more frames waiting than `frame`'s sender, its newest one goes, and
/// `frame` may be queued (true). Else nothing changes and `frame` is to be
/// dropped (false). A flooding sender thus fills a receiver's backlog only
/// with what others leave free.
pub fn make_room<T: AsRef<[u8]>>(backlog: &mut VecDeque<T>, frame: &[u8]) -> bool {
    let mut counts: HashMap<&[u8], usize> = HashMap::new();
    for queued in backlog.iter() {
        *counts.entry(source(queued.as_ref())).or_default() += 1;
    }
    let own = counts.get(source(frame)).copied().unwrap_or(0);
    let Some((hog, most)) = counts.into_iter().max_by_key(|&(_, n)| n) else {
        return false;
    };
    if most <= own + 1 {
        return false;
    }
    let hog: Mac = hog.try_into().unwrap_or_default();
    match backlog
        .iter()
        .rposition(|queued| source(queued.as_ref()) == hog)
    {
        Some(at) => backlog.remove(at).is_some(),
        None => false,
    }
}

/// Reads a transmit chain (already checked to lie in `mem`): its header,
/// which must ask for nothing, and a frame from `mac`. Returns them with
/// the header made the receive header, ready to go into a receive chain
/// as it is.
pub fn read_frame(mem: &GuestMemoryMmap<()>, chain: &Chain, mac: Mac) -> Result<Vec<u8>, Refused> {
    let total: u64 = chain.descs.iter().map(|d| u64::from(d.len)).sum();
    let writable = chain.descs.iter().any(|d| d.flags & DESC_WRITE != 0);
    let lengths = (HEADER as u64 + u64::from(FRAME_MIN))..=(HEADER as u64 + u64::from(FRAME_MAX));
    if writable || !lengths.contains(&total) {
        return Err(Refused::Bad);
    }
    let mut bytes = vec![0u8; total as usize];
    let mut at = 0;
    for d in &chain.descs {
        let end = at + d.len as usize;
        mem.read_slice(&mut bytes[at..end], GuestAddress(d.addr))
            .map_err(|_| Refused::Bad)?;
        at = end;
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

/// The header before every frame the LAN delivers: one buffer, nothing
/// asked.
pub fn receive_header() -> NetHeader {
    NetHeader {
        num_buffers: 1,
        ..NetHeader::default()
    }
}

/// Writes `frame` (receive header included) into a receive chain. The
/// bytes written, or `None` if the chain is not all device-writable or too
/// short (the frame is then dropped).
fn write_frame(mem: &GuestMemoryMmap<()>, chain: &Chain, frame: &[u8]) -> Option<u32> {
    let room: u64 = chain.descs.iter().map(|d| u64::from(d.len)).sum();
    if chain.descs.iter().any(|d| d.flags & DESC_WRITE == 0) || room < frame.len() as u64 {
        return None;
    }
    let mut at = 0;
    for d in &chain.descs {
        let n = (frame.len() - at).min(d.len as usize);
        mem.write_slice(&frame[at..at + n], GuestAddress(d.addr))
            .ok()?;
        at += n;
    }
    Some(frame.len() as u32)
}

/// Moves waiting frames into the guest's receive buffers. Frames it must
/// drop (a receive chain that cannot hold one) count as missed. Returns
/// the frames delivered, the frames missed and whether the guest wants its
/// event.
pub(super) fn fill_rx(state: &mut SlotState) -> Result<(u64, u64, bool), RingError> {
    let SlotState { rings, backlog, .. } = state;
    let Some(rx) = rings[0].as_mut() else {
        return Ok((0, 0, false));
    };
    let (mut delivered, mut missed) = (0, 0);
    while let Some(frame) = backlog.front() {
        let Some(chain) = next_chain(rx)? else { break };
        match write_frame(rx.mem(), &chain, frame) {
            Some(written) => {
                rx.complete(chain.head, written)?;
                delivered += 1;
            }
            None => {
                rx.complete(chain.head, 0)?;
                missed += 1;
            }
        }
        backlog.pop_front();
    }
    let raise = delivered + missed > 0 && rx.wants_event()?;
    Ok((delivered, missed, raise))
}

/// The next receive chain; with none, asks for a notification when the
/// guest adds one (and takes it if one came meanwhile).
fn next_chain(rx: &mut Ring) -> Result<Option<Chain>, RingError> {
    if let Some(chain) = rx.pop()? {
        return Ok(Some(chain));
    }
    if rx.rearm()? { rx.pop() } else { Ok(None) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_from(sender: u8) -> Vec<u8> {
        let mut frame = vec![0; HEADER + 14];
        frame[HEADER + 6..HEADER + 12].copy_from_slice(&[2, 0, 0, 0, 0, sender]);
        frame
    }

    fn waiting(backlog: &VecDeque<Vec<u8>>, sender: u8) -> usize {
        let from = frame_from(sender);
        backlog
            .iter()
            .filter(|f| source(f) == source(&from))
            .count()
    }

    #[test]
    fn a_full_backlog_makes_room_for_a_sender_with_fewer_frames_waiting() {
        let mut backlog: VecDeque<Vec<u8>> = (0..10).map(|_| frame_from(1)).collect();
        backlog.push_back(frame_from(2));
        assert!(make_room(&mut backlog, &frame_from(2)));
        assert_eq!(waiting(&backlog, 1), 9);
        assert_eq!(backlog.len(), 10, "one frame went to make room");
        assert!(
            !make_room(&mut backlog, &frame_from(1)),
            "the flooder gets none"
        );
        assert!(
            make_room(&mut backlog, &frame_from(3)),
            "a newcomer gets some"
        );
        assert_eq!(waiting(&backlog, 1), 8);
    }

    #[derive(Debug)]
    struct Sink;

    impl Endpoint for Sink {
        fn receive(&self, _: Vec<u8>) -> bool {
            true
        }
    }

    #[test]
    fn an_address_stays_with_the_endpoint_that_holds_it() {
        let lan = Lan::new("t");
        let (first, second): (Arc<dyn Endpoint>, Arc<dyn Endpoint>) =
            (Arc::new(Sink), Arc::new(Sink));
        let mac = [2, 0x73, 0x68, 0, 0, 1];
        assert!(lan.attach(mac, Arc::downgrade(&first)));
        assert!(
            lan.attach(mac, Arc::downgrade(&first)),
            "again, by its holder"
        );
        assert!(!lan.attach(mac, Arc::downgrade(&second)), "taken");
        lan.detach(mac, &*second);
        assert!(
            !lan.attach(mac, Arc::downgrade(&second)),
            "not the other's to free"
        );
        lan.detach(mac, &*first);
        assert!(
            lan.attach(mac, Arc::downgrade(&second)),
            "free once its holder left"
        );
        drop(second);
        assert!(
            lan.attach(mac, Arc::downgrade(&first)),
            "free once its holder is gone"
        );
    }

    #[test]
    fn senders_with_equal_shares_keep_them() {
        let mut backlog: VecDeque<Vec<u8>> = [1, 2, 1, 2].map(frame_from).into();
        assert!(!make_room(&mut backlog, &frame_from(2)));
        assert_eq!(backlog.len(), 4);
    }
}
