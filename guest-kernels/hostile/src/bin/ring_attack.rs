//! ring-attack: breaks the ring of device 0 in the way its argument
//! names, notifies the host, and waits to be stopped. Prints `sending
//! MODE` first; exits 3 if the host has not stopped it 5 seconds later.
//!
//! Modes: `loop` (two descriptors that point at each other), `index` (a
//! head past the table), `next` (a `next` past the table), `outside` (a
//! buffer in the host-reserved low memory), `past-end` (a buffer over the
//! end of RAM), `rings` (a buffer over the used ring), `huge` (buffers
//! adding up to 2 MiB), `indirect` (an indirect table), `ahead` (an
//! available index a queue and more ahead), `cut` (a chain with no status
//! byte), `storm` (notifications with nothing to do, without end).
//!
//! `storm RATE [DURATION]` notifies with nothing to do RATE times a
//! second, in 1 ms bursts, for DURATION (default `2s`), and exits 0 if the
//! host has let it: a rate under the host's storm limit is a noisy
//! neighbour, not an attack.
//!
//! `setup` instead checks that `queue_setup` refuses bad rings and exits
//! 0 when it does.
#![no_std]
#![no_main]

use shoal_guest::abi::HypercallError;
use shoal_guest::abi::device::{DESC_INDIRECT, DESC_NEXT, DESC_WRITE, Descriptor, desc_table_len};
use shoal_guest::abi::hypercall::QueueSetup;
use shoal_guest::hypercall::{self, Error};
use shoal_guest::{boot, mmu, println, time, virtq};

shoal_guest::entry!(main);

const SIZE: u32 = 8;

/// Device 0's queue of `SIZE` at `base`: descriptors, then the available
/// ring, the used ring at 2048.
fn queue_at(base: u64) -> QueueSetup {
    QueueSetup {
        device: 0,
        size: SIZE,
        desc: base,
        avail: base + desc_table_len(SIZE),
        used: base + 2048,
        event: 0,
        queue: 0,
    }
}

/// A queue of `SIZE` set up by hand in two pages: descriptors, available
/// ring, used ring at 2048; a page of buffer memory after them.
struct Raw {
    base: u64,
}

impl Raw {
    fn new() -> Self {
        let base = mmu::take_low(3).expect("boot heap");
        hypercall::call(&mut queue_at(base)).expect("queue_setup");
        Self { base }
    }

    fn desc(&self, index: u64, desc: Descriptor) {
        // SAFETY: the descriptor table is this guest's memory.
        unsafe { ((self.base + index * 16) as *mut Descriptor).write_volatile(desc) };
    }

    fn avail(&self, word: u64, value: u16) {
        let at = self.base + desc_table_len(SIZE) + 2 * word;
        // SAFETY: inside the available ring.
        unsafe { (at as *mut u16).write_volatile(value) };
    }

    /// Publishes head `head` as available entry 0 and notifies.
    fn offer(&self, head: u16) {
        self.avail(2, head);
        self.avail(1, 1);
        virtq::notify(0);
    }

    /// A buffer in the page after the rings.
    fn buffer(&self) -> u64 {
        self.base + 2 * 4096
    }
}

fn setup_refusals() -> i32 {
    let base = mmu::take_low(2).expect("boot heap");
    let mem = boot::info().mem_size;
    let good = queue_at(base);
    let cases: [(&str, QueueSetup, HypercallError); 9] = [
        (
            "no such device",
            QueueSetup { device: 1, ..good },
            HypercallError::Invalid,
        ),
        (
            "size not a power of two",
            QueueSetup { size: 3, ..good },
            HypercallError::Invalid,
        ),
        (
            "size too large",
            QueueSetup { size: 512, ..good },
            HypercallError::Invalid,
        ),
        (
            "misaligned table",
            QueueSetup {
                desc: base + 8,
                ..good
            },
            HypercallError::Invalid,
        ),
        (
            "overlapping rings",
            QueueSetup {
                used: base + 64,
                ..good
            },
            HypercallError::Invalid,
        ),
        (
            "event 64",
            QueueSetup { event: 64, ..good },
            HypercallError::Invalid,
        ),
        (
            "table in low memory",
            QueueSetup {
                desc: 0x1000,
                ..good
            },
            HypercallError::Fault,
        ),
        (
            "used ring past the end",
            QueueSetup {
                used: mem - 8,
                ..good
            },
            HypercallError::Fault,
        ),
        (
            "no such queue",
            QueueSetup { queue: 1, ..good },
            HypercallError::Invalid,
        ),
    ];
    let mut failed = 0;
    for (name, setup, want) in cases {
        let got = hypercall::call(&mut { setup });
        if got != Err(Error::Abi(want)) {
            println!("{name}: got {got:?}, want {want:?}");
            failed += 1;
        }
    }
    let first = hypercall::call(&mut { good });
    let second = hypercall::call(&mut { good });
    if first.is_err() || second != Err(Error::Abi(HypercallError::Invalid)) {
        println!("set up twice: {first:?} then {second:?}");
        failed += 1;
    }
    if failed == 0 {
        println!("setup refusals ok");
    }
    failed
}

