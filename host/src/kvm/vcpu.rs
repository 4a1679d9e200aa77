//! A vCPU running a 64-bit guest at CPL3, and the kick that interrupts it.

use kvm_bindings::{Msrs, kvm_dtable, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::Once;

/// GDT selectors of the host-built descriptor table.
pub mod selector {
    /// 64-bit code, DPL 0 (the exception stubs).
    pub const KERNEL_CODE: u16 = 0x08;
    /// Data, DPL 0.
    pub const KERNEL_DATA: u16 = 0x10;
    /// Data, DPL 3 (the guest's SS/DS/ES/FS/GS), RPL 3.
    pub const USER_DATA: u16 = 0x18 | 3;
    /// 64-bit code, DPL 3 (the guest's CS), RPL 3.
    pub const USER_CODE: u16 = 0x20 | 3;
    /// The 64-bit TSS (two GDT slots).
    pub const TSS: u16 = 0x28;
}

/// Why a vCPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU` failed.
    #[error("cannot create the vCPU")]
    Create(#[source] kvm_ioctls::Error),
    /// Setting the initial CPU state failed.
    #[error("cannot set the vCPU's initial state")]
    Setup(#[source] kvm_ioctls::Error),
    /// Reading CPU state failed.
    #[error("cannot read the vCPU's state")]
    Read(#[source] kvm_ioctls::Error),
    /// `KVM_RUN` failed for a reason other than a kick.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
}

/// Where the host put the guest's system structures, and where to start.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSetup {
    /// GDT base and limit.
    pub gdt: (u64, u16),
    /// IDT base and limit.
    pub idt: (u64, u16),
    /// TSS base and limit.
    pub tss: (u64, u32),
    /// Root page table.
    pub cr3: u64,
    /// First instruction.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// Initial `rdi` (the SDK ignores it; the boot info address is fixed).
    pub rdi: u64,
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IF: u64 = 1 << 9;
/// The flags a CPL3 guest may set for itself: CF, PF, AF, ZF, SF, TF, DF,
/// OF, RF and AC.
const RFLAGS_USER: u64 = 0x0005_0dd5;
const MSR_IA32_TSC: u32 = 0x10;

/// What a `KVM_RUN` ended with, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `out` of `size` bytes to `port`.
    Out {
        /// Port.
        port: u16,
        /// Access size in bytes.
        size: u8,
        /// The value, zero-extended.
        value: u32,
    },
    /// `in` from `port`.
    In {
        /// Port.
        port: u16,
        /// Access size.
        size: u8,
    },
    /// String I/O (`rep ins`/`rep outs`) on `port`: never part of the ABI.
    StringIo {
        /// Port.
        port: u16,
    },
    /// A write to guest-physical `addr` that no writable memory backs
    /// (an MMIO write) of `len` bytes of `value`.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Bytes written (1 to 8).
        len: u32,
        /// The bytes, little-endian, zero-extended.
        value: u64,
    },
    /// Triple fault.
    Shutdown,
    /// `KVM_RUN` was interrupted by a kick.
    Kicked,
    /// Any other exit, named.
    Other(&'static str),
}

/// What [`Vcpu::reset`] puts back, read from a vCPU that never ran.
#[derive(Debug)]
pub struct PristineState {
    xsave: Box<kvm_bindings::kvm_xsave>,
    events: kvm_bindings::kvm_vcpu_events,
    debug: kvm_bindings::kvm_debugregs,
}

/// XSAVE components, by their bit in the image's header.
const XFEATURE_X87: u64 = 1 << 0;
const XFEATURE_SSE: u64 = 1 << 1;
const XFEATURE_PKRU: u64 = 1 << 9;
/// The 32-bit word of the standard-format XSAVE image where the header's
/// component bitmap (`XSTATE_BV`) starts: byte 512.
const XSTATE_BV_WORD: usize = 512 / 4;
/// The x87 control word and `MXCSR` at their initial values.
const FCW_INITIAL: u32 = 0x037f;
const MXCSR_INITIAL: u32 = 0x1f80;

/// Makes `xsave` name the x87, SSE and PKRU components with their
/// initial values, everything else of it left as read from a vCPU that
/// never ran.
///
/// KVM's `KVM_SET_XSAVE` puts every user component the image's
/// `XSTATE_BV` leaves out in its initial state, but two things survive
/// it: PKRU, which it leaves as it was unless the image names it (KVM's
/// documented exception), and `MXCSR`, which it copies only with x87,
/// SSE or AVX named. Under PVM a CPL3 guest changes both (`WRPKRU`,
/// `LDMXCSR`: the guest runs on the host's CR4, where PKE is on), so the
/// image names them. PKRU's offset is the CPU's (CPUID leaf 0xD); a CPU
/// without protection keys has none to reset.
fn initial_xsave(xsave: &mut kvm_bindings::kvm_xsave) {
    let words = &mut xsave.region;
    let mut named = XFEATURE_X87 | XFEATURE_SSE;
    // Legacy area: FCW in the low half of word 0, FSW, FTW (abridged: all
    // empty) and the rest zero; MXCSR in word 6.
    words[..XSTATE_BV_WORD].fill(0);
    words[0] = FCW_INITIAL;
    words[6] = MXCSR_INITIAL;
    let pkru = std::arch::x86_64::__cpuid_count(0xd, 9);
    let pkru_word = pkru.ebx as usize / 4;
    if pkru.eax >= 4 && pkru_word < words.len() {
        words[pkru_word] = 0;
        named |= XFEATURE_PKRU;
    }
    let bv = u64::from(words[XSTATE_BV_WORD]) | u64::from(words[XSTATE_BV_WORD + 1]) << 32;
    let bv = bv | named;
    words[XSTATE_BV_WORD] = bv as u32;
    words[XSTATE_BV_WORD + 1] = (bv >> 32) as u32;
}

/// A vCPU.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    /// The special registers the guest runs with, as [`Vcpu::setup`] set
    /// them.
    user_sregs: kvm_sregs,
}

fn segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl Vcpu {
    pub(super) fn new(fd: VcpuFd) -> Self {
        Self {
            fd,
            user_sregs: kvm_sregs::default(),
        }
    }

    /// Puts the vCPU in 64-bit mode at CPL3 with the host's descriptor
    /// tables, TSS and page tables, at `setup.rip`. `at_first_entry`: the
    /// registers go through the `kvm_run` page and KVM loads them as the
    /// vCPU first enters, with no ioctl on the spawn path (register
    /// ioctls before then would not see them); otherwise two ioctls set
    /// them now.
    pub fn setup(&mut self, setup: &CpuSetup, at_first_entry: bool) -> Result<(), VcpuError> {
        // A vCPU that never ran has the reset state, the same for all: one
        // read serves the process.
        static RESET: std::sync::OnceLock<kvm_sregs> = std::sync::OnceLock::new();
        let mut sregs = match RESET.get() {
            Some(reset) => *reset,
            None => {
                let reset = self.fd.get_sregs().map_err(VcpuError::Setup)?;
                *RESET.get_or_init(|| reset)
            }
        };
        // Nothing of a run may travel in the shared copy.
        sregs.cr2 = 0;
        sregs.interrupt_bitmap = [0; 4];
        let data = segment(selector::USER_DATA, false, 3);
        sregs.cs = segment(selector::USER_CODE, true, 3);
        sregs.ss = data;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.tr = kvm_segment {
            base: setup.tss.0,
            limit: setup.tss.1,
            selector: selector::TSS,
            type_: 0xb, // 64-bit TSS, busy
            present: 1,
            ..Default::default()
        };
        sregs.ldt = kvm_segment {
            type_: 0x2,
            present: 1,
            unusable: 1,
            ..Default::default()
        };
        sregs.gdt = kvm_dtable {
            base: setup.gdt.0,
            limit: setup.gdt.1,
            padding: [0; 3],
        };
        sregs.idt = kvm_dtable {
            base: setup.idt.0,
            limit: setup.idt.1,
            padding: [0; 3],
        };
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
        sregs.cr3 = setup.cr3;
        self.user_sregs = sregs;
        // Every exit leaves the general registers in the shared `kvm_run`
        // page, so an exception can be bounced to the guest's handler
        // without a register ioctl (`KVM_CAP_SYNC_REGS`). Not the special
        // registers: storing those costs 8 µs on every exit under PVM.
        self.fd.set_sync_valid_reg(SyncReg::Register);
        let regs = kvm_regs {
            rip: setup.rip,
            rsp: setup.rsp,
            rdi: setup.rdi,
            rflags: RFLAGS_RESERVED | RFLAGS_IF,
            ..Default::default()
        };
        if at_first_entry {
            let synced = self.fd.sync_regs_mut();
            synced.sregs = sregs;
            synced.regs = regs;
            self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            return Ok(());
        }
        self.fd.set_sregs(&sregs).map_err(VcpuError::Setup)?;
        self.fd.set_regs(&regs).map_err(VcpuError::Setup)
    }

    /// Enters `KVM_RUN` once with `immediate_exit` set, so that KVM does
    /// the work it saves for a VM's first run now, where a pool's filler
    /// pays for it, instead of between a spawn and the guest's first
    /// instruction (on these kernels: starting the VM's NX-recovery kernel
    /// thread, ~120 µs). The vCPU does not run: KVM returns `EINTR` before
    /// it would enter the guest, and nothing was set for it to load.
    pub fn prepare_first_run(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Enters `KVM_RUN` once with a signal pending, so that KVM does all
    /// it does before it would enter the guest, and returns `EINTR`
    /// instead of entering: it loads what [`Vcpu::setup`] set, updates
    /// the VM's master clock, fills the vCPU's MMU caches and builds the
    /// root of the shadow page tables for the guest's `CR3`. A pool's
    /// filler pays for that, not a spawn (~0.3 ms of a new VM's first
    /// run on these machines, more with thousands of VMs in the host).
    ///
    /// No guest instruction runs and nothing reads or writes guest
    /// memory: the root KVM builds is empty (filled as the guest faults),
    /// so it holds no translation of the guest's tables and fits a guest
    /// of any template. The signal is one of shoal's own, blocked on the
    /// calling thread but for the `KVM_RUN` (`KVM_SET_SIGNAL_MASK`), and
    /// taken again before returning. An error if KVM entered the guest
    /// after all (the vCPU is then unusable: it ran code that expected
    /// boot information).
    pub fn prepare_entry(&mut self) -> Result<(), VcpuError> {
        let run = entry_signal::pending_during(&mut self.fd, |fd| fd.run().map(|_| ()));
        match run.map_err(VcpuError::Setup)? {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(VcpuError::Run(e)),
            Ok(()) => Err(VcpuError::Run(kvm_ioctls::Error::new(libc::EPROTO))),
        }
    }

    /// The state a vCPU that never ran has, where the guest can change it
    /// and [`Vcpu::setup`] does not set it: x87, SSE and other XSAVE state
    /// (`KVM_SET_FPU` would leave `MXCSR` as the guest left it), pending
    /// events, debug registers (three ioctls; once per process).
    ///
    /// The XSAVE image names x87, SSE and PKRU outright, at their initial
    /// values (`initial_xsave`): read back from KVM, it would name
    /// neither PKRU nor (for a vCPU that never ran) SSE, and KVM leaves
    /// what the image does not name as the last guest left it.
    pub fn pristine(&self) -> Result<PristineState, VcpuError> {
        let mut xsave = self.fd.get_xsave().map_err(VcpuError::Read)?;
        initial_xsave(&mut xsave);
        Ok(PristineState {
            xsave: Box::new(xsave),
            events: self.fd.get_vcpu_events().map_err(VcpuError::Read)?,
            debug: self.fd.get_debug_regs().map_err(VcpuError::Read)?,
        })
    }

    /// Puts back what one guest may have left in this vCPU, so that it can
    /// run another. First whatever the last exit left for KVM to complete
    /// (a port access, or the rest of an MMIO write KVM split into
    /// pieces) is completed against the old guest, by `KVM_RUN`s that
    /// return before the guest would run; then `pristine`'s state is set
    /// (three ioctls), and no register change is left pending in the
    /// `kvm_run` page. The general and special registers are not touched:
    /// [`Vcpu::setup`] sets every one of them for the next guest, which
    /// puts back the data selectors, the FS and GS bases (`WRFSBASE`
    /// works at CPL3 under PVM) and the flags. Everything else a CPL3
    /// guest can change lives in the XSAVE image: x87, SSE, AVX, AVX-512,
    /// the AMX tile configuration, and PKRU (`docs/threat-model.md` lists
    /// each piece and the test that checks it). MSRs, control registers
    /// and `XCR0` need an instruction that faults at CPL3. The TSC runs
    /// on: a guest can tell how old its VM is, nothing more.
    pub fn reset(&mut self, pristine: &PristineState) -> Result<(), VcpuError> {
        self.fd.get_kvm_run().kvm_dirty_regs = 0;
        self.finish_pending_io()?;
        // SAFETY: `KVM_SET_XSAVE` reads as many bytes as the vCPU's XSAVE
        // state has; `KVM_GET_XSAVE` filled this buffer and refuses a state
        // larger than it, and every vCPU of the process has the same size.
        unsafe { self.fd.set_xsave(&pristine.xsave) }.map_err(VcpuError::Setup)?;
        self.fd
            .set_vcpu_events(&pristine.events)
            .map_err(VcpuError::Setup)?;
        self.fd
            .set_debug_regs(&pristine.debug)
            .map_err(VcpuError::Setup)?;
        self.user_sregs = kvm_sregs::default();
        Ok(())
    }

    /// Enters `KVM_RUN` with `immediate_exit` set until KVM returns
    /// `EINTR`, which it does once nothing of the last exit is left to
    /// complete: each further piece of a split MMIO write comes out as
    /// one more exit first (a 16-byte write across two pages is three).
    /// An error if it does not settle within a few rounds.
    fn finish_pending_io(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let mut settled = Err(VcpuError::Run(kvm_ioctls::Error::new(libc::EBUSY)));
        for _ in 0..8 {
            match self.fd.run() {
                Ok(_) => continue,
                Err(e) if e.errno() == libc::EINTR => settled = Ok(()),
                Err(e) => settled = Err(VcpuError::Run(e)),
            }
            break;
        }
        self.fd.set_kvm_immediate_exit(0);
        settled
    }

    /// The guest's TSC now (one `KVM_GET_MSRS`).
    pub fn guest_tsc(&self) -> Result<u64, VcpuError> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .map_err(|_| VcpuError::Read(kvm_ioctls::Error::new(libc::EINVAL)))?;
        self.fd.get_msrs(&mut msrs).map_err(VcpuError::Read)?;
        Ok(msrs.as_slice()[0].data)
    }

    /// KVM's counter `name` of this vCPU (see [`super::stats::read`]).
    pub fn kvm_stat(&self, name: &str) -> std::io::Result<Option<u64>> {
        super::stats::read(&self.fd, name)
    }

    /// The guest TSC frequency KVM reports, in kHz.
    pub fn tsc_khz(&self) -> Result<u32, VcpuError> {
        self.fd.get_tsc_khz().map_err(VcpuError::Read)
    }

    /// General registers (crash reports only: an ioctl).
    pub fn regs(&self) -> Result<kvm_regs, VcpuError> {
        self.fd.get_regs().map_err(VcpuError::Read)
    }

    /// Special registers (crash reports only: an ioctl).
    pub fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        self.fd.get_sregs().map_err(VcpuError::Read)
    }

    /// The general registers at the last exit (no ioctl: KVM stores them
    /// in the `kvm_run` page on every exit).
    pub fn exit_regs(&mut self) -> kvm_regs {
        self.fd.sync_regs_mut().regs
    }

    /// Makes the next entry resume the guest with `regs`, at CPL3; the
    /// flags are limited to those a CPL3 guest may set, with interrupts
    /// enabled. `from_kernel`: the vCPU exited at CPL0 (in an exception
    /// stub), so the segments go back to the guest's too. No ioctl: the
    /// state goes through the `kvm_run` page. The I/O instruction the vCPU
    /// exited on is not completed (KVM skips it only when `rip` is
    /// unchanged).
    pub fn resume_user(&mut self, regs: &kvm_regs, from_kernel: bool) {
        let user_sregs = self.user_sregs;
        let synced = self.fd.sync_regs_mut();
        synced.regs = kvm_regs {
            rflags: (regs.rflags & RFLAGS_USER) | RFLAGS_RESERVED | RFLAGS_IF,
            ..*regs
        };
        if from_kernel {
            // The guest cannot change any special register at CPL3 (no
            // FSGSBASE, no control registers), so the set it was started
            // with is its set now.
            synced.sregs = user_sregs;
            self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
        }
        self.fd.set_sync_dirty_reg(SyncReg::Register);
    }

    /// Makes this thread's kick target this vCPU: a [`Kick`] sent to the
    /// thread from now on makes the current or next [`Vcpu::run`] return
    /// [`Exit::Kicked`]. Call on the thread that runs the vCPU, right before
    /// running it. The returned guard disarms when dropped, also during a
    /// panic; it must be dropped before the vCPU is, which declaring it
    /// after the vCPU's owner in the same scope ensures.
    pub fn arm_kick(&mut self) -> KickGuard {
        Kick::install_handler();
        let run = self.fd.get_kvm_run();
        let flag = std::ptr::addr_of_mut!(run.immediate_exit);
        KICK_TARGET.with(|target| target.set(flag));
        KickGuard(std::marker::PhantomData)
    }

    /// The repeat count of the last I/O exit (1 unless `rep ins/outs`).
    fn io_count(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: called only right after a KVM_EXIT_IO, for which KVM
        // fills the `io` member of the exit union.
        unsafe { run.__bindgen_anon_1.io.count }
    }

    /// Runs the guest until its next exit. Performs exactly one ioctl.
    pub fn run(&mut self) -> Result<Exit, VcpuError> {
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut bytes = [0u8; 4];
                let n = data.len().min(4);
                bytes[..n].copy_from_slice(&data[..n]);
                Exit::Out {
                    port,
                    size: data.len() as u8,
                    value: u32::from_le_bytes(bytes),
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => Exit::In {
                port,
                size: data.len() as u8,
            },
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::Intr) => Exit::Kicked,
            Ok(VcpuExit::Hlt) => Exit::Other("hlt"),
            Ok(VcpuExit::MmioRead(..)) => Exit::Other("mmio read"),
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let mut bytes = [0u8; 8];
                let n = data.len().min(8);
                bytes[..n].copy_from_slice(&data[..n]);
                Exit::MmioWrite {
                    addr,
                    len: data.len() as u32,
                    value: u64::from_le_bytes(bytes),
                }
            }
            Ok(VcpuExit::FailEntry(..)) => Exit::Other("entry failure"),
            Ok(VcpuExit::InternalError) => Exit::Other("KVM internal error"),
            Ok(VcpuExit::Exception) => Exit::Other("exception"),
            Ok(_) => Exit::Other("unexpected exit"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Kicked,
            Err(e) => return Err(VcpuError::Run(e)),
        };
        match exit {
            Exit::Kicked => self.fd.set_kvm_immediate_exit(0),
            Exit::Out { port, .. } | Exit::In { port, .. } if self.io_count() != 1 => {
                return Ok(Exit::StringIo { port });
            }
            _ => {}
        }
        Ok(exit)
    }
}

