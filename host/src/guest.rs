//! One guest: its VM, vCPU, memory and services, and the loop that runs it
//! from exit to exit.

use crate::boot::{BootError, BootParams, Template, descriptors, paging};
use crate::clock::{GuestClock, TscScale};
use crate::console::{Console, RingReader};
use crate::device::{DeviceParts, Devices};
use crate::end::{Crash, GuestEnd};
use crate::event::Events;
use crate::hypercall::custom::CustomCalls;
use crate::hypercall::{self, Context, Flow};
use crate::kvm::memory::{GuestRam, MemoryError};
use crate::kvm::vcpu::{Exit, VcpuError};
use crate::kvm::vm::VmError;
use crate::kvm::{Vcpu, Vm};
use crate::limits::{Limit, RateWindow};
use crate::mmu::{Forget, GuestMmu, TABLES_ALIAS, TABLES_LEN, Translations};
use crate::observe::{Observe, Observer};
use crate::pool::{Recycler, Shadow, Shell};
use crate::stats::{ExitReason, GuestStats};
use crate::trap::{self, Traps};
use kvm_bindings::kvm_regs;
use shoal_abi::layout::{
    EXCEPTION_PORT_BASE, EXCEPTION_VECTORS, HYPERCALL_PORT, NULL_EXIT_PORT, PAGE_TABLE_AREA_START,
};
use std::cell::{Cell, RefCell};
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use zerocopy::IntoBytes;

mod debug;

/// Why a guest could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The image does not fit or the arguments are bad.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// KVM refused the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The trap-and-emulate window could not be opened.
    #[error(transparent)]
    Mmu(#[from] crate::mmu::MmuFailure),
    /// KVM refused the vCPU or its state.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A device could not be attached (a disk that cannot be opened or
    /// is in use).
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// A VM could not be reset for another guest (the state of a new
    /// vCPU is not known yet); it is destroyed instead.
    #[error("cannot reset a VM for another guest before a new one was made")]
    Reset,
    /// The trace file ([`crate::Observe::trace_file`]) could not be
    /// opened.
    #[error("cannot open the hypercall trace file")]
    Trace(#[source] std::io::Error),
    /// The runner thread could not be started.
    #[error("cannot start the guest's thread")]
    Thread(#[source] std::io::Error),
    /// The shard process meant to run the guest failed (see
    /// [`crate::HostConfig::shard_size`]); its reason, as text.
    #[error("in a shard process: {0}")]
    Shard(String),
}

/// What a run of the guest stopped at.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The guest blocked until this deadline (guest monotonic ns).
    Blocked(u64),
    /// The scheduler asked the guest to give up its worker.
    Preempted,
    /// The guest gave up its worker (`yield`).
    Yielded,
    /// The guest is over.
    Ended(GuestEnd),
}

/// A guest ready to run. Its vCPU, VM and RAM go, when it is dropped, to
/// its pool's [`Recycler`] or are dropped in that order.
#[derive(Debug)]
pub struct Guest {
    id: u64,
    vcpu: ManuallyDrop<Vcpu>,
    vm: ManuallyDrop<Vm>,
    ram: ManuallyDrop<GuestRam>,
    /// Where its VM goes when it is dropped, if it can be reused.
    recycler: Option<Recycler>,
    clock: GuestClock,
    features: u64,
    console: Arc<Console>,
    /// The host's end of the console ring, if it is offered.
    console_ring: Option<RingReader>,
    stats: Arc<GuestStats>,
    exit_rate: Option<RateWindow>,
    mmu: RefCell<GuestMmu>,
    traps: Cell<Traps>,
    events: Arc<Events>,
    devices: Devices,
    custom: Arc<CustomCalls>,
    /// Watches its hypercalls, if asked to.
    observer: Option<Box<Observer>>,
    /// Waits for a debugger before the first instruction.
    gdb: Option<std::net::TcpListener>,
    /// The `block` call the guest is parked in, whose result is written
    /// when it runs again.
    blocked_at: Option<u64>,
}

/// Everything needed to create a guest.
pub struct GuestParts<'a> {
    /// Guest id.
    pub id: u64,
    /// The image laid out in the guest's memory size.
    pub template: &'a Template,
    /// Arguments.
    pub args: &'a [String],
    /// Feature bits offered.
    pub features: u64,
    /// The console.
    pub console: Arc<Console>,
    /// The counters.
    pub stats: Arc<GuestStats>,
    /// Most exits per second, if limited.
    pub exit_rate: Option<u64>,
    /// Open the trap-and-emulate page-table window (an experiment).
    pub trapped_page_tables: bool,
    /// How stale translations are dropped.
    pub forget: Forget,
    /// Its events (shared with its control block).
    pub events: Arc<Events>,
    /// Its devices, if it has any.
    pub devices: Option<DeviceParts>,
    /// The host's custom hypercalls.
    pub custom: Arc<CustomCalls>,
    /// What to record about its hypercalls.
    pub observe: &'a Observe,
    /// Serve a debugger on this listener before the first instruction.
    pub gdb: Option<std::net::TcpListener>,
    /// Where its VM goes when it is over.
    pub recycler: Option<Recycler>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(observer) = &self.observer {
            observer.take_guest_timing(&self.ram);
        }
        self.devices.detach();
        self.events.detach();
        self.stats.release_memory(&self.ram);
        let shadow = match self.ram.overlay_key() {
            Some(key) if self.mmu.get_mut().is_template() => Shadow::Template(key),
            _ => Shadow::Stale,
        };
        // SAFETY: each is taken once, here, and never used again: the
        // guest is being dropped, and no other field refers to them.
        let shell = unsafe {
            Shell {
                vcpu: ManuallyDrop::take(&mut self.vcpu),
                vm: ManuallyDrop::take(&mut self.vm),
                ram: ManuallyDrop::take(&mut self.ram),
                tsc_offset: self.clock.tsc_offset(),
                shadow,
            }
        };
        match &self.recycler {
            Some(recycler) => recycler.give(shell),
            None => drop(shell),
        }
    }
}

