//! The in-process engine behind a [`crate::Host`]: one `/dev/kvm`, a pool
//! of VMs made ahead of demand, image templates and a scheduler, all in
//! this process. A sharded host runs one of these in each shard process.

use crate::console::Console;
use crate::control::{EndHook, GuestControl};
use crate::device::{DeviceError, DeviceParts, Disks, IoThread, Lans, Owner};
use crate::guest::{Guest, GuestParts, SpawnError};
use crate::host::{GuestConfig, HostConfig, HostError};
use crate::hypercall::custom::CustomCalls;
use crate::kvm::GuestRam;
use crate::kvm::vm::Kvm;
use crate::limits::CpuShare;
use crate::loader::Image;
use crate::pool::{Pool, PoolStatus, Templates, Toolstack};
use crate::sched::{Scheduler, SchedulerRef, Task};
use crate::stats::GuestStats;
use shoal_abi::layout::DEFAULT_MEMORY;
use std::sync::{Arc, Mutex, Weak};

/// Guests of this process.
#[derive(Debug)]
pub(crate) struct Local {
    toolstack: Arc<Toolstack>,
    pool: Arc<Pool>,
    templates: Templates,
    sched: Scheduler,
    /// Disks open in this process (read-only ones shared).
    disks: Disks,
    /// Virtual LANs with a guest of this process on them.
    lans: Lans,
    custom: Arc<CustomCalls>,
    /// The device thread, started with the first guest that has a device.
    io: Mutex<Option<Arc<IoThread>>>,
    /// Every guest not yet known to be over, for `drop`; ended ones are
    /// swept out only when the list would have to grow.
    live: Mutex<Vec<Weak<GuestControl>>>,
}

impl Local {
    /// Opens `/dev/kvm`, starts the pool filler and the scheduler. Raises
    /// the process's soft open-file limit to its hard limit: every guest
    /// holds a VM and a vCPU file descriptor.
    pub(crate) fn start(config: &HostConfig) -> Result<Self, HostError> {
        raise_fd_limit();
        let toolstack = Arc::new(Toolstack::new(Kvm::open()?));
        let pool = Pool::start(&toolstack, config.pool, DEFAULT_MEMORY)
            .map(Arc::new)
            .map_err(HostError::Threads)?;
        let sched = Scheduler::start(config.workers, config.slice).map_err(HostError::Threads)?;
        Ok(Self {
            pool,
            toolstack,
            templates: Templates::default(),
            sched,
            disks: Disks::default(),
            lans: Lans::default(),
            custom: Arc::default(),
            io: Mutex::default(),
            live: Mutex::default(),
        })
    }

    pub(crate) fn workers(&self) -> usize {
        self.sched.workers()
    }

    /// This host's custom hypercalls.
    pub(crate) fn custom(&self) -> &CustomCalls {
        &self.custom
    }

    /// This process's virtual LANs.
    pub(crate) fn lans(&self) -> &Lans {
        &self.lans
    }

    pub(crate) fn pool(&self) -> PoolStatus {
        self.pool.status()
    }

    /// The pool itself, to size it to the room left ([`Pool::set_room`]).
    pub(crate) fn pool_handle(&self) -> Arc<Pool> {
        Arc::clone(&self.pool)
    }

    pub(crate) fn scheduler(&self) -> SchedulerRef {
        self.sched.handle()
    }

    /// Creates guest `id` from `image` and makes it runnable. With
    /// `relay_end`, the guest is relayed to a supervisor that keeps its
    /// console: the console only streams to its sink, and the hook runs
    /// once the guest ended and everything it held is freed.
    pub(crate) fn spawn(
        &self,
        id: u64,
        image: &Image,
        mut config: GuestConfig,
        relay_end: Option<EndHook>,
    ) -> Result<(Arc<GuestControl>, SchedulerRef), SpawnError> {
        let console = Arc::new(match (&relay_end, config.console_sink.take()) {
            (Some(_), Some(sink)) => Console::streaming(id, config.console_limit, sink),
            (_, sink) => Console::new(id, config.console_limit, sink),
        });
        let stats = Arc::new(GuestStats::default());
        GuestRam::check_size(config.mem_size)?;
        let template = self.templates.get(image, config.mem_size)?;
        let shell = match self.pool.take(&template) {
            Some(shell) => shell,
            None => self.toolstack.shell(config.mem_size)?,
        };
        let control = Arc::new(GuestControl::new(
            id,
            Arc::clone(&console),
            Arc::clone(&stats),
            config.limits,
        ));
        let devices = self.devices(&config, &control)?;
        let guest = Guest::create(
            shell,
            self.toolstack.scale(),
            GuestParts {
                id,
                template: &template,
                args: &config.args,
                features: shoal_abi::features::ALL_V1
                    | if config.console_ring {
                        shoal_abi::features::CONSOLE_RING
                    } else {
                        0
                    },
                console: Arc::clone(&console),
                stats: Arc::clone(&stats),
                exit_rate: config.limits.exit_rate,
                trapped_page_tables: config.trapped_page_tables,
                forget: config.forget,
                events: Arc::clone(&control.events),
                devices,
                custom: Arc::clone(&self.custom),
                observe: &config.observe,
                gdb: config.gdb.take(),
                recycler: self.pool.recycler(),
            },
        )?;
        if let Some(hook) = relay_end {
            control.set_on_end(hook);
        }
        {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            if live.len() == live.capacity() {
                live.retain(|control| control.strong_count() > 0);
            }
            live.push(Arc::downgrade(&control));
        }
        self.sched.submit(Task {
            guest: Box::new(guest),
            share: config.limits.cpu_share.map(CpuShare::new),
            control: Arc::clone(&control),
            preempted_at: None,
        });
        Ok((control, self.sched.handle()))
    }

    /// Opens the disks of a guest and finds its LAN, with the device
    /// thread to serve them.
    fn devices(
        &self,
        config: &GuestConfig,
        control: &Arc<GuestControl>,
    ) -> Result<Option<DeviceParts>, SpawnError> {
        if config.disks.is_empty() && config.net.is_none() {
            return Ok(None);
        }
        let disks = config
            .disks
            .iter()
            .map(|spec| self.disks.open(spec))
            .collect::<Result<Vec<_>, _>>()
            .map_err(DeviceError::from)?;
        let io = {
            let mut io = self.io.lock().unwrap_or_else(|e| e.into_inner());
            match io.as_ref() {
                Some(io) => Arc::clone(io),
                None => Arc::clone(io.insert(IoThread::start().map_err(DeviceError::from)?)),
            }
        };
        let net = config.net.as_ref().map(|name| {
            (
                self.lans.join(name),
                shoal_abi::device::guest_mac(control.id),
            )
        });
        Ok(Some(DeviceParts {
            disks,
            net,
            io,
            owner: Owner {
                control: Arc::clone(control),
                sched: self.sched.handle(),
            },
        }))
    }
}

fn raise_fd_limit() {
    // SAFETY: `getrlimit`/`setrlimit` only read and write the struct passed.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

impl Drop for Local {
    /// Kills the guests still running and waits for them.
    fn drop(&mut self) {
        let live: Vec<_> = self
            .live
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .filter_map(|control| control.upgrade())
            .collect();
        let handle = self.sched.handle();
        for control in &live {
            handle.kill(control);
        }
        for control in &live {
            control.wait();
        }
        self.sched.stop();
        if let Some(io) = self.io.get_mut().unwrap_or_else(|e| e.into_inner()) {
            io.stop();
        }
    }
}
