//! blk: drives disk 0 (`shoal run --disk FILE blk -- MODE`).
//!
//! - `check [SEED]`: writes a pattern over the whole disk in 64 KiB
//!   requests, 16 in flight, flushes, reads it all back and checks it.
//!   Prints `blk ok: N sectors`.
//! - `fill [SEED]`: writes the pattern over the whole disk, flushes,
//!   prints `flushed`, then waits for ever (to be killed).
//! - `verify [SEED]`: reads the whole disk and checks the pattern (works
//!   on a read-only disk). Prints `verified N sectors`.
//! - `refused`: a write to a read-only disk and a read past the end must
//!   both fail. Prints `refused ok`.
//! - `info`: prints the disk's size, mode and id.
//! - `flushes`: writes 64 KiB and flushes, over and over, for ever (to be
//!   killed): a guest whose flushes keep the storage busy.
//! - `bench read|write BYTES DEPTH TOTAL`: for `shoal bench`, moves TOTAL
//!   bytes sequentially (wrapping at the disk's end) in requests of BYTES,
//!   DEPTH at a time; prints `result blk TOTAL NANOS`.
//! - `notify N`: for `shoal bench`, times N notifications with nothing
//!   to do, 1,000 at a time with a pause after each so that the host's
//!   storm limit never counts more than 1,000; prints `result notify N
//!   NANOS` (the pauses not counted).
//!
//! Byte `o` of the disk holds byte `o % 8` of the little-endian word
//! `pattern(SEED, o / 8)`: tests read the host file and check it the
//! same way.
#![no_std]
#![no_main]

use shoal_guest::blk::{self, BlkError, Disk, Request};
use shoal_guest::{boot, println, time};

shoal_guest::entry!(main);

/// Bytes per request.
const CHUNK: usize = 64 << 10;
/// Requests in flight.
const DEPTH: usize = 16;

/// The word at word index `index` of a disk filled with `seed`.
fn pattern(seed: u64, index: u64) -> u64 {
    (index ^ seed.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed
}

fn fill_chunk(buf: &mut [u8], seed: u64, offset: u64) {
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&pattern(seed, offset / 8 + i as u64).to_le_bytes());
    }
}

fn check_chunk(buf: &[u8], seed: u64, offset: u64) -> bool {
    buf.chunks_exact(8)
        .enumerate()
        .all(|(i, word)| word == pattern(seed, offset / 8 + i as u64).to_le_bytes())
}