impl Guest {
    /// Loads the template into `shell` (a new or reset VM with RAM of the
    /// template's size) and sets the vCPU at the entry point.
    pub fn create(
        shell: Shell,
        scale: TscScale,
        parts: GuestParts<'_>,
    ) -> Result<Self, SpawnError> {
        let Shell {
            mut vcpu,
            vm,
            mut ram,
            tsc_offset,
            shadow,
        } = shell;
        let template = parts.template;
        let mut mmu = GuestMmu::new(
            Arc::clone(template.tables()),
            template.overlay_len(),
            parts.forget,
        );
        let observer = Observer::new(
            parts.id,
            parts.observe,
            Some(parts.stats.call_stats()),
            scale,
        )
        .map_err(SpawnError::Trace)?
        .map(Box::new);
        let mut features = parts.features | observer.as_ref().map_or(0, |o| o.features());
        if parts.trapped_page_tables {
            vm.alias_read_only(&ram, PAGE_TABLE_AREA_START, TABLES_LEN, TABLES_ALIAS)?;
            features |= shoal_abi::features::TRAPPED_PAGE_TABLES;
        }
        template.load(
            &mut ram,
            &BootParams {
                guest_id: parts.id,
                features,
                args: parts.args,
            },
        )?;
        // KVM may still shadow the last guest's tables: drop them unless
        // this guest starts with the very same ones.
        if shadow != Shadow::Empty
            && (shadow != Shadow::Template(template.key()) || parts.trapped_page_tables)
        {
            vm.forget_all_translations(&ram)?;
            parts.stats.count_slot_move();
        }
        if parts.trapped_page_tables {
            mmu.active(ram.size()).open_window(&ram)?;
        }
        // A debugger reads the registers before the first entry.
        vcpu.setup(template.cpu(), parts.gdb.is_none())?;
        let devices = match parts.devices {
            Some(devices) => Devices::attach(devices, &vm)?,
            None => Devices::default(),
        };
        let clock = GuestClock::start(scale, tsc_offset);
        clock.publish(&ram)?;
        parts.stats.watch_memory(&ram);
        parts.events.attach(&ram);
        tracing::debug!(
            id = parts.id,
            entry = template.cpu().rip,
            table_frames = template.table_frames(),
            "guest created"
        );
        Ok(Self {
            id: parts.id,
            vcpu: ManuallyDrop::new(vcpu),
            vm: ManuallyDrop::new(vm),
            ram: ManuallyDrop::new(ram),
            recycler: parts.recycler,
            clock,
            features,
            console: parts.console,
            console_ring: (features & shoal_abi::features::CONSOLE_RING != 0)
                .then(RingReader::default),
            stats: parts.stats,
            exit_rate: parts.exit_rate.map(RateWindow::new),
            mmu: RefCell::new(mmu),
            traps: Cell::default(),
            events: parts.events,
            devices,
            custom: parts.custom,
            observer,
            gdb: parts.gdb,
            blocked_at: None,
        })
    }

