//! The messages of a one-file run whose payload has structure: `OPEN`,
//! `FILE_INFO`, `CHUNK` and `DONE`, with their limits.
//!
//! Each type's doc gives its payload layout (after the type byte; integers
//! little-endian, `bytes` = u32 length + that many bytes). The simpler
//! messages are encoded in [`crate::wire::messages`] itself.

use anyhow::Result;

use crate::wire::codec::{malformed, put_bytes, Rd};
use crate::wire::options::{Options, WriteMode};

/// Most indices in one `REQUEST` or `BLOCK_REQUEST`.
pub const MAX_REQUEST: usize = 65536;
/// Longest path or source name in `OPEN`, and longest relative path or
/// link target in a tree message.
pub const MAX_PATH: usize = 4096;
/// Longest error message.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most `--seed` files in `OPEN`.
pub const MAX_SEEDS: usize = 64;
/// Largest N of `--sample K/N`.
pub const MAX_SAMPLE: u32 = 1_000_000;
/// Longest `--timeout`, in seconds (a day).
pub const MAX_TIMEOUT: u32 = 86_400;
/// Most piece digests in `PIECES` (4 MiB; a piece is about 64 chunks).
pub const MAX_PIECE_REFS: usize = 1 << 18;
/// Most difference ranges listed in `DONE` (the total is always exact).
pub const MAX_RANGES: usize = 4096;

/// `CHUNK` encoding bits.
const ENC_ZSTD: u8 = 1;
const ENC_PIECES: u8 = 2;
const ENC_CHANGED: u8 = 4;

/// Which end the server plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The server reads its file and sends it.
    Send,
    /// The server receives into its file.
    Receive,
    /// The server lists the tree at its path (`-r`).
    List,
    /// The server applies operations to the tree at its path (`-r`).
    Apply,
}

/// `OPEN`: what the client asks the server to do.
///
/// | size      | field                                                     |
/// |-----------|-----------------------------------------------------------|
/// | 1         | role: 0 server sends, 1 receives, 2 lists, 3 applies      |
/// | 4         | flags u32 ([`Options`]; unknown bits refused)             |
/// | 1         | compress level                                            |
/// | 4         | chunking (see `ChunkParams::code`)                        |
/// | bytes     | path (≤ [`MAX_PATH`])                                     |
/// | bytes     | source name (≤ [`MAX_PATH`])                              |
/// | 4         | timeout seconds (0 = none; ≤ [`MAX_TIMEOUT`])             |
/// | 8         | bandwidth limit, bytes/s (0 = none)                       |
/// | 4 + 4     | sample k, n (0, 0 = whole file; else 1 ≤ k ≤ n ≤ [`MAX_SAMPLE`]) |
/// | 4 + bytes | seed count (≤ [`MAX_SEEDS`]) × seed path                  |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub role: Role,
    /// The options' bits; see [`Open::options`].
    pub flags: u32,
    pub compress_level: u8,
    pub chunking: u32,
    /// The server's path, raw bytes (Unix paths are bytes).
    pub path: Vec<u8>,
    /// File name of the source, for a destination that is a directory.
    pub source_name: Vec<u8>,
    /// Seconds of silence after which either end gives up; 0 = never.
    pub timeout_secs: u32,
    /// The server's cap on its own sending rate, bytes/s; 0 = none.
    pub bwlimit: u64,
    /// `--sample K/N`: check only slice K of N; `None` = the whole file.
    pub sample: Option<(u32, u32)>,
    /// `--seed` files on the receiving end, extra sources of chunks.
    pub seeds: Vec<Vec<u8>>,
}

impl Open {
    /// The options in [`Open::flags`] (a decoded `OPEN` has no unknown bits).
    pub fn options(&self) -> Options {
        Options::from_known_bits(self.flags)
    }

    pub(super) fn put(&self, out: &mut Vec<u8>) {
        out.push(match self.role {
            Role::Send => 0,
            Role::Receive => 1,
            Role::List => 2,
            Role::Apply => 3,
        });
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.push(self.compress_level);
        out.extend_from_slice(&self.chunking.to_le_bytes());
        put_bytes(out, &self.path);
        put_bytes(out, &self.source_name);
        out.extend_from_slice(&self.timeout_secs.to_le_bytes());
        out.extend_from_slice(&self.bwlimit.to_le_bytes());
        let (k, n) = self.sample.unwrap_or((0, 0));
        out.extend_from_slice(&k.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(self.seeds.len() as u32).to_le_bytes());
        for seed in &self.seeds {
            put_bytes(out, seed);
        }
    }

