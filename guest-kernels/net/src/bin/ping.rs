//! ping: two guests on a virtual LAN exchange frames and measure round
//! trips. Run two with the same arguments: `shoal run -n 2 --net lan ping
//! -- N [SIZE] [WINDOW]`.
//!
//! The two find each other by broadcast; the one with the lower MAC
//! address replies, the other sends N data frames of SIZE bytes (default
//! 64, at most 1514) with up to WINDOW (default 1) unanswered. The replier
//! answers every frame to its sender with the same payload and checks that
//! data frames come in order, one after another, intact; the sender checks
//! the same of the answers, then says `bye`. The sender prints `ping ok: N
//! frames of SIZE bytes, rtt p50 .. p99 .. us` (round trips mean most with
//! WINDOW 1) and `result ping N NANOS`, the replier `reply ok: N frames in
//! order`; each exits 1 at a frame lost (no answer within a second), out
//! of order or damaged.
//!
//! Frames carry EtherType 0x88b5 (local experiments) and a payload of a
//! kind byte (probe, data, bye), the sequence number and filler derived
//! from it.
#![no_std]
#![no_main]

use shoal_guest::net::Nic;
use shoal_guest::{boot, println, time};

shoal_guest::entry!(main);

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const BROADCAST: [u8; 6] = [0xff; 6];
const PROBE: u8 = 0;
const DATA: u8 = 1;
const BYE: u8 = 2;
/// Ethernet header, kind byte, sequence number.
const HEAD: usize = 14 + 1 + 8;
/// Round trips kept for the percentiles.
const SAMPLES: usize = 4096;
/// How long an answer may take before it counts as lost.
const PATIENCE_NS: u64 = 1_000_000_000;

/// Byte `i` of the payload of frame `seq`.
fn filler(seq: u64, i: usize) -> u8 {
    (seq as u8).wrapping_mul(31).wrapping_add(i as u8)
}

/// Builds a ping frame of `size` bytes into `buf`.
fn frame(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], kind: u8, seq: u64) {
    buf[..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    buf[12..14].copy_from_slice(&ETHERTYPE);
    buf[14] = kind;
    buf[15..23].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in buf[HEAD..].iter_mut().enumerate() {
        *b = filler(seq, i);
    }
}

/// What a received frame is.
#[derive(Clone, Copy)]
enum Parsed {
    /// Another protocol's (skipped).
    Other,
    /// A ping frame whose payload is not what its number says.
    Damaged,
    /// A ping frame: source, kind, sequence number.
    Ping([u8; 6], u8, u64),
}

fn parse(frame: &[u8]) -> Parsed {
    if frame.len() < HEAD || frame[12..14] != ETHERTYPE {
        return Parsed::Other;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&frame[15..23]);
    let seq = u64::from_le_bytes(seq);
    let intact = frame[HEAD..]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == filler(seq, i));
    let mut src = [0u8; 6];
    src.copy_from_slice(&frame[6..12]);
    if intact {
        Parsed::Ping(src, frame[14], seq)
    } else {
        Parsed::Damaged
    }
}

/// Replies to every ping frame, starting with `first` (its length).
fn reply(nic: &mut Nic, out: &mut [u8; 1514], first: usize) -> i32 {
    let mac = nic.mac();
    let mut next = 1u64;
    let mut skipped = 0u64;
    let mut pending = Some(first);
    loop {
        let got = match pending.take() {
            Some(len) => Some((parse(&out[..len]), len)),
            None => nic.recv(|f| {
                let len = f.len();
                out[..len].copy_from_slice(f);
                (parse(f), len)
            }),
        };
        let (src, kind, seq, len) = match got {
            None => {
                nic.wait(u64::MAX);
                continue;
            }
            Some((Parsed::Other, _)) => {
                skipped += 1;
                continue;
            }
            Some((Parsed::Damaged, _)) => {
                println!("reply: a damaged ping frame");
                return 1;
            }
            Some((Parsed::Ping(src, kind, seq), len)) => (src, kind, seq, len),
        };
        if kind == DATA {
            if seq != next {
                println!("reply: expected frame {next}, got {seq}");
                return 1;
            }
            next += 1;
        }
        out[..6].copy_from_slice(&src);
        out[6..12].copy_from_slice(&mac);
        if nic.send(&out[..len]).is_err() {
            println!("reply: cannot send");
            return 1;
        }
        if kind == BYE {
            nic.flush();
            println!("reply ok: {} frames in order", next - 1);
            if skipped > 0 {
                println!("reply: skipped {skipped} frames that were not pings");
            }
            return 0;
        }
    }
}

/// Waits for the answer to `(kind, seq)` (skipping the peer's probes);
/// an error after [`PATIENCE_NS`] or at a wrong one.
fn answer(nic: &mut Nic, kind: u8, seq: u64, peer: &mut [u8; 6]) -> Result<(), &'static str> {
    let deadline = time::monotonic_ns() + PATIENCE_NS;
    loop {
        if let Some(got) = nic.recv(parse) {
            return match got {
                Parsed::Ping(src, k, s) if k == kind && s == seq => {
                    *peer = src;
                    Ok(())
                }
                Parsed::Ping(_, PROBE, _) | Parsed::Other => continue,
                Parsed::Ping(..) => Err("an answer out of order"),
                Parsed::Damaged => Err("a damaged answer"),
            };
        }
        if !nic.wait(deadline) {
            return Err("no answer within a second");
        }
    }
}

