//! A GDB remote-protocol stub for one guest ([`crate::GuestConfig::gdb`]),
//! served with the `gdbstub` crate.
//!
//! The guest stops before its first instruction and waits for a debugger
//! on its listener. The session runs on the worker that runs the guest:
//! while the debugger holds it (stopped, or running under its control),
//! the guest keeps that worker. Registers are the guest's CPL3 state;
//! memory is read and written through the guest's own page tables, and
//! only at addresses its user mode can reach, so a debugger cannot touch
//! what the host keeps in guest RAM (descriptor tables, stubs, page
//! tables). A software breakpoint is an `int3` written into the code: it
//! raises #BP after the instruction (or #GP with the error code of vector
//! 3 at it, where the gate is closed to user mode), which the stub claims
//! when it set a breakpoint at that address, and reports with `rip` at
//! the `int3`. A single step sets the trap flag and waits for #DB. Detaching
//! takes the breakpoints out and lets the guest run on as if never
//! stopped; a debugger that disconnects is a detach.

use super::Guest;
use crate::boot::paging;
use crate::end::{Crash, GuestEnd};
use crate::hypercall::{self, Flow};
use crate::kvm::vcpu::{Exit, selector};
use crate::stats::ExitReason;
use gdbstub::common::Signal;
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, GdbStub, SingleThreadStopReason};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep,
    SingleThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::X86_64_SSE;
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use kvm_bindings::kvm_regs;
use shoal_abi::layout::{EXCEPTION_PORT_BASE, PAGE_SIZE};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The trap flag.
const RFLAGS_TF: u64 = 1 << 8;
/// `int3`.
const INT3: u8 = 0xcc;
/// The error code of the #GP an `int3` raises at CPL3 if its gate is
/// closed to user mode: vector 3, from the IDT (bit 1).
const INT3_GP_CODE: u64 = (3 << 3) | 2;
const DEBUG_VECTOR: u8 = 1;
const BREAKPOINT_VECTOR: u8 = 3;
const GP_VECTOR: u8 = 13;
/// How often a waiting stub looks at the guest's kill flag.
const POLL: Duration = Duration::from_millis(20);

/// Serves the debugger that connects to `listener`, then returns: `Some`
/// with the guest's end if it ended (or was killed) in the session,
/// `None` if the debugger detached and the guest runs on.
pub(super) fn session(
    guest: &mut Guest,
    listener: TcpListener,
    killed: &AtomicBool,
) -> Option<GuestEnd> {
    let stream = match accept(&listener, killed) {
        Ok(Some(stream)) => stream,
        Ok(None) => return Some(GuestEnd::Killed),
        Err(e) => {
            return Some(GuestEnd::Crashed(Crash::Internal(format!(
                "the debugger could not connect: {e}"
            ))));
        }
    };
    drop(listener);
    let regs = match guest.vcpu.regs() {
        Ok(regs) => regs,
        Err(e) => return Some(GuestEnd::Crashed(Crash::Internal(e.to_string()))),
    };
    let cr3 = match guest.vcpu.sregs() {
        Ok(sregs) => sregs.cr3,
        Err(e) => return Some(GuestEnd::Crashed(Crash::Internal(e.to_string()))),
    };
    tracing::info!(id = guest.id, "a debugger connected");
    let mut session = Session {
        guest,
        killed,
        cr3,
        regs,
        from_kernel: false,
        stepping: false,
        breakpoints: BTreeMap::new(),
        end: None,
    };
    let conn = Conn { stream, killed };
    let reason = match GdbStub::new(conn).run_blocking::<Loop<'_>>(&mut session) {
        Ok(reason) => reason,
        Err(e) => {
            tracing::warn!("the debugger session failed: {e}; the guest runs on");
            DisconnectReason::Disconnect
        }
    };
    match (reason, session.end.take()) {
        (_, Some(end)) => Some(end),
        (DisconnectReason::Kill, None) => Some(GuestEnd::Killed),
        _ if killed.load(Ordering::SeqCst) => Some(GuestEnd::Killed),
        _ => {
            session.detach();
            None
        }
    }
}

