//! The host's sandbox: a seccomp allowlist for each kind of thread shoal
//! starts.
//!
//! Once [`enable`] has been called (a [`crate::HostConfig`] with
//! `seccomp` on, the default, does it before its first thread starts),
//! every thread shoal starts calls [`confine`] with its [`Kind`] first
//! thing, and from then on the kernel lets it make only the system calls
//! its kind's list names. The lists are what each kind of thread was seen
//! to call running every built-in guest, disks, LANs, forwards, shards,
//! the debugger and custom hypercalls (`host/tools/seccomp-trace.sh`
//! prints them again), plus what any thread may need: memory, futexes,
//! signals, the clock, writing its messages, exiting.
//!
//! A call off the list does not run: the kernel raises `SIGSYS`, whose
//! handler makes the call return `EPERM`, writes `shoal: sandbox denied
//! system call NAME [of PATH] in a KIND thread` to standard error, and
//! notes the call for the thread ([`take_denied`]): a custom hypercall's
//! handler that made one stops its guest, with the call's name as the
//! reason. Nothing is killed, so a denial shows up as an error where the
//! call was made. Calls that start threads or processes are refused with
//! `EPERM` and no signal (`STARTS_THREADS`).
//!
//! Threads the embedding program owns (those that call [`crate::Host`]'s
//! methods, and the main thread) are not confined: what they may do is
//! the embedder's choice. A shard process is shoal's own: its main thread,
//! which serves the supervisor, is confined as [`Kind::ShardServer`].
//! Filters are inherited by the threads a thread starts, so every thread
//! a confined thread starts is confined by that filter too: the lists of
//! such parents include their children's calls.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use syscalls::Sysno;

/// The kinds of thread shoal starts, each with its own allowlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Runs guests' vCPUs and serves their hypercalls (custom ones
    /// included): KVM ioctls on open VM and vCPU descriptors, eventfds,
    /// console output, memory.
    Worker,
    /// Wakes blocked guests at their deadlines and preempts spinners
    /// (signals to workers).
    Timer,
    /// Takes ended guests apart: closes their descriptors, gives back
    /// memory, releases disk locks.
    Reaper,
    /// The pool's filler: makes VMs ahead of demand (through the VM
    /// factory, which it starts) and resets ended guests' VMs.
    Filler,
    /// The VM factory: creates VMs in a file table of its own and hands
    /// them over a socket.
    Factory,
    /// The device thread: serves every guest's disks and LANs.
    Device,
    /// A flush thread: syncs disk files.
    Flush,
    /// The host's end of a LAN: forwarded TCP connections.
    Gateway,
    /// A TAP device bridged to a LAN.
    Tap,
    /// A supervisor's reader of a shard's events or trunk, or a shard's
    /// writer of events or reader of its trunk.
    Trunk,
    /// A shard process's main thread: serves the supervisor's requests,
    /// which includes starting guests and the threads above.
    ShardServer,
}

/// What every thread may call: memory, futexes and scheduling, signal
/// handling and masks, the clock and sleeping, its own identity, random
/// bytes (hash maps' keys), writing (to descriptors it was given: its
/// messages, eventfds), closing, exiting, and adding a filter.
const EVERY_THREAD: &[Sysno] = &[
    Sysno::brk,
    Sysno::mmap,
    Sysno::munmap,
    Sysno::mremap,
    Sysno::mprotect,
    Sysno::madvise,
    Sysno::futex,
    Sysno::sched_yield,
    Sysno::sched_getaffinity,
    Sysno::getrandom,
    Sysno::gettid,
    Sysno::getpid,
    Sysno::clock_gettime,
    Sysno::clock_nanosleep,
    Sysno::nanosleep,
    Sysno::rt_sigprocmask,
    Sysno::rt_sigreturn,
    Sysno::sigaltstack,
    Sysno::rseq,
    Sysno::set_robust_list,
    Sysno::prctl,
    Sysno::write,
    Sysno::close,
    Sysno::exit,
    Sysno::exit_group,
    // A thread started by a confined one installs its own filter, which
    // only ever narrows what it may do.
    Sysno::seccomp,
    // Copies and flags of descriptors the thread has.
    Sysno::fcntl,
    Sysno::dup,
];

