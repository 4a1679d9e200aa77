//! Hypercall numbers and argument blocks.
//!
//! A hypercall is one `out dx, eax` with `dx` = [`HYPERCALL_PORT`] and `eax`
//! = the guest-physical address of an argument block: a [`HypercallHeader`]
//! immediately followed by the call's argument struct (`arg_len` bytes). The
//! block must lie entirely inside guest RAM and be 8-byte aligned; otherwise
//! the guest is stopped ("bad hypercall memory"), since there is nowhere to
//! write an error.
//!
//! The host reads the block once, performs the call, writes the argument
//! struct back (output fields filled in) and stores the result in
//! [`HypercallHeader::ret`]: `>= 0` on success, `-(HypercallError)` on
//! failure. Every exit costs a userspace round trip, so calls are few and do
//! as much as they can at once.
//!
//! [`HYPERCALL_PORT`]: crate::layout::HYPERCALL_PORT

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The first 16 bytes of every argument block.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct HypercallHeader {
    /// The [`HypercallNr`].
    pub nr: u32,
    /// Size in bytes of the argument struct that follows the header.
    pub arg_len: u32,
    /// Written by the host: `>= 0` on success, `-(error code)` on failure.
    pub ret: i64,
}
const _: () = assert!(size_of::<HypercallHeader>() == 16);
const _: () = assert!(offset_of!(HypercallHeader, arg_len) == 4);
const _: () = assert!(offset_of!(HypercallHeader, ret) == 8);

/// Largest `arg_len` the host accepts.
pub const MAX_ARG_LEN: u32 = 256;

/// The first of the hypercall numbers reserved for experiments, up to
/// [`CUSTOM_LAST`]. ABI v1 gives them no meaning: a host serves one only
/// with a handler its embedder registered (`Host::register_hypercall`),
/// and answers [`crate::HypercallError::UnknownHypercall`] otherwise. The
/// argument struct is the handler's request, `arg_len` the larger of the
/// request's and the response's sizes; on success the host writes the
/// response over the request and `ret` is 0. A handler that fails stops
/// the calling guest.
pub const CUSTOM_FIRST: u32 = 0x1000;

/// The last hypercall number reserved for experiments.
pub const CUSTOM_LAST: u32 = 0x1fff;

/// Hypercall numbers of ABI v1.
#[repr(u32)]
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HypercallNr {
    /// Query the ABI version and feature bits: [`AbiInfo`].
    AbiInfo = 0,
    /// Write bytes to the guest's console: [`ConsoleWrite`].
    ConsoleWrite = 1,
    /// End the guest with an exit code: [`Exit`]. Does not return.
    Exit = 2,
    /// Read the host's wall-clock time: [`WallClock`].
    WallClock = 3,
    /// Block until a monotonic deadline: [`Block`].
    Block = 4,
    /// Report a panic and end the guest: [`Panic`]. Does not return.
    Panic = 5,
    /// Give the CPU to another guest: [`Yield`]. Feature `YIELD`.
    Yield = 6,
    /// Change the guest's page tables: [`MmuUpdate`]. Feature `MMU`.
    MmuUpdate = 7,
    /// Take zeroed frames from the host: [`FrameAlloc`]. Feature `MMU`.
    FrameAlloc = 8,
    /// Give unmapped frames back to the host: [`FrameFree`]. Feature `MMU`.
    FrameFree = 9,
    /// Register the guest's exception handler: [`SetTrapTable`]. Feature
    /// `TRAPS`.
    SetTrapTable = 10,
    /// Return from the exception handler: [`TrapReturn`]. Feature `TRAPS`.
    TrapReturn = 11,
    /// Several hypercalls in one exit: [`Multicall`]. Feature `MULTICALL`.
    Multicall = 12,
    /// Describe one of the guest's devices: [`DeviceInfo`]. Feature
    /// `DEVICES`.
    DeviceInfo = 13,
    /// Give a device's virtqueue to the host: [`QueueSetup`]. Feature
    /// `DEVICES`.
    QueueSetup = 14,
}

