//! The journal's byte layout: encoding and verifying its header and records.
//!
//! Everything that knows where a byte sits is here; [`super`] only appends
//! records and walks verified ones. Nothing read is trusted: every length is
//! checked against its limit before it sizes a read or an allocation, and a
//! record is handed on only once its checksum matched.
//!
//! # Format (version [`VERSION`]; all integers little-endian)
//!
//! Header (`H` = 155 + `n` bytes; at most [`MAX_HEADER`]):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic [`MAGIC`] (`vmsyncJ\n`) |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | `H`, the header's length (must be 155 + `n`) |
//! | 16 | 16 | run id (random; in every record's checksum) |
//! | 32 | 8 | old size of the destination |
//! | 40 | 8 | new size (a file is `set_len` to it after the apply) |
//! | 48 | 8 | new mtime, seconds (i64; set on a file after the apply) |
//! | 56 | 4 | new mtime, nanoseconds (< 10⁹) |
//! | 60 | 32 | digest of the new contents (opaque here) |
//! | 92 | 1 | target kind: 1 regular file, 2 block device |
//! | 93 | 8 | file: `st_dev`; device: `st_rdev` |
//! | 101 | 8 | file: `st_ino`; device: its size in bytes |
//! | 109 | 1 | file: 1 if the birth time is known, else 0; device: 0 |
//! | 110 | 8 | birth time, seconds (i64; 0 when unknown) |
//! | 118 | 4 | birth time, nanoseconds (0 when unknown) |
//! | 122 | 1 | `n`: length of the stable id (device only; ≤ 255) |
//! | 123 | `n` | device's stable id, UTF-8 (`dm/uuid=LVM-…`) |
//! | 123+`n` | 32 | BLAKE3 (derive_key `vmsync 2027 journal header v1`) of bytes 0..123+`n` |
//!
//! DATA record (`k` pieces, `p` data bytes):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 1 | `D` |
//! | 1 | 8 | chunk offset in the destination |
//! | 9 | 4 | chunk length `len`, 1..=[`MAX_CHUNK`] |
//! | 13 | 32 | chunk hash (BLAKE3 of the new chunk) |
//! | 45 | 4 | `k`, pieces, ≤ [`MAX_PIECES`] |
//! | 49 | 13·`k` | pieces table, in increasing order, not overlapping, inside the chunk; each: kind (1 byte: 0 data, 1 zero), absolute offset (8), length (4, ≥ 1) |
//! | 49+13`k` | `p` | the data pieces' bytes, in table order (`p` = sum of their lengths) |
//! | 49+13`k`+`p` | 32 | checksum |
//!
//! ZERO record (49 bytes):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 1 | `Z` |
//! | 1 | 8 | offset |
//! | 9 | 8 | length, 1..=`i64::MAX` |
//! | 17 | 32 | checksum |
//!
//! COMMIT record (81 bytes, the last in the file):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 1 | `C` |
//! | 1 | 8 | records before it (DATA and ZERO) |
//! | 9 | 8 | payload: data piece bytes of all of them |
//! | 17 | 32 | chain hash |
//! | 49 | 32 | checksum |
//!
//! A record's checksum is BLAKE3 (derive_key `vmsync 2027 journal record
//! v1`) of the run id followed by every byte of the record before the
//! checksum, so a record copied from another journal never validates. The
//! chain starts at the header's checksum; each record (not the COMMIT) moves
//! it to BLAKE3 (derive_key `vmsync 2027 journal chain v1`) of the chain so
//! far and the record's checksum: a committed journal is complete and in
//! order. Every record's range ends within the new size. Anything beyond
//! these limits is damage, refused before any allocation is sized by it.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::content::chunk::MAX_CHUNK;
use crate::content::hash::ChunkHash;
use crate::dest::sparse::BLOCK;

use super::identity::{Identity, MAX_STABLE_ID};

