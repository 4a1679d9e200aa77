//! Decoding and validation of hypercalls, without KVM: the dispatcher runs
//! against plain guest RAM.

use super::*;
use crate::clock::{GuestClock, TscScale};
use crate::event::Events;
use crate::mmu::Forget;
use shoal_abi::hypercall::{AbiInfo, Block, ConsoleWrite, Exit, Panic, WallClock};
use shoal_abi::layout::EVENT_PAGE;
use shoal_abi::layout::{IMAGE_BASE, PAGE_TABLE_AREA_START};

const MEM: u64 = 4 << 20;
const BLOCK_AT: u64 = IMAGE_BASE + 0x1000;

struct Fixture {
    ram: GuestRam,
    clock: GuestClock,
    console: Console,
    stats: GuestStats,
    mmu: RefCell<GuestMmu>,
    events: Events,
    devices: Devices,
    traps: Cell<Traps>,
    preempt: AtomicBool,
    custom: custom::CustomCalls,
}

impl Fixture {
    fn new(console_limit: u64) -> Self {
        Self {
            ram: GuestRam::new(MEM).expect("maps"),
            clock: GuestClock::start(TscScale::from_hz(1_000_000_000), 0),
            console: Console::new(1, console_limit, None),
            stats: GuestStats::default(),
            events: Events::default(),
            devices: Devices::default(),
            mmu: RefCell::new(GuestMmu::new(
                std::sync::Arc::default(),
                0,
                Forget::default(),
            )),
            traps: Cell::default(),
            preempt: AtomicBool::new(false),
            custom: custom::CustomCalls::default(),
        }
    }

    fn dispatch(&self, addr: u64) -> Flow {
        let ctx = Context {
            id: 1,
            ram: &self.ram,
            clock: &self.clock,
            console: &self.console,
            features: 0b101,
            stats: &self.stats,
            vm: None,
            mmu: &self.mmu,
            events: &self.events,
            devices: &self.devices,
            at: 0,
            traps: &self.traps,
            preempt: &self.preempt,
            in_multicall: false,
            custom: &self.custom,
            observer: None,
        };
        dispatch(&ctx, addr)
    }

    /// Writes a block for `args` at `addr`, dispatches it, and returns the
    /// flow, `ret` and the arguments as written back.
    fn call<T: Hypercall>(&self, addr: u64, args: T) -> (Flow, i64, T) {
        self.call_raw(addr, T::NR as u32, T::ARG_LEN, args)
    }

    fn call_raw<T: Hypercall>(&self, addr: u64, nr: u32, arg_len: u32, args: T) -> (Flow, i64, T) {
        let header = HypercallHeader {
            nr,
            arg_len,
            ret: 0,
        };
        self.ram
            .write_guest(addr, header.as_bytes())
            .expect("in RAM");
        self.ram
            .write_guest(addr + 16, args.as_bytes())
            .expect("in RAM");
        let flow = self.dispatch(addr);
        let mut back = [0u8; 16];
        self.ram.read_guest(addr, &mut back).expect("in RAM");
        let header = HypercallHeader::read_from_bytes(&back).expect("16 bytes");
        let mut arg_bytes = vec![0u8; size_of::<T>()];
        self.ram
            .read_guest(addr + 16, &mut arg_bytes)
            .expect("in RAM");
        (
            flow,
            header.ret,
            T::read_from_bytes(&arg_bytes).expect("sized"),
        )
    }
}

#[test]
fn abi_info_reports_version_and_features() {
    let f = Fixture::new(100);
    let (flow, ret, info) = f.call(BLOCK_AT, AbiInfo::default());
    assert_eq!((flow, ret), (Flow::Resume, 0));
    assert_eq!(info.version, shoal_abi::ABI_VERSION);
    assert_eq!(info.features, 0b101);
    assert_eq!(f.stats.snapshot().hypercall(HypercallNr::AbiInfo), 1);
}