impl HypercallNr {
    /// Every hypercall number of this ABI version, in numeric order.
    pub const ALL: [HypercallNr; 15] = [
        Self::AbiInfo,
        Self::ConsoleWrite,
        Self::Exit,
        Self::WallClock,
        Self::Block,
        Self::Panic,
        Self::Yield,
        Self::MmuUpdate,
        Self::FrameAlloc,
        Self::FrameFree,
        Self::SetTrapTable,
        Self::TrapReturn,
        Self::Multicall,
        Self::DeviceInfo,
        Self::QueueSetup,
    ];

    /// The call's name as the docs and traces spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::AbiInfo => "abi_info",
            Self::ConsoleWrite => "console_write",
            Self::Exit => "exit",
            Self::WallClock => "wall_clock",
            Self::Block => "block",
            Self::Panic => "panic",
            Self::Yield => "yield",
            Self::MmuUpdate => "mmu_update",
            Self::FrameAlloc => "frame_alloc",
            Self::FrameFree => "frame_free",
            Self::SetTrapTable => "set_trap_table",
            Self::TrapReturn => "trap_return",
            Self::Multicall => "multicall",
            Self::DeviceInfo => "device_info",
            Self::QueueSetup => "queue_setup",
        }
    }
}

/// A number that is not a hypercall of this ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownHypercall(pub u32);

impl TryFrom<u32> for HypercallNr {
    type Error = UnknownHypercall;

    fn try_from(nr: u32) -> Result<Self, Self::Error> {
        Self::ALL
            .iter()
            .copied()
            .find(|call| *call as u32 == nr)
            .ok_or(UnknownHypercall(nr))
    }
}

/// An argument struct, tied to its hypercall number.
pub trait Hypercall: FromBytes + IntoBytes + Immutable + KnownLayout + Copy {
    /// The number this struct is the argument of.
    const NR: HypercallNr;
    /// `arg_len` for this call.
    const ARG_LEN: u32 = size_of::<Self>() as u32;
}

/// `abi_info`: returns 0 and fills in the host's ABI version and features.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct AbiInfo {
    /// Out: the host's [`crate::ABI_VERSION`].
    pub version: u32,
    /// Must be zero.
    pub _pad: u32,
    /// Out: the [`crate::features`] bits this host offers this guest.
    pub features: u64,
}
const _: () = assert!(size_of::<AbiInfo>() == 16);
const _: () = assert!(offset_of!(AbiInfo, features) == 8);
impl Hypercall for AbiInfo {
    const NR: HypercallNr = HypercallNr::AbiInfo;
}

/// `console_write`: appends `len` bytes at guest-physical `addr` to the
/// console. Returns the number of bytes accepted, which is less than `len`
/// only when the console byte limit is reached (then the rest is dropped and
/// later writes fail with `LimitExceeded`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ConsoleWrite {
    /// Guest-physical address of the bytes.
    pub addr: u64,
    /// Number of bytes, at most [`CONSOLE_WRITE_MAX`].
    pub len: u64,
}
const _: () = assert!(size_of::<ConsoleWrite>() == 16);
const _: () = assert!(offset_of!(ConsoleWrite, len) == 8);
impl Hypercall for ConsoleWrite {
    const NR: HypercallNr = HypercallNr::ConsoleWrite;
}

/// Largest `len` of one `console_write`; longer writes fail with `Invalid`.
pub const CONSOLE_WRITE_MAX: u64 = 64 << 10;

/// `exit`: ends the guest with `code`. Does not return.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Exit {
    /// The exit code the host reports.
    pub code: i32,
    /// Must be zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<Exit>() == 8);
impl Hypercall for Exit {
    const NR: HypercallNr = HypercallNr::Exit;
}

/// `wall_clock`: returns 0 and the host's real time.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct WallClock {
    /// Out: nanoseconds since 1970-01-01T00:00:00Z (UTC).
    pub unix_ns: u64,
}
const _: () = assert!(size_of::<WallClock>() == 8);
impl Hypercall for WallClock {
    const NR: HypercallNr = HypercallNr::WallClock;
}

