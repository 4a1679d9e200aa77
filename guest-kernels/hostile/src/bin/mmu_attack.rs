//! mmu-attack: asks the paravirtual MMU for what the rules forbid and
//! checks that each request is refused with the documented error, and that
//! a refused batch changed nothing. Prints one line per case; exits 0 when
//! every case was refused as documented, 1 otherwise.
//!
//! `mmu-attack exhaust` then maps 1 GiB apart until the host's page-table
//! frames run out, which must be a `LimitExceeded`, not a crash.
#![no_std]
#![no_main]

use shoal_guest::abi::HypercallError;
use shoal_guest::abi::hypercall::{
    FrameFree, MMU_BATCH_MAX, MMU_MAP, MMU_UNMAP, MMU_WRITE, MmuRequest, MmuUpdate,
};
use shoal_guest::abi::layout::{
    BOOT_INFO_PAGE, CLOCK_PAGE, PAGE_SIZE, PAGE_TABLE_AREA_START, SYSTEM_AREA_START,
};
use shoal_guest::hypercall::{self, Error};
use shoal_guest::mmu::{self, Refused};
use shoal_guest::{boot, println};

shoal_guest::entry!(main);

const V: u64 = 0x40_0000_0000;

fn map(vaddr: u64, frame: u64, flags: u32) -> MmuRequest {
    MmuRequest {
        op: MMU_MAP,
        flags,
        vaddr,
        frame,
    }
}

fn expect(name: &str, got: Result<usize, Refused>, index: u64, error: HypercallError) -> u32 {
    let ok = got
        == Err(Refused {
            index,
            error: Error::Abi(error),
        });
    println!(
        "{name}: {got:?} {}",
        if ok { "refused as documented" } else { "WRONG" }
    );
    u32::from(!ok)
}

fn expect_call(name: &str, got: Result<u64, Error>, error: HypercallError) -> u32 {
    let ok = got == Err(Error::Abi(error));
    println!(
        "{name}: {got:?} {}",
        if ok { "refused as documented" } else { "WRONG" }
    );
    u32::from(!ok)
}

fn read(vaddr: u64) -> u64 {
    // SAFETY: `vaddr` is mapped (the guest's own heap page).
    unsafe { core::ptr::read_volatile(vaddr as *const u64) }
}

fn write(vaddr: u64, value: u64) {
    // SAFETY: `vaddr` is mapped writable (the guest's own heap page).
    unsafe { core::ptr::write_volatile(vaddr as *mut u64, value) }
}

fn attacks() -> u32 {
    let info = boot::info();
    let mem = info.mem_size;
    let heap = info.heap_start;
    let unmap_v = MmuRequest {
        op: MMU_UNMAP,
        flags: 0,
        vaddr: V,
        frame: 0,
    };
    let cases = [
        (
            "map a page-table frame",
            map(V, PAGE_TABLE_AREA_START, MMU_WRITE),
            HypercallError::Denied,
        ),
        (
            "map the boot info frame",
            map(V, BOOT_INFO_PAGE, MMU_WRITE),
            HypercallError::Denied,
        ),
        (
            "map the host's system area",
            map(V, SYSTEM_AREA_START, 0),
            HypercallError::Denied,
        ),
        (
            "map a frame past the end of memory",
            map(V, mem, 0),
            HypercallError::Denied,
        ),
        (
            "map over the clock page",
            map(CLOCK_PAGE, heap, MMU_WRITE),
            HypercallError::Denied,
        ),
        (
            "map at the null page",
            map(0, heap, MMU_WRITE),
            HypercallError::Denied,
        ),
        (
            "map at a non-canonical address",
            map(1 << 47, heap, 0),
            HypercallError::Denied,
        ),
        (
            "map in the kernel half",
            map(0xffff_8000_0000_0000, heap, 0),
            HypercallError::Denied,
        ),
        (
            "unknown flags",
            map(V, heap, 1 << 5),
            HypercallError::Invalid,
        ),
        (
            "unaligned address",
            map(V + 8, heap, 0),
            HypercallError::Invalid,
        ),
        ("unmap what is not mapped", unmap_v, HypercallError::Invalid),
    ];
    let mut failures = 0;
    for (name, request, error) in cases {
        failures += expect(name, mmu::update(&[request]), 0, error);
    }

    // A batch whose sixth request is refused: the first five (remapping a
    // live heap page to the next frame) must not have happened.
    write(heap, 0x1111);
    write(heap + PAGE_SIZE, 0x2222);
    let mut batch = [map(heap, heap + PAGE_SIZE, MMU_WRITE); 6];
    batch[5] = map(V, PAGE_TABLE_AREA_START, 0);
    failures += expect(
        "a batch with one bad request",
        mmu::update(&batch),
        5,
        HypercallError::Denied,
    );
    if read(heap) != 0x1111 {
        println!("a refused batch was partly applied: WRONG");
        failures += 1;
    }

    let mut too_many = MmuUpdate {
        requests: heap,
        count: MMU_BATCH_MAX + 1,
        _pad: 0,
        error_index: 0,
    };
    failures += expect_call(
        "a batch over the limit",
        hypercall::call(&mut too_many),
        HypercallError::Invalid,
    );
    let mut in_tables = MmuUpdate {
        requests: PAGE_TABLE_AREA_START,
        count: 1,
        _pad: 0,
        error_index: 0,
    };
    failures += expect_call(
        "requests read from the page tables",
        hypercall::call(&mut in_tables),
        HypercallError::Fault,
    );

    let free = |frame: u64| {
        let frames = [frame];
        hypercall::call(&mut FrameFree {
            frames: frames.as_ptr() as u64,
            count: 1,
            _pad: 0,
        })
    };
    failures += expect_call(
        "give back a mapped frame",
        free(heap),
        HypercallError::Invalid,
    );
    failures += expect_call(
        "give back a page-table frame",
        free(PAGE_TABLE_AREA_START),
        HypercallError::Denied,
    );
    failures += expect_call(
        "give back a frame twice",
        mmu::take_heap(1).and_then(|end| {
            free(end)?;
            Ok(0)
        }),
        HypercallError::Invalid,
    );
    let mut frames = [0u64; 2];
    failures += expect_call(
        "take more frames than are free",
        mmu::alloc_frames(&mut frames).map(|()| 0),
        HypercallError::LimitExceeded,
    );
    failures
}

fn exhaust() -> u32 {
    let frame = boot::info().heap_start;
    for i in 1..1000u64 {
        match mmu::update(&[map(i << 30, frame, 0)]) {
            Ok(_) => {}
            Err(refused) => {
                println!("table frames ran out after {} GiB", i - 1);
                return expect("one more", Err(refused), 0, HypercallError::LimitExceeded);
            }
        }
    }
    println!("never ran out: WRONG");
    1
}

fn main() -> i32 {
    let failures = match boot::args().next() {
        Some("exhaust") => exhaust(),
        _ => attacks(),
    };
    i32::from(failures != 0)
}