    /// The guest's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The guest's clock.
    pub fn clock(&self) -> &GuestClock {
        &self.clock
    }

    /// The guest's events.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Makes kicks sent to the current thread interrupt this guest until
    /// the guard is dropped.
    pub fn arm_kick(&mut self) -> crate::kvm::KickGuard {
        self.vcpu.arm_kick()
    }

    /// Runs the guest until it blocks, yields or ends, or until `preempt`
    /// is set. Checks `killed` before every entry; a kick makes the current
    /// entry return so that both flags are looked at.
    pub fn run(&mut self, killed: &AtomicBool, preempt: &AtomicBool) -> Step {
        if let Some(listener) = self.gdb.take()
            && let Some(end) = debug::session(self, listener, killed)
        {
            return Step::Ended(end);
        }
        if let Some(at) = self.blocked_at.take() {
            hypercall::time::woke(&self.ram, &self.events, at);
        }
        loop {
            if killed.load(Ordering::SeqCst) {
                return Step::Ended(GuestEnd::Killed);
            }
            // A plain load first: the swap's locked write only when set.
            if preempt.load(Ordering::Relaxed) && preempt.swap(false, Ordering::SeqCst) {
                return Step::Preempted;
            }
            let (exit, reason) = match self.enter() {
                Ok(entered) => entered,
                Err(crash) => return Step::Ended(GuestEnd::Crashed(crash)),
            };
            // A kick: the loop's checks decide (killed, preempted, or stale).
            let Some(reason) = reason else { continue };
            if let Some(window) = self.exit_rate.as_mut()
                && !window.allow(self.clock.now_ns())
            {
                let limit = Limit::ExitRate(window.limit());
                return Step::Ended(GuestEnd::Crashed(Crash::LimitExceeded(limit)));
            }
            match self.serve(reason, exit, preempt) {
                Flow::Resume => {}
                Flow::Return(frame) => self.vcpu.resume_user(&trap::registers(&frame), false),
                Flow::Block { deadline_ns, at } => {
                    self.blocked_at = Some(at);
                    return Step::Blocked(deadline_ns);
                }
                Flow::Yield => return Step::Yielded,
                Flow::End(end) => return Step::Ended(end),
            }
        }
    }

    /// Runs the guest until its next exit, counts the exit (its reason;
    /// `None` for a kick) and takes what the guest has put in its console
    /// ring, so that nothing is lost however the guest goes on. The crash
    /// if KVM failed or the guest broke its ring.
    fn enter(&mut self) -> Result<(Exit, Option<ExitReason>), Crash> {
        let exit = self.vcpu.run();
        let taken = match self.console_ring.as_mut() {
            Some(ring) => ring.take(&self.ram, &self.console),
            None => Ok(0),
        };
        if let Ok(bytes @ 1..) = taken {
            self.stats.add_console_bytes(bytes);
        }
        let exit = exit.map_err(|e| Crash::Internal(e.to_string()))?;
        let reason = (exit != Exit::Kicked).then(|| exit_reason(&exit));
        match reason {
            Some(reason) => self.stats.count_exit(reason),
            None => self.stats.count_kick(),
        }
        taken?;
        Ok((exit, reason))
    }