#[test]
fn nonzero_padding_is_refused() {
    let f = Fixture::new(100);
    let (_, ret, _) = f.call(
        BLOCK_AT,
        AbiInfo {
            _pad: 1,
            ..Default::default()
        },
    );
    assert_eq!(ret, HypercallError::ReservedNotZero.to_ret());
}

#[test]
fn unknown_number_returns_documented_error_and_resumes() {
    let f = Fixture::new(100);
    let (flow, ret, _) = f.call_raw(BLOCK_AT, 0xdead, 16, AbiInfo::default());
    assert_eq!(
        (flow, ret),
        (Flow::Resume, HypercallError::UnknownHypercall.to_ret())
    );
    assert_eq!(f.stats.snapshot().unknown_hypercalls, 1);
}

#[test]
fn wrong_arg_len_returns_bad_length() {
    let f = Fixture::new(100);
    let (flow, ret, _) = f.call_raw(
        BLOCK_AT,
        HypercallNr::WallClock as u32,
        16,
        AbiInfo::default(),
    );
    assert_eq!(
        (flow, ret),
        (Flow::Resume, HypercallError::BadLength.to_ret())
    );
    let (_, ret, _) = f.call_raw(
        BLOCK_AT,
        HypercallNr::WallClock as u32,
        u32::MAX,
        AbiInfo::default(),
    );
    assert_eq!(ret, HypercallError::BadLength.to_ret());
}

fn is_bad_memory(flow: &Flow) -> bool {
    matches!(
        flow,
        Flow::End(GuestEnd::Crashed(Crash::BadHypercallMemory { .. }))
    )
}

#[test]
fn misaligned_or_outside_blocks_stop_the_guest() {
    let f = Fixture::new(100);
    assert!(is_bad_memory(&f.dispatch(BLOCK_AT + 4)));
    assert!(is_bad_memory(&f.dispatch(MEM - 8)));
    assert!(is_bad_memory(&f.dispatch(MEM)));
    assert!(is_bad_memory(&f.dispatch(0)));
    assert!(is_bad_memory(&f.dispatch(PAGE_TABLE_AREA_START)));
    assert!(is_bad_memory(&f.dispatch(u64::MAX - 7)));
}

#[test]
fn arguments_past_the_end_of_memory_stop_the_guest() {
    let f = Fixture::new(100);
    // The header fits in the last 16 bytes; its arguments would not.
    let header = HypercallHeader {
        nr: HypercallNr::WallClock as u32,
        arg_len: 8,
        ret: 0,
    };
    f.ram
        .write_guest(MEM - 16, header.as_bytes())
        .expect("in RAM");
    assert!(is_bad_memory(&f.dispatch(MEM - 16)));
}

#[test]
fn console_write_checks_pointer_length_and_limit() {
    let f = Fixture::new(8);
    f.ram
        .write_guest(IMAGE_BASE, b"hello, world")
        .expect("in RAM");
    let write = |addr, len| f.call(BLOCK_AT, ConsoleWrite { addr, len }).1;
    assert_eq!(write(0x3000, 4), HypercallError::Fault.to_ret());
    assert_eq!(write(MEM - 2, 4), HypercallError::Fault.to_ret());
    assert_eq!(write(u64::MAX, 2), HypercallError::Fault.to_ret());
    assert_eq!(
        write(IMAGE_BASE, u64::MAX),
        HypercallError::Invalid.to_ret()
    );
    assert_eq!(write(1, 0), 0, "an empty write may point anywhere");
    assert_eq!(write(IMAGE_BASE, 5), 5);
    assert_eq!(
        write(IMAGE_BASE + 5, 7),
        3,
        "only three bytes fit under the limit"
    );
    assert_eq!(write(IMAGE_BASE, 1), HypercallError::LimitExceeded.to_ret());
    assert_eq!(f.console.snapshot(), b"hello, w");
    assert_eq!(f.stats.snapshot().console_bytes, 8);
}

