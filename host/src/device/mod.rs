//! Devices: virtio split virtqueues in guest memory, served by a device
//! thread of the host process, with notifications that stay in the kernel
//! on the guest's side (see [`shoal_abi::device`] for the guest's view).
//!
//! Each device of a guest is a [`Slot`]: its disk, an eventfd that KVM
//! signals when the guest writes the device's index to the notification
//! port (an ioeventfd: the vCPU's exit never leaves the kernel), and, once
//! the guest called `queue_setup`, its [`Ring`]. The device thread
//! ([`IoThread`]) waits on every slot's eventfd, serves a slot's ring a
//! bounded turn at a time so that no guest holds it up for the others, and
//! raises the queue's event when the guest asked to hear of used buffers.
//!
//! A ring the guest broke stops the guest with the reason; so does a storm
//! of notifications with nothing to do.

mod disk;
mod io;
pub mod ring;

pub use disk::{Disk, DiskError, DiskSpec, Disks, FLUSH_COST, Served};
pub use io::IoThread;

use crate::control::GuestControl;
use crate::end::Crash;
use crate::kvm::Vm;
use crate::kvm::memory::GuestRam;
use crate::limits::RateWindow;
use crate::sched::SchedulerRef;
use ring::{Ring, RingError};
use shoal_abi::HypercallError;
use shoal_abi::device::{FLAG_READ_ONLY, KIND_BLOCK, NOTIFY_PORT, QUEUE_SIZE_MAX, REQUEST_MAX};
use shoal_abi::hypercall::{DeviceInfo, QueueSetup};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Chains one slot serves in a turn before the device thread moves on.
pub const TURN_CHAINS: usize = 32;
/// Cost (data bytes; a flush counts as [`FLUSH_COST`], 1 MiB) after which a
/// turn ends early.
pub const TURN_COST: u64 = 4 << 20;

/// Notifications that find nothing to do, in one [`STORM_WINDOW`], before
/// the guest is stopped for a notification storm (20,000 a second, counted
/// over a tenth of a second so that a storm ends soon). A guest that
/// follows the event index sends a needless one only when it races the
/// host's re-arming.
pub const STORM_LIMIT: u64 = 2_000;

/// The window [`STORM_LIMIT`] counts over: 100 ms.
pub const STORM_WINDOW: Duration = Duration::from_millis(100);

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
    disk: Arc<Disk>,
    notify: EventFd,
    owner: Owner,
    /// In the device thread's run queue.
    queued: AtomicBool,
    /// The guest's device gate, held for reading during a turn (see
    /// [`crate::mmu::Translations::device_gate`]).
    gate: Arc<RwLock<()>>,
    state: Mutex<SlotState>,
}

#[derive(Debug)]
struct SlotState {
    ring: Option<Ring>,
    /// Detached, or the guest was stopped: serve nothing more.
    gone: bool,
    storm: RateWindow,
}

impl SlotState {
    /// Serves nothing more.
    fn retire(&mut self) {
        self.gone = true;
        self.ring = None;
    }
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
    pub fn serve(&self) -> Turn {
        self.queued.store(false, Ordering::Release);
        let notifications = self.notify.read().unwrap_or(0);
        self.owner.control.stats.count_notifications(notifications);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.gone {
            return Turn::Done;
        }
        let outcome = match state.ring.as_mut() {
            Some(ring) => {
                let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
                // A host bug on a guest's request stops that guest, not
                // the thread that serves every guest's devices.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.turn(ring)))
                    .unwrap_or(Err(RingError::HostPanic))
            }
            None => Ok((0, Turn::Done, false)),
        };
        let (used, turn, raise) = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                state.retire();
                drop(state);
                self.stop(error.to_string());
                return Turn::Done;
            }
        };
        if used == 0 && notifications > 0 && !state.storm.allow_n(notifications, now_ns()) {
            state.retire();
            drop(state);
            self.stop(format!(
                "notification storm: more than {STORM_LIMIT} notifications with nothing to do in {} ms",
                    STORM_WINDOW.as_millis()
            ));
            return Turn::Done;
        }
        let event = state.ring.as_ref().map_or(0, |ring| ring.event);
        drop(state);
        self.owner.control.stats.count_device_requests(used);
        if raise {
            self.owner
                .sched
                .raise_events(&self.owner.control, 1 << event);
        }
        turn
    }

    /// One turn on `ring`: chains used, whether more are left, whether the
    /// guest wants its event.
    fn turn(&self, ring: &mut Ring) -> Result<(u64, Turn, bool), RingError> {
        let mut used = 0;
        let mut cost = 0;
        let spent = |used: u64, cost: u64| used as usize >= TURN_CHAINS || cost >= TURN_COST;
        let turn = loop {
            while let Some(chain) = ring.pop()? {
                let served = self
                    .disk
                    .serve(ring.mem(), &chain)
                    .ok_or(RingError::Unanswerable(chain.head))?;
                ring.complete(chain.head, served.written)?;
                used += 1;
                cost += served.cost;
                if spent(used, cost) {
                    break;
                }
            }
            if spent(used, cost) {
                break Turn::More;
            }
            if !ring.rearm()? {
                break Turn::Done;
            }
        };
        let raise = used > 0 && ring.wants_event()?;
        Ok((used, turn, raise))
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
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retire();
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
            slots: Vec::with_capacity(parts.disks.len()),
            io: Some(Arc::clone(&parts.io)),
            gate: Arc::default(),
        };
        for (index, disk) in parts.disks.into_iter().enumerate() {
            let index = index as u32;
            let notify = EventFd::new(EFD_NONBLOCK)?;
            vm.notify_on(&notify, NOTIFY_PORT, index)?;
            let slot = Arc::new(Slot {
                token: parts.io.token(),
                index,
                disk,
                notify,
                owner: parts.owner.clone(),
                queued: AtomicBool::new(false),
                gate: Arc::clone(&devices.gate),
                state: Mutex::new(SlotState {
                    ring: None,
                    gone: false,
                    storm: RateWindow::per(STORM_LIMIT, STORM_WINDOW.as_nanos() as u64),
                }),
            });
            parts.io.watch(&slot)?;
            devices.slots.push(slot);
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
        Some(DeviceInfo {
            index,
            kind: KIND_BLOCK,
            flags: if slot.disk.read_only() {
                FLAG_READ_ONLY
            } else {
                0
            },
            queue_max: QUEUE_SIZE_MAX,
            capacity: slot.disk.sectors(),
            request_max: REQUEST_MAX,
            _pad: 0,
        })
    }

    /// `queue_setup`: starts serving the device's queue.
    pub fn setup(&self, ram: &GuestRam, setup: &QueueSetup) -> Result<(), HypercallError> {
        let slot = self
            .slots
            .get(setup.device as usize)
            .ok_or(HypercallError::Invalid)?;
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.ring.is_some() || state.gone {
            return Err(HypercallError::Invalid);
        }
        state.ring = Some(Ring::new(ram, setup)?);
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
