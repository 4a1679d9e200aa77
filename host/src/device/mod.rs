//! Devices: virtio split virtqueues in guest memory, served by a device
//! thread of the host process, with notifications that stay in the kernel
//! on the guest's side (see [`shoal_abi::device`] for the guest's view).
//!
//! Each device of a guest is a [`Slot`]: its disk or LAN port, an eventfd that KVM
//! signals when the guest writes the device's index to the notification
//! port (an ioeventfd: the vCPU's exit never leaves the kernel), and, once
//! the guest called `queue_setup`, its [`Ring`]s. The device thread
//! ([`IoThread`]) waits on every slot's eventfd, serves a slot's ring a
//! bounded turn at a time so that no guest holds it up for the others, and
//! raises the queue's event when the guest asked to hear of used buffers.
//!
//! A ring the guest broke stops the guest with the reason; so does a storm
//! of notifications with nothing to do.

mod disk;
mod flush;
mod gateway;
mod io;
pub mod net;
pub mod ring;
mod tap;

pub use disk::{
    Disk, DiskError, DiskSpec, Disks, FLUSH_COST, FlushHold, PendingFlush, Served, Started,
    hold_flushes,
};
pub use flush::FLUSH_THREADS;
pub use gateway::{Forward, Gateway, GatewayStats};
pub use io::IoThread;
pub use net::{Endpoint, Lan, Lans, Mac, make_room};
pub use tap::{Tap, TapStats};

use crate::control::GuestControl;
use crate::end::Crash;
use crate::kvm::Vm;
use crate::kvm::memory::GuestRam;
use crate::limits::{Bucket, RateWindow};
use crate::sched::SchedulerRef;
use crate::stats::FrameCount;
use ring::{Ring, RingError};
use shoal_abi::HypercallError;
use shoal_abi::device::{
    FLAG_READ_ONLY, FRAME_MAX, KIND_BLOCK, KIND_NET, NET_RX, NET_TX, NOTIFY_PORT, QUEUE_SIZE_MAX,
    REQUEST_MAX, mac_to_capacity,
};
use shoal_abi::hypercall::{DeviceInfo, QueueSetup};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Chains one slot serves in a turn before the device thread moves on.
pub const TURN_CHAINS: usize = 32;
/// Cost (data bytes; a flush counts as [`FLUSH_COST`], 1 MiB) after which a
/// turn ends early.
pub const TURN_COST: u64 = 4 << 20;

/// Notifications that find nothing to do, a second, that a guest may send
/// on average; it is stopped for a notification storm when it outruns this
/// by more than [`STORM_BURST`]. A guest that follows the event index sends
/// a needless one only when it races the host's re-arming.
pub const STORM_RATE: u64 = 20_000;

/// How far ahead of [`STORM_RATE`] a guest may get: a storm at full speed
/// is stopped within a few milliseconds, and a guest held up for a while
/// (at 15,000 a second, up to 130 ms) that then catches up is not taken
/// for one. A device thread held up for any time is not either: the
/// notifications it then reads at once are counted as having come over the
/// time since it last looked.
pub const STORM_BURST: u64 = 2_000;

/// Why a guest's devices could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A disk could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// An eventfd or the device thread could not be set up.
    #[error("cannot set up a device: {0}")]
    Io(#[from] std::io::Error),
    /// KVM refused the notification port.
    #[error(transparent)]
    Vm(#[from] crate::kvm::vm::VmError),
    /// Another guest, or the host's end, has the guest's address on its
    /// LAN (guest addresses repeat every 2^24 ids).
    #[error("the LAN address {} is taken", net::format_mac(.0))]
    AddressTaken(Mac),
}

/// Whom a device tells of used buffers, and stops when it breaks a ring.
#[derive(Clone)]
pub struct Owner {
    /// The guest's control block.
    pub control: Arc<GuestControl>,
    /// Its scheduler.
    pub sched: SchedulerRef,
}

/// What a guest's devices are made from.
pub struct DeviceParts {
    /// Its disks, device `i` being `disks[i]`.
    pub disks: Vec<Arc<Disk>>,
    /// Its network device (after the disks): the LAN and its address.
    pub net: Option<(Arc<Lan>, Mac)>,
    /// The process's device thread.
    pub io: Arc<IoThread>,
    /// The guest.
    pub owner: Owner,
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("guest", &self.control.id)
            .finish()
    }
}