/// Keeps a vCPU armed for kicks on this thread; disarms on drop.
#[must_use = "the vCPU is disarmed as soon as the guard is dropped"]
pub struct KickGuard(std::marker::PhantomData<*const ()>);

impl Drop for KickGuard {
    fn drop(&mut self) {
        let _ = KICK_TARGET.try_with(|target| target.set(std::ptr::null_mut()));
    }
}

thread_local! {
    /// The `immediate_exit` byte of the vCPU this thread runs, or null.
    static KICK_TARGET: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Interrupts a vCPU running (or about to run) on another thread.
///
/// A kick is a real-time signal to the thread. Its handler sets the armed
/// vCPU's `immediate_exit`, so a kick that lands just before `KVM_RUN` is
/// not lost: that `KVM_RUN` returns at once.
pub struct Kick;

impl Kick {
    fn signal() -> libc::c_int {
        libc::SIGRTMIN() + 4
    }

    fn install_handler() {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            extern "C" fn on_kick(_: libc::c_int) {
                // Only touches a const-initialised thread-local and one
                // byte: async-signal-safe.
                let _ = KICK_TARGET.try_with(|target| {
                    let flag = target.get();
                    if !flag.is_null() {
                        // SAFETY: a non-null target points at the
                        // `immediate_exit` byte of the `kvm_run` mapping of
                        // the vCPU armed on this thread, which stays mapped
                        // while it is armed.
                        unsafe { flag.write_volatile(1) };
                    }
                });
            }
            // SAFETY: a zeroed `sigaction` is valid; we set the handler and
            // an empty mask, without SA_RESTART so KVM_RUN returns EINTR.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_kick as *const () as usize;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(Self::signal(), &action, std::ptr::null_mut());
            }
        });
    }

    /// Kicks the thread `thread`.
    ///
    /// # Safety
    /// `thread` must be a thread of this process that has not been joined
    /// or detached-and-exited (signalling a stale `pthread_t` is undefined).
    pub unsafe fn send(thread: libc::pthread_t) {
        Self::install_handler();
        // SAFETY: the caller guarantees `thread` is live; the signal has an
        // installed handler, so it has no effect beyond the kick.
        unsafe {
            libc::pthread_kill(thread, Self::signal());
        }
    }
}

