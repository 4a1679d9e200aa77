//! net-flood: floods its virtual LAN for DURATION (`net-flood 2s [ID
//! ...]`): 64-byte frames as fast as its transmit queue takes them, to the
//! broadcast address and, in turn, to guests ID... (unicast). It throws
//! away what it receives. The LAN must keep the others talking: the
//! flood's broadcasts over their limit are dropped, and a receiver's
//! backlog keeps room for its other senders. It prints `flood: sent N
//! frames, received M` and exits 0.
//!
//! `net-flood 2s unknown` sends only to a unicast address no guest has
//! (`0a:00:00:00:00:01`), which a LAN floods to every port as it does a
//! broadcast; `net-flood 2s listen` sends nothing and counts what
//! arrives.
#![no_std]
#![no_main]

use shoal_guest::abi::device::guest_mac;
use shoal_guest::net::Nic;
use shoal_guest::{boot, println, time};

shoal_guest::entry!(main);

const BROADCAST: [u8; 6] = [0xff; 6];
/// A unicast address no guest has: locally administered, not host-given.
const UNKNOWN: [u8; 6] = [0x0a, 0, 0, 0, 0, 1];
/// Most unicast targets.
const TARGETS_MAX: usize = 8;

fn main() -> i32 {
    let mut args = boot::args();
    let Some(duration) = args.next().and_then(time::parse_duration_ns) else {
        println!("usage: net-flood DURATION [ID ...]");
        return 2;
    };
    let mut targets = [BROADCAST; TARGETS_MAX + 1];
    let mut count = 1;
    let mut args = args.peekable();
    let listen = args.peek() == Some(&"listen");
    if args.next_if_eq(&"unknown").is_some() {
        targets[0] = UNKNOWN;
    }
    for arg in args.take(TARGETS_MAX).filter(|_| !listen) {
        let Ok(id) = arg.parse() else {
            println!("net-flood: not a guest id: {arg}");
            return 2;
        };
        targets[count] = guest_mac(id);
        count += 1;
    }
    let mut nic = match Nic::find() {
        Ok(nic) => nic,
        Err(e) => {
            println!("net-flood: no network device ({e:?})");
            return 2;
        }
    };
    let mut frame = [0u8; 64];
    frame[6..12].copy_from_slice(&nic.mac());
    frame[12..14].copy_from_slice(&[0x88, 0xb7]);
    let deadline = time::monotonic_ns() + duration;
    let (mut sent, mut received) = (0u64, 0u64);
    while time::monotonic_ns() < deadline {
        while nic.recv(|_| ()).is_some() {
            received += 1;
        }
        if listen {
            nic.wait_io(deadline, false);
            continue;
        }
        frame[..6].copy_from_slice(&targets[sent as usize % count]);
        match nic.try_send(&frame) {
            Ok(true) => sent += 1,
            Ok(false) => {
                nic.wait_io(deadline, true);
            }
            Err(e) => {
                println!("net-flood: cannot send ({e:?})");
                return 1;
            }
        }
    }
    nic.flush();
    println!("flood: sent {sent} frames, received {received}");
    0
}