/// One device of one guest.
#[derive(Debug)]
pub struct Slot {
    /// The device thread's name for it.
    token: u64,
    index: u32,
    backend: Backend,
    notify: EventFd,
    owner: Owner,
    /// In the device thread's run queue.
    queued: AtomicBool,
    /// The guest's device gate, held for reading during a turn (see
    /// [`crate::mmu::Translations::device_gate`]).
    gate: Arc<RwLock<()>>,
    /// The flush threads, for a disk's flushes.
    flushers: Arc<flush::Flushers>,
    state: Mutex<SlotState>,
}

/// What a device is.
#[derive(Debug)]
enum Backend {
    /// A disk (one queue).
    Disk(Arc<Disk>),
    /// A port on a virtual LAN (receive and transmit queues).
    Net(net::Port),
}

impl Backend {
    fn queues(&self) -> u32 {
        match self {
            Backend::Disk(_) => 1,
            Backend::Net(_) => 2,
        }
    }
}

#[derive(Debug)]
struct SlotState {
    /// The device's queues, once set up (a disk uses the first).
    rings: [Option<Ring>; 2],
    /// Detached, or the guest was stopped: serve nothing more.
    gone: bool,
    storm: Bucket,
    /// Network: frames waiting for receive buffers, each with its receive
    /// header.
    backlog: VecDeque<Vec<u8>>,
    /// Network: frames sent in the current window.
    sent: RateWindow,
    /// Disk: flushes handed to the flush threads.
    flushes: flush::SlotFlushes,
    /// Network: frames sent in the current window that the LAN floods
    /// (group addresses, unknown ones).
    broadcasts: RateWindow,
}

impl SlotState {
    /// Serves nothing more.
    fn retire(&mut self) {
        self.gone = true;
        self.rings = [None, None];
        self.backlog.clear();
        self.flushes = flush::SlotFlushes::default();
    }
}

/// What one turn did.
#[derive(Debug, Default)]
struct TurnDone {
    /// Chains used.
    used: u64,
    /// Chains taken but left to complete later (flushes).
    deferred: u64,
    /// More chains are waiting.
    more: bool,
    /// The events to raise.
    raise: u64,
    /// Network: frames to forward (with their receive headers).
    outbox: Vec<Vec<u8>>,
}

/// Whether a slot has more work after its turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// It stopped for its budget with chains left.
    More,
    /// Its ring is empty (or gone).
    Done,
}

impl Slot {
    /// The fd the device thread waits on.
    pub fn eventfd(&self) -> &EventFd {
        &self.notify
    }

    /// Marks the slot queued; false if it already was.
    pub fn enqueue(&self) -> bool {
        !self.queued.swap(true, Ordering::AcqRel)
    }

    /// Serves one turn (up to [`TURN_CHAINS`] chains or [`TURN_COST`]).
    /// Raises the queue's event if the guest asked for it; stops the guest
    /// if its ring is broken. Called by the device thread only.
    pub fn serve(self: &Arc<Self>) -> Turn {
        self.queued.store(false, Ordering::Release);
        let notifications = self.notify.read().unwrap_or(0);
        self.owner.control.stats.count_notifications(notifications);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.gone {
            return Turn::Done;
        }
        let outcome = self.guarded(&mut state, |state| match &self.backend {
            Backend::Disk(disk) => self.disk_turn(disk, state),
            Backend::Net(port) => self.net_turn(port, state),
        });
        let done = match outcome {
            Ok(done) => done,
            Err(error) => {
                self.fail(state, error.to_string());
                return Turn::Done;
            }
        };
        let used = done.used;
        let idle = used == 0 && done.deferred == 0;
        if idle && notifications > 0 && !state.storm.allow_n(notifications, now_ns()) {
            self.fail(
                state,
                format!(
                    "notification storm: notifications with nothing to do outran {STORM_RATE} a second by more than {STORM_BURST}"
                ),
            );
            return Turn::Done;
        }
        drop(state);
        self.owner.control.stats.count_device_requests(used);
        self.raise(done.raise);
        if let Backend::Net(port) = &self.backend {
            self.forward(port, done.outbox);
        }
        if done.more { Turn::More } else { Turn::Done }
    }

