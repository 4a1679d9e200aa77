//! The paravirtual MMU (`host/src/mmu.rs`): batches of `mmu_update`
//! requests, frames given back and taken again, and writes trapped in the
//! page-tables window, in sequence on one guest made as a spawn makes one
//! (`shoal_fuzz::guest`).
//!
//! Input: byte 0 sets the scene (bit 0: the trapped page-tables window is
//! open; bit 1: frames given back keep their host memory, as under the
//! slot move). Then operations until the input ends, each an op byte:
//! - 0: a batch of raw requests (count byte, then 24 bytes each, as a
//!   guest passes them);
//! - 1: a batch of compact requests (count byte, then 6 bytes each: op,
//!   flags, page of the address from `IMAGE_BASE` (0xffff: the window),
//!   page of the frame from 0);
//! - 2: frames given back (count byte, then a page number from 0 each,
//!   2 bytes);
//! - 3: frames taken (count, 2 bytes);
//! - 4: a trapped write (offset into the alias, 2 bytes; length byte;
//!   value, 8 bytes).
//!
//! Checks after each operation, besides the absence of panics and of host
//! failures (`MmuFailure`):
//! - the leaves in guest RAM are what a model says: a refused batch
//!   changes nothing, an applied one makes exactly the entries its
//!   requests ask for, in order;
//! - they keep the host's rules (`guest::check_tables`);
//! - a frame given back is mapped nowhere until taken again, frames come
//!   back oldest first and zeroed, and a batch of frames is refused whole
//!   if one of them is mapped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_abi::HypercallError;
use shoal_abi::hypercall::{
    MMU_BATCH_MAX, MMU_EXEC, MMU_MAP, MMU_PROTECT, MMU_UNMAP, MMU_WRITE, MmuRequest,
};
use shoal_abi::layout::pte::{ACCESSED, ADDR_MASK, DIRTY, NO_EXECUTE, PRESENT, USER, WRITABLE};
use shoal_abi::layout::{IMAGE_BASE, PAGE_SIZE, TRAPPED_TABLES_WINDOW};
use shoal_fuzz::Input;
use shoal_fuzz::guest::{self, Leaf, MEM};
use shoal_host::kvm::GuestRam;
use shoal_host::mmu::{Forget, GuestMmu, Mmu, TABLES_ALIAS, Translations};
use shoal_host::stats::GuestStats;
use std::collections::VecDeque;
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let scene = input.u8();
    let window = scene & 1 != 0;
    let forget = if scene & 2 != 0 {
        Forget::SlotMove
    } else {
        Forget::Notifier
    };
    let ram = guest::fresh_ram();
    let template = guest::template();
    let mut state = GuestMmu::new(template.tables().clone(), template.overlay_len(), forget);
    let mmu = state.active(MEM);
    if window {
        mmu.open_window(&ram).expect("the window opens");
    }
    let stats = GuestStats::default();
    let mut model = Model {
        leaves: guest::leaves(&ram),
        free: VecDeque::new(),
    };
    guest::check_tables(&model.leaves, window);
    // The leaves last checked against the rules.
    let mut checked = model.leaves.clone();
    let mut now_ns = 0;
    while !input.is_empty() {
        now_ns += 1_000;
        let at = Translations {
            ram: &ram,
            vm: None,
            stats: &stats,
            now_ns,
            device_gate: None,
        };
        match input.u8() % 5 {
            0 => {
                let count = usize::from(input.u8());
                let requests: Vec<MmuRequest> = (0..count)
                    .map(|_| MmuRequest::read_from_bytes(&input.bytes::<24>()).expect("24 bytes"))
                    .collect();
                update(mmu, at, &mut model, &requests);
            }
            1 => {
                // Up to 255 * 3: past MMU_BATCH_MAX too.
                let count = usize::from(input.u8()) * 3;
                let requests: Vec<MmuRequest> =
                    (0..count).map(|_| compact_request(&mut input)).collect();
                update(mmu, at, &mut model, &requests);
            }
            2 => {
                let count = usize::from(input.u8());
                let frames: Vec<u64> = (0..count)
                    .map(|_| u64::from(input.u16()) * PAGE_SIZE)
                    .collect();
                give_back(mmu, at, &mut model, &frames);
            }
            3 => {
                let count = usize::from(input.u16() % (MMU_BATCH_MAX as u16 + 8));
                take(mmu, &ram, &mut model, count);
            }
            _ => {
                let addr = TABLES_ALIAS + u64::from(input.u16());
                let len = u32::from(input.u8() % 9);
                let value = input.u64();
                let done = mmu
                    .trapped_write(at, addr, len, value)
                    .expect("no host failure");
                if done.is_ok() {
                    model.leaves = guest::leaves(&ram);
                }
            }
        }
        let leaves = guest::leaves(&ram);
        assert_eq!(
            leaves, model.leaves,
            "the tables are not what the requests asked for"
        );
        if leaves != checked {
            guest::check_tables(&leaves, window);
            for frame in &model.free {
                assert!(
                    leaves.iter().all(|[_, entry]| entry & ADDR_MASK != *frame),
                    "frame {frame:#x} is mapped while given back"
                );
            }
            checked = leaves;
        }
    }
});