/// Which side this guest is on.
enum Role {
    /// Send to this peer.
    Send([u8; 6]),
    /// Reply, starting with the frame of this length in the buffer.
    Reply(usize),
}

/// Broadcasts probes until a ping frame from another guest comes in:
/// from a lower address, this guest sends to it; from a higher one, it
/// replies (that frame first).
fn discover(nic: &mut Nic, out: &mut [u8; 1514]) -> Option<Role> {
    let mac = nic.mac();
    let give_up = time::monotonic_ns() + 30 * PATIENCE_NS;
    let mut probe = [0u8; HEAD];
    frame(&mut probe, BROADCAST, mac, PROBE, 0);
    while time::monotonic_ns() < give_up {
        nic.send(&probe).ok()?;
        nic.wait(time::monotonic_ns() + 20_000_000);
        while let Some((got, len)) = nic.recv(|f| {
            out[..f.len()].copy_from_slice(f);
            (parse(f), f.len())
        }) {
            match got {
                Parsed::Ping(src, ..) if src < mac => return Some(Role::Send(src)),
                Parsed::Ping(src, ..) if src > mac => return Some(Role::Reply(len)),
                _ => {}
            }
        }
    }
    None
}

fn send(nic: &mut Nic, mut peer: [u8; 6], count: u64, size: usize, window: u64) -> i32 {
    let mac = nic.mac();
    let mut buf = [0u8; 1514];
    // The replier answers a probe once it knows it replies.
    frame(&mut buf[..HEAD], peer, mac, PROBE, 0);
    let known = (0..10).any(|_| nic.send(&buf[..HEAD]).is_ok() && answer_probe(nic, peer));
    if !known {
        println!("ping: the peer does not answer");
        return 1;
    }
    let mut rtts = [0u32; SAMPLES];
    let mut sent_at = [0u64; SAMPLES];
    let start = time::monotonic_ns();
    let (mut sent, mut answered) = (0u64, 0u64);
    while answered < count {
        while sent < count && sent - answered < window {
            sent += 1;
            frame(&mut buf[..size], peer, mac, DATA, sent);
            sent_at[sent as usize % SAMPLES] = time::monotonic_ns();
            if nic.send(&buf[..size]).is_err() {
                println!("ping: cannot send");
                return 1;
            }
        }
        if let Err(why) = answer(nic, DATA, answered + 1, &mut peer) {
            println!("ping: frame {}: {why}", answered + 1);
            return 1;
        }
        answered += 1;
        let rtt = time::monotonic_ns() - sent_at[answered as usize % SAMPLES];
        rtts[answered as usize % SAMPLES] = rtt.min(u64::from(u32::MAX)) as u32;
    }
    let nanos = time::monotonic_ns() - start;
    frame(&mut buf[..HEAD], peer, mac, BYE, 0);
    if nic.send(&buf[..HEAD]).is_err() {
        println!("ping: cannot send");
        return 1;
    }
    if let Err(why) = answer(nic, BYE, 0, &mut peer) {
        println!("ping: bye: {why}");
        return 1;
    }
    let kept = &mut rtts[..(count as usize).min(SAMPLES)];
    kept.sort_unstable();
    let at = |q: usize| kept[(kept.len() * q / 100).min(kept.len() - 1)] / 1000;
    println!(
        "ping ok: {count} frames of {size} bytes, rtt p50 {} p99 {} us",
        at(50),
        at(99)
    );
    println!("result ping {count} {nanos}");
    0
}

/// Waits up to [`PATIENCE_NS`] for a probe from `peer`.
fn answer_probe(nic: &mut Nic, peer: [u8; 6]) -> bool {
    let deadline = time::monotonic_ns() + PATIENCE_NS;
    loop {
        if let Some(got) = nic.recv(parse) {
            if matches!(got, Parsed::Ping(src, PROBE, _) if src == peer) {
                return true;
            }
            continue;
        }
        if !nic.wait(deadline) {
            return false;
        }
    }
}

fn main() -> i32 {
    let mut args = boot::args();
    let mut number = |default: u64| args.next().and_then(|a| a.parse().ok()).unwrap_or(default);
    let count = number(100);
    let size = (number(64) as usize).clamp(HEAD, 1514);
    let window = number(1).max(1);
    let mut nic = match Nic::find() {
        Ok(nic) => nic,
        Err(e) => {
            println!("ping: no network device ({e:?}); run with --net NAME");
            return 2;
        }
    };
    let mut buf = [0u8; 1514];
    match discover(&mut nic, &mut buf) {
        Some(Role::Send(peer)) => send(&mut nic, peer, count, size, window),
        Some(Role::Reply(first)) => reply(&mut nic, &mut buf, first),
        None => {
            println!("ping: nobody on the LAN");
            1
        }
    }
}