    fn raise(&self, events: u64) {
        if events != 0 {
            self.owner.sched.raise_events(&self.owner.control, events);
        }
    }

    /// One turn of a disk: completes the flushes the flush threads
    /// synced, then serves its queue, handing new flushes to them.
    fn disk_turn(
        self: &Arc<Self>,
        disk: &Disk,
        state: &mut SlotState,
    ) -> Result<TurnDone, RingError> {
        let SlotState { rings, flushes, .. } = state;
        let Some(ring) = rings[0].as_mut() else {
            return Ok(TurnDone::default());
        };
        let mut done = TurnDone::default();
        for (head, flush, status) in std::mem::take(&mut flushes.done) {
            let served = flush
                .finish(ring.mem(), status)
                .ok_or(RingError::Unanswerable(head))?;
            ring.complete(head, served.written)?;
            done.used += 1;
        }
        let mut cost = 0;
        let spent = |used: u64, cost: u64| used as usize >= TURN_CHAINS || cost >= TURN_COST;
        loop {
            while let Some(chain) = ring.pop()? {
                let started = disk
                    .start(ring.mem(), &chain)
                    .ok_or(RingError::Unanswerable(chain.head))?;
                let served = match started {
                    Started::Served(served) => served,
                    Started::Flush(flush) => {
                        flushes.waiting.push((chain.head, flush));
                        if !flushes.queued {
                            flushes.queued = true;
                            self.flushers.submit(self);
                        }
                        done.deferred += 1;
                        cost += FLUSH_COST;
                        continue;
                    }
                };
                ring.complete(chain.head, served.written)?;
                done.used += 1;
                cost += served.cost;
                if spent(done.used, cost) {
                    break;
                }
            }
            if spent(done.used, cost) {
                done.more = true;
                break;
            }
            if !ring.rearm()? {
                break;
            }
        }
        if done.used > 0 && ring.wants_event()? {
            done.raise = 1 << ring.event;
        }
        Ok(done)
    }

    /// One turn of a network device: waiting frames into its receive
    /// buffers, then up to [`TURN_CHAINS`] frames off its transmit queue
    /// (checked and copied out, to forward once the slot is unlocked).
    fn net_turn(&self, port: &net::Port, state: &mut SlotState) -> Result<TurnDone, RingError> {
        let mut done = TurnDone::default();
        let (received, missed, raise) = net::fill_rx(state)?;
        self.count_received(received, missed);
        done.used += received + missed;
        if raise {
            done.raise |= state.rings[NET_RX as usize]
                .as_ref()
                .map_or(0, |r| 1 << r.event);
        }
        let SlotState { rings, sent, .. } = state;
        let Some(tx) = rings[NET_TX as usize].as_mut() else {
            return Ok(done);
        };
        let mut dropped = 0;
        let mut taken = 0;
        loop {
            while let Some(chain) = tx.pop()? {
                let frame = net::read_frame(tx.mem(), &chain, port.mac);
                tx.complete(chain.head, 0)?;
                taken += 1;
                let now = now_ns();
                match frame {
                    Ok(frame) if sent.allow(now) => done.outbox.push(frame),
                    _ => dropped += 1,
                }
                if taken >= TURN_CHAINS {
                    break;
                }
            }
            if taken >= TURN_CHAINS {
                done.more = true;
                break;
            }
            if !tx.rearm()? {
                break;
            }
        }
        done.used += taken as u64;
        if taken > 0 && tx.wants_event()? {
            done.raise |= 1 << tx.event;
        }
        self.owner
            .control
            .stats
            .count_frames(FrameCount::Dropped, dropped);
        Ok(done)
    }

    fn count_received(&self, received: u64, missed: u64) {
        let stats = &self.owner.control.stats;
        stats.count_frames(FrameCount::Received, received);
        stats.count_frames(FrameCount::Missed, missed);
    }

    /// Forwards the frames of a turn over the port's LAN, those it would
    /// flood within the guest's broadcast share.
    fn forward(&self, port: &net::Port, outbox: Vec<Vec<u8>>) {
        let (mut sent, mut dropped) = (0, 0);
        // The LAN asks with its table locked, which comes before a slot's
        // lock (as when it hands a frame to a receiving slot).
        let mut may_flood = || crate::lock(&self.state).broadcasts.allow(now_ns());
        for frame in outbox {
            if port.lan.forward_within(self, frame, &mut may_flood) {
                sent += 1;
            } else {
                dropped += 1;
            }
        }
        let stats = &self.owner.control.stats;
        stats.count_frames(FrameCount::Sent, sent);
        stats.count_frames(FrameCount::Dropped, dropped);
    }
}