/// The kinds of thread a thread of `kind` starts, whose calls its list
/// must include (they inherit its filter).
fn children(kind: Kind) -> &'static [Kind] {
    match kind {
        // The factory starts with the first VM, usually the filler's.
        Kind::Filler => &[Kind::Factory],
        // Flush threads start with the first flush.
        Kind::Device => &[Kind::Flush],
        Kind::ShardServer => &ALL_KINDS,
        _ => &[],
    }
}

/// The calls `kind` may make besides [`EVERY_THREAD`], its children's
/// and `tgkill` of a thread of its own process.
fn allowed(kind: Kind) -> &'static [Sysno] {
    use Sysno::*;
    match kind {
        Kind::Worker => &[
            ioctl,
            read,
            rt_sigaction,
            mincore,
            // The GDB stub of a debugged guest, on the listener the
            // embedder bound.
            accept4,
            recvfrom,
            sendto,
            poll,
            setsockopt,
            getsockopt,
            getpeername,
            shutdown,
        ],
        Kind::Timer => &[sched_setscheduler],
        Kind::Reaper => &[ioctl, read, epoll_ctl, flock, mincore, munlock],
        Kind::Filler => &[
            // KVM ioctls, the pagemap, the signal that readies a vCPU's
            // first entry, the factory's socket, and starting it.
            ioctl,
            openat,
            pread64,
            read,
            rt_sigaction,
            rt_sigtimedwait,
            sendto,
            recvmsg,
            socketpair,
            clone3,
            clone,
        ],
        Kind::Factory => &[
            ioctl,
            openat,
            fcntl,
            recvfrom,
            sendmsg,
            unshare,
            close_range,
        ],
        Kind::Device => &[
            read, pread64, pwrite64, epoll_wait, epoll_ctl,
            // Frames up a shard's trunk.
            sendmsg, sendto, poll, // Starting the flush threads.
            clone3, clone,
        ],
        Kind::Flush => &[read, fdatasync],
        Kind::Gateway => &[
            read, accept4, epoll_wait, epoll_ctl, recvfrom, sendto, setsockopt, getsockopt,
            shutdown, ioctl, poll, // Frames up a shard's trunk.
            sendmsg,
        ],
        Kind::Tap => &[read, poll, ioctl, sendmsg, sendto],
        // The supervisor's reader of a shard's events stops the shard
        // process when its socket fails.
        Kind::Trunk => &[read, poll, recvfrom, sendto, recvmsg, sendmsg, kill, wait4],
        Kind::ShardServer => &[
            // Opening images' memory, disks, KVM, LANs, forwards and
            // TAP devices, and starting threads.
            ioctl,
            openat,
            read,
            pread64,
            pwrite64,
            fcntl,
            flock,
            fstat,
            statx,
            newfstatat,
            lseek,
            memfd_create,
            ftruncate,
            fallocate,
            fdatasync,
            eventfd2,
            epoll_create1,
            epoll_ctl,
            epoll_wait,
            socket,
            socketpair,
            bind,
            listen,
            accept4,
            connect,
            getsockname,
            setsockopt,
            getsockopt,
            shutdown,
            recvfrom,
            sendto,
            recvmsg,
            sendmsg,
            poll,
            clone3,
            clone,
            unshare,
            close_range,
            dup,
            rt_sigaction,
            rt_sigtimedwait,
            sched_setscheduler,
            mincore,
            munlock,
            readlink,
            getcwd,
            uname,
            pipe2,
            prlimit64,
        ],
    }
}

