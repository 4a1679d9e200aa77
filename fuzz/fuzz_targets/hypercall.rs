//! The hypercall dispatcher: any hypercall number and any argument block,
//! in a guest made as a spawn makes one but without KVM
//! (`shoal_fuzz::guest`), as the unit tests of `host/src/hypercall` run it.
//!
//! Input: byte 0 sets the scene (bit 0: a trap handler is running, its
//! frame at `INPUT_AT + 0x1000`; bit 1: an event is pending; bit 2: the
//! trapped page-tables window is open; bit 3: the time slice is over);
//! the rest is written into guest RAM at `INPUT_AT`, and the block there is
//! dispatched. A `multicall` block reaches every other call in one input.
//!
//! Checks, besides the absence of panics:
//! - the flow is one the guest runner handles (`Crash::Internal` is a host
//!   failure, and a finding);
//! - guest RAM changed only where the calls served may write: their
//!   blocks (header and arguments), `frame_alloc`'s array, the frames a
//!   `frame_free` gave back (scrubbed or returned to the host), and the
//!   page-table area when an MMU call was served; never anywhere else in
//!   the host's area below `IMAGE_BASE`;
//! - the page tables in RAM keep the host's rules (`guest::check_tables`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_abi::hypercall::{
    FrameAlloc, FrameFree, MAX_ARG_LEN, MMU_BATCH_MAX, MULTICALL_MAX, MmuRequest, MmuUpdate,
    Multicall, SetTrapTable,
};
use shoal_abi::layout::{IMAGE_BASE, PAGE_SIZE, PAGE_TABLE_AREA_END, PAGE_TABLE_AREA_START};
use shoal_abi::{HypercallHeader, HypercallNr};
use shoal_fuzz::guest::{self, INPUT_AT, INPUT_MAX, MEM, Snapshot};
use shoal_host::clock::{GuestClock, TscScale};
use shoal_host::console::Console;
use shoal_host::device::Devices;
use shoal_host::end::{Crash, GuestEnd};
use shoal_host::event::Events;
use shoal_host::hypercall::custom::{Caller, CustomCalls};
use shoal_host::hypercall::{Context, Flow, dispatch};
use shoal_host::kvm::GuestRam;
use shoal_host::mmu::{Forget, GuestMmu};
use shoal_host::stats::GuestStats;
use shoal_host::trap::Traps;
use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::sync::LazyLock;
use std::sync::atomic::AtomicBool;
use zerocopy::FromBytes;

const HEADER_LEN: u64 = size_of::<HypercallHeader>() as u64;

/// Where the running trap handler's frame is (scene bit 0).
const FRAME_AT: u64 = INPUT_AT + 0x1000;

/// The custom hypercall registered: adds its two words.
const CUSTOM_ADD: u32 = 0x1000;

fuzz_target!(|data: &[u8]| {
    let Some((&scene, memory)) = data.split_first() else {
        return;
    };
    let memory = &memory[..memory.len().min(INPUT_MAX)];
    let ram = guest::fresh_ram();
    ram.write_guest(INPUT_AT, memory).expect("inside guest RAM");
    let host = Host::new(&ram, scene);
    let allowed = Allowed::find(&ram, INPUT_AT);
    let before = Snapshot::take(&ram);

    let flow = host.dispatch(&ram, INPUT_AT);
    match &flow {
        Flow::Resume | Flow::Block { .. } | Flow::Yield | Flow::Return(_) => {}
        Flow::End(GuestEnd::Exited(_) | GuestEnd::Panicked(_)) => {}
        Flow::End(GuestEnd::Crashed(Crash::BadHypercallMemory { .. })) => {}
        other => panic!("a flow the dispatcher must not give: {other:?}"),
    }

    for addr in before.changed(&ram) {
        let in_tables = (PAGE_TABLE_AREA_START..PAGE_TABLE_AREA_END).contains(&addr);
        if in_tables && allowed.tables {
            continue;
        }
        assert!(
            addr >= IMAGE_BASE,
            "the host's byte at {addr:#x} changed (flow {flow:?})"
        );
        assert!(
            allowed.tangled || allowed.ranges.iter().any(|r| r.contains(&addr)),
            "guest byte {addr:#x} changed outside what the calls may write {:x?} (flow {flow:?})",
            allowed.ranges
        );
    }
    // Only an MMU call may change the tables (any other change of the
    // page-table area failed above).
    if allowed.tables {
        guest::check_tables(&guest::leaves(&ram), scene & 4 != 0);
    }
});

/// What the host keeps for the guest besides its RAM.
struct Host {
    clock: GuestClock,
    console: Console,
    stats: GuestStats,
    mmu: RefCell<GuestMmu>,
    events: Events,
    devices: Devices,
    traps: Cell<Traps>,
    preempt: AtomicBool,
}

/// The custom hypercalls: one, which adds its two words. Kept from input
/// to input (its handler keeps nothing).
static CUSTOM: LazyLock<CustomCalls> = LazyLock::new(|| {
    let calls = CustomCalls::default();
    calls
        .register(CUSTOM_ADD, |_: &Caller<'_>, [a, b]: [u64; 2]| {
            Ok::<u64, String>(a.wrapping_add(b))
        })
        .expect("a custom number");
    calls
});

