//! VMs made without KVM's debugfs entries.
//!
//! `KVM_CREATE_VM` gives every VM a debugfs directory named
//! `<thread id>-<fd number>` with a file per statistic, and every vCPU a
//! directory inside it; destroying the VM removes them file by file. On
//! the machines shoal targets that is most of a VM's life cycle in the
//! kernel: making a VM and a vCPU and destroying them measured ~880 µs
//! with the entries and ~140 µs without (see `docs/benchmarks.md`). The
//! KVM API has no flag to skip them, but KVM does skip them, and creates
//! the VM all the same, when a directory of that name already exists
//! (it logs a rate-limited `KVM: debugfs: duplicate directory` line).
//!
//! So one thread per process makes every VM. It has a file table of its
//! own (`unshare(CLONE_FILES)`), holding only stdio, its end of a socket
//! pair and `/dev/kvm`, so its next descriptor number never changes. It
//! makes one *anchor* VM at that number and keeps it at another, so that
//! the anchor's directory stands for the number, and each new VM, made at
//! the number, finds its name taken. The VM goes to the asker over the
//! socket (`SCM_RIGHTS`, close-on-exec) and the factory closes its copy,
//! freeing the number for the next one.
//!
//! Where any step is unavailable (no `unshare`, another kernel's debugfs
//! rules), VMs are made the plain way; only their cost differs. The
//! environment variable `SHOAL_PLAIN_VMS=1` asks for the plain way, to
//! compare the two.

use kvm_ioctls::VmFd;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

/// The process's factory, once started (`None`: it could not start).
static FACTORY: OnceLock<Option<Factory>> = OnceLock::new();

/// The asking end of the factory thread's socket.
struct Factory {
    link: Mutex<UnixStream>,
    /// VMs made at the anchored number, so without debugfs entries.
    anchored: AtomicU64,
    /// VMs made at another number (the number was taken).
    unanchored: AtomicU64,
    /// The factory thread stopped answering.
    broken: AtomicBool,
}

/// VMs the factory made without and with debugfs entries, in this
/// process (both 0 if it did not start).
pub fn counts() -> (u64, u64) {
    match FACTORY.get() {
        Some(Some(f)) => (
            f.anchored.load(Ordering::Relaxed),
            f.unanchored.load(Ordering::Relaxed),
        ),
        _ => (0, 0),
    }
}

/// Creates a VM, through the factory thread when it runs.
pub fn create_vm(kvm: &kvm_ioctls::Kvm) -> Result<VmFd, kvm_ioctls::Error> {
    let Some(factory) = FACTORY.get_or_init(|| {
        let plain = std::env::var_os("SHOAL_PLAIN_VMS").is_some_and(|v| v == "1");
        if plain { None } else { Factory::start() }
    }) else {
        return kvm.create_vm();
    };
    if factory.broken.load(Ordering::Relaxed) {
        return kvm.create_vm();
    }
    match factory.make() {
        // SAFETY: `fd` is a VM descriptor KVM just made, and we own it.
        Ok(fd) => unsafe { kvm.create_vmfd_from_rawfd(fd.into_raw_fd()) },
        Err(e) if e.errno() == libc::EPIPE => {
            // The factory is gone (it cannot be, short of a bug): go on
            // the plain way rather than refuse every VM from now on.
            if !factory.broken.swap(true, Ordering::Relaxed) {
                tracing::warn!("the VM factory stopped; VMs are made the plain way");
            }
            kvm.create_vm()
        }
        Err(e) => Err(e),
    }
}

impl Factory {
    /// Starts the factory thread; `None` if it could not set up its own
    /// file table.
    fn start() -> Option<Self> {
        let (ours, theirs) = UnixStream::pair().ok()?;
        let their_number = theirs.as_raw_fd();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        std::thread::Builder::new()
            .name("shoal-vm-factory".into())
            .spawn(move || {
                crate::seccomp::confine_or_warn(crate::seccomp::Kind::Factory);
                serve(theirs, &ready_tx)
            })
            .ok()?;
        let ready = ready_rx.recv();
        if matches!(ready, Ok(Ok(())) | Ok(Err((_, true)))) {
            // The thread has its own table now, with its own copy of its
            // end: close the process's, so that the end dies with the
            // thread and a gone factory reads as a closed socket.
            // SAFETY: no object of this process owns that number any
            // more (the thread's `UnixStream` owns the copy in its table).
            unsafe { libc::close(their_number) };
        }
        match ready {
            Ok(Ok(())) => Some(Self {
                link: Mutex::new(ours),
                anchored: AtomicU64::new(0),
                unanchored: AtomicU64::new(0),
                broken: AtomicBool::new(false),
            }),
            Ok(Err((e, _))) => {
                tracing::debug!(error = %e, "VMs are made the plain way");
                None
            }
            Err(_) => None,
        }
    }