/// Whether threads started from now on are confined.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the sandbox on for this process: every thread shoal starts from
/// now on is confined. It cannot be turned off again (threads confined
/// stay confined).
pub fn enable() {
    if !ENABLED.swap(true, Ordering::SeqCst) {
        prepare_process();
    }
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Work done once, before any thread is confined, that the C library
/// would otherwise do lazily in whichever thread came first: glibc
/// counts the CPUs (reading a file under `/sys`) the first time it needs
/// more than eight malloc arenas, unless their limit is set.
fn prepare_process() {
    install_handler();
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = i32::try_from(8 * cpus).unwrap_or(i32::MAX);
        // SAFETY: `mallopt` changes a tuning limit of the allocator; any
        // value is valid.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    }
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Building the BPF program failed.
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    /// The kernel refused it.
    #[error("cannot install the seccomp filter: {0}")]
    Install(String),
}

/// The compiled filter of each kind, built on first use.
fn programs(kind: Kind) -> Result<&'static [seccompiler::BpfProgram], SeccompError> {
    static PROGRAMS: OnceLock<BTreeMap<Kind, Result<Vec<seccompiler::BpfProgram>, String>>> =
        OnceLock::new();
    let programs = PROGRAMS.get_or_init(|| {
        ALL_KINDS
            .iter()
            .map(|&kind| (kind, build(kind).map_err(|e| e.to_string())))
            .collect()
    });
    match programs.get(&kind) {
        Some(Ok(programs)) => Ok(programs),
        Some(Err(e)) => Err(SeccompError::Build(e.clone())),
        None => Err(SeccompError::Build(format!("no filter for {kind:?}"))),
    }
}

/// Every kind, for building their filters.
pub const ALL_KINDS: [Kind; 11] = [
    Kind::Worker,
    Kind::Timer,
    Kind::Reaper,
    Kind::Filler,
    Kind::Factory,
    Kind::Device,
    Kind::Flush,
    Kind::Gateway,
    Kind::Tap,
    Kind::Trunk,
    Kind::ShardServer,
];

/// The syscall numbers `kind` may call (without arguments' conditions).
pub fn allowlist(kind: Kind) -> Vec<Sysno> {
    let mut calls: Vec<Sysno> = EVERY_THREAD.iter().chain(allowed(kind)).copied().collect();
    for &child in children(kind) {
        calls.extend_from_slice(allowed(child));
    }
    calls.push(Sysno::tgkill);
    calls.sort();
    calls.dedup();
    calls
}

/// Calls that start a thread or process. C libraries make them with
/// every signal blocked (`pthread_create`, `posix_spawn`), and a `SIGSYS`
/// that arrives blocked kills the process: so a kind that may not make
/// them gets `EPERM` from a filter of their own, without the signal (and
/// so without a message).
const STARTS_THREADS: &[Sysno] = &[Sysno::clone, Sysno::clone3, Sysno::fork, Sysno::vfork];

/// `kind`'s filters: the allowlist, whose other calls raise `SIGSYS`,
/// and, unless the kind starts threads, one that refuses
/// [`STARTS_THREADS`] with `EPERM` (the allowlist lets them through, and
/// of two filters' answers the kernel takes the refusal).
fn build(kind: Kind) -> Result<Vec<seccompiler::BpfProgram>, seccompiler::Error> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let allowlist = allowlist(kind);
    let starts_threads = allowlist.contains(&Sysno::clone3);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowlist
        .into_iter()
        .chain(STARTS_THREADS.iter().copied())
        .map(|call| (i64::from(call.id()), Vec::new()))
        .collect();
    // Signals go only to threads of this process (kicks of workers).
    let own_process = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(std::process::id()),
    )?;
    rules.insert(
        i64::from(Sysno::tgkill.id()),
        vec![SeccompRule::new(vec![own_process])?],
    );
    let compile = |filter: SeccompFilter| -> Result<seccompiler::BpfProgram, seccompiler::Error> {
        filter.try_into().map_err(seccompiler::Error::Backend)
    };
    let mut programs = vec![compile(SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?)?];
    if !starts_threads {
        let refused = STARTS_THREADS
            .iter()
            .map(|call| (i64::from(call.id()), Vec::new()))
            .collect();
        programs.push(compile(SeccompFilter::new(
            refused,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            TargetArch::x86_64,
        )?)?);
    }
    Ok(programs)
}