/// `block`: gives up the CPU until the monotonic clock (the clock page's
/// time base) reaches `deadline_ns`, or until an event that is not masked
/// is pending ([`crate::EventPage`]). Returns at once if one is pending
/// already or the deadline is past. Returns 1 when unmasked events are
/// pending as it returns (their bits are in `events`; the call does not
/// clear them), else 0.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Block {
    /// Monotonic deadline in nanoseconds since the guest started;
    /// `u64::MAX` waits for events only.
    pub deadline_ns: u64,
    /// Out: the events that were pending when the call returned.
    pub events: u64,
}
const _: () = assert!(size_of::<Block>() == 16);
const _: () = assert!(offset_of!(Block, events) == 8);
impl Hypercall for Block {
    const NR: HypercallNr = HypercallNr::Block;
}

/// `panic`: reports a panic message and its source location, then ends the
/// guest (reported as panicked, not exited). Does not return. Strings that
/// are not inside guest RAM are reported as missing; the guest ends anyway.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Panic {
    /// Guest-physical address of the UTF-8 message.
    pub msg_addr: u64,
    /// Length of the message, at most [`PANIC_TEXT_MAX`] bytes are kept.
    pub msg_len: u64,
    /// Guest-physical address of the UTF-8 source file name.
    pub file_addr: u64,
    /// Length of the file name, at most [`PANIC_TEXT_MAX`] bytes are kept.
    pub file_len: u64,
    /// Source line.
    pub line: u32,
    /// Source column.
    pub column: u32,
}
const _: () = assert!(size_of::<Panic>() == 40);
const _: () = assert!(offset_of!(Panic, line) == 32);
const _: () = assert!(offset_of!(Panic, column) == 36);
impl Hypercall for Panic {
    const NR: HypercallNr = HypercallNr::Panic;
}

/// `yield`: puts the guest at the back of the run queue and resumes it
/// when its turn comes again. Returns 0.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Yield {
    /// Must be zero.
    pub _reserved: u64,
}
const _: () = assert!(size_of::<Yield>() == 8);
impl Hypercall for Yield {
    const NR: HypercallNr = HypercallNr::Yield;
}

/// `mmu_update`: applies `count` [`MmuRequest`]s, read from the array at
/// guest-physical `requests`, to the guest's page tables, in order.
///
/// The batch is validated as a whole before anything is applied: either
/// every request takes effect and the call returns `count`, or none does
/// and the call fails with the first refused request's error, its index in
/// `error_index`. When the call returns, every change is visible to the
/// guest (no stale translation survives it).
///
/// Rules: addresses page-aligned; `vaddr` in [`MMU_VADDR_START`]`..`
/// [`MMU_VADDR_END`] (the host-reserved areas below it are never touched,
/// and the page-table frames are never mapped at all); `frame` one of the
/// guest's own frames (`IMAGE_BASE..mem_size`, not given back with
/// `frame_free`); `flags` only [`MMU_WRITE`] and [`MMU_EXEC`]. `map` over
/// a mapped address replaces the mapping; `unmap` and `protect` need a
/// mapped address. Every mapping is user-accessible. Failures: `Invalid`
/// (alignment, op, flags, count over [`MMU_BATCH_MAX`], unmapped
/// address), `Denied` (a frame or address that is not the guest's),
/// `LimitExceeded` (the host's page-table frames are used up), `Fault`
/// (the array is not in guest memory).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct MmuUpdate {
    /// Guest-physical address of `count` [`MmuRequest`]s (8-byte aligned).
    pub requests: u64,
    /// Number of requests, at most [`MMU_BATCH_MAX`].
    pub count: u32,
    /// Must be zero.
    pub _pad: u32,
    /// Out: index of the refused request; `u64::MAX` when none was.
    pub error_index: u64,
}
const _: () = assert!(size_of::<MmuUpdate>() == 24);
const _: () = assert!(offset_of!(MmuUpdate, count) == 8);
const _: () = assert!(offset_of!(MmuUpdate, error_index) == 16);
impl Hypercall for MmuUpdate {
    const NR: HypercallNr = HypercallNr::MmuUpdate;
}