    pub(super) fn get(r: &mut Rd<'_>) -> Result<Open> {
        let role = match r.u8()? {
            0 => Role::Send,
            1 => Role::Receive,
            2 => Role::List,
            3 => Role::Apply,
            x => return Err(malformed(format!("OPEN with unknown role {x}"))),
        };
        let flags = r.u32()?;
        if Options::from_bits(flags).is_err() {
            return Err(malformed(format!("OPEN with unknown flags {flags:#x}")));
        }
        let compress_level = r.u8()?;
        let chunking = r.u32()?;
        let path = r.bytes(MAX_PATH)?.to_vec();
        let source_name = r.bytes(MAX_PATH)?.to_vec();
        let timeout_secs = r.u32()?;
        if timeout_secs > MAX_TIMEOUT {
            return Err(malformed(format!(
                "OPEN with a timeout of {timeout_secs} s"
            )));
        }
        let bwlimit = r.u64()?;
        let sample = match (r.u32()?, r.u32()?) {
            (0, 0) => None,
            (k, n) if 1 <= k && k <= n && n <= MAX_SAMPLE => Some((k, n)),
            (k, n) => return Err(malformed(format!("OPEN with sample {k}/{n}"))),
        };
        let count = r.u32()? as usize;
        if count > MAX_SEEDS {
            return Err(malformed(format!("OPEN with {count} seeds")));
        }
        let mut seeds = Vec::with_capacity(count);
        for _ in 0..count {
            seeds.push(r.bytes(MAX_PATH)?.to_vec());
        }
        Ok(Open {
            role,
            flags,
            compress_level,
            chunking,
            path,
            source_name,
            timeout_secs,
            bwlimit,
            sample,
            seeds,
        })
    }
}

/// `FILE_INFO`: the source's size and times.
///
/// | size | field                                                            |
/// |------|------------------------------------------------------------------|
/// | 8    | size u64                                                         |
/// | 8    | mtime seconds i64                                                |
/// | 4    | mtime nanoseconds u32                                            |
/// | 4    | mode u32: full `st_mode`; `S_IFBLK` marks a block device source, never quick-checked, whose mtime is the time of the copy |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileInfo {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub mode: u32,
}

impl FileInfo {
    pub(super) fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mtime_sec.to_le_bytes());
        out.extend_from_slice(&self.mtime_nsec.to_le_bytes());
        out.extend_from_slice(&self.mode.to_le_bytes());
    }

    pub(super) fn get(r: &mut Rd<'_>) -> Result<FileInfo> {
        Ok(FileInfo {
            size: r.u64()?,
            mtime_sec: r.u64()? as i64,
            mtime_nsec: r.u32()?,
            mode: r.u32()?,
        })
    }
}

/// How the receiver wants the run to go (`START`: one byte, the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// 0: send the manifest; I will request what I lack.
    Manifest,
    /// 1: quick check: the destination is up to date; nothing follows but `DONE`.
    UpToDate,
    /// 2: I hold nothing of this file: send every data chunk right after the
    /// manifest batch that lists it, unasked.
    Inline,
    /// 3: my destination holds the `SNAPSHOT` base: send `RANGES` and a
    /// manifest of those ranges only (see [`super::snapshot`]).
    Delta,
}

/// `DONE`'s write mode byte when nothing was written.
const NOT_WRITTEN: u8 = 255;

/// What the receiver reports at the end (`DONE`).
///
/// | size   | field                                                          |
/// |--------|----------------------------------------------------------------|
/// | 1      | flags: 1 up to date, 2 identical, 4 verified, 8 basis chunk list taken from the manifest cache, 16 the source changed while read and was committed anyway, 32 dry run: nothing written |
/// | 7 × 8  | source size, reused, literal, zero, differing bytes, checked bytes (what `--check` compared: the file, or its sample), total range count |
/// | 1      | write mode that ran: a [`WriteMode`] code (never 0, auto), 255 when nothing was written |
/// | 8      | bytes the receiver wrote to storage for this file: data into the destination, its partial file or journal, and the journal's replay |
/// | 8      | bytes of a delta run's verify ranges that differed from the destination |
/// | 4      | listed count (≤ [`MAX_RANGES`], ≤ the total)                   |
/// | listed × 16 | (offset u64, length u64)                                  |
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub up_to_date: bool,
    pub identical: bool,
    pub verified: bool,
    pub basis_cached: bool,
    /// The source changed while it was read, and was committed anyway.
    pub source_changed: bool,
    /// `--dry-run`: the counts say what would have been done.
    pub dry_run: bool,
    pub source_bytes: u64,
    pub reused_bytes: u64,
    pub literal_bytes: u64,
    pub zero_bytes: u64,
    pub differing_bytes: u64,
    /// Bytes `--check` compared (less than the size with `--sample`).
    pub checked_bytes: u64,
    pub range_count: u64,
    pub ranges: Vec<(u64, u64)>,
    /// How the destination was written; `None` when nothing was.
    pub write_mode: Option<WriteMode>,
    /// Bytes the receiver wrote to storage for this file: the destination,
    /// its partial file or journal (not the manifest cache).
    pub dest_written_bytes: u64,
    /// Bytes of a delta run's verify ranges that differed from the
    /// destination (see [`super::snapshot`]).
    pub verify_mismatch_bytes: u64,
    /// `--snapshot`: what the sending side read. Not in `DONE`: each end
    /// knows it from `SNAPSHOT` and `RANGES`.
    /// Boxed: a `DONE` in a message queue would otherwise make every
    /// queued message this much larger.
    pub snapshot: Option<Box<super::snapshot::SnapshotStats>>,
}