#[test]
fn exit_and_panic_end_the_guest() {
    let f = Fixture::new(100);
    let (flow, _, _) = f.call(BLOCK_AT, Exit { code: -3, _pad: 0 });
    assert_eq!(flow, Flow::End(GuestEnd::Exited(-3)));

    f.ram
        .write_guest(IMAGE_BASE, b"oops main.rs")
        .expect("in RAM");
    let panic = Panic {
        msg_addr: IMAGE_BASE,
        msg_len: 4,
        file_addr: IMAGE_BASE + 5,
        file_len: 7,
        line: 3,
        column: 9,
    };
    let (flow, _, _) = f.call(BLOCK_AT, panic);
    let Flow::End(GuestEnd::Panicked(report)) = flow else {
        panic!("panic did not end the guest: {flow:?}")
    };
    assert_eq!(
        (report.message.as_str(), report.file.as_str()),
        ("oops", "main.rs")
    );
    assert_eq!((report.line, report.column), (3, 9));
}

#[test]
fn panic_with_bad_pointers_still_ends_the_guest() {
    let f = Fixture::new(100);
    let panic = Panic {
        msg_addr: u64::MAX,
        msg_len: u64::MAX,
        file_addr: 0,
        file_len: 10,
        line: 1,
        column: 1,
    };
    let (flow, _, _) = f.call(BLOCK_AT, panic);
    let Flow::End(GuestEnd::Panicked(report)) = flow else {
        panic!("panic did not end the guest: {flow:?}")
    };
    assert_eq!(report.message, "<outside guest memory>");
}

#[test]
fn block_returns_at_once_for_past_deadlines_and_blocks_for_future_ones() {
    let f = Fixture::new(100);
    let (flow, ret, args) = f.call(
        BLOCK_AT,
        Block {
            deadline_ns: 0,
            events: 7,
        },
    );
    assert_eq!((flow, ret, args.events), (Flow::Resume, 0, 0));
    let far = f.clock.now_ns() + 1_000_000_000;
    let (flow, _, _) = f.call(
        BLOCK_AT,
        Block {
            deadline_ns: far,
            events: 0,
        },
    );
    assert_eq!(
        flow,
        Flow::Block {
            deadline_ns: far,
            at: BLOCK_AT
        }
    );
    // Nothing pending when it wakes: the 0 stays.
    time::woke(&f.ram, &f.events, BLOCK_AT);
    let mut ret = [0u8; 8];
    f.ram.read_guest(BLOCK_AT + 8, &mut ret).expect("in RAM");
    assert_eq!(i64::from_le_bytes(ret), 0);
}

#[test]
fn block_returns_pending_events_at_once_or_on_waking() {
    let f = Fixture::new(100);
    f.events.attach(&f.ram);
    let far = f.clock.now_ns() + 1_000_000_000;
    let block = Block {
        deadline_ns: far,
        events: 0,
    };
    // Masked: it blocks.
    f.ram
        .write_host(EVENT_PAGE + 8, &0b10u64.to_le_bytes())
        .expect("mask");
    assert!(!f.events.raise(0b10));
    let (flow, ret, _) = f.call(BLOCK_AT, block);
    assert!(matches!(flow, Flow::Block { .. }) && ret == 0);
    // Raised while it sleeps: the result says so when it runs again.
    assert!(f.events.raise(0b1));
    time::woke(&f.ram, &f.events, BLOCK_AT);
    let mut after = [0u8; 32];
    f.ram.read_guest(BLOCK_AT, &mut after).expect("in RAM");
    assert_eq!(i64::from_le_bytes(after[8..16].try_into().expect("8")), 1);
    assert_eq!(
        u64::from_le_bytes(after[24..32].try_into().expect("8")),
        0b1
    );
    // Pending before the call: it returns at once.
    let (flow, ret, args) = f.call(BLOCK_AT, block);
    assert_eq!((flow, ret, args.events), (Flow::Resume, 1, 0b1));
}

#[test]
fn wall_clock_is_the_hosts_real_time() {
    let f = Fixture::new(100);
    let before = crate::clock::wall_ns();
    let (_, ret, args) = f.call(BLOCK_AT, WallClock::default());
    assert_eq!(ret, 0);
    assert!(args.unix_ns >= before && args.unix_ns <= crate::clock::wall_ns());
}