/// The journal format's version.
pub const VERSION: u32 = 1;
/// The first 8 bytes of every journal.
pub const MAGIC: [u8; 8] = *b"vmsyncJ\n";
/// Hard limit on a header's length, checked before it is read.
pub const MAX_HEADER: usize = 4096;
/// Most pieces in one DATA record: every 4 KiB block of the longest chunk,
/// plus the two partial blocks at its unaligned ends.
pub const MAX_PIECES: usize = MAX_CHUNK as usize / BLOCK + 2;
/// Bytes of a ZERO record.
pub const ZERO_SIZE: usize = 49;
/// Bytes of the COMMIT record.
pub const COMMIT_SIZE: usize = 81;

const HEADER_FIXED: usize = 123;
pub(super) const SUM: usize = 32;
pub(super) const DATA_FIXED: usize = 49;
pub(super) const ENTRY: usize = 13;
const KIND_DATA: u8 = b'D';
const KIND_ZERO: u8 = b'Z';
const KIND_COMMIT: u8 = b'C';
const HEADER_CONTEXT: &str = "vmsync 2027 journal header v1";
const RECORD_CONTEXT: &str = "vmsync 2027 journal record v1";
const CHAIN_CONTEXT: &str = "vmsync 2027 journal chain v1";
/// How much of the journal one read brings in while walking it.
pub(super) const READAHEAD: usize = 1 << 20;

/// A part of a chunk that differs from the destination's old bytes: the
/// writer's own [`crate::dest::sparse::Piece`] (made by
/// [`crate::dest::sparse::changes`]).
pub use crate::dest::sparse::Piece;

impl Piece<'_> {
    pub(super) fn range(&self) -> (u64, u64) {
        (self.at(), self.len())
    }
}

/// The journal's header: the target, and what the target becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub identity: Identity,
    pub old_size: u64,
    pub new_size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub digest: [u8; 32],
    pub run_id: [u8; 16],
}

