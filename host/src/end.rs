//! How a guest's life ended.

use crate::boot::descriptors::exception_name;
use std::fmt;

/// The end of a guest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GuestEnd {
    /// The guest called `exit` (or returned from its entry function).
    Exited(i32),
    /// The guest reported a panic.
    Panicked(PanicReport),
    /// The guest broke a rule or faulted; the host stopped it.
    Crashed(Crash),
    /// Killed from the host.
    Killed,
}

impl GuestEnd {
    /// Whether the guest exited with code 0.
    pub fn is_success(&self) -> bool {
        *self == GuestEnd::Exited(0)
    }

    /// The process exit status the CLI uses for this end: the guest's code
    /// for an exit (a non-zero code that truncates to 0 becomes 1), 101 for a
    /// panic, 125 for a crash, 137 for a kill.
    pub fn exit_status(&self) -> i32 {
        match self {
            GuestEnd::Exited(0) => 0,
            GuestEnd::Exited(code) if code & 0xff == 0 => 1,
            GuestEnd::Exited(code) => code & 0xff,
            GuestEnd::Panicked(_) => shoal_abi::hypercall::PANIC_EXIT_CODE,
            GuestEnd::Crashed(_) => 125,
            GuestEnd::Killed => 137,
        }
    }
}

impl fmt::Display for GuestEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestEnd::Exited(code) => write!(f, "exited with code {code}"),
            GuestEnd::Panicked(p) => write!(
                f,
                "panicked at {}:{}:{}: {}",
                p.file, p.line, p.column, p.message
            ),
            GuestEnd::Crashed(crash) => write!(f, "crashed: {crash}"),
            GuestEnd::Killed => write!(f, "killed"),
        }
    }
}

/// A guest's panic, as its SDK reported it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PanicReport {
    /// The message (truncated to the ABI's limit).
    pub message: String,
    /// Source file.
    pub file: String,
    /// Line.
    pub line: u32,
    /// Column.
    pub column: u32,
}

/// Why the host stopped a guest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum Crash {
    /// A CPU exception with no handler in the guest.
    #[error("{} (vector {vector}{}) at rip {rip:#x}{}", exception_name(*vector),
        error_code.map(|c| format!(", error code {c:#x}")).unwrap_or_default(),
        fault_addr.map(|a| format!(", address {a:#x}")).unwrap_or_default())]
    Exception {
        /// Vector number.
        vector: u8,
        /// Error code, for vectors that push one.
        error_code: Option<u64>,
        /// Faulting instruction.
        rip: u64,
        /// Guest stack pointer at the fault.
        rsp: u64,
        /// CR2, for page faults.
        fault_addr: Option<u64>,
    },
    /// Triple fault (`KVM_EXIT_SHUTDOWN`).
    #[error("triple fault at rip {rip:#x}")]
    TripleFault {
        /// The instruction pointer after the shutdown.
        rip: u64,
    },
    /// A hypercall argument block outside guest-owned memory or misaligned.
    #[error(
        "bad hypercall memory: argument block at {addr:#x} ({len} bytes) is not 8-byte aligned inside guest-owned memory"
    )]
    BadHypercallMemory {
        /// Block address.
        addr: u64,
        /// Bytes the host needed there.
        len: u64,
    },
    /// An I/O access the ABI does not define (`size` 0: string I/O).
    #[error("{} of {size} bytes to port {port:#x} is not part of the ABI", if *size == 0 { "string I/O" } else if *write { "out" } else { "in" })]
    BadPortAccess {
        /// Port.
        port: u16,
        /// Access size.
        size: u8,
        /// `out` (true) or `in`.
        write: bool,
    },
    /// A write to the guest's page tables through the trap-and-emulate
    /// window that the rules refuse.
    #[error("page-table write refused ({error}): {value:#x} at table address {addr:#x}")]
    PageTableWrite {
        /// Guest-physical address written (in the tables' alias).
        addr: u64,
        /// The entry written.
        value: u64,
        /// Why it was refused: the error `mmu_update` would have returned.
        error: String,
    },
    /// The guest broke one of its device rings (see
    /// [`shoal_abi::device`]).
    #[error("device {device}: {reason}")]
    Device {
        /// The device index.
        device: u32,
        /// What the guest did.
        reason: String,
    },
    /// The handler of a custom hypercall failed or panicked.
    #[error("custom hypercall {nr:#x}: {reason}")]
    CustomHypercall {
        /// The hypercall number.
        nr: u32,
        /// The handler's error, or its panic message.
        reason: String,
    },
    /// The guest exceeded one of its limits.
    #[error("limit exceeded: {0}")]
    LimitExceeded(crate::limits::Limit),
    /// An exit the host does not serve.
    #[error("unexpected exit: {0}")]
    UnexpectedExit(String),
    /// The host failed while serving this guest (KVM error).
    #[error("internal host error: {0}")]
    Internal(String),
    /// The guest's console ring claimed more bytes than the ring holds
    /// (see [`shoal_abi::event::ConsoleRing`]).
    #[error("console ring broken: head {head} is more than the ring ahead of tail {tail}")]
    ConsoleRing {
        /// The guest's `head`.
        head: u32,
        /// The bytes the host had taken.
        tail: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_are_distinct_per_kind() {
        assert_eq!(GuestEnd::Exited(0).exit_status(), 0);
        assert_eq!(GuestEnd::Exited(3).exit_status(), 3);
        assert_eq!(GuestEnd::Exited(256).exit_status(), 1);
        assert_eq!(GuestEnd::Killed.exit_status(), 137);
        assert_eq!(
            GuestEnd::Crashed(Crash::TripleFault { rip: 0 }).exit_status(),
            125
        );
    }

    #[test]
    fn exception_crash_names_vector_code_and_address() {
        let crash = Crash::Exception {
            vector: 14,
            error_code: Some(6),
            rip: 0x10_0123,
            rsp: 0,
            fault_addr: Some(0),
        };
        assert_eq!(
            crash.to_string(),
            "#PF page fault (vector 14, error code 0x6) at rip 0x100123, address 0x0"
        );
    }
}