/// A small deterministic generator for the randomized test below.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_hostile_blocks_never_panic_and_end_only_with_documented_outcomes() {
    let f = Fixture::new(4096);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let interesting = [
        0,
        8,
        IMAGE_BASE - 8,
        IMAGE_BASE,
        MEM - 16,
        MEM - 8,
        MEM,
        u64::MAX - 7,
    ];
    for round in 0..20_000 {
        let addr = match rng.next() % 4 {
            0 => interesting[(rng.next() % interesting.len() as u64) as usize],
            1 => rng.next(),
            _ => IMAGE_BASE + (rng.next() % (MEM - IMAGE_BASE)),
        };
        let nr = match rng.next() % 3 {
            0 => rng.next() as u32,
            _ => (rng.next() % 8) as u32,
        };
        let arg_len = match rng.next() % 3 {
            0 => rng.next() as u32,
            _ => [0, 8, 16, 40][(rng.next() % 4) as usize],
        };
        let mut block = [0u8; 56];
        block[..4].copy_from_slice(&nr.to_le_bytes());
        block[4..8].copy_from_slice(&arg_len.to_le_bytes());
        for chunk in block[16..].chunks_mut(8) {
            // Pointers into RAM half of the time, anything otherwise.
            let value = if rng.next().is_multiple_of(2) {
                IMAGE_BASE + rng.next() % (MEM - IMAGE_BASE)
            } else {
                rng.next() % 0x2_0000
            };
            chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
        }
        let written = addr
            .checked_add(block.len() as u64)
            .is_some_and(|end| end <= MEM)
            && addr >= IMAGE_BASE;
        if written {
            f.ram.write_guest(addr, &block).expect("in RAM");
        }
        match f.dispatch(addr) {
            Flow::Resume | Flow::Block { .. } => {}
            Flow::End(GuestEnd::Exited(_) | GuestEnd::Panicked(_)) => {}
            Flow::End(GuestEnd::Crashed(Crash::BadHypercallMemory { .. })) => {}
            other => panic!("round {round}: unexpected outcome {other:?} for block at {addr:#x}"),
        }
    }
}

/// Writes a block for `args` at `addr` (without dispatching it).
fn put<T: Hypercall>(f: &Fixture, addr: u64, args: T) {
    let header = HypercallHeader {
        nr: T::NR as u32,
        arg_len: T::ARG_LEN,
        ret: 1,
    };
    f.ram.write_guest(addr, header.as_bytes()).expect("in RAM");
    f.ram
        .write_guest(addr + 16, args.as_bytes())
        .expect("in RAM");
}

fn ret_at(f: &Fixture, addr: u64) -> i64 {
    let mut back = [0u8; 16];
    f.ram.read_guest(addr, &mut back).expect("in RAM");
    HypercallHeader::read_from_bytes(&back)
        .expect("16 bytes")
        .ret
}

/// A multicall of `blocks`, listed at `LIST`.
fn multicall(f: &Fixture, blocks: &[u64]) -> (Flow, i64, abi::Multicall) {
    const LIST: u64 = BLOCK_AT + 0x800;
    f.ram.write_guest(LIST, blocks.as_bytes()).expect("in RAM");
    f.call(
        BLOCK_AT,
        abi::Multicall {
            calls: LIST,
            count: blocks.len() as u32,
            done: 0,
        },
    )
}

#[test]
fn multicall_runs_each_call_with_its_own_result() {
    let f = Fixture::new(100);
    let (a, b, c) = (BLOCK_AT + 0x100, BLOCK_AT + 0x200, BLOCK_AT + 0x300);
    put(&f, a, AbiInfo::default());
    put(
        &f,
        b,
        AbiInfo {
            _pad: 1,
            ..Default::default()
        },
    );
    put(&f, c, WallClock::default());
    let (flow, ret, args) = multicall(&f, &[a, b, c]);
    assert_eq!((flow, ret, args.done), (Flow::Resume, 3, 3));
    assert_eq!(ret_at(&f, a), 0);
    assert_eq!(ret_at(&f, b), HypercallError::ReservedNotZero.to_ret());
    assert_eq!(ret_at(&f, c), 0);
    let stats = f.stats.snapshot();
    assert_eq!(stats.hypercall(HypercallNr::AbiInfo), 2);
    assert_eq!(stats.hypercall(HypercallNr::Multicall), 1);
}