/// The signal [`Vcpu::prepare_entry`] leaves pending for one `KVM_RUN`.
mod entry_signal {
    use kvm_ioctls::VcpuFd;
    use std::os::fd::AsRawFd;
    use std::sync::Once;

    /// `_IOW(KVMIO, 0x8b, struct kvm_signal_mask)`.
    const KVM_SET_SIGNAL_MASK: libc::c_ulong = 0x4004_ae8b;

    /// `struct kvm_signal_mask` with the kernel's 64-bit signal set.
    #[repr(C)]
    struct SignalMask {
        len: u32,
        set: u64,
    }

    fn signal() -> libc::c_int {
        libc::SIGRTMIN() + 5
    }

    /// Sets the signal mask the thread running `fd` has during `KVM_RUN`
    /// (`None`: its own).
    fn set_mask(fd: &VcpuFd, mask: Option<u64>) -> Result<(), kvm_ioctls::Error> {
        let arg = mask.map(|set| SignalMask { len: 8, set });
        let ptr = arg
            .as_ref()
            .map_or(std::ptr::null(), |m| m as *const SignalMask);
        // SAFETY: KVM reads a `struct kvm_signal_mask` of `len` set bytes
        // from `ptr`, or clears the mask for a null pointer; it keeps no
        // reference to it.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_SET_SIGNAL_MASK, ptr) };
        if r < 0 {
            return Err(kvm_ioctls::Error::last());
        }
        Ok(())
    }