impl Summary {
    pub(super) fn put(&self, out: &mut Vec<u8>) {
        let f = u8::from(self.up_to_date)
            | u8::from(self.identical) << 1
            | u8::from(self.verified) << 2
            | u8::from(self.basis_cached) << 3
            | u8::from(self.source_changed) << 4
            | u8::from(self.dry_run) << 5;
        out.push(f);
        for v in [
            self.source_bytes,
            self.reused_bytes,
            self.literal_bytes,
            self.zero_bytes,
            self.differing_bytes,
            self.checked_bytes,
            self.range_count,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(self.write_mode.map_or(NOT_WRITTEN, |m| m as u8));
        out.extend_from_slice(&self.dest_written_bytes.to_le_bytes());
        out.extend_from_slice(&self.verify_mismatch_bytes.to_le_bytes());
        let listed = &self.ranges[..self.ranges.len().min(MAX_RANGES)];
        out.extend_from_slice(&(listed.len() as u32).to_le_bytes());
        for (o, l) in listed {
            out.extend_from_slice(&o.to_le_bytes());
            out.extend_from_slice(&l.to_le_bytes());
        }
    }

    pub(super) fn get(r: &mut Rd<'_>) -> Result<Summary> {
        let f = r.u8()?;
        if f & !63 != 0 {
            return Err(malformed(format!("DONE with unknown flags {f:#x}")));
        }
        let mut s = Summary {
            up_to_date: f & 1 != 0,
            identical: f & 2 != 0,
            verified: f & 4 != 0,
            basis_cached: f & 8 != 0,
            source_changed: f & 16 != 0,
            dry_run: f & 32 != 0,
            source_bytes: r.u64()?,
            reused_bytes: r.u64()?,
            literal_bytes: r.u64()?,
            zero_bytes: r.u64()?,
            differing_bytes: r.u64()?,
            checked_bytes: r.u64()?,
            range_count: r.u64()?,
            ranges: Vec::new(),
            write_mode: match r.u8()? {
                NOT_WRITTEN => None,
                m => match WriteMode::from_code(m.into()) {
                    Some(WriteMode::Auto) | None => {
                        return Err(malformed(format!("DONE with write mode {m}")))
                    }
                    known => known,
                },
            },
            dest_written_bytes: r.u64()?,
            verify_mismatch_bytes: r.u64()?,
            snapshot: None,
        };
        let n = r.u32()? as usize;
        if n > MAX_RANGES || n as u64 > s.range_count {
            return Err(malformed(format!("DONE listing {n} ranges")));
        }
        for _ in 0..n {
            s.ranges.push((r.u64()?, r.u64()?));
        }
        Ok(s)
    }
}

/// `CHUNK`: one chunk's data (or the pieces of it that were asked for).
///
/// | size | field                                                             |
/// |------|-------------------------------------------------------------------|
/// | 8    | entry index u64                                                   |
/// | 4    | raw length u32                                                    |
/// | 1    | encoding: bit 0 the connection's zstd stream (one or more frames in sequence, flushed at the end of each payload); bit 1 only the pieces asked for, concatenated; bit 2 the source changed since the manifest, this is the chunk's new content, to be hashed by the receiver (only with `ALLOW_CHANGING`; never with bit 1) |
/// | rest | payload                                                           |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMsg {
    pub index: u64,
    pub raw_len: u32,
    pub compressed: bool,
    /// Only the requested pieces, concatenated, not the whole chunk.
    pub pieces: bool,
    /// The source changed under this chunk since its manifest entry: the
    /// payload is its new content (`--allow-changing-source` only).
    pub changed: bool,
    pub payload: Vec<u8>,
}

impl ChunkMsg {
    pub(super) fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.push(
            if self.compressed { ENC_ZSTD } else { 0 }
                | if self.pieces { ENC_PIECES } else { 0 }
                | if self.changed { ENC_CHANGED } else { 0 },
        );
        out.extend_from_slice(&self.payload);
    }

    pub(super) fn get(r: &mut Rd<'_>) -> Result<ChunkMsg> {
        let index = r.u64()?;
        let raw_len = r.u32()?;
        let enc = r.u8()?;
        if enc & !(ENC_ZSTD | ENC_PIECES | ENC_CHANGED) != 0
            || enc & ENC_PIECES != 0 && enc & ENC_CHANGED != 0
        {
            return Err(malformed(format!("CHUNK with unknown encoding {enc}")));
        }
        Ok(ChunkMsg {
            index,
            raw_len,
            compressed: enc & ENC_ZSTD != 0,
            pieces: enc & ENC_PIECES != 0,
            changed: enc & ENC_CHANGED != 0,
            payload: r.rest().to_vec(),
        })
    }
}