#[test]
fn multicall_stops_at_a_call_that_does_not_return_and_at_the_slice_end() {
    let f = Fixture::new(100);
    let (a, b, c) = (BLOCK_AT + 0x100, BLOCK_AT + 0x200, BLOCK_AT + 0x300);
    put(&f, a, AbiInfo::default());
    put(&f, b, Exit { code: 3, _pad: 0 });
    put(&f, c, AbiInfo::default());
    let (flow, _, _) = multicall(&f, &[a, b, c]);
    assert_eq!(flow, Flow::End(crate::end::GuestEnd::Exited(3)));
    assert_eq!(ret_at(&f, c), 1, "the call after exit never ran");

    put(&f, b, AbiInfo::default());
    f.preempt.store(true, Ordering::Relaxed);
    let (flow, ret, args) = multicall(&f, &[a, b, c]);
    assert_eq!(
        (flow, ret, args.done),
        (Flow::Resume, 1, 1),
        "one call, then the slice ends"
    );
    assert_eq!(ret_at(&f, b), 1);
}

#[test]
fn multicall_refuses_nesting_and_long_lists() {
    let f = Fixture::new(100);
    let inner = BLOCK_AT + 0x100;
    put(
        &f,
        inner,
        abi::Multicall {
            calls: BLOCK_AT + 0x800,
            count: 0,
            done: 0,
        },
    );
    let (flow, ret, _) = multicall(&f, &[inner]);
    assert_eq!((flow, ret), (Flow::Resume, 1));
    assert_eq!(ret_at(&f, inner), HypercallError::Invalid.to_ret());
    let too_many = vec![inner; MULTICALL_MAX as usize + 1];
    let (_, ret, args) = multicall(&f, &too_many);
    assert_eq!((ret, args.done), (HypercallError::Invalid.to_ret(), 0));
}

#[test]
fn trap_return_needs_a_running_handler() {
    let f = Fixture::new(100);
    let (flow, ret, _) = f.call(BLOCK_AT, abi::TrapReturn::default());
    assert_eq!(
        (flow, ret),
        (Flow::Resume, HypercallError::Invalid.to_ret())
    );
    let frame_at = BLOCK_AT + 0x400;
    let table = abi::SetTrapTable {
        entry: IMAGE_BASE,
        stack: BLOCK_AT,
        frame: frame_at,
        vectors: 1 << 14,
        _pad: 0,
    };
    assert_eq!(f.call(BLOCK_AT, table).1, 0);
    let mut traps = f.traps.get();
    assert!(traps.enter(14).is_some());
    f.traps.set(traps);
    let frame = TrapFrame {
        rip: IMAGE_BASE + 5,
        rsp: BLOCK_AT - 64,
        rax: 42,
        ..Default::default()
    };
    f.ram
        .write_guest(frame_at, frame.as_bytes())
        .expect("in RAM");
    let (flow, ret, _) = f.call(BLOCK_AT, abi::TrapReturn::default());
    assert_eq!((flow, ret), (Flow::Return(frame), 0));
    assert_eq!(
        f.call(BLOCK_AT, abi::TrapReturn::default()).1,
        HypercallError::Invalid.to_ret()
    );
}

/// A custom call's 16 bytes, carried in `AbiInfo`'s layout.
fn two_words(a: u32, b: u64) -> AbiInfo {
    AbiInfo {
        version: a,
        _pad: 0,
        features: b,
    }
}