impl Header {
    /// The header's bytes, checksum included.
    pub(super) fn encode(&self) -> Vec<u8> {
        let (kind, a, b, btime, id) = match &self.identity {
            Identity::File { dev, ino, btime } => (1u8, *dev, *ino, *btime, ""),
            Identity::Device {
                rdev,
                size,
                stable_id,
            } => (2u8, *rdev, *size, None, stable_id.as_str()),
        };
        let len = HEADER_FIXED + id.len() + SUM;
        let mut h = Vec::with_capacity(len);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&(len as u32).to_le_bytes());
        h.extend_from_slice(&self.run_id);
        h.extend_from_slice(&self.old_size.to_le_bytes());
        h.extend_from_slice(&self.new_size.to_le_bytes());
        h.extend_from_slice(&self.mtime_sec.to_le_bytes());
        h.extend_from_slice(&self.mtime_nsec.to_le_bytes());
        h.extend_from_slice(&self.digest);
        h.push(kind);
        h.extend_from_slice(&a.to_le_bytes());
        h.extend_from_slice(&b.to_le_bytes());
        let (known, sec, nsec) = btime.map_or((0u8, 0, 0), |(s, n)| (1, s, n));
        h.push(known);
        h.extend_from_slice(&sec.to_le_bytes());
        h.extend_from_slice(&nsec.to_le_bytes());
        h.push(id.len() as u8);
        h.extend_from_slice(id.as_bytes());
        let sum = blake3::Hasher::new_derive_key(HEADER_CONTEXT)
            .update(&h)
            .finalize();
        h.extend_from_slice(sum.as_bytes());
        debug_assert_eq!(h.len(), len);
        h
    }

    /// What is wrong with a header about to be written or just read.
    pub(super) fn invalid(&self) -> Option<String> {
        if self.old_size > i64::MAX as u64 || self.new_size > i64::MAX as u64 {
            return Some(format!(
                "sizes {} and {} out of range",
                self.old_size, self.new_size
            ));
        }
        if self.mtime_nsec >= 1_000_000_000 {
            return Some(format!(
                "mtime nanoseconds {} out of range",
                self.mtime_nsec
            ));
        }
        match &self.identity {
            Identity::File { btime, .. } => match btime {
                Some((_, n)) if *n >= 1_000_000_000 => {
                    Some(format!("birth time nanoseconds {n} out of range"))
                }
                _ => None,
            },
            Identity::Device {
                size, stable_id, ..
            } => {
                if stable_id.len() > MAX_STABLE_ID {
                    Some(format!("stable id of {} bytes", stable_id.len()))
                } else if self.new_size > *size {
                    Some(format!(
                        "new size {} beyond the device's {size} bytes",
                        self.new_size
                    ))
                } else {
                    None
                }
            }
        }
    }

    /// Parses a whole header (exactly its `H` bytes, already checked to
    /// agree with its id length).
    pub(super) fn decode(h: &[u8]) -> Result<(Header, [u8; 32]), String> {
        if h.len() < HEADER_FIXED + SUM {
            return Err(format!("a header of {} bytes", h.len()));
        }
        let body = &h[..h.len() - SUM];
        let sum = blake3::Hasher::new_derive_key(HEADER_CONTEXT)
            .update(body)
            .finalize();
        if sum.as_bytes() != &h[h.len() - SUM..] {
            return Err("the header's checksum does not match".into());
        }
        let (a, b) = (u64_at(h, 93), u64_at(h, 101));
        let (known, sec, nsec) = (h[109], i64_at(h, 110), u32_at(h, 118));
        let id = &h[HEADER_FIXED..h.len() - SUM];
        let identity = match h[92] {
            1 if id.is_empty() && (known == 1 || (known == 0 && sec == 0 && nsec == 0)) => {
                Identity::File {
                    dev: a,
                    ino: b,
                    btime: (known == 1).then_some((sec, nsec)),
                }
            }
            2 if known == 0 && sec == 0 && nsec == 0 => Identity::Device {
                rdev: a,
                size: b,
                stable_id: String::from_utf8(id.to_vec())
                    .map_err(|_| "the device's stable id is not UTF-8".to_string())?,
            },
            k => return Err(format!("target kind {k} with inconsistent fields")),
        };
        let header = Header {
            identity,
            run_id: h[16..32].try_into().unwrap_or_default(),
            old_size: u64_at(h, 32),
            new_size: u64_at(h, 40),
            mtime_sec: i64_at(h, 48),
            mtime_nsec: u32_at(h, 56),
            digest: h[60..92].try_into().unwrap_or_default(),
        };
        if let Some(why) = header.invalid() {
            return Err(why);
        }
        Ok((header, *sum.as_bytes()))
    }
}

/// The checksum that ends an encoded record (or header).
pub(super) fn sum_of(record: &[u8]) -> [u8; 32] {
    record[record.len() - SUM..].try_into().unwrap_or_default()
}