/// What the tables and frames should be.
struct Model {
    /// Every present leaf, in address order.
    leaves: Vec<Leaf>,
    /// Frames given back, oldest first.
    free: VecDeque<u64>,
}

impl Model {
    /// The leaf of `vaddr`: where it is, or where it would go.
    fn find(&self, vaddr: u64) -> Result<usize, usize> {
        self.leaves.binary_search_by_key(&vaddr, |[v, _]| *v)
    }

    fn is_mapped(&self, frame: u64) -> bool {
        self.leaves
            .iter()
            .any(|[_, entry]| entry & ADDR_MASK == frame)
    }
}

/// A compact request: op, flags, the address's page from `IMAGE_BASE`
/// (0xffff: the window), the frame's page from 0.
fn compact_request(input: &mut Input<'_>) -> MmuRequest {
    let op = u32::from(input.u8());
    let flags = u32::from(input.u8());
    let vpage = input.u16();
    let vaddr = if vpage == 0xffff {
        TRAPPED_TABLES_WINDOW
    } else {
        IMAGE_BASE + u64::from(vpage) * PAGE_SIZE
    };
    MmuRequest {
        op,
        flags,
        vaddr,
        frame: u64::from(input.u16()) * PAGE_SIZE,
    }
}

/// The leaf bits the rules give ABI `flags` (known to be valid).
fn leaf_flags(flags: u32) -> u64 {
    let mut bits = PRESENT | USER | ACCESSED;
    if flags & MMU_WRITE != 0 {
        bits |= WRITABLE | DIRTY;
    }
    if flags & MMU_EXEC == 0 {
        bits |= NO_EXECUTE;
    }
    bits
}

fn update(mmu: &mut Mmu, at: Translations<'_>, model: &mut Model, requests: &[MmuRequest]) {
    let result = mmu.update(at, requests).expect("no host failure");
    let Ok(done) = result else {
        return;
    };
    assert_eq!(done, requests.len(), "an applied batch is applied whole");
    for request in requests {
        let vaddr = request.vaddr;
        match (request.op, model.find(vaddr)) {
            (MMU_MAP, at) => {
                assert!(
                    !model.free.contains(&request.frame),
                    "given-back frame {:#x} mapped",
                    request.frame
                );
                let leaf = [vaddr, request.frame | leaf_flags(request.flags)];
                match at {
                    Ok(i) => model.leaves[i] = leaf,
                    Err(i) => model.leaves.insert(i, leaf),
                }
            }
            (MMU_UNMAP, Ok(i)) => {
                model.leaves.remove(i);
            }
            (MMU_PROTECT, Ok(i)) => {
                let old = model.leaves[i][1];
                model.leaves[i][1] = (old & ADDR_MASK) | leaf_flags(request.flags);
            }
            (op, _) => panic!("request with op {op} at {vaddr:#x} applied"),
        }
    }
}

fn give_back(mmu: &mut Mmu, at: Translations<'_>, model: &mut Model, frames: &[u64]) {
    let result = mmu.give_back(at, frames).expect("no host failure");
    if result.is_err() {
        return;
    }
    for frame in frames {
        assert!(
            !model.is_mapped(*frame),
            "mapped frame {frame:#x} given back"
        );
        assert!(
            !model.free.contains(frame),
            "frame {frame:#x} given back twice"
        );
        assert!(
            (IMAGE_BASE..MEM).contains(frame),
            "frame {frame:#x} is not the guest's"
        );
        model.free.push_back(*frame);
    }
}

fn take(mmu: &mut Mmu, ram: &GuestRam, model: &mut Model, count: usize) {
    let result = mmu.alloc(ram, count).expect("no host failure");
    match result {
        Ok(frames) => {
            let oldest: Vec<u64> = model.free.drain(..count).collect();
            assert_eq!(frames, oldest, "frames come back oldest first");
            let mut page = vec![0u8; PAGE_SIZE as usize];
            for frame in frames {
                ram.read_host(frame, &mut page).expect("inside RAM");
                assert!(page.iter().all(|&b| b == 0), "frame {frame:#x} not zeroed");
            }
        }
        Err(HypercallError::LimitExceeded) => {
            assert!(
                count > model.free.len(),
                "{count} frames refused, {} free",
                model.free.len()
            );
        }
        Err(HypercallError::Invalid) => assert!(count > MMU_BATCH_MAX as usize),
        Err(other) => panic!("frame_alloc refused with {other:?}"),
    }
}
