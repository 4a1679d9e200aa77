//! Writes the fuzz targets' seed corpora (`fuzz/corpus/<target>/`): a
//! handful of meaningful inputs per target, in each target's input format
//! (see the target's doc comment). Run after changing a format:
//!
//! ```text
//! cd fuzz && RUSTFLAGS="--cfg fuzzing" cargo run --release --bin make_seeds --target-dir target/seeds
//! ```
//!
//! (`--cfg fuzzing` for the host's wire seeds; no coverage flags, which
//! would need libFuzzer linked.)

use shoal_abi::device::{
    DESC_NEXT, DESC_WRITE, Descriptor, GATEWAY_IPV4, GATEWAY_MAC, guest_ipv4, guest_mac,
};
use shoal_abi::hypercall::{
    AbiInfo, Block, ConsoleWrite, DeviceInfo, Exit, FrameAlloc, FrameFree, Hypercall, MMU_EXEC,
    MMU_MAP, MMU_PROTECT, MMU_UNMAP, MMU_WRITE, MmuRequest, MmuUpdate, Multicall, Panic,
    QueueSetup, SetTrapTable, TrapFrame, TrapReturn, WallClock, Yield,
};
use shoal_abi::layout::pte::{ACCESSED, DIRTY, NO_EXECUTE, PRESENT, USER, WRITABLE};
use shoal_abi::layout::{IMAGE_BASE, PAGE_SIZE, PAGE_TABLE_AREA_START};
use shoal_abi::{ABI_VERSION, HypercallHeader};
use shoal_fuzz::elf::{self, PF_R, PF_W, PF_X};
use shoal_fuzz::frames::{self, IPV4, Segment, tcp};
use shoal_fuzz::guest::{self, INPUT_AT};
use std::path::Path;
use zerocopy::IntoBytes;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let corpora = [
        ("descriptor_walk", descriptor_walk()),
        ("hypercall", hypercall()),
        ("loader", loader()),
        ("mmu_update", mmu_update()),
        ("lan_frame", lan_frame()),
        ("gateway", gateway()),
        ("shard_wire", shard_wire()),
    ];
    for (target, seeds) in corpora {
        let dir = root.join(target);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).expect("seed written");
        }
        println!("{target}: {} seeds", seeds.len());
    }
}