/// Encodes into `head` a DATA record for `chunk` (offset, length, hash)
/// up to its data: the fields and the pieces table, after checking the
/// chunk ends within `new_size` and the pieces lie in it in increasing
/// order without overlapping. Returns the record's checksum, over `head`
/// and then the data pieces' bytes: what follows `head` in the file.
pub(super) fn encode_data(
    head: &mut Vec<u8>,
    run_id: &[u8; 16],
    new_size: u64,
    (offset, len, hash): (u64, u32, &ChunkHash),
    pieces: &[Piece<'_>],
) -> Result<[u8; 32], String> {
    let end = offset.checked_add(u64::from(len));
    if len == 0 || len > MAX_CHUNK || end.is_none_or(|e| e > new_size) {
        return Err(format!("a chunk of {len} bytes at {offset}, out of range"));
    }
    if pieces.len() > MAX_PIECES {
        return Err(format!("{} pieces in one record", pieces.len()));
    }
    head.clear();
    head.push(KIND_DATA);
    head.extend_from_slice(&offset.to_le_bytes());
    head.extend_from_slice(&len.to_le_bytes());
    head.extend_from_slice(&hash.0);
    head.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    for p in pieces {
        let (at, n) = p.range();
        if n > u64::from(len) {
            return Err(format!("a piece of {n} bytes at {at}"));
        }
        head.push(matches!(p, Piece::Zero { .. }) as u8);
        head.extend_from_slice(&at.to_le_bytes());
        head.extend_from_slice(&(n as u32).to_le_bytes());
    }
    check_table(&head[DATA_FIXED..], offset, len)?;
    let mut h = record_hasher(run_id);
    h.update(head);
    for p in pieces {
        if let Piece::Data { bytes, .. } = p {
            h.update(bytes);
        }
    }
    Ok(*h.finalize().as_bytes())
}

/// A ZERO record for `[offset, offset + len)`, which must end within
/// `new_size`.
pub(super) fn encode_zero(
    run_id: &[u8; 16],
    new_size: u64,
    offset: u64,
    len: u64,
) -> Result<[u8; ZERO_SIZE], String> {
    let end = offset.checked_add(len);
    if len == 0 || len > i64::MAX as u64 || end.is_none_or(|e| e > new_size) {
        return Err(format!(
            "a zero run of {len} bytes at {offset}, out of range"
        ));
    }
    let mut r = [0u8; ZERO_SIZE];
    r[0] = KIND_ZERO;
    r[1..9].copy_from_slice(&offset.to_le_bytes());
    r[9..17].copy_from_slice(&len.to_le_bytes());
    let sum = record_hasher(run_id).update(&r[..17]).finalize();
    r[17..].copy_from_slice(sum.as_bytes());
    Ok(r)
}

/// The COMMIT record after `records` records of `payload` data bytes
/// whose chain hash is `chain`.
pub(super) fn encode_commit(
    run_id: &[u8; 16],
    records: u64,
    payload: u64,
    chain: &[u8; 32],
) -> [u8; COMMIT_SIZE] {
    let mut c = [0u8; COMMIT_SIZE];
    c[0] = KIND_COMMIT;
    c[1..9].copy_from_slice(&records.to_le_bytes());
    c[9..17].copy_from_slice(&payload.to_le_bytes());
    c[17..49].copy_from_slice(chain);
    let sum = record_hasher(run_id).update(&c[..49]).finalize();
    c[49..].copy_from_slice(sum.as_bytes());
    c
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

pub(super) fn i64_at(b: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

pub(super) fn record_hasher(run_id: &[u8; 16]) -> blake3::Hasher {
    let mut h = blake3::Hasher::new_derive_key(RECORD_CONTEXT);
    h.update(run_id);
    h
}

pub(super) fn chain_next(chain: &[u8; 32], sum: &[u8; 32]) -> [u8; 32] {
    *blake3::Hasher::new_derive_key(CHAIN_CONTEXT)
        .update(chain)
        .update(sum)
        .finalize()
        .as_bytes()
}

/// Why a walk over the records stopped short of a COMMIT record.
pub(super) enum Bad {
    /// The file ends exactly between two records.
    End,
    /// The file ends inside a record.
    Torn,
    /// A record that is not valid.
    Damaged(String),
    Io(std::io::Error),
}

impl From<std::io::Error> for Bad {
    fn from(e: std::io::Error) -> Bad {
        Bad::Io(e)
    }
}

/// One verified record, borrowing from the [`Window`] it was read through.
pub(super) enum Rec<'a> {
    Data {
        offset: u64,
        len: u32,
        hash: ChunkHash,
        table: &'a [u8],
        data: &'a [u8],
        sum: [u8; 32],
    },
    Zero {
        offset: u64,
        len: u64,
        sum: [u8; 32],
    },
    Commit {
        records: u64,
        payload: u64,
        chain: [u8; 32],
    },
}

/// Positioned, buffered reads of the journal: a walk costs one read per
/// [`READAHEAD`] bytes, and the buffer grows only to the longest record.
pub(super) struct Window<'a> {
    file: &'a File,
    len: u64,
    buf: Vec<u8>,
    lo: u64,
    readahead: usize,
}

impl<'a> Window<'a> {
    pub(super) fn new(file: &'a File, len: u64, readahead: usize) -> Window<'a> {
        Window {
            file,
            len,
            buf: Vec::new(),
            lo: 0,
            readahead,
        }
    }

    /// The `n` bytes at `pos`, or None when the file ends first.
    pub(super) fn get(&mut self, pos: u64, n: usize) -> std::io::Result<Option<&[u8]>> {
        let end = match pos.checked_add(n as u64) {
            Some(e) if e <= self.len => e,
            _ => return Ok(None),
        };
        if pos < self.lo || end > self.lo + self.buf.len() as u64 {
            let want = (n.max(self.readahead) as u64).min(self.len - pos) as usize;
            self.buf.resize(want, 0);
            match self.file.read_exact_at(&mut self.buf, pos) {
                Ok(()) => self.lo = pos,
                Err(e) => {
                    self.buf.clear();
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        return Ok(None); // shrank since its size was taken
                    }
                    return Err(e);
                }
            }
        }
        let s = (pos - self.lo) as usize;
        Ok(Some(&self.buf[s..s + n]))
    }
}

/// Checks a DATA record's pieces table; returns its data bytes.
pub(super) fn check_table(table: &[u8], offset: u64, len: u32) -> Result<usize, String> {
    let end = offset + u64::from(len);
    let mut prev = offset;
    let mut payload = 0usize;
    for e in table.chunks_exact(ENTRY) {
        let (kind, at, n) = (e[0], u64_at(e, 1), u64::from(u32_at(e, 9)));
        if kind > 1 || n == 0 || at < prev || at > end || n > end - at {
            return Err(format!(
                "piece (kind {kind}, {n} bytes at {at}) outside the chunk of {len} bytes at {offset} or out of order"
            ));
        }
        prev = at + n;
        if kind == 0 {
            payload += n as usize;
        }
    }
    Ok(payload)
}

/// The pieces of a verified DATA record.
pub(super) fn pieces<'a>(table: &'a [u8], data: &'a [u8]) -> impl Iterator<Item = Piece<'a>> + 'a {
    let mut used = 0usize;
    table.chunks_exact(ENTRY).map(move |e| {
        let (at, n) = (u64_at(e, 1), u32_at(e, 9) as usize);
        if e[0] == 0 {
            used += n;
            Piece::Data {
                at,
                bytes: &data[used - n..used],
            }
        } else {
            Piece::Zero { at, len: n as u64 }
        }
    })
}