/// One page-table change in an [`MmuUpdate`] batch.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct MmuRequest {
    /// [`MMU_MAP`], [`MMU_UNMAP`] or [`MMU_PROTECT`].
    pub op: u32,
    /// [`MMU_WRITE`] and/or [`MMU_EXEC`] (`map`, `protect`); zero for
    /// `unmap`.
    pub flags: u32,
    /// The virtual address of the page.
    pub vaddr: u64,
    /// `map`: the guest-physical address of the frame; otherwise zero.
    pub frame: u64,
}
const _: () = assert!(size_of::<MmuRequest>() == 24);
const _: () = assert!(offset_of!(MmuRequest, vaddr) == 8);
const _: () = assert!(offset_of!(MmuRequest, frame) == 16);

/// Map `frame` at `vaddr` with `flags` (replacing any mapping there).
pub const MMU_MAP: u32 = 1;
/// Remove the mapping at `vaddr`.
pub const MMU_UNMAP: u32 = 2;
/// Change the flags of the mapping at `vaddr`.
pub const MMU_PROTECT: u32 = 3;
/// The page is writable.
pub const MMU_WRITE: u32 = 1 << 0;
/// The page is executable.
pub const MMU_EXEC: u32 = 1 << 1;
/// Most requests in one `mmu_update`, and most frames in one
/// `frame_alloc` or `frame_free`.
pub const MMU_BATCH_MAX: u32 = 512;
/// Lowest virtual address a guest may map: below it lie the null page, the
/// shared pages and the host's system area.
pub const MMU_VADDR_START: u64 = crate::layout::IMAGE_BASE;
/// End (exclusive) of the virtual addresses a guest may map: the lower
/// half of the canonical address space.
pub const MMU_VADDR_END: u64 = 1 << 47;

/// `frame_alloc`: takes `count` zeroed frames from the guest's free frames
/// (those it gave back with `frame_free`) and writes their guest-physical
/// addresses into the `u64` array at `frames`. All or nothing: fails with
/// `LimitExceeded` when fewer are free. Returns `count`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct FrameAlloc {
    /// Guest-physical address of a `u64` array of `count` entries.
    pub frames: u64,
    /// Number of frames, at most [`MMU_BATCH_MAX`].
    pub count: u32,
    /// Must be zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<FrameAlloc>() == 16);
impl Hypercall for FrameAlloc {
    const NR: HypercallNr = HypercallNr::FrameAlloc;
}

/// `frame_free`: gives the `count` frames listed in the `u64` array at
/// `frames` back to the host, which scrubs them: a frame comes back from
/// `frame_alloc` zeroed. Each must be the guest's, mapped nowhere and not
/// free already (`Invalid` otherwise; `Denied` for a frame that is not the
/// guest's). All or nothing. Returns `count`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct FrameFree {
    /// Guest-physical address of a `u64` array of `count` entries.
    pub frames: u64,
    /// Number of frames, at most [`MMU_BATCH_MAX`].
    pub count: u32,
    /// Must be zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<FrameFree>() == 16);
impl Hypercall for FrameFree {
    const NR: HypercallNr = HypercallNr::FrameFree;
}

/// `set_trap_table`: registers the guest's exception handler, Xen-style,
/// or removes it (`entry` zero). Returns 0.
///
/// When the guest raises an exception whose bit is set in `vectors`, the
/// host writes a [`TrapFrame`] (the vector, error code, faulting address
/// and every register at the fault) to guest-physical `frame` and resumes
/// the guest at `entry` with `rsp` = `stack` and `rdi` = `frame`; all
/// other registers keep their values from the fault. The handler returns
/// with [`TrapReturn`], which resumes the guest with the frame's registers
/// (edited or not). An exception raised while a handler runs (between the
/// bounce and `trap_return`) is not bounced: it stops the guest, as does an
/// exception whose vector is not in `vectors`.
///
/// Failures: `Invalid` (a vector outside [`TRAP_VECTORS`], `entry` or
/// `stack` not canonical lower-half, `stack` not 16-byte aligned, `frame`
/// not 8-byte aligned), `Fault` (`frame` not in guest RAM).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SetTrapTable {
    /// Virtual address of the handler's first instruction; zero removes
    /// the handler.
    pub entry: u64,
    /// The handler's initial stack pointer (virtual, 16-byte aligned).
    pub stack: u64,
    /// Guest-physical address of the [`TrapFrame`] the host fills in.
    pub frame: u64,
    /// Bit `v` set: vector `v` goes to the handler.
    pub vectors: u32,
    /// Must be zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<SetTrapTable>() == 32);