thread_local! {
    /// The kind this thread was confined as, for the denial message.
    static CONFINED: Cell<Option<Kind>> = const { Cell::new(None) };
    /// The last call the sandbox denied this thread, not yet taken.
    static DENIED: Cell<Option<Sysno>> = const { Cell::new(None) };
}

/// Confines the calling thread to `kind`'s allowlist, if the sandbox is
/// on. An error only if the kernel refused the filter.
pub fn confine(kind: Kind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    let programs = programs(kind)?;
    CONFINED.with(|confined| confined.set(Some(kind)));
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(e.to_string()))?;
    }
    Ok(())
}

/// Confines the calling thread as [`confine`] does, logging a failure
/// (the thread then runs unconfined).
pub fn confine_or_warn(kind: Kind) {
    if let Err(e) = confine(kind) {
        tracing::error!(error = %e, ?kind, "thread runs without its sandbox");
    }
}

/// The system call the sandbox last denied this thread, if any since the
/// last call: it returned `EPERM`.
pub fn take_denied() -> Option<Sysno> {
    DENIED.with(Cell::take)
}

/// Installs the `SIGSYS` handler (once).
fn install_handler() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // SAFETY: a zeroed `sigaction` is valid; the handler is
        // async-signal-safe (see `on_sigsys`).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
        }
    });
}

/// Offset of `si_syscall` in a `SIGSYS` `siginfo_t` on x86-64: after
/// `si_signo`, `si_errno`, `si_code`, padding and `si_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

/// The `SIGSYS` handler: makes the denied call return `EPERM`, notes it
/// for the thread and says so on standard error. Touches only the
/// signal's own frame, two const-initialised thread-locals and `write`.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid `siginfo_t` for SIGSYS, whose
    // `si_syscall` field lies at this offset on x86-64.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<libc::c_int>()
            .read()
    };
    let call = usize::try_from(nr).ok().and_then(Sysno::new);
    // SAFETY: for an SA_SIGINFO handler the third argument is the
    // interrupted thread's `ucontext_t`; setting `rax` sets the value the
    // system call returns.
    let path = unsafe {
        let gregs = &mut (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
        match call {
            Some(Sysno::open | Sysno::execve) => gregs[libc::REG_RDI as usize],
            Some(Sysno::openat | Sysno::execveat) => gregs[libc::REG_RSI as usize],
            _ => 0,
        }
    };
    // SAFETY: a non-zero `path` is the path argument of the call, a
    // NUL-terminated string.
    if path != 0 && unsafe { read_by_the_c_library(path as *const u8) } {
        return;
    }
    // Only the first denial until the thread takes it is written: a
    // panic's backtrace, say, tries many files.
    let first = DENIED
        .try_with(|denied| denied.replace(call).is_none())
        .unwrap_or(false);
    if !first {
        return;
    }
    let kind = CONFINED.try_with(Cell::get).ok().flatten();
    let mut message = Message::default();
    message.push("shoal: sandbox denied system call ");
    match call {
        Some(call) => message.push(call.name()),
        None => message.push("?"),
    }
    if path != 0 {
        message.push(" of ");
        // SAFETY: the path argument of the denied call, a NUL-terminated
        // string the thread passed the kernel; read up to its end or the
        // message's room, whichever comes first.
        unsafe { message.push_c_string(path as *const u8) };
    }
    message.push(" in a ");
    message.push(kind.map_or("shoal", Kind::name));
    message.push(" thread\n");
    // SAFETY: writes the message's initialised bytes to standard error.
    unsafe { libc::write(2, message.bytes.as_ptr().cast(), message.len) };
}