/// Reads and verifies the record at `pos`; returns it and its size.
pub(super) fn parse<'w>(
    w: &'w mut Window<'_>,
    pos: u64,
    run_id: &[u8; 16],
    new_size: u64,
) -> Result<(Rec<'w>, u64), Bad> {
    if pos == w.len {
        return Err(Bad::End);
    }
    let kind = w.get(pos, 1)?.ok_or(Bad::Torn)?[0];
    let size = match kind {
        KIND_DATA => {
            let head = w.get(pos, DATA_FIXED)?.ok_or(Bad::Torn)?;
            let (offset, len, k) = (u64_at(head, 1), u32_at(head, 9), u32_at(head, 45) as usize);
            let end = offset.checked_add(u64::from(len));
            if len == 0 || len > MAX_CHUNK || end.is_none_or(|e| e > new_size) {
                return Err(Bad::Damaged(format!(
                    "a chunk of {len} bytes at {offset}, out of range"
                )));
            }
            if k > MAX_PIECES {
                return Err(Bad::Damaged(format!("{k} pieces in one record")));
            }
            let table = w
                .get(pos + DATA_FIXED as u64, k * ENTRY)?
                .ok_or(Bad::Torn)?;
            let payload = check_table(table, offset, len).map_err(Bad::Damaged)?;
            DATA_FIXED + k * ENTRY + payload + SUM
        }
        KIND_ZERO => ZERO_SIZE,
        KIND_COMMIT => COMMIT_SIZE,
        k => return Err(Bad::Damaged(format!("unknown record kind {k:#04x}"))),
    };
    let all = w.get(pos, size)?.ok_or(Bad::Torn)?;
    let (body, sum) = all.split_at(size - SUM);
    if record_hasher(run_id).update(body).finalize().as_bytes() != sum {
        return Err(Bad::Damaged("a record's checksum does not match".into()));
    }
    let sum: [u8; 32] = sum.try_into().unwrap_or_default();
    let rec = match kind {
        KIND_DATA => {
            let k = u32_at(body, 45) as usize;
            Rec::Data {
                offset: u64_at(body, 1),
                len: u32_at(body, 9),
                hash: ChunkHash(body[13..45].try_into().unwrap_or_default()),
                table: &body[DATA_FIXED..DATA_FIXED + k * ENTRY],
                data: &body[DATA_FIXED + k * ENTRY..],
                sum,
            }
        }
        KIND_ZERO => {
            let (offset, len) = (u64_at(body, 1), u64_at(body, 9));
            if len == 0
                || len > i64::MAX as u64
                || offset.checked_add(len).is_none_or(|e| e > new_size)
            {
                return Err(Bad::Damaged(format!(
                    "a zero run of {len} bytes at {offset}, out of range"
                )));
            }
            Rec::Zero { offset, len, sum }
        }
        _ => Rec::Commit {
            records: u64_at(body, 1),
            payload: u64_at(body, 9),
            chain: body[17..49].try_into().unwrap_or_default(),
        },
    };
    Ok((rec, size as u64))
}

