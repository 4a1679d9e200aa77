//! net-attack: sends, on its network device's transmit queue, frames the
//! virtual LAN must drop and count, then one good broadcast frame, and
//! exits 0 once the host has taken them all. The host must neither stop it
//! nor pass a bad frame on.
//!
//! The bad frames: shorter than an Ethernet header, longer than 1514
//! bytes, in a device-writable buffer, with offloads asked for in the
//! header, from another guest's address, and to a guest that is gone.
#![no_std]
#![no_main]

use shoal_guest::abi::device::{KIND_NET, NET_TX, guest_mac, mac_from_capacity};
use shoal_guest::blk;
use shoal_guest::virtq::{Buf, Virtq};
use shoal_guest::{event, mmu, println};

shoal_guest::entry!(main);

/// Frames sent that the LAN must drop.
const BAD: u32 = 6;

fn main() -> i32 {
    let Some((index, info)) = (0..blk::devices())
        .filter_map(|i| Some((i, blk::info(i).ok()?)))
        .find(|(_, info)| info.kind == KIND_NET)
    else {
        println!("no network device");
        return 2;
    };
    let mac = mac_from_capacity(info.capacity);
    let event = 40;
    let mut tx = Virtq::new(index, NET_TX, 16, event).expect("transmit queue");
    let page = mmu::take_low(1).expect("a page");
    // SAFETY: the page is this guest's, identity-mapped, and only this
    // function uses it.
    let buf = unsafe { core::slice::from_raw_parts_mut(page as *mut u8, 4096) };
    // Frame at 2048: header (12 zero bytes), then broadcast from `mac`.
    let good = |buf: &mut [u8], dst: [u8; 6], src: [u8; 6]| {
        buf[..12].fill(0);
        buf[12..18].copy_from_slice(&dst);
        buf[18..24].copy_from_slice(&src);
        buf[24..26].copy_from_slice(&[0x88, 0xb6]);
    };
    good(&mut buf[2048..], [0xff; 6], mac);
    let at = page + 2048;
    let frame = |len: u32, device_writes: bool| Buf {
        addr: at,
        len,
        device_writes,
    };
    let send = |tx: &mut Virtq, bufs: &[Buf]| {
        tx.push(bufs).expect("room in the queue");
        tx.kick();
        // Wait for the host to take it before changing the buffer.
        loop {
            if tx.pop_used().is_some() {
                break;
            }
            if !tx.arm() {
                event::wait_any(1 << event, u64::MAX);
            }
        }
    };
    send(&mut tx, &[frame(12 + 10, false)]); // short
    // Long: 2,000 bytes of frame, in two buffers.
    send(
        &mut tx,
        &[
            frame(1024, false),
            Buf {
                addr: page,
                len: 12 + 2000 - 1024,
                device_writes: false,
            },
        ],
    );
    send(&mut tx, &[frame(12 + 60, true)]); // writable
    buf[2048] = 1; // offloads asked for
    send(&mut tx, &[frame(12 + 60, false)]);
    buf[2048] = 0;
    good(&mut buf[2048..], [0xff; 6], guest_mac(9999)); // spoofed
    send(&mut tx, &[frame(12 + 60, false)]);
    good(&mut buf[2048..], guest_mac(123_456), mac); // to a guest gone
    send(&mut tx, &[frame(12 + 60, false)]);
    good(&mut buf[2048..], [0xff; 6], mac);
    send(&mut tx, &[frame(12 + 60, false)]);
    println!("sent {BAD} bad frames and a good one");
    0
}
