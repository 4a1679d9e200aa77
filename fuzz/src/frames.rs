//! Ethernet frames for the network targets and their seeds: ARP and
//! IPv4/TCP frames built with correct checksums, and the few fields the
//! targets read back. Frames here start at the Ethernet header; the LAN
//! carries them behind a receive header ([`with_header`]).

use shoal_host::device::net::receive_header;
use zerocopy::IntoBytes;

/// Ethertype of IPv4.
pub const IPV4: [u8; 2] = [0x08, 0x00];
/// Ethertype of ARP.
pub const ARP: [u8; 2] = [0x08, 0x06];
/// The broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// TCP flag bits.
pub mod tcp {
    /// FIN.
    pub const FIN: u8 = 1;
    /// SYN.
    pub const SYN: u8 = 2;
    /// RST.
    pub const RST: u8 = 4;
    /// PSH.
    pub const PSH: u8 = 8;
    /// ACK.
    pub const ACK: u8 = 16;
}

/// `frame` behind the receive header the LAN puts before every frame.
pub fn with_header(frame: &[u8]) -> Vec<u8> {
    let mut out = receive_header().as_bytes().to_vec();
    out.extend_from_slice(frame);
    out
}

/// The Internet checksum of `bytes`, started from `sum`.
pub fn checksum(bytes: &[u8], mut sum: u32) -> u16 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet header.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: [u8; 2]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype);
    frame
}

/// An ARP request (broadcast) from `sha`/`spa` for `tpa`.
pub fn arp_request(sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut frame = ethernet(BROADCAST, sha, ARP);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&sha);
    frame.extend_from_slice(&spa);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&tpa);
    frame
}

/// One TCP segment's addresses and fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Source IPv4 address.
    pub src: [u8; 4],
    /// Destination IPv4 address.
    pub dst: [u8; 4],
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags ([`tcp`]).
    pub flags: u8,
    /// Window.
    pub window: u16,
}

/// An IPv4/TCP frame from `src_mac` to `dst_mac` carrying `segment` and
/// `payload`, with both checksums right.
pub fn tcp_frame(dst_mac: [u8; 6], src_mac: [u8; 6], segment: &Segment, payload: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&segment.sport.to_be_bytes());
    tcp.extend_from_slice(&segment.dport.to_be_bytes());
    tcp.extend_from_slice(&segment.seq.to_be_bytes());
    tcp.extend_from_slice(&segment.ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, segment.flags]);
    tcp.extend_from_slice(&segment.window.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&segment.src);
    pseudo.extend_from_slice(&segment.dst);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    let sum = checksum(&pseudo, 0);
    let tcp_sum = checksum(&tcp, u32::from(!sum));
    tcp[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
    let mut frame = ethernet(dst_mac, src_mac, IPV4);
    frame.extend_from_slice(&ipv4_header(segment.src, segment.dst, 6, tcp.len()));
    frame.extend_from_slice(&tcp);
    frame
}

/// An IPv4 header (no options, don't fragment) for `len` payload bytes.
pub fn ipv4_header(src: [u8; 4], dst: [u8; 4], protocol: u8, len: usize) -> [u8; 20] {
    let mut header = [0u8; 20];
    header[0] = 0x45;
    header[2..4].copy_from_slice(&((20 + len) as u16).to_be_bytes());
    header[6] = 0x40;
    header[8] = 64;
    header[9] = protocol;
    header[12..16].copy_from_slice(&src);
    header[16..20].copy_from_slice(&dst);
    let sum = checksum(&header, 0);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    header
}

/// The TCP segment an Ethernet frame carries, if it carries one in an
/// IPv4 packet without options.
pub fn parse_tcp(frame: &[u8]) -> Option<Segment> {
    if frame.get(12..14)? != IPV4 || frame.get(14)? & 0x0f != 5 || *frame.get(23)? != 6 {
        return None;
    }
    let tcp = frame.get(34..54)?;
    let u16_at = |i: usize| u16::from_be_bytes([tcp[i], tcp[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([tcp[i], tcp[i + 1], tcp[i + 2], tcp[i + 3]]);
    Some(Segment {
        src: frame[26..30].try_into().ok()?,
        dst: frame[30..34].try_into().ok()?,
        sport: u16_at(0),
        dport: u16_at(2),
        seq: u32_at(4),
        ack: u32_at(8),
        flags: tcp[13],
        window: u16_at(14),
    })
}