/// Runs `op` over the whole disk in `CHUNK` requests, `DEPTH` at a time;
/// `prepare` fills a buffer before a write, `check` looks at one after a
/// read.
fn sweep(disk: &mut Disk, bufs: &mut [u8], write: bool, seed: u64) -> Result<(), BlkError> {
    let total = disk.sectors() * 512;
    let mut offset = 0;
    while offset < total {
        let mut reqs: [Option<Request<'_>>; DEPTH] = Default::default();
        let mut starts = [0u64; DEPTH];
        let mut n = 0;
        for (buf, start) in bufs.chunks_exact_mut(CHUNK).zip(starts.iter_mut()) {
            if offset >= total {
                break;
            }
            let len = (total - offset).min(CHUNK as u64) as usize;
            let buf = &mut buf[..len];
            *start = offset;
            reqs[n] = Some(if write {
                fill_chunk(buf, seed, offset);
                Request::write(offset / 512, buf)
            } else {
                Request::read(offset / 512, buf)
            });
            n += 1;
            offset += len as u64;
        }
        let mut batch: [Request<'_>; DEPTH] = reqs.map(|r| r.unwrap_or_else(Request::flush));
        disk.run(&mut batch[..n]);
        for req in &batch[..n] {
            req.result?;
        }
        if !write {
            for (i, start) in starts[..n].iter().enumerate() {
                let len = (total - start).min(CHUNK as u64) as usize;
                let buf = &bufs[i * CHUNK..i * CHUNK + len];
                if !check_chunk(buf, seed, *start) {
                    println!("mismatch in the 64 KiB from byte {start}");
                    return Err(BlkError::Io);
                }
            }
        }
    }
    Ok(())
}

/// `bench read|write BYTES DEPTH TOTAL`.
fn bench(disk: &mut Disk, mut args: impl Iterator<Item = &'static str>) -> Result<i32, BlkError> {
    let write = args.next() == Some("write");
    let mut number = || args.next().and_then(|a| a.parse::<u64>().ok());
    let (Some(bytes), Some(depth), Some(total)) = (number(), number(), number()) else {
        println!("usage: blk bench read|write BYTES DEPTH TOTAL");
        return Ok(2);
    };
    let (bytes, depth) = (
        bytes as usize,
        (depth as usize).clamp(1, blk::IN_FLIGHT_MAX),
    );
    let bufs = blk::buffer((bytes * depth).div_ceil(4096) as u64)?;
    let sectors = (bytes / 512) as u64;
    let mut sector = 0;
    let mut moved = 0;
    let start = time::monotonic_ns();
    while moved < total {
        let mut batch: [Option<Request<'_>>; blk::IN_FLIGHT_MAX] =
            [const { None }; blk::IN_FLIGHT_MAX];
        for (slot, buf) in batch
            .iter_mut()
            .zip(bufs.chunks_exact_mut(bytes))
            .take(depth)
        {
            if sector + sectors > disk.sectors() {
                sector = 0;
            }
            *slot = Some(if write {
                Request::write(sector, buf)
            } else {
                Request::read(sector, buf)
            });
            sector += sectors;
        }
        let mut batch = batch.map(|r| r.unwrap_or_else(Request::flush));
        disk.run(&mut batch[..depth]);
        for req in &batch[..depth] {
            req.result?;
        }
        moved += (bytes * depth) as u64;
    }
    println!("result blk {moved} {}", time::monotonic_ns() - start);
    Ok(0)
}

/// `notify N`.
fn notify(count: u64) -> i32 {
    let mut nanos = 0;
    let mut left = count;
    while left > 0 {
        let round = left.min(1000);
        let start = time::monotonic_ns();
        for _ in 0..round {
            shoal_guest::virtq::notify(0);
        }
        nanos += time::monotonic_ns() - start;
        left -= round;
        time::sleep(core::time::Duration::from_millis(110));
    }
    println!("result notify {count} {nanos}");
    0
}

/// Runs `mode`; `rest` are the arguments after it.
fn run(mode: &str, seed: u64, rest: impl Iterator<Item = &'static str>) -> Result<i32, BlkError> {
    if mode == "notify" {
        return Ok(notify(seed));
    }
    let mut disk = Disk::open(0)?;
    let bufs = || blk::buffer((CHUNK * DEPTH / 4096) as u64).map_err(BlkError::from);
    match mode {
        "check" => {
            let bufs = bufs()?;
            sweep(&mut disk, bufs, true, seed)?;
            disk.flush()?;
            sweep(&mut disk, bufs, false, seed)?;
            println!("blk ok: {} sectors", disk.sectors());
        }
        "fill" => {
            sweep(&mut disk, bufs()?, true, seed)?;
            disk.flush()?;
            println!("flushed");
            loop {
                shoal_guest::time::sleep(core::time::Duration::from_secs(3600));
            }
        }
        "verify" => {
            sweep(&mut disk, bufs()?, false, seed)?;
            println!("verified {} sectors", disk.sectors());
        }
        "refused" => {
            let mut sector = [0u8; 512];
            let write = disk.write(0, &sector);
            let past = disk.read(disk.sectors(), &mut sector);
            println!("write: {write:?}; read past the end: {past:?}");
            if write != Err(BlkError::Io) || past != Err(BlkError::Io) {
                return Ok(1);
            }
            println!("refused ok");
        }
        "bench" => return bench(&mut disk, rest),
        "flushes" => {
            let buf = &mut bufs()?[..CHUNK];
            let chunks = (disk.sectors() * 512 / CHUNK as u64).max(1);
            for n in 0u64.. {
                let offset = n % chunks * CHUNK as u64;
                fill_chunk(buf, n, offset);
                disk.write(offset / 512, buf)?;
                disk.flush()?;
            }
        }
        "info" => {
            let id = disk.id()?;
            let len = id.iter().position(|b| *b == 0).unwrap_or(id.len());
            println!(
                "disk 0: {} sectors, {}, id {:?}",
                disk.sectors(),
                if disk.read_only() {
                    "read-only"
                } else {
                    "read-write"
                },
                core::str::from_utf8(&id[..len]).unwrap_or("?")
            );
        }
        other => {
            println!("usage: blk check|fill|verify|refused|info|flushes [SEED], not {other}");
            return Ok(2);
        }
    }
    Ok(0)
}

fn main() -> i32 {
    let mut args = boot::args();
    let mode = args.next().unwrap_or("check");
    let seed = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    match run(mode, seed, boot::args().skip(1)) {
        Ok(code) => code,
        Err(e) => {
            println!("blk failed: {e:?}");
            1
        }
    }
}