impl net::Endpoint for Slot {
    /// A frame from the LAN: into a receive buffer, or the backlog until
    /// there is one.
    fn receive(&self, frame: Vec<u8>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.gone || state.rings[NET_RX as usize].is_none() {
            drop(state);
            self.count_received(0, 1);
            return true;
        }
        if state.backlog.len() >= net::BACKLOG_MAX {
            // Full: the frame takes the place of the newest of the sender
            // with the most frames waiting, if that is another; one frame
            // is missed either way.
            if net::make_room(&mut state.backlog, &frame) {
                state.backlog.push_back(frame);
            }
            drop(state);
            self.count_received(0, 1);
            return true;
        }
        state.backlog.push_back(frame);
        match self.guarded(&mut state, net::fill_rx) {
            Ok((received, missed, raise)) => {
                let event = state.rings[NET_RX as usize].as_ref().map_or(0, |r| r.event);
                drop(state);
                self.count_received(received, missed);
                self.owner
                    .control
                    .stats
                    .count_device_requests(received + missed);
                if raise {
                    self.raise(1 << event);
                }
            }
            Err(error) => self.fail(state, error.to_string()),
        }
        true
    }
}

impl Slot {
    /// Does `work` on the slot's state, which may write guest memory: with
    /// the guest's device gate held (the MMU never has the guest's RAM
    /// read-only meanwhile) and a host panic caught, so that a host bug on
    /// a guest's request stops that guest, not the thread serving every
    /// guest's devices. Every device write goes through here.
    fn guarded<T>(
        &self,
        state: &mut SlotState,
        work: impl FnOnce(&mut SlotState) -> Result<T, RingError>,
    ) -> Result<T, RingError> {
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(state)))
            .unwrap_or(Err(RingError::HostPanic))
    }

    /// Syncs the disk for the flushes waiting (on a flush thread),
    /// leaving them for the device thread to complete; queues the next
    /// sync if more arrived meanwhile.
    fn sync_flushes(self: &Arc<Self>) {
        let Backend::Disk(disk) = &self.backend else {
            return;
        };
        {
            let mut state = crate::lock(&self.state);
            let flushes = &mut state.flushes;
            flushes.syncing = std::mem::take(&mut flushes.waiting);
        }
        let status = disk.sync();
        let mut state = crate::lock(&self.state);
        if state.gone {
            return;
        }
        let flushes = &mut state.flushes;
        let synced = std::mem::take(&mut flushes.syncing);
        flushes.done.extend(
            synced
                .into_iter()
                .map(|(head, flush)| (head, flush, status)),
        );
        flushes.queued = !flushes.waiting.is_empty();
        if flushes.queued {
            self.flushers.submit(self);
        }
    }

    /// Serves nothing more and stops the guest for `reason`.
    fn fail(&self, mut state: std::sync::MutexGuard<'_, SlotState>, reason: String) {
        state.retire();
        drop(state);
        self.stop(reason);
    }

    fn stop(&self, reason: String) {
        tracing::debug!(guest = self.owner.control.id, device = self.index, %reason, "device stops its guest");
        self.owner.control.set_stop_reason(Crash::Device {
            device: self.index,
            reason,
        });
        self.owner.sched.kill(&self.owner.control);
    }

    /// Stops serving: the guest's RAM is about to go.
    fn detach(&self) {
        if let Backend::Net(port) = &self.backend {
            port.lan.detach(port.mac, self);
        }
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retire();
        // No turn runs now (a turn holds the state) and none will do I/O
        // again, but the device thread may hold the slot a little longer:
        // free a writable disk for its next guest now, not then.
        if let Backend::Disk(disk) = &self.backend {
            disk.release();
        }
    }
}