/// Reads the header; None when the file ends inside it (a crash right
/// after the journal was created) and what is there is consistent.
pub(super) fn read_header(file: &File, len: u64) -> Result<Option<(Header, [u8; 32])>, Bad> {
    let mut buf = vec![0u8; len.min(MAX_HEADER as u64) as usize];
    file.read_exact_at(&mut buf, 0)?;
    let n = buf.len();
    if buf[..n.min(8)] != MAGIC[..n.min(8)] {
        return Err(Bad::Damaged("not a vmsync journal (bad magic)".into()));
    }
    if n >= 12 && u32_at(&buf, 8) != VERSION {
        return Err(Bad::Damaged(format!(
            "journal format version {}; this vmsync reads version {VERSION}",
            u32_at(&buf, 8)
        )));
    }
    if n < 16 {
        return Ok(None);
    }
    let h = u32_at(&buf, 12) as usize;
    if !(HEADER_FIXED + SUM..=MAX_HEADER).contains(&h)
        || (n >= HEADER_FIXED && h != HEADER_FIXED + usize::from(buf[HEADER_FIXED - 1]) + SUM)
    {
        return Err(Bad::Damaged(format!("header length {h} inconsistent")));
    }
    if n < h {
        return Ok(None);
    }
    Header::decode(&buf[..h]).map(Some).map_err(Bad::Damaged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device_header(id: &str) -> Header {
        Header {
            identity: Identity::Device {
                rdev: 7,
                size: 1 << 30,
                stable_id: id.into(),
            },
            old_size: 1 << 30,
            new_size: 1 << 29,
            mtime_sec: -5,
            mtime_nsec: 0,
            digest: [3; 32],
            run_id: [4; 16],
        }
    }

    #[test]
    fn headers_round_trip_with_ids_of_any_length() {
        for n in [0, 1, 100, MAX_STABLE_ID] {
            let h = device_header(&"x".repeat(n));
            let bytes = h.encode();
            assert_eq!(bytes.len(), HEADER_FIXED + n + SUM);
            assert!(bytes.len() <= MAX_HEADER);
            assert_eq!(u32_at(&bytes, 12) as usize, bytes.len());
            let (back, sum) = Header::decode(&bytes).unwrap();
            assert_eq!(back, h);
            assert_eq!(sum, sum_of(&bytes));
        }
        let f = Header {
            identity: Identity::File {
                dev: 1,
                ino: 2,
                btime: Some((-3, 999_999_999)),
            },
            ..device_header("")
        };
        assert_eq!(Header::decode(&f.encode()).unwrap().0, f);
        let none = Header {
            identity: Identity::File {
                dev: 1,
                ino: 2,
                btime: None,
            },
            ..f.clone()
        };
        assert_eq!(Header::decode(&none.encode()).unwrap().0, none);
    }

    #[test]
    fn impossible_headers_are_refused_even_with_a_good_checksum() {
        let resum = |mut b: Vec<u8>| {
            let n = b.len() - SUM;
            let sum = blake3::Hasher::new_derive_key(HEADER_CONTEXT)
                .update(&b[..n])
                .finalize();
            b[n..].copy_from_slice(sum.as_bytes());
            b
        };
        let good = device_header("wwid=1").encode();
        // A device header with a birth time, an unknown kind, mtime
        // nanoseconds of a second or more, a new size beyond the device.
        for (at, value) in [(109, 1u8), (92, 3), (59, 0x40), (47, 0x7f)] {
            let mut b = good.clone();
            b[at] = value;
            assert!(Header::decode(&resum(b)).is_err(), "byte {at} = {value}");
        }
        let mut b = good.clone();
        b[HEADER_FIXED] = 0xff; // not UTF-8
        assert!(Header::decode(&resum(b)).is_err());
        assert!(device_header("").invalid().is_none());
        assert!(device_header(&"y".repeat(MAX_STABLE_ID + 1))
            .invalid()
            .is_some());
    }

    #[test]
    fn encoders_refuse_what_the_reader_would() {
        let h = ChunkHash::of(b"");
        let mut head = Vec::new();
        let bytes = [1u8; 8];
        let ok = [
            Piece::Zero { at: 10, len: 2 },
            Piece::Data {
                at: 12,
                bytes: &bytes,
            },
        ];
        assert!(encode_data(&mut head, &[0; 16], 100, (10, 10, &h), &ok).is_ok());
        assert_eq!(head.len(), DATA_FIXED + 2 * ENTRY);
        assert_eq!(check_table(&head[DATA_FIXED..], 10, 10), Ok(8));
        let bad: [&[Piece<'_>]; 4] = [
            &[Piece::Zero { at: 9, len: 2 }],
            &[Piece::Zero { at: 15, len: 6 }],
            &[Piece::Zero { at: 10, len: 0 }],
            &[
                Piece::Zero { at: 12, len: 2 },
                Piece::Zero { at: 10, len: 1 },
            ],
        ];
        for pieces in bad {
            assert!(encode_data(&mut head, &[0; 16], 100, (10, 10, &h), pieces).is_err());
        }
        assert!(encode_data(&mut head, &[0; 16], 19, (10, 10, &h), &[]).is_err());
        assert!(encode_data(&mut head, &[0; 16], u64::MAX, (u64::MAX, 1, &h), &[]).is_err());
        let z = Piece::Zero { at: 0, len: 1 };
        let many = vec![z; MAX_PIECES + 1];
        assert!(encode_data(&mut head, &[0; 16], 1 << 30, (0, MAX_CHUNK, &h), &many).is_err());
        assert!(encode_zero(&[0; 16], 100, 50, 51).is_err());
        assert!(encode_zero(&[0; 16], u64::MAX, 1, i64::MAX as u64 + 1).is_err());
        assert!(encode_zero(&[0; 16], 100, 0, 100).is_ok());
    }
}