const _: () = assert!(offset_of!(SetTrapTable, vectors) == 24);
impl Hypercall for SetTrapTable {
    const NR: HypercallNr = HypercallNr::SetTrapTable;
}

/// The vectors a guest may handle: every exception but NMI (2), double
/// fault (8) and machine check (18), which never reach a guest's handler.
pub const TRAP_VECTORS: u32 = !((1 << 2) | (1 << 8) | (1 << 18));

/// The state of the guest at an exception, as the host hands it to the
/// guest's handler, and as [`TrapReturn`] takes it back.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct TrapFrame {
    /// The exception vector (14 for a page fault).
    pub vector: u32,
    /// Must be zero.
    pub _pad: u32,
    /// The error code, or zero for vectors without one.
    pub error_code: u64,
    /// The faulting address (CR2) for a page fault, else zero.
    pub fault_addr: u64,
    /// The faulting instruction (or, for traps such as `int3`, the next).
    pub rip: u64,
    /// The stack pointer at the fault.
    pub rsp: u64,
    /// The flags at the fault. On return only the arithmetic flags, DF,
    /// TF, RF and AC are taken; interrupts stay enabled.
    pub rflags: u64,
    /// General registers at the fault, restored by [`TrapReturn`].
    pub rax: u64,
    /// See `rax`.
    pub rbx: u64,
    /// See `rax`.
    pub rcx: u64,
    /// See `rax`.
    pub rdx: u64,
    /// See `rax`.
    pub rsi: u64,
    /// See `rax`.
    pub rdi: u64,
    /// See `rax`.
    pub rbp: u64,
    /// See `rax`.
    pub r8: u64,
    /// See `rax`.
    pub r9: u64,
    /// See `rax`.
    pub r10: u64,
    /// See `rax`.
    pub r11: u64,
    /// See `rax`.
    pub r12: u64,
    /// See `rax`.
    pub r13: u64,
    /// See `rax`.
    pub r14: u64,
    /// See `rax`.
    pub r15: u64,
}
const _: () = assert!(size_of::<TrapFrame>() == 168);
const _: () = assert!(offset_of!(TrapFrame, rip) == 24);
const _: () = assert!(offset_of!(TrapFrame, rax) == 48);
const _: () = assert!(offset_of!(TrapFrame, r15) == 160);

/// `trap_return`: ends the running exception handler and resumes the
/// guest with the registers of the [`TrapFrame`] at the registered
/// `frame` address, read once when the call is made. Does not return on
/// success. Failures: `Invalid` (no handler is running, or the frame's
/// `rip` or `rsp` is not canonical lower-half), `Fault` (the frame is no
/// longer in guest RAM).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct TrapReturn {
    /// Must be zero.
    pub _reserved: u64,
}
const _: () = assert!(size_of::<TrapReturn>() == 8);
impl Hypercall for TrapReturn {
    const NR: HypercallNr = HypercallNr::TrapReturn;
}

/// `multicall`: performs the hypercalls whose argument blocks are listed
/// in the `u64` array at `calls` (guest-physical addresses, each of a
/// [`HypercallHeader`] and its arguments, exactly as for a single call),
/// in order, in one exit. Each block gets its own result in its header.
///
/// The run stops after a call that does not simply return: one that
/// blocks, yields, ends the guest, or `trap_return`; that call's effect
/// then follows. It also stops early, before a call, when the guest's time
/// slice is over, so a long list never holds a worker past one slice; the
/// caller issues the rest again. `done` says how many calls ran. A nested
/// `multicall` gets `Invalid`. Returns `done`.
///
/// Failures of the call itself: `Invalid` (`count` over [`MULTICALL_MAX`]),
/// `Fault` (the array is not in guest memory).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Multicall {
    /// Guest-physical address of `count` block addresses (8-byte aligned).
    pub calls: u64,
    /// Number of calls, at most [`MULTICALL_MAX`].
    pub count: u32,
    /// Out: the number of calls that ran.
    pub done: u32,
}
const _: () = assert!(size_of::<Multicall>() == 16);
impl Hypercall for Multicall {
    const NR: HypercallNr = HypercallNr::Multicall;
}