#[test]
fn a_custom_call_is_served_by_its_typed_handler() {
    let f = Fixture::new(100);
    f.custom
        .register(0x1000, |caller: &custom::Caller<'_>, [a, b]: [u64; 2]| {
            Ok::<u64, String>(a + b + caller.id())
        })
        .expect("registers");
    let (flow, ret, back) = f.call_raw(BLOCK_AT, 0x1000, 16, two_words(2, 40));
    assert_eq!((flow, ret), (Flow::Resume, 0));
    // The response (8 bytes) over the request, the rest zeroed.
    assert_eq!((back.version, back._pad, back.features), (43, 0, 0));
    assert_eq!(f.stats.snapshot().custom_hypercalls, 1);

    let (flow, ret, _) = f.call_raw(BLOCK_AT, 0x1000, 8, two_words(2, 40));
    assert_eq!(
        (flow, ret),
        (Flow::Resume, HypercallError::BadLength.to_ret())
    );
    let (flow, ret, _) = f.call_raw(BLOCK_AT, 0x1001, 16, two_words(2, 40));
    assert_eq!(
        (flow, ret),
        (Flow::Resume, HypercallError::UnknownHypercall.to_ret())
    );
}

#[test]
fn a_custom_handler_reaches_guest_memory_only_through_the_checked_door() {
    let f = Fixture::new(100);
    f.custom
        .register(
            0x1000,
            |caller: &custom::Caller<'_>, [addr, len]: [u64; 2]| {
                let mut text = vec![0; len as usize];
                caller.read(addr, &mut text)?;
                text.make_ascii_uppercase();
                caller.write(addr, &text)?;
                Ok::<u64, HypercallError>(len)
            },
        )
        .expect("registers");
    let text_at = IMAGE_BASE + 0x2000;
    f.ram.write_guest(text_at, b"shoal").expect("in RAM");
    let (flow, ret, back) = f.call_raw(BLOCK_AT, 0x1000, 16, two_words(text_at as u32, 5));
    assert_eq!((flow, ret, back.version), (Flow::Resume, 0, 5));
    let mut text = [0; 5];
    f.ram.read_guest(text_at, &mut text).expect("in RAM");
    assert_eq!(&text, b"SHOAL");
    // Outside guest-owned memory: the handler's error stops the guest.
    let (flow, _, _) = f.call_raw(BLOCK_AT, 0x1000, 16, two_words(0, 5));
    assert!(
        matches!(&flow, Flow::End(GuestEnd::Crashed(Crash::CustomHypercall { nr: 0x1000, reason })) if reason.contains("outside guest memory")),
        "{flow:?}"
    );
}

#[test]
fn a_custom_handler_that_panics_stops_only_its_caller_with_the_reason() {
    let f = Fixture::new(100);
    f.custom
        .register(
            0x1fff,
            |_: &custom::Caller<'_>, _: [u64; 2]| -> Result<u64, String> { panic!("boom") },
        )
        .expect("registers");
    let (flow, _, _) = f.call_raw(BLOCK_AT, 0x1fff, 16, two_words(0, 0));
    assert_eq!(
        flow,
        Flow::End(GuestEnd::Crashed(Crash::CustomHypercall {
            nr: 0x1fff,
            reason: "the handler panicked: boom".into()
        }))
    );
}

#[test]
fn custom_numbers_are_checked_when_registered() {
    let calls = custom::CustomCalls::default();
    let handler = |_: &custom::Caller<'_>, x: u64| Ok::<u64, String>(x);
    assert!(matches!(
        calls.register(0x0fff, handler),
        Err(custom::RegisterError::NotCustom(0x0fff))
    ));
    calls.register(0x1000, handler).expect("registers");
    assert!(matches!(
        calls.register(0x1000, handler),
        Err(custom::RegisterError::Taken(0x1000))
    ));
    assert!(matches!(
        calls.register(
            0x1001,
            |_: &custom::Caller<'_>, x: [u8; 300]| Ok::<_, String>(x)
        ),
        Err(custom::RegisterError::TooLarge { len: 300, .. })
    ));
}