/// The one debugger connection, or `None` if the guest was killed first.
fn accept(listener: &TcpListener, killed: &AtomicBool) -> std::io::Result<Option<TcpStream>> {
    listener.set_nonblocking(true)?;
    loop {
        if killed.load(Ordering::SeqCst) {
            return Ok(None);
        }
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(POLL))?;
                return Ok(Some(stream));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The debugger's connection: reads wait in short slices so that a kill
/// ends the session even while the debugger says nothing.
struct Conn<'a> {
    stream: TcpStream,
    killed: &'a AtomicBool,
}

impl Connection for Conn<'_> {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> Result<(), Self::Error> {
        Connection::write_all(&mut self.stream, &[byte])
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        Connection::write_all(&mut self.stream, buf)
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Connection::flush(&mut self.stream)
    }

    fn on_session_start(&mut self) -> Result<(), Self::Error> {
        self.stream.set_nodelay(true)
    }
}

impl ConnectionExt for Conn<'_> {
    fn read(&mut self) -> Result<u8, Self::Error> {
        let mut byte = [0u8];
        loop {
            if self.killed.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("the guest was killed"));
            }
            match Read::read(&mut self.stream, &mut byte) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(_) => return Ok(byte[0]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn peek(&mut self) -> Result<Option<u8>, Self::Error> {
        self.stream.set_nonblocking(true)?;
        let mut byte = [0u8];
        let peeked = TcpStream::peek(&self.stream, &mut byte);
        self.stream.set_nonblocking(false)?;
        match peeked {
            Ok(0) => Err(ErrorKind::UnexpectedEof.into()),
            Ok(_) => Ok(Some(byte[0])),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Why the guest stopped for the debugger.
enum Stop {
    Step,
    Breakpoint,
}

/// What one entry into the guest came to.
enum Ran {
    /// An exit was served; the guest can go on.
    Served,
    /// The guest blocked until this deadline (guest monotonic ns).
    Blocked(u64),
    /// The guest stopped for the debugger with these registers.
    Stopped(Stop, kvm_regs),
    /// The guest is over.
    Ended(GuestEnd),
}

/// A guest under a debugger.
struct Session<'a> {
    guest: &'a mut Guest,
    killed: &'a AtomicBool,
    cr3: u64,
    /// The guest's registers while it is stopped.
    regs: kvm_regs,
    /// Stopped in an exception stub (registers go back with an `iret`),
    /// not at its first instruction.
    from_kernel: bool,
    stepping: bool,
    /// Addresses with an `int3`, and the byte it replaced.
    breakpoints: BTreeMap<u64, u8>,
    end: Option<GuestEnd>,
}

impl Session<'_> {
    /// Runs the guest from its stop until it stops again, ends, or the
    /// debugger sends something.
    fn run_until_stop(
        &mut self,
        conn: &mut Conn<'_>,
    ) -> Result<Event<SingleThreadStopReason<u64>>, std::io::Error> {
        let mut resume = true;
        loop {
            if conn.peek()?.is_some() {
                if !resume {
                    // Interrupted between two exits: the guest stops
                    // where it is.
                    self.regs = self.guest.vcpu.exit_regs();
                    self.from_kernel = false;
                }
                return Ok(Event::IncomingData(conn.read()?));
            }
            let regs = kvm_regs {
                rflags: if self.stepping {
                    self.regs.rflags | RFLAGS_TF
                } else {
                    self.regs.rflags & !RFLAGS_TF
                },
                ..self.regs
            };
            let resume_with = resume.then_some((&regs, self.from_kernel));
            resume = false;
            match self.enter(resume_with) {
                Ran::Served => {}
                Ran::Blocked(deadline) => self.wait(deadline, conn)?,
                Ran::Stopped(stop, regs) => {
                    self.regs = regs;
                    self.from_kernel = true;
                    return Ok(Event::TargetStopped(match stop {
                        Stop::Step => SingleThreadStopReason::DoneStep,
                        Stop::Breakpoint => SingleThreadStopReason::SwBreak(()),
                    }));
                }
                Ran::Ended(end) => {
                    let reason = match &end {
                        GuestEnd::Exited(code) => SingleThreadStopReason::Exited(*code as u8),
                        GuestEnd::Panicked(_) => {
                            SingleThreadStopReason::Terminated(Signal::SIGABRT)
                        }
                        GuestEnd::Killed => SingleThreadStopReason::Terminated(Signal::SIGKILL),
                        GuestEnd::Crashed(_) => SingleThreadStopReason::Terminated(Signal::SIGSEGV),
                    };
                    self.end = Some(end);
                    return Ok(Event::TargetStopped(reason));
                }
            }
        }
    }

    /// One entry into the guest and the exit it ends with, served as the
    /// scheduler's loop would serve it, except for the exceptions the
    /// debugger caused.
    fn enter(&mut self, resume: Option<(&kvm_regs, bool)>) -> Ran {
        let guest = &mut *self.guest;
        if let Some(at) = guest.blocked_at.take() {
            hypercall::time::woke(&guest.ram, &guest.events, at);
        }
        if self.killed.load(Ordering::SeqCst) {
            return Ran::Ended(GuestEnd::Killed);
        }
        if let Some((regs, from_kernel)) = resume {
            guest.vcpu.resume_user(regs, from_kernel);
        }
        let (exit, reason) = match guest.enter() {
            Ok((exit, Some(reason))) => (exit, reason),
            Ok((_, None)) => return Ran::Served,
            Err(crash) => return Ran::Ended(GuestEnd::Crashed(crash)),
        };
        if let (ExitReason::Exception, Exit::Out { port, .. }) = (reason, &exit) {
            let vector = (port - EXCEPTION_PORT_BASE) as u8;
            if let Some(stop) = self.claims(vector) {
                return stop;
            }
        }
        // The scheduler's preemption does not reach a debugged guest.
        let preempt = AtomicBool::new(false);
        let guest = &mut *self.guest;
        match guest.serve(reason, exit, &preempt) {
            Flow::Resume | Flow::Yield => Ran::Served,
            Flow::Return(frame) => {
                guest
                    .vcpu
                    .resume_user(&crate::trap::registers(&frame), false);
                Ran::Served
            }
            Flow::Block { deadline_ns, at } => {
                guest.blocked_at = Some(at);
                Ran::Blocked(deadline_ns)
            }
            Flow::End(end) => Ran::Ended(end),
        }
    }

    /// The stop, if exception `vector` is the debugger's: the #DB of a
    /// single step, or the #GP of an `int3` it put in.
    fn claims(&mut self, vector: u8) -> Option<Ran> {
        if ![DEBUG_VECTOR, BREAKPOINT_VECTOR, GP_VECTOR].contains(&vector) {
            return None;
        }
        let fault = match self.guest.fault(vector) {
            Ok(fault) => fault,
            Err(crash) => return Some(Ran::Ended(GuestEnd::Crashed(crash))),
        };
        // The address of the `int3`, if this is one of ours.
        let int3 = match vector {
            BREAKPOINT_VECTOR => fault.rip.wrapping_sub(1),
            GP_VECTOR if fault.error_code == Some(INT3_GP_CODE) => fault.rip,
            _ => u64::MAX,
        };
        let (stop, rip) = match vector {
            DEBUG_VECTOR if self.stepping => (Stop::Step, fault.rip),
            _ if self.breakpoints.contains_key(&int3) => (Stop::Breakpoint, int3),
            _ => return None,
        };
        let regs = kvm_regs {
            rip,
            rsp: fault.rsp,
            rflags: fault.rflags & !RFLAGS_TF,
            ..self.guest.vcpu.exit_regs()
        };
        Some(Ran::Stopped(stop, regs))
    }

    /// Waits, as `block` would, until the guest's deadline or an unmasked
    /// event, or until the debugger sends something.
    fn wait(&mut self, deadline_ns: u64, conn: &mut Conn<'_>) -> std::io::Result<()> {
        let until = self.guest.clock.instant_of(deadline_ns);
        loop {
            let now = Instant::now();
            if until.is_some_and(|until| now >= until)
                || self.guest.events.unmasked() != 0
                || self.killed.load(Ordering::SeqCst)
                || conn.peek()?.is_some()
            {
                return Ok(());
            }
            let left = until.map_or(POLL, |until| until - now);
            std::thread::sleep(left.min(Duration::from_millis(1)));
        }
    }

    /// Calls `access` on each piece of `start..start + len` that lies in
    /// one page, with the piece's guest-physical address and its offset
    /// in the range; stops at the first page the guest cannot reach.
    /// Returns the bytes reached.
    fn each_page(
        &self,
        start: u64,
        len: usize,
        mut access: impl FnMut(u64, usize, usize) -> bool,
    ) -> usize {
        let mut done = 0;
        while done < len {
            let vaddr = start.wrapping_add(done as u64);
            let in_page = ((PAGE_SIZE - vaddr % PAGE_SIZE) as usize).min(len - done);
            match paging::user_address(&self.guest.ram, self.cr3, vaddr) {
                Some(paddr) if access(paddr, done, in_page) => done += in_page,
                _ => break,
            }
        }
        done
    }

    /// Takes every breakpoint out and lets the guest go on where it
    /// stopped.
    fn detach(&mut self) {
        for (addr, byte) in std::mem::take(&mut self.breakpoints) {
            let _ = self.write(addr, &[byte]);
        }
        let regs = kvm_regs {
            rflags: self.regs.rflags & !RFLAGS_TF,
            ..self.regs
        };
        self.guest.vcpu.resume_user(&regs, self.from_kernel);
        tracing::info!(id = self.guest.id, "the debugger detached");
    }

    fn read(&self, addr: u64, data: &mut [u8]) -> usize {
        let ram = &self.guest.ram;
        self.each_page(addr, data.len(), |paddr, at, len| {
            ram.read_host(paddr, &mut data[at..at + len]).is_ok()
        })
    }

    fn write(&self, addr: u64, data: &[u8]) -> bool {
        let ram = &self.guest.ram;
        let written = self.each_page(addr, data.len(), |paddr, at, len| {
            ram.write_host(paddr, &data[at..at + len]).is_ok()
        });
        written == data.len()
    }
}

/// An address the guest cannot reach.
const EFAULT: u8 = 14;

impl Target for Session<'_> {
    type Arch = X86_64_SSE;
    type Error = std::convert::Infallible;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl SingleThreadBase for Session<'_> {
    fn read_registers(&mut self, regs: &mut X86_64CoreRegs) -> TargetResult<(), Self> {
        let r = &self.regs;
        regs.regs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        regs.rip = r.rip;
        regs.eflags = r.rflags as u32;
        let data = u32::from(selector::USER_DATA);
        regs.segments.cs = u32::from(selector::USER_CODE);
        regs.segments.ss = data;
        regs.segments.ds = data;
        regs.segments.es = data;
        regs.segments.fs = data;
        regs.segments.gs = data;
        Ok(())
    }

    fn write_registers(&mut self, regs: &X86_64CoreRegs) -> TargetResult<(), Self> {
        let [
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rbp,
            rsp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
        ] = regs.regs;
        // `resume_user` keeps only the flags user mode may hold.
        self.regs = kvm_regs {
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rbp,
            rsp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
            rip: regs.rip,
            rflags: u64::from(regs.eflags),
        };
        Ok(())
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        match self.read(start, data) {
            0 if !data.is_empty() => Err(TargetError::Errno(EFAULT)),
            n => Ok(n),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8]) -> TargetResult<(), Self> {
        if self.write(start, data) {
            Ok(())
        } else {
            Err(TargetError::Errno(EFAULT))
        }
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadResume for Session<'_> {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.stepping = false;
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadSingleStep for Session<'_> {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.stepping = true;
        Ok(())
    }
}