/// `device_info`: fills in what device `index` is. Returns 0, or
/// `Invalid` when the guest has no device `index` (devices are numbered
/// from 0 without gaps).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DeviceInfo {
    /// The device's index.
    pub index: u32,
    /// Out: [`crate::device::KIND_BLOCK`] or [`crate::device::KIND_NET`].
    pub kind: u32,
    /// Out: [`crate::device::FLAG_READ_ONLY`].
    pub flags: u32,
    /// Out: the largest queue size the device accepts.
    pub queue_max: u32,
    /// Out: the device's size (block: in 512-byte sectors) or address
    /// (network: the MAC address, its first byte lowest,
    /// [`crate::device::mac_from_capacity`]).
    pub capacity: u64,
    /// Out: most data bytes one request may carry (network: the largest
    /// frame, [`crate::device::FRAME_MAX`]).
    pub request_max: u32,
    /// In: zero. Out: how many queues the device has (block 1, network
    /// 2: receive and transmit).
    pub queues: u32,
}
const _: () = assert!(size_of::<DeviceInfo>() == 32);
impl Hypercall for DeviceInfo {
    const NR: HypercallNr = HypercallNr::DeviceInfo;
}

/// `queue_setup`: the host starts serving device `device`'s virtqueue of
/// `size` descriptors at these guest-physical addresses, with the event
/// index on, and raises event `event` when it has used buffers. Returns 0.
///
/// `Invalid`: no such device or queue, the queue is already set up, `size` not a
/// power of two up to `queue_max`, a part misaligned (descriptors 16
/// bytes, available ring 2, used ring 4), parts overlapping, or `event`
/// not below 64. `Fault`: a part outside guest-owned memory.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct QueueSetup {
    /// The device's index.
    pub device: u32,
    /// Descriptors in the queue.
    pub size: u32,
    /// The descriptor table.
    pub desc: u64,
    /// The available (driver) ring.
    pub avail: u64,
    /// The used (device) ring.
    pub used: u64,
    /// The event raised for used buffers.
    pub event: u32,
    /// Which of the device's queues (block: 0; network:
    /// [`crate::device::NET_RX`] or [`crate::device::NET_TX`]).
    pub queue: u32,
}
const _: () = assert!(size_of::<QueueSetup>() == 40);
impl Hypercall for QueueSetup {
    const NR: HypercallNr = HypercallNr::QueueSetup;
}

/// Most calls in one [`Multicall`].
pub const MULTICALL_MAX: u32 = 64;

/// Longest panic message or file name the host keeps.
pub const PANIC_TEXT_MAX: u64 = 1024;

/// Exit code the CLI reports for a guest that panicked.
pub const PANIC_EXIT_CODE: i32 = 101;

// Every argument struct fits the host's limit.
const _: () = assert!(AbiInfo::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(ConsoleWrite::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(Exit::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(WallClock::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(Block::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(Panic::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(Yield::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(MmuUpdate::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(FrameAlloc::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(FrameFree::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(SetTrapTable::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(TrapReturn::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(Multicall::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(DeviceInfo::ARG_LEN <= MAX_ARG_LEN);
const _: () = assert!(QueueSetup::ARG_LEN <= MAX_ARG_LEN);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_decode_and_unknown_numbers_are_errors() {
        for call in HypercallNr::ALL {
            assert_eq!(HypercallNr::try_from(call as u32), Ok(call));
        }
        assert_eq!(HypercallNr::try_from(15), Err(UnknownHypercall(15)));
        assert_eq!(
            HypercallNr::try_from(u32::MAX),
            Err(UnknownHypercall(u32::MAX))
        );
    }
}