impl Host {
    /// The host's part of a fresh guest, set as `scene` says.
    fn new(ram: &GuestRam, scene: u8) -> Self {
        let template = guest::template();
        let host = Self {
            clock: GuestClock::start(TscScale::from_hz(1_000_000_000), 0),
            console: Console::new(1, 4096, None),
            stats: GuestStats::default(),
            mmu: RefCell::new(GuestMmu::new(
                template.tables().clone(),
                template.overlay_len(),
                Forget::Notifier,
            )),
            events: Events::default(),
            devices: Devices::default(),
            traps: Cell::default(),
            preempt: AtomicBool::new(scene & 8 != 0),
        };
        if scene & 1 != 0 {
            let mut traps = Traps::default();
            let table = SetTrapTable {
                entry: IMAGE_BASE,
                stack: INPUT_AT,
                frame: FRAME_AT,
                vectors: 1 << 14,
                _pad: 0,
            };
            traps.register(&table).expect("a valid table");
            traps.enter(14).expect("vector 14 is handled");
            host.traps.set(traps);
        }
        if scene & 2 != 0 {
            host.events.attach(ram);
            host.events.raise(1);
        }
        if scene & 4 != 0 {
            host.mmu
                .borrow_mut()
                .active(MEM)
                .open_window(ram)
                .expect("the window opens");
        }
        host
    }

    fn dispatch(&self, ram: &GuestRam, addr: u64) -> Flow {
        let ctx = Context {
            id: 1,
            ram,
            clock: &self.clock,
            console: &self.console,
            features: 0,
            stats: &self.stats,
            vm: None,
            mmu: &self.mmu,
            events: &self.events,
            devices: &self.devices,
            at: 0,
            traps: &self.traps,
            preempt: &self.preempt,
            in_multicall: false,
            custom: &CUSTOM,
            observer: None,
        };
        dispatch(&ctx, addr)
    }
}

/// The guest bytes a dispatch may change, found from RAM before it.
struct Allowed {
    /// Blocks, `frame_alloc` arrays, pages given back.
    ranges: Vec<Range<u64>>,
    /// An MMU call may be served: the page-table area may change.
    tables: bool,
    /// One call may write what another reads (overlapping blocks and
    /// arrays of a multicall), so what each call reads is not known from
    /// RAM before the dispatch: only the host's area is checked.
    tangled: bool,
}

/// A guest range `at..at + len`, saturated.
fn range(at: u64, len: u64) -> Range<u64> {
    at..at.saturating_add(len)
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

fn read<T: FromBytes>(ram: &GuestRam, addr: u64) -> Option<T> {
    let mut bytes = vec![0u8; size_of::<T>()];
    ram.read_guest(addr, &mut bytes).ok()?;
    T::read_from_bytes(&bytes).ok()
}

fn read_array<T: FromBytes>(ram: &GuestRam, addr: u64, count: u32) -> Vec<T> {
    let mut bytes = vec![0u8; size_of::<T>() * count as usize];
    if ram.read_guest(addr, &mut bytes).is_err() {
        return Vec::new();
    }
    bytes
        .chunks_exact(size_of::<T>())
        .filter_map(|chunk| T::read_from_bytes(chunk).ok())
        .collect()
}

impl Allowed {
    fn find(ram: &GuestRam, at: u64) -> Self {
        let mut blocks = vec![at];
        let mut nested = false;
        if let Some(header) = read::<HypercallHeader>(ram, at)
            && header.nr == HypercallNr::Multicall as u32
            && let Some(args) = read::<Multicall>(ram, at + HEADER_LEN)
            && args.count <= MULTICALL_MAX
        {
            blocks.extend(read_array::<u64>(ram, args.calls, args.count));
            nested = true;
        }
        let mut allowed = Allowed {
            ranges: Vec::new(),
            tables: false,
            tangled: false,
        };
        // (call, range) a call writes, and one it reads.
        let mut writes: Vec<(u64, Range<u64>)> = Vec::new();
        let mut reads: Vec<(u64, Range<u64>)> = Vec::new();
        for (i, &block) in blocks.iter().enumerate() {
            let whole = range(block, HEADER_LEN + u64::from(MAX_ARG_LEN));
            allowed.ranges.push(whole.clone());
            // The multicall's own block is written after its calls ran.
            if !(nested && i == 0) {
                writes.push((block, whole.clone()));
                reads.push((block, whole));
            }
            let Some(header) = read::<HypercallHeader>(ram, block) else {
                continue;
            };
            let args_at = block + HEADER_LEN;
            let nr = header.nr;
            if nr == HypercallNr::MmuUpdate as u32 {
                allowed.tables = true;
                if let Some(args) = read::<MmuUpdate>(ram, args_at) {
                    let len = u64::from(args.count) * size_of::<MmuRequest>() as u64;
                    reads.push((block, range(args.requests, len)));
                }
            } else if nr == HypercallNr::FrameAlloc as u32 {
                if let Some(args) = read::<FrameAlloc>(ram, args_at) {
                    let array = range(args.frames, u64::from(args.count) * 8);
                    allowed.ranges.push(array.clone());
                    writes.push((block, array));
                }
            } else if nr == HypercallNr::FrameFree as u32
                && let Some(args) = read::<FrameFree>(ram, args_at)
                && args.count <= MMU_BATCH_MAX
            {
                reads.push((block, range(args.frames, u64::from(args.count) * 8)));
                for frame in read_array::<u64>(ram, args.frames, args.count) {
                    let page = frame & !(PAGE_SIZE - 1);
                    allowed.ranges.push(range(page, PAGE_SIZE));
                }
            }
        }
        // A block another call writes over, unless it is the same block
        // listed twice (a call writes back what it read, its results
        // aside, and no result is a pointer or a count).
        allowed.tangled = writes.iter().any(|(writer, written)| {
            reads
                .iter()
                .any(|(reader, read)| writer != reader && overlaps(written, read))
        });
        allowed
    }
}