impl Breakpoints for Session<'_> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for Session<'_> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.breakpoints.contains_key(&addr) {
            return Ok(true);
        }
        let mut byte = [0u8];
        if self.read(addr, &mut byte) != 1 || !self.write(addr, &[INT3]) {
            return Ok(false);
        }
        self.breakpoints.insert(addr, byte[0]);
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        match self.breakpoints.remove(&addr) {
            Some(byte) => Ok(self.write(addr, &[byte])),
            None => Ok(false),
        }
    }
}

/// The event loop of a session.
struct Loop<'a>(std::marker::PhantomData<&'a ()>);

impl<'a> BlockingEventLoop for Loop<'a> {
    type Target = Session<'a>;
    type Connection = Conn<'a>;
    type StopReason = SingleThreadStopReason<u64>;

    fn wait_for_stop_reason(
        target: &mut Self::Target,
        conn: &mut Self::Connection,
    ) -> Result<
        Event<Self::StopReason>,
        WaitForStopReasonError<std::convert::Infallible, std::io::Error>,
    > {
        target
            .run_until_stop(conn)
            .map_err(WaitForStopReasonError::Connection)
    }

    fn on_interrupt(
        _target: &mut Self::Target,
    ) -> Result<Option<Self::StopReason>, std::convert::Infallible> {
        Ok(Some(SingleThreadStopReason::Signal(Signal::SIGINT)))
    }
}