type Seeds = Vec<(&'static str, Vec<u8>)>;

/// Bytes placed at `offset` in a buffer grown as needed.
#[derive(Default)]
struct Memory(Vec<u8>);

impl Memory {
    fn put(&mut self, offset: u64, bytes: &[u8]) -> &mut Self {
        let at = offset as usize;
        if self.0.len() < at + bytes.len() {
            self.0.resize(at + bytes.len(), 0);
        }
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }

    /// A hypercall block for `args` at `offset`.
    fn call<T: Hypercall>(&mut self, offset: u64, args: T) -> &mut Self {
        self.put(offset, &block(args))
    }

    /// The input: `prefix`, then the memory.
    fn input(&self, prefix: &[u8]) -> Vec<u8> {
        let mut input = prefix.to_vec();
        input.extend_from_slice(&self.0);
        input
    }
}

fn block<T: Hypercall>(args: T) -> Vec<u8> {
    let header = HypercallHeader {
        nr: T::NR as u32,
        arg_len: T::ARG_LEN,
        ret: 0,
    };
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend_from_slice(args.as_bytes());
    bytes
}

fn descriptor_walk() -> Seeds {
    const BASE: u64 = 0x10_0000;
    let data = BASE + 0x2000;
    let table = |shift: u8, head: u16, descs: &[Descriptor]| {
        let mut input = vec![shift];
        input.extend_from_slice(&head.to_le_bytes());
        for d in descs {
            input.extend_from_slice(d.as_bytes());
        }
        input
    };
    vec![
        (
            "chain-of-three",
            table(
                3,
                0,
                &[
                    Descriptor::new(data, 16, DESC_NEXT, 2),
                    Descriptor::new(0, 0, 0, 0),
                    Descriptor::new(data + 16, 512, DESC_NEXT | DESC_WRITE, 3),
                    Descriptor::new(data + 528, 1, DESC_WRITE, 0),
                ],
            ),
        ),
        ("single", table(0, 0, &[Descriptor::new(data, 4096, 0, 0)])),
        (
            "loop",
            table(
                1,
                0,
                &[
                    Descriptor::new(data, 16, DESC_NEXT, 1),
                    Descriptor::new(data, 16, DESC_NEXT, 0),
                ],
            ),
        ),
    ]
}

fn hypercall() -> Seeds {
    let text = 0x100;
    let mut seeds: Seeds = Vec::new();
    let mut simple =
        |name, bytes: Vec<u8>| seeds.push((name, Memory::default().put(0, &bytes).input(&[0])));
    simple("abi-info", block(AbiInfo::default()));
    simple("exit", block(Exit { code: 3, _pad: 0 }));
    simple("wall-clock", block(WallClock::default()));
    simple("yield", block(Yield::default()));
    simple("block-past", block(Block::default()));
    simple("device-info", block(DeviceInfo::default()));
    simple(
        "queue-setup",
        block(QueueSetup {
            size: 8,
            desc: INPUT_AT + 0x1000,
            avail: INPUT_AT + 0x1080,
            used: INPUT_AT + 0x1100,
            ..QueueSetup::default()
        }),
    );
    simple(
        "set-trap-table",
        block(SetTrapTable {
            entry: IMAGE_BASE,
            stack: INPUT_AT,
            frame: INPUT_AT + 0x1000,
            vectors: 1 << 14,
            _pad: 0,
        }),
    );
    let mut custom = HypercallHeader {
        nr: 0x1000,
        arg_len: 16,
        ret: 0,
    }
    .as_bytes()
    .to_vec();
    custom.extend_from_slice(&[2u64, 40].map(u64::to_le_bytes).concat());
    simple("custom-add", custom);
    let unknown = HypercallHeader {
        nr: 0xdead,
        arg_len: 8,
        ret: 0,
    };
    simple("unknown", unknown.as_bytes().to_vec());

    let console = ConsoleWrite {
        addr: INPUT_AT + text,
        len: 5,
    };
    seeds.push((
        "console-write",
        Memory::default()
            .call(0, console)
            .put(text, b"hello")
            .input(&[0]),
    ));
    let panic = Panic {
        msg_addr: INPUT_AT + text,
        msg_len: 4,
        file_addr: INPUT_AT + text + 5,
        file_len: 7,
        line: 3,
        column: 9,
    };
    seeds.push((
        "panic",
        Memory::default()
            .call(0, panic)
            .put(text, b"oops main.rs")
            .input(&[0]),
    ));
    seeds.push((
        "block-event-pending",
        Memory::default()
            .call(
                0,
                Block {
                    deadline_ns: u64::MAX,
                    events: 0,
                },
            )
            .input(&[2]),
    ));
    let frame = TrapFrame {
        rip: IMAGE_BASE,
        rsp: INPUT_AT,
        ..TrapFrame::default()
    };
    seeds.push((
        "trap-return",
        Memory::default()
            .call(0, TrapReturn::default())
            .put(0x1000, frame.as_bytes())
            .input(&[1]),
    ));

    // An MMU batch: map a new page, protect it, map another, unmap one.
    let requests = [
        request(MMU_MAP, MMU_WRITE, 0x4000_0000, INPUT_AT + 0x3000),
        request(MMU_PROTECT, 0, 0x4000_0000, 0),
        request(MMU_MAP, MMU_EXEC, 0x4000_1000, INPUT_AT + 0x4000),
        request(MMU_UNMAP, 0, INPUT_AT + 0x5000, 0),
    ];
    let update = MmuUpdate {
        requests: INPUT_AT + 0x100,
        count: requests.len() as u32,
        ..MmuUpdate::default()
    };
    seeds.push((
        "mmu-update",
        Memory::default()
            .call(0, update)
            .put(0x100, requests.as_bytes())
            .input(&[0]),
    ));

    // A multicall: unmap a heap page, give its frame back, take a frame,
    // map it again; then the same with the tables window open.
    let page = INPUT_AT + 0x6000;
    let list = [0x100u64, 0x200, 0x300, 0x400].map(|o| INPUT_AT + o);
    let mut memory = Memory::default();
    memory
        .call(
            0,
            Multicall {
                calls: INPUT_AT + 0x800,
                count: list.len() as u32,
                done: 0,
            },
        )
        .put(0x800, list.as_bytes())
        .call(
            0x100,
            MmuUpdate {
                requests: INPUT_AT + 0xa00,
                count: 1,
                ..MmuUpdate::default()
            },
        )
        .put(0xa00, request(MMU_UNMAP, 0, page, 0).as_bytes())
        .call(
            0x200,
            FrameFree {
                frames: INPUT_AT + 0x900,
                count: 1,
                _pad: 0,
            },
        )
        .put(0x900, &page.to_le_bytes())
        .call(
            0x300,
            FrameAlloc {
                frames: INPUT_AT + 0x980,
                count: 1,
                _pad: 0,
            },
        )
        .call(
            0x400,
            MmuUpdate {
                requests: INPUT_AT + 0xa80,
                count: 1,
                ..MmuUpdate::default()
            },
        )
        .put(0xa80, request(MMU_MAP, MMU_WRITE, page, page).as_bytes());
    seeds.push(("multicall-frames", memory.input(&[0])));
    seeds.push(("multicall-frames-window", memory.input(&[4])));
    seeds
}

fn request(op: u32, flags: u32, vaddr: u64, frame: u64) -> MmuRequest {
    MmuRequest {
        op,
        flags,
        vaddr,
        frame,
    }
}

fn loader() -> Seeds {
    let text = |vaddr| elf::Segment {
        vaddr,
        flags: PF_R | PF_X,
        data: vec![0xf4; 16],
        mem_size: 16,
    };
    let data = elf::Segment {
        vaddr: IMAGE_BASE + 0x1000,
        flags: PF_R | PF_W,
        data: vec![1; 8],
        mem_size: 0x2000,
    };
    let smallest = shoal_host::builtin::elf("privileged").expect("built in");
    assert!(
        smallest.len() < 100 << 10,
        "the smallest built-in guest grew"
    );
    vec![
        (
            "text-only",
            elf::image(IMAGE_BASE, &[text(IMAGE_BASE)], Some(ABI_VERSION)),
        ),
        (
            "text-and-bss",
            elf::image(IMAGE_BASE + 4, &[text(IMAGE_BASE), data], Some(ABI_VERSION)),
        ),
        ("no-note", elf::image(IMAGE_BASE, &[text(IMAGE_BASE)], None)),
        (
            "other-version",
            elf::image(IMAGE_BASE, &[text(IMAGE_BASE)], Some(ABI_VERSION + 1)),
        ),
        ("builtin-privileged", smallest.to_vec()),
    ]
}

fn mmu_update() -> Seeds {
    // Compact requests: op, flags, page from IMAGE_BASE, frame page.
    let compact = |op: u32, flags: u32, vaddr: u64, frame: u64| {
        let mut bytes = vec![op as u8, flags as u8];
        bytes.extend_from_slice(&(((vaddr - IMAGE_BASE) / PAGE_SIZE) as u16).to_le_bytes());
        bytes.extend_from_slice(&((frame / PAGE_SIZE) as u16).to_le_bytes());
        bytes
    };
    let batch = |requests: &[Vec<u8>; 3]| {
        let mut bytes = vec![1, 1];
        bytes.extend(requests.concat());
        bytes
    };
    let heap = INPUT_AT;
    let far = IMAGE_BASE + 0x4000_0000;
    let mut map_protect_unmap = vec![0];
    map_protect_unmap.extend(batch(&[
        compact(MMU_MAP, MMU_WRITE, far, heap),
        compact(MMU_PROTECT, MMU_EXEC, far, 0),
        compact(MMU_UNMAP, 0, heap + PAGE_SIZE, 0),
    ]));
    // Unmap a heap page, give its frame back, take it again, map it.
    let mut frames = vec![0];
    frames.extend(batch(&[
        compact(MMU_UNMAP, 0, heap, 0),
        compact(MMU_UNMAP, 0, heap + PAGE_SIZE, 0),
        compact(MMU_MAP, 0, far, heap + 2 * PAGE_SIZE),
    ]));
    frames.extend([2, 2]);
    frames.extend(((heap / PAGE_SIZE) as u16).to_le_bytes());
    frames.extend((((heap + PAGE_SIZE) / PAGE_SIZE) as u16).to_le_bytes());
    frames.extend([3, 1, 0]);
    frames.extend(batch(&[
        compact(MMU_MAP, MMU_WRITE, heap, heap),
        compact(MMU_MAP, 0, heap + PAGE_SIZE, heap + PAGE_SIZE),
        compact(MMU_UNMAP, 0, far, 0),
    ]));
    // A raw request as a guest passes it.
    let mut raw = vec![0, 0, 1];
    raw.extend_from_slice(request(MMU_MAP, MMU_WRITE, 0x7000_0000_0000, heap).as_bytes());
    // With the tables window open: a trapped write that remaps a heap
    // page, and one that unmaps it.
    let (offset, value) = trapped_leaf(heap);
    let mut window = vec![1, 4];
    window.extend(offset.to_le_bytes());
    window.push(8);
    window.extend(value.to_le_bytes());
    window.push(4);
    window.extend(offset.to_le_bytes());
    window.push(8);
    window.extend(0u64.to_le_bytes());
    vec![
        ("map-protect-unmap", map_protect_unmap),
        ("frames-back-and-forth", frames),
        ("raw-request", raw),
        ("trapped-writes", window),
    ]
}

/// The offset in the tables' alias of the leaf that maps `vaddr` in the
/// template, and that leaf as the template has it (user, writable).
fn trapped_leaf(vaddr: u64) -> (u16, u64) {
    let tables = guest::template().tables();
    let (table, base) = tables
        .leaf_tables()
        .into_iter()
        .find(|&(_, base)| (base..base + (2 << 20)).contains(&vaddr))
        .expect("the heap is mapped");
    let offset = table - PAGE_TABLE_AREA_START + (vaddr - base) / PAGE_SIZE * 8;
    let value = vaddr | PRESENT | USER | WRITABLE | ACCESSED | DIRTY | NO_EXECUTE;
    (offset as u16, value)
}

fn lan_frame() -> Seeds {
    // The sender is guest 3 (scene bit 2 clear).
    let sender = guest_mac(3);
    let frame = |dst: [u8; 6], src: [u8; 6]| {
        let mut bytes = vec![0u8; 12];
        bytes.extend(frames::ethernet(dst, src, IPV4));
        bytes.extend([0x45; 46]);
        bytes
    };
    let input = |scene: u8, descs: &[(u16, u16, u8)], memory: &[u8]| {
        let mut bytes = vec![scene, descs.len() as u8];
        for (offset, len, flags) in descs {
            bytes.extend(offset.to_le_bytes());
            bytes.extend(len.to_le_bytes());
            bytes.push(*flags);
        }
        // A backlog of five frames from sender 1, two from 2; newcomer 3.
        bytes.extend([7, 1, 1, 2, 1, 1, 2, 1, 3]);
        bytes.extend_from_slice(memory);
        bytes
    };
    let one = |dst| {
        let bytes = frame(dst, sender);
        input(0, &[(0, bytes.len() as u16, 1)], &bytes)
    };
    let mut split = frame(guest_mac(2), sender);
    let body = split.split_off(12);
    let mut memory = split;
    memory.resize(0x100, 0);
    memory.extend(&body);
    vec![
        ("to-a-port", one(guest_mac(2))),
        ("to-a-port-second-address", one(guest_mac(4))),
        ("to-itself", one(sender)),
        ("to-a-guest-gone", one(guest_mac(6))),
        ("to-an-unknown-guest", one(guest_mac(9))),
        ("to-an-unknown-address", one([0x0a, 0, 0, 0, 0, 1])),
        ("broadcast-may-flood", {
            let bytes = frame([0xff; 6], sender);
            input(3, &[(0, bytes.len() as u16, 1)], &bytes)
        }),
        (
            "spoofed",
            one(guest_mac(2))
                .into_iter()
                .enumerate()
                .map(|(i, b)| {
                    if i == 2 + 5 + 9 + 12 + 6 + 5 {
                        b ^ 1
                    } else {
                        b
                    }
                })
                .collect(),
        ),
        (
            "header-apart",
            input(2, &[(0, 12, 0), (0x100, body.len() as u16, 1)], &memory),
        ),
        ("writable", {
            let bytes = frame(guest_mac(2), sender);
            input(0, &[(0, bytes.len() as u16, 3)], &bytes)
        }),
    ]
}

fn gateway() -> Seeds {
    let guest = guest_mac(2);
    let ip = guest_ipv4(2);
    let op_frame = |bytes: &[u8]| {
        let mut op = vec![0];
        op.extend((bytes.len() as u16).to_le_bytes());
        op.extend_from_slice(bytes);
        op
    };
    let segment = |dport: u16, seq: u32, ack: u32, flags: u8| Segment {
        src: ip,
        dst: GATEWAY_IPV4,
        sport: 80,
        dport,
        seq,
        ack,
        flags,
        window: 8192,
    };
    let arp = frames::arp_request(guest, ip, GATEWAY_IPV4);
    let syn = frames::tcp_frame(GATEWAY_MAC, guest, &segment(22, 7, 0, tcp::SYN), &[]);
    let mut ping = frames::ethernet(GATEWAY_MAC, guest, IPV4);
    let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
    icmp.extend_from_slice(b"ping");
    let sum = frames::checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    ping.extend(frames::ipv4_header(ip, GATEWAY_IPV4, 1, icmp.len()));
    ping.extend(icmp);
    let mut spoofed_segment = segment(22, 7, 0, tcp::SYN);
    spoofed_segment.src = guest_ipv4(3);
    let spoofed = frames::tcp_frame(GATEWAY_MAC, guest, &spoofed_segment, &[]);
    // With the connection: numbers count from the initial ones. The
    // guest acknowledges, sends data, the host program writes and closes,
    // the guest closes.
    let port = 49152;
    let ack = frames::tcp_frame(GATEWAY_MAC, guest, &segment(port, 1, 0, tcp::ACK), &[]);
    let data = frames::tcp_frame(
        GATEWAY_MAC,
        guest,
        &segment(port, 1, 0, tcp::ACK | tcp::PSH),
        b"hello",
    );
    let fin = frames::tcp_frame(
        GATEWAY_MAC,
        guest,
        &segment(port, 6, 0, tcp::ACK | tcp::FIN),
        &[],
    );
    let mut connected = vec![1];
    connected.extend(op_frame(&ack));
    connected.extend(op_frame(&data));
    connected.extend([3, 1, 100, 0, 3, 2, 3]);
    connected.extend(op_frame(&fin));
    let mut reset = vec![1];
    reset.extend(op_frame(&frames::tcp_frame(
        GATEWAY_MAC,
        guest,
        &segment(port, 1, 0, tcp::RST),
        &[],
    )));
    let broadcast = Segment {
        dst: [255; 4],
        ..segment(22, 7, 0, tcp::ACK)
    };
    let broadcast = frames::tcp_frame(GATEWAY_MAC, guest, &broadcast, &[]);
    let alone = |bytes: &[u8]| {
        let mut input = vec![0];
        input.extend(op_frame(bytes));
        input
    };
    vec![
        ("arp", alone(&arp)),
        ("syn-to-a-closed-port", alone(&syn)),
        ("ping", alone(&ping)),
        ("spoofed-source", alone(&spoofed)),
        ("to-the-broadcast-address", alone(&broadcast)),
        ("connection", connected),
        ("connection-reset", reset),
    ]
}

fn shard_wire() -> Seeds {
    const NAMES: [&str; 13] = [
        "request-start",
        "request-image",
        "request-spawn",
        "request-kill",
        "request-raise",
        "request-stats",
        "request-pool",
        "event-done",
        "event-done-error",
        "event-stats",
        "event-pool",
        "event-console",
        "event-ended",
    ];
    let seeds = shoal_host::fuzzing::wire_seeds();
    assert_eq!(seeds.len(), NAMES.len());
    let mut all_events = vec![1];
    let mut out: Seeds = NAMES
        .iter()
        .zip(seeds)
        .map(|(name, (request, frame))| {
            let mut input = vec![if request { 0 } else { 1 }];
            input.extend_from_slice(&frame);
            if !request {
                all_events.extend_from_slice(&frame);
            }
            (*name, input)
        })
        .collect();
    out.push(("events-in-a-row", all_events));
    out
}
