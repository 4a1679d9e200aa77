//! Exceptions a guest handles itself, Xen-style: the guest registers one
//! handler for a set of vectors (`set_trap_table`); the host bounces such
//! an exception to it with the saved state in a [`TrapFrame`] in guest
//! memory, and the handler resumes the guest with `trap_return`.
//!
//! One handler runs at a time: an exception raised while it runs stops the
//! guest, like one with no handler, so a handler that faults cannot loop
//! through the host.

use kvm_bindings::kvm_regs;
use shoal_abi::HypercallError;
use shoal_abi::hypercall::{MMU_VADDR_END, SetTrapTable, TRAP_VECTORS, TrapFrame};

/// A registered handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrapTable {
    /// The handler's first instruction.
    pub entry: u64,
    /// Its stack pointer.
    pub stack: u64,
    /// Guest-physical address of the frame.
    pub frame: u64,
    vectors: u32,
}

/// A guest's handler and whether it is running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traps {
    table: Option<TrapTable>,
    running: bool,
}

/// Whether `addr` is a canonical lower-half address, the only kind a guest
/// runs at.
fn user_address(addr: u64) -> bool {
    addr < MMU_VADDR_END
}

impl Traps {
    /// Registers `args` (or removes the handler for a zero `entry`) after
    /// checking it. The frame's memory is checked by the caller.
    pub fn register(&mut self, args: &SetTrapTable) -> Result<(), HypercallError> {
        if args.entry == 0 {
            self.table = None;
            return Ok(());
        }
        if args.vectors & !TRAP_VECTORS != 0
            || !user_address(args.entry)
            || !user_address(args.stack)
            || !args.stack.is_multiple_of(16)
            || !args.frame.is_multiple_of(8)
        {
            return Err(HypercallError::Invalid);
        }
        self.table = Some(TrapTable {
            entry: args.entry,
            stack: args.stack,
            frame: args.frame,
            vectors: args.vectors,
        });
        Ok(())
    }

    /// The handler that takes `vector` now, if any: none while a handler
    /// runs. Marks the handler running.
    pub fn enter(&mut self, vector: u8) -> Option<TrapTable> {
        let table = self
            .table
            .filter(|t| !self.running && t.vectors & (1 << vector) != 0)?;
        self.running = true;
        Some(table)
    }

    /// Ends the running handler; returns where its frame is.
    pub fn leave(&mut self) -> Result<u64, HypercallError> {
        match self.table {
            Some(table) if self.running => {
                self.running = false;
                Ok(table.frame)
            }
            _ => Err(HypercallError::Invalid),
        }
    }
}

/// The state a handler gets: the exception and the registers at it.
pub fn frame(vector: u8, error_code: u64, fault_addr: u64, at: &kvm_regs) -> TrapFrame {
    TrapFrame {
        vector: u32::from(vector),
        _pad: 0,
        error_code,
        fault_addr,
        rip: at.rip,
        rsp: at.rsp,
        rflags: at.rflags,
        rax: at.rax,
        rbx: at.rbx,
        rcx: at.rcx,
        rdx: at.rdx,
        rsi: at.rsi,
        rdi: at.rdi,
        rbp: at.rbp,
        r8: at.r8,
        r9: at.r9,
        r10: at.r10,
        r11: at.r11,
        r12: at.r12,
        r13: at.r13,
        r14: at.r14,
        r15: at.r15,
    }
}

/// Whether the guest can be resumed with `frame`: its `rip` and `rsp`
/// are addresses a guest can run at.
pub fn resumable(frame: &TrapFrame) -> bool {
    user_address(frame.rip) && user_address(frame.rsp)
}

/// The registers `trap_return` resumes with.
pub fn registers(frame: &TrapFrame) -> kvm_regs {
    kvm_regs {
        rax: frame.rax,
        rbx: frame.rbx,
        rcx: frame.rcx,
        rdx: frame.rdx,
        rsi: frame.rsi,
        rdi: frame.rdi,
        rsp: frame.rsp,
        rbp: frame.rbp,
        r8: frame.r8,
        r9: frame.r9,
        r10: frame.r10,
        r11: frame.r11,
        r12: frame.r12,
        r13: frame.r13,
        r14: frame.r14,
        r15: frame.r15,
        rip: frame.rip,
        rflags: frame.rflags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(vectors: u32) -> SetTrapTable {
        SetTrapTable {
            entry: 0x10_0000,
            stack: 0x20_0000,
            frame: 0x30_0000,
            vectors,
            _pad: 0,
        }
    }

    #[test]
    fn only_registered_vectors_bounce_and_never_while_a_handler_runs() {
        let mut traps = Traps::default();
        assert_eq!(traps.enter(14), None);
        traps.register(&table(1 << 14)).expect("valid table");
        assert_eq!(traps.enter(13), None);
        let entered = traps.enter(14).expect("handled");
        assert_eq!((entered.entry, entered.frame), (0x10_0000, 0x30_0000));
        assert_eq!(traps.enter(14), None, "nested");
        assert_eq!(traps.leave(), Ok(0x30_0000));
        assert_eq!(traps.leave(), Err(HypercallError::Invalid));
        assert!(traps.enter(14).is_some());
    }

    #[test]
    fn bad_tables_and_frames_are_refused() {
        let mut traps = Traps::default();
        let invalid = Err(HypercallError::Invalid);
        assert_eq!(traps.register(&table(1 << 8)), invalid);
        assert_eq!(
            traps.register(&SetTrapTable {
                stack: 0x20_0008,
                ..table(1)
            }),
            invalid
        );
        assert_eq!(
            traps.register(&SetTrapTable {
                entry: 1 << 47,
                ..table(1)
            }),
            invalid
        );
        assert_eq!(
            traps.register(&SetTrapTable {
                frame: 0x30_0004,
                ..table(1)
            }),
            invalid
        );
        assert_eq!(traps.table, None);
        let mut frame = frame(
            14,
            2,
            0x1000,
            &kvm_regs {
                rip: 0x10_0000,
                rsp: 0x20_0000,
                ..Default::default()
            },
        );
        assert!(resumable(&frame));
        assert_eq!(registers(&frame).rsp, 0x20_0000);
        frame.rip = 0xffff_8000_0000_0000;
        assert!(!resumable(&frame));
    }
}