impl Kind {
    /// The kind as the denial message and the docs name it.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Worker => "worker",
            Kind::Timer => "timer",
            Kind::Reaper => "reaper",
            Kind::Filler => "pool filler",
            Kind::Factory => "VM factory",
            Kind::Device => "device",
            Kind::Flush => "flush",
            Kind::Gateway => "gateway",
            Kind::Tap => "TAP",
            Kind::Trunk => "shard link",
            Kind::ShardServer => "shard server",
        }
    }
}

/// Files the C library opens on its own, in whichever thread first needs
/// them, and does without when it cannot: glibc reads the overcommit
/// policy the first time a malloc arena shrinks, and counts CPUs when it
/// needs more arenas (`prepare_process` avoids the latter). Denied
/// quietly, as nothing of shoal asked for them.
const READ_BY_THE_C_LIBRARY: &[&[u8]] = &[
    b"/proc/sys/vm/overcommit_memory",
    b"/sys/devices/system/cpu/online",
];

/// Whether the NUL-terminated `path` is one of [`READ_BY_THE_C_LIBRARY`].
///
/// # Safety
/// `path` must point at a NUL-terminated string.
unsafe fn read_by_the_c_library(path: *const u8) -> bool {
    READ_BY_THE_C_LIBRARY.iter().any(|known| {
        known.iter().chain(&[0]).enumerate().all(|(i, &byte)| {
            // SAFETY: the comparison stops at the first byte that
            // differs, which the path's NUL is if it is shorter.
            unsafe { path.add(i).read() == byte }
        })
    })
}

/// A fixed buffer to build a message in without allocating (in a signal
/// handler).
struct Message {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Self {
            bytes: [0; 256],
            len: 0,
        }
    }
}

impl Message {
    /// Appends the NUL-terminated string at `text`, as much as fits.
    ///
    /// # Safety
    /// `text` must point at a NUL-terminated string.
    unsafe fn push_c_string(&mut self, mut text: *const u8) {
        // Room kept for the rest of the message.
        while self.len < self.bytes.len() - 48 {
            // SAFETY: up to and including the NUL, as the caller says.
            let byte = unsafe { text.read() };
            if byte == 0 {
                break;
            }
            self.bytes[self.len] = byte;
            self.len += 1;
            // SAFETY: `byte` was not the NUL, so the string goes on.
            text = unsafe { text.add(1) };
        }
    }

    fn push(&mut self, text: &str) {
        let n = text.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&text.as_bytes()[..n]);
        self.len += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_filter_the_kernel_takes_and_it_denies_off_the_list() {
        for kind in ALL_KINDS {
            build(kind).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        }
        enable();
        let denied = std::thread::spawn(|| {
            confine(Kind::Flush).expect("installed");
            // Off the flush threads' list.
            let opened = std::fs::File::open("/proc/self/status");
            (
                opened.map(drop).map_err(|e| e.raw_os_error()),
                take_denied(),
            )
        })
        .join()
        .expect("the thread ends");
        assert_eq!(denied, (Err(Some(libc::EPERM)), Some(Sysno::openat)));
        // This thread is not confined.
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }

    #[test]
    fn only_the_c_librarys_own_files_are_denied_quietly() {
        // SAFETY: NUL-terminated strings.
        let quiet = |path: &std::ffi::CStr| unsafe { read_by_the_c_library(path.as_ptr().cast()) };
        assert!(quiet(c"/proc/sys/vm/overcommit_memory"));
        assert!(quiet(c"/sys/devices/system/cpu/online"));
        assert!(!quiet(c"/proc/sys/vm/overcommit_memory2"));
        assert!(!quiet(c"/proc/sys/vm/overcommit"));
        assert!(!quiet(c"/etc/hostname"));
        assert!(!quiet(c""));
    }
}