    /// Runs `run` (one `KVM_RUN` of `fd`) on this thread with the signal
    /// pending and open to KVM only, so that KVM sees a signal to deliver
    /// just before it would enter the guest; the signal is then taken back
    /// and the thread's and vCPU's masks are as before. An error if the
    /// masks could not be set (`run` did not run).
    pub(super) fn pending_during<T>(
        fd: &mut VcpuFd,
        run: impl FnOnce(&mut VcpuFd) -> T,
    ) -> Result<T, kvm_ioctls::Error> {
        static HANDLER: Once = Once::new();
        HANDLER.call_once(|| {
            extern "C" fn ignore(_: libc::c_int) {}
            // SAFETY: a zeroed `sigaction` is valid; the handler does
            // nothing, so should the signal ever be delivered it has no
            // effect (it is only ever blocked or open inside `KVM_RUN`).
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = ignore as *const () as usize;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal(), &action, std::ptr::null_mut());
            }
        });
        // SAFETY: the sets are initialised by `sigemptyset` or by the
        // kernel before use; the calls change only this thread's mask.
        let (only, old) = unsafe {
            let mut only: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut only);
            libc::sigaddset(&mut only, signal());
            libc::pthread_sigmask(libc::SIG_BLOCK, &only, &mut old);
            (only, old)
        };
        // During KVM_RUN: the thread's own mask, with the signal open.
        let during = (1..=64)
            // SAFETY: `old` is an initialised set; 1..=64 are signal numbers.
            .filter(|&n| n != signal() && unsafe { libc::sigismember(&old, n) } == 1)
            .fold(0u64, |set, n| set | 1 << (n - 1));
        let result = set_mask(fd, Some(during)).map(|()| {
            // SAFETY: signals this very thread, which is live.
            unsafe { libc::pthread_kill(libc::pthread_self(), signal()) };
            let ran = run(fd);
            let _ = set_mask(fd, None);
            ran
        });
        // SAFETY: as above; taking the signal back changes only this
        // thread's pending signals (none but it is in `only`).
        unsafe {
            let none = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            libc::sigtimedwait(&only, std::ptr::null_mut(), &none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
        result
    }
}