/// Nanoseconds on a process-wide monotonic clock (for rate windows).
fn now_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// One guest's devices. The guest calls [`Devices::detach`] before its
/// RAM is unmapped.
#[derive(Debug, Default)]
pub struct Devices {
    slots: Vec<Arc<Slot>>,
    io: Option<Arc<IoThread>>,
    gate: Arc<RwLock<()>>,
}

impl Devices {
    /// Gives the guest of `vm` its devices: one notification eventfd each,
    /// watched by the device thread.
    pub fn attach(parts: DeviceParts, vm: &Vm) -> Result<Self, DeviceError> {
        let mut devices = Self {
            slots: Vec::with_capacity(parts.disks.len() + 1),
            io: Some(Arc::clone(&parts.io)),
            gate: Arc::default(),
        };
        let backends = parts.disks.into_iter().map(Backend::Disk).chain(
            parts
                .net
                .map(|(lan, mac)| Backend::Net(net::Port { mac, lan })),
        );
        for (index, backend) in backends.enumerate() {
            let index = index as u32;
            let notify = EventFd::new(EFD_NONBLOCK)?;
            vm.notify_on(&notify, NOTIFY_PORT, index)?;
            let slot = Arc::new(Slot {
                token: parts.io.token(),
                index,
                backend,
                notify,
                owner: parts.owner.clone(),
                queued: AtomicBool::new(false),
                gate: Arc::clone(&devices.gate),
                flushers: parts.io.flushers(),
                state: Mutex::new(SlotState {
                    rings: [None, None],
                    gone: false,
                    storm: Bucket::new(STORM_RATE, STORM_BURST),
                    backlog: VecDeque::new(),
                    flushes: flush::SlotFlushes::default(),
                    sent: RateWindow::per(net::FRAME_LIMIT, net::FRAME_WINDOW.as_nanos() as u64),
                    broadcasts: RateWindow::per(
                        net::BROADCAST_LIMIT,
                        net::FRAME_WINDOW.as_nanos() as u64,
                    ),
                }),
            });
            parts.io.watch(&slot)?;
            devices.slots.push(Arc::clone(&slot));
            if let Backend::Net(port) = &slot.backend
                && !port.lan.attach(port.mac, Arc::downgrade(&slot) as _)
            {
                return Err(DeviceError::AddressTaken(port.mac));
            }
        }
        Ok(devices)
    }

    /// The gate the MMU takes for writing before it makes guest RAM
    /// read-only for a moment; none without devices.
    pub fn gate(&self) -> Option<&RwLock<()>> {
        (!self.slots.is_empty()).then_some(&*self.gate)
    }

    /// `device_info` for device `index`.
    pub fn info(&self, index: u32) -> Option<DeviceInfo> {
        let slot = self.slots.get(index as usize)?;
        let queues = slot.backend.queues();
        Some(match &slot.backend {
            Backend::Disk(disk) => DeviceInfo {
                index,
                kind: KIND_BLOCK,
                flags: if disk.read_only() { FLAG_READ_ONLY } else { 0 },
                queue_max: QUEUE_SIZE_MAX,
                capacity: disk.sectors(),
                request_max: REQUEST_MAX,
                queues,
            },
            Backend::Net(port) => DeviceInfo {
                index,
                kind: KIND_NET,
                flags: 0,
                queue_max: QUEUE_SIZE_MAX,
                capacity: mac_to_capacity(port.mac),
                request_max: FRAME_MAX,
                queues,
            },
        })
    }

    /// `queue_setup`: starts serving the device's queue.
    pub fn setup(&self, ram: &GuestRam, setup: &QueueSetup) -> Result<(), HypercallError> {
        let slot = self
            .slots
            .get(setup.device as usize)
            .ok_or(HypercallError::Invalid)?;
        if setup.queue >= slot.backend.queues() {
            return Err(HypercallError::Invalid);
        }
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        let queue = setup.queue as usize;
        if state.rings[queue].is_some() || state.gone {
            return Err(HypercallError::Invalid);
        }
        state.rings[queue] = Some(Ring::new(ram, setup)?);
        Ok(())
    }

    /// Stops every device touching the guest's RAM and unwatches its
    /// eventfds. Waits for a turn the device thread is in the middle of.
    pub fn detach(&mut self) {
        if let Some(io) = self.io.take() {
            for slot in self.slots.drain(..) {
                io.unwatch(&slot);
                slot.detach();
            }
        }
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.detach();
    }
}