    /// Asks for one VM: a byte out, an errno (0: made) and the VM back.
    fn make(&self) -> Result<OwnedFd, kvm_ioctls::Error> {
        let link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        let broken = |_| kvm_ioctls::Error::new(libc::EPIPE);
        (&*link).write_all(&[1]).map_err(broken)?;
        let mut reply = [0u8; 5];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = loop {
            // A signal (a kick is one) may interrupt the wait: wait again,
            // or the reply would be read as the next one's.
            match rustix::net::recvmsg(
                link.as_fd(),
                &mut [IoSliceMut::new(&mut reply)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::WAITALL,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return Err(kvm_ioctls::Error::new(libc::EPIPE)),
                Ok(got) => break got,
            }
        };
        let fd = control.drain().find_map(|message| match message {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        });
        drop(link);
        if got.bytes != reply.len() {
            return Err(kvm_ioctls::Error::new(libc::EPIPE));
        }
        let errno = i32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]);
        let counter = if reply[4] == 1 {
            &self.anchored
        } else {
            &self.unanchored
        };
        match fd {
            Some(fd) if errno == 0 => {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(fd)
            }
            _ => Err(kvm_ioctls::Error::new(if errno == 0 {
                libc::EIO
            } else {
                errno
            })),
        }
    }
}

/// The factory thread: sets up its file table and anchor, says so on
/// `ready`, then makes a VM for every byte that arrives until the socket
/// closes.
fn serve(link: UnixStream, ready: &crossbeam_channel::Sender<Result<(), SetUpError>>) {
    let (kvm, number, _anchor) = match set_up(&link) {
        Ok(parts) => parts,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut request = [0u8; 1];
    while (&link).read_exact(&mut request).is_ok() {
        let (errno, vm) = match kvm.create_vm() {
            Ok(vm) => (0, Some(vm)),
            Err(e) => (e.errno(), None),
        };
        let anchored = vm.as_ref().is_some_and(|vm| vm.as_raw_fd() == number);
        let mut reply = [0u8; 5];
        reply[..4].copy_from_slice(&errno.to_le_bytes());
        reply[4] = u8::from(anchored);
        // SAFETY: `vm` stays open until after the send.
        let fds = vm
            .as_ref()
            .map(|vm| [unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) }]);
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if let Some(fds) = &fds {
            control.push(SendAncillaryMessage::ScmRights(fds));
        }
        let sent = loop {
            match rustix::net::sendmsg(
                link.as_fd(),
                &[IoSlice::new(&reply)],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                sent => break sent,
            }
        };
        // Our copy goes now: the number is free for the next VM.
        drop(vm);
        if sent.is_err() {
            return;
        }
    }
}

/// Why the factory could not start, and whether its thread had its own
/// file table by then.
type SetUpError = (std::io::Error, bool);

/// Gives this thread a file table of its own with only `link`, opens
/// `/dev/kvm`, and makes the anchor VM. Returns KVM, the number every VM
/// will be made at, and the anchor (held elsewhere).
///
/// From here on this thread must not use a descriptor number of the
/// process (stdio included): in its table the number is another file or
/// none.
fn set_up(link: &UnixStream) -> Result<(kvm_ioctls::Kvm, i32, OwnedFd), SetUpError> {
    // SAFETY: `unshare(CLONE_FILES)` gives this thread a private copy of
    // the file table; the rest of the process is unaffected.
    if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
        return Err((std::io::Error::last_os_error(), false));
    }
    let unshared = |e: std::io::Error| (e, true);
    // Close the copies of everything but our end of the socket, stdio
    // included, so that no descriptor of the process stays open because
    // of us (a pipe's reader waiting for its end, say).
    let keep = link.as_raw_fd() as libc::c_uint;
    let below = keep.checked_sub(1).map(|last| (0, last));
    for (first, last) in below.into_iter().chain([(keep + 1, libc::c_uint::MAX)]) {
        // SAFETY: closes descriptors of this thread's own table only;
        // none of them is used by this thread.
        if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) } != 0 {
            return Err(unshared(std::io::Error::last_os_error()));
        }
    }
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| unshared(e.into()))?;
    let first = kvm.create_vm().map_err(|e| unshared(e.into()))?;
    let number = first.as_raw_fd();
    // Keep the anchor above the number, and free the number.
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own.
    let moved = unsafe { libc::fcntl(number, libc::F_DUPFD_CLOEXEC, number + 1) };
    if moved < 0 {
        return Err(unshared(std::io::Error::last_os_error()));
    }
    drop(first);
    // SAFETY: `moved` is a fresh descriptor we own.
    let anchor = unsafe { OwnedFd::from_raw_fd(moved) };
    Ok((kvm, number, anchor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_are_made_at_the_anchored_number_and_work() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let (before, _) = counts();
        for _ in 0..20 {
            let vm = create_vm(&kvm).expect("a VM");
            let vcpu = vm.create_vcpu(0).expect("a vCPU");
            drop(vcpu);
        }
        let (after, unanchored) = counts();
        assert!(
            FACTORY.get().is_some_and(Option::is_some),
            "the factory runs"
        );
        // Other tests may make VMs at the same time, through the factory
        // too: nothing else opens files in its table, so none misses.
        assert!(after >= before + 20, "{after} anchored after {before}");
        assert_eq!(unanchored, 0);
    }
}
