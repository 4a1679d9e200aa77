//! What the fuzz targets share: a guest made as a spawn makes one, without
//! KVM, and the checks on its memory ([`guest`]); Ethernet, ARP and IPv4
//! bytes for the network targets ([`frames`]); the seeds' ELF images
//! ([`elf`]).
//!
//! Nothing here links libFuzzer, so `src/bin/make_seeds.rs` builds without
//! the fuzzing flags.

pub mod elf;
pub mod frames;
pub mod guest;

/// Reads input from the front of a byte slice, giving zeros once it runs
/// out: the targets' inputs are read this way, so that any input means
/// something.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    /// The next `N` bytes (zeros past the end).
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }

    /// The next little-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    /// The next little-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    /// The next little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    /// The next `n` bytes, or as many as are left.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