    /// Serves one exit, classified by [`exit_reason`] (the only place
    /// that looks at port numbers).
    fn serve(&mut self, reason: ExitReason, exit: Exit, preempt: &AtomicBool) -> Flow {
        let crash = |c| Flow::End(GuestEnd::Crashed(c));
        match (reason, exit) {
            (ExitReason::Hypercall, Exit::Out { value, .. }) => {
                let observer = self.observer.as_deref();
                if let Some(observer) = observer {
                    observer.take_guest_timing(&self.ram);
                }
                let ctx = Context {
                    id: self.id,
                    ram: &self.ram,
                    clock: &self.clock,
                    console: &self.console,
                    features: self.features,
                    stats: &self.stats,
                    vm: Some(&self.vm),
                    mmu: &self.mmu,
                    events: &self.events,
                    devices: &self.devices,
                    at: 0,
                    traps: &self.traps,
                    preempt,
                    in_multicall: false,
                    custom: &self.custom,
                    observer,
                };
                hypercall::dispatch(&ctx, u64::from(value))
            }
            (ExitReason::NullExit, _) | (_, Exit::Kicked) => Flow::Resume,
            (ExitReason::Exception, Exit::Out { port, .. }) => {
                self.exception((port - EXCEPTION_PORT_BASE) as u8)
            }
            (_, Exit::Out { port, size, .. }) => crash(Crash::BadPortAccess {
                port,
                size,
                write: true,
            }),
            (_, Exit::In { port, size }) => crash(Crash::BadPortAccess {
                port,
                size,
                write: false,
            }),
            (_, Exit::StringIo { port }) => crash(Crash::BadPortAccess {
                port,
                size: 0,
                write: true,
            }),
            (ExitReason::PageTableWrite, Exit::MmioWrite { addr, len, value }) => {
                let mut mmu = self.mmu.borrow_mut();
                match mmu.active(self.ram.size()).trapped_write(
                    Translations {
                        ram: &self.ram,
                        vm: Some(&self.vm),
                        stats: &self.stats,
                        now_ns: self.clock.now_ns(),
                        device_gate: self.devices.gate(),
                    },
                    addr,
                    len,
                    value,
                ) {
                    Ok(Ok(())) => Flow::Resume,
                    Ok(Err(error)) => crash(Crash::PageTableWrite {
                        addr,
                        value,
                        error: format!("{error:?}"),
                    }),
                    Err(e) => crash(Crash::Internal(e.to_string())),
                }
            }
            // Only the trapping window is backed read-only; nothing else
            // reaches here.
            (_, Exit::MmioWrite { .. }) => crash(Crash::UnexpectedExit("mmio write".into())),
            (_, Exit::Shutdown) => crash(match self.vcpu.regs() {
                Ok(regs) => Crash::TripleFault { rip: regs.rip },
                Err(e) => Crash::Internal(e.to_string()),
            }),
            (_, Exit::Other(what)) => crash(Crash::UnexpectedExit(what.into())),
        }
    }

    /// Serves an exception the stub for `vector` reported: bounces it to
    /// the guest's handler if it has one for `vector` and none is running,
    /// or stops the guest with its state.
    fn exception(&mut self, vector: u8) -> Flow {
        let fault = match self.fault(vector) {
            Ok(fault) => fault,
            Err(internal) => return Flow::End(GuestEnd::Crashed(internal)),
        };
        let (vector, fault) = match self.syscall_at(&fault) {
            Some(syscall) => (descriptors::INVALID_OPCODE, syscall),
            None => (vector, fault),
        };
        let mut traps = self.traps.get();
        if let Some(table) = traps.enter(vector) {
            let at = kvm_regs {
                rip: fault.rip,
                rsp: fault.rsp,
                rflags: fault.rflags,
                ..self.vcpu.exit_regs()
            };
            let code = fault.error_code.unwrap_or(0);
            let frame = trap::frame(vector, code, fault.addr.unwrap_or(0), &at);
            if self.ram.write_guest(table.frame, frame.as_bytes()).is_ok() {
                self.traps.set(traps);
                self.stats.count_trap();
                self.vcpu.resume_user(
                    &kvm_regs {
                        rip: table.entry,
                        rsp: table.stack,
                        rdi: table.frame,
                        ..at
                    },
                    true,
                );
                return Flow::Resume;
            }
        }
        Flow::End(GuestEnd::Crashed(Crash::Exception {
            vector,
            error_code: fault.error_code,
            rip: fault.rip,
            rsp: fault.rsp,
            fault_addr: fault.addr,
        }))
    }