fn attack(mode: &str) -> bool {
    let raw = Raw::new();
    let buf = raw.buffer();
    let status = Descriptor::new(buf + 512, 1, DESC_WRITE, 0);
    match mode {
        "loop" => {
            raw.desc(0, Descriptor::new(buf, 16, DESC_NEXT, 1));
            raw.desc(1, Descriptor::new(buf, 16, DESC_NEXT, 0));
            raw.offer(0);
        }
        "index" => raw.offer(1000),
        "next" => {
            raw.desc(0, Descriptor::new(buf, 16, DESC_NEXT, 999));
            raw.offer(0);
        }
        "outside" => {
            raw.desc(0, Descriptor::new(0x1000, 16, DESC_NEXT, 1));
            raw.desc(1, status);
            raw.offer(0);
        }
        "past-end" => {
            raw.desc(
                0,
                Descriptor::new(boot::info().mem_size - 8, 4096, DESC_NEXT, 1),
            );
            raw.desc(1, status);
            raw.offer(0);
        }
        "rings" => {
            raw.desc(0, Descriptor::new(buf, 16, DESC_NEXT, 1));
            raw.desc(1, Descriptor::new(raw.base + 2048, 64, DESC_WRITE, 0));
            raw.offer(0);
        }
        "huge" => {
            // The top MiB of RAM (the stack), twice: in guest memory, off
            // the rings, 2 MiB in all.
            let start = boot::info().mem_size - (1 << 20);
            raw.desc(0, Descriptor::new(start, 1 << 20, DESC_NEXT, 1));
            raw.desc(1, Descriptor::new(start, 1 << 20, DESC_NEXT, 2));
            raw.desc(2, status);
            raw.offer(0);
        }
        "indirect" => {
            raw.desc(0, Descriptor::new(buf, 64, DESC_INDIRECT, 0));
            raw.offer(0);
        }
        "ahead" => {
            raw.avail(1, (SIZE + 5) as u16);
            virtq::notify(0);
        }
        "cut" => {
            raw.desc(0, Descriptor::new(buf, 16, 0, 0));
            raw.offer(0);
        }
        "storm" => loop {
            virtq::notify(0);
        },
        _ => return false,
    }
    true
}

/// Notifications with nothing to do, `rate` a second for `nanos`.
fn storm_at(rate: u64, nanos: u64) -> i32 {
    let _queue = Raw::new();
    let per_tick = rate / 1000;
    let start = time::monotonic_ns();
    let mut tick = start;
    while tick - start < nanos {
        for _ in 0..per_tick {
            virtq::notify(0);
        }
        tick += 1_000_000;
        shoal_guest::event::wait_any(0, tick);
    }
    println!("storm at {rate}/s not stopped");
    0
}

fn main() -> i32 {
    let mode = boot::args().next().unwrap_or("loop");
    if mode == "setup" {
        return setup_refusals();
    }
    if let (Some(rate), "storm") = (boot::args().nth(1), mode) {
        let duration = boot::args().nth(2).unwrap_or("2s");
        return match time::parse_duration_ns(duration) {
            Some(nanos) => storm_at(rate.parse().unwrap_or(0), nanos),
            None => {
                println!("bad duration {duration}");
                2
            }
        };
    }
    println!("sending {mode}");
    if !attack(mode) {
        println!("unknown mode {mode}");
        return 2;
    }
    time::sleep(core::time::Duration::from_secs(5));
    println!("not stopped");
    3
}