    /// The `#UD` the ABI gives `syscall`, if `fault` is what PVM makes of
    /// one instead: the CPU jumps to its `LSTAR`, which is 0 for a guest,
    /// and faults fetching there (a user-mode `#PF` at rip 0, address 0),
    /// with `rcx` at the instruction after the `syscall` and `r11` holding
    /// the flags. Recognised by those registers and the instruction's two
    /// bytes (`0f 05`) at `rcx - 2`; the `#UD` is reported there, with the
    /// flags of that moment. (On hardware KVM a guest's `syscall` raises
    /// `#UD` itself: its `EFER.SCE` is clear.)
    fn syscall_at(&mut self, fault: &Fault) -> Option<Fault> {
        const PF_USER_FETCH: u64 = (1 << 2) | (1 << 4);
        const RFLAGS_FIXED: u64 = 1 << 1;
        let pf_at_zero = fault.rip == 0
            && fault.addr == Some(0)
            && fault
                .error_code
                .is_some_and(|c| c & PF_USER_FETCH == PF_USER_FETCH);
        if !pf_at_zero {
            return None;
        }
        let regs = self.vcpu.exit_regs();
        let at = regs.rcx.checked_sub(2)?;
        if regs.r11 & RFLAGS_FIXED == 0 {
            return None;
        }
        let cr3 = self.vcpu.sregs().ok()?.cr3;
        let mut bytes = [0u8; 2];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let physical = paging::user_address(&self.ram, cr3, at + i as u64)?;
            self.ram
                .read_host(physical, std::slice::from_mut(byte))
                .ok()?;
        }
        (bytes == [0x0f, 0x05]).then_some(Fault {
            error_code: None,
            rip: at,
            rsp: fault.rsp,
            rflags: regs.r11,
            addr: None,
        })
    }

    /// Reads the state of the CPL3 code that raised `vector`: the frame
    /// the CPU pushed on the CPL0 stack (at the stub's `rsp`), and CR2 for
    /// a page fault, all from memory and the `kvm_run` page.
    fn fault(&mut self, vector: u8) -> Result<Fault, Crash> {
        let sp = self.vcpu.exit_regs().rsp;
        let has_code = descriptors::has_error_code(vector);
        let words = if has_code { 6 } else { 5 };
        if sp < descriptors::KERNEL_STACK || sp + words * 8 > descriptors::KERNEL_STACK_TOP {
            return Err(Crash::Internal(format!(
                "exception {vector} reported a bad stack {sp:#x}"
            )));
        }
        let mut frame = [0u64; 6];
        let read = &mut frame.as_mut_bytes()[..words as usize * 8];
        if let Err(e) = self.ram.read_host(sp, read) {
            return Err(Crash::Internal(e.to_string()));
        }
        // The error code if any, then rip, cs, rflags, rsp, ss.
        let [a, b, c, d, e, f] = frame;
        let (error_code, [rip, _cs, rflags, rsp, _ss]) = if has_code {
            (Some(a), [b, c, d, e, f])
        } else {
            (None, [a, b, c, d, e])
        };
        Ok(Fault {
            error_code,
            rip,
            rsp,
            rflags,
            addr: if vector == 14 {
                Some(
                    self.vcpu
                        .sregs()
                        .map_err(|e| Crash::Internal(e.to_string()))?
                        .cr2,
                )
            } else {
                None
            },
        })
    }
}

/// The state of the guest at an exception.
struct Fault {
    error_code: Option<u64>,
    rip: u64,
    rsp: u64,
    rflags: u64,
    addr: Option<u64>,
}

/// What an exit is: the one place that decodes ports into the ABI's
/// meaning, for both the counters and [`Guest::serve`].
fn exit_reason(exit: &Exit) -> ExitReason {
    match *exit {
        Exit::Out {
            port: HYPERCALL_PORT,
            size: 4,
            ..
        } => ExitReason::Hypercall,
        Exit::Out {
            port: NULL_EXIT_PORT,
            size: 4,
            ..
        } => ExitReason::NullExit,
        Exit::Out { port, size: 1, .. }
            if (EXCEPTION_PORT_BASE..EXCEPTION_PORT_BASE + EXCEPTION_VECTORS).contains(&port) =>
        {
            ExitReason::Exception
        }
        Exit::Out { .. } | Exit::In { .. } | Exit::StringIo { .. } => ExitReason::BadPort,
        Exit::MmioWrite { .. } => ExitReason::PageTableWrite,
        Exit::Shutdown => ExitReason::TripleFault,
        Exit::Kicked | Exit::Other(_) => ExitReason::Other,
    }
}
