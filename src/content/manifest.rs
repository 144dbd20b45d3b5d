//! The manifest: the list of chunks that make up the source file.
//!
//! The sender streams it to the receiver in batches (protocol message
//! `MANIFEST`). Offsets are implicit: each entry starts where the previous one
//! ended, so overlapping or gapped manifests cannot be expressed at all, and
//! consecutive zero chunks are merged into one zero entry (half of a sparse
//! image is zeros).
//!
//! # Batch layout (all integers little-endian)
//!
//! | offset | size | field                                           |
//! |--------|------|-------------------------------------------------|
//! | 0      | 4    | entry count N, 1 ≤ N ≤ [`MAX_BATCH`]            |
//! | 4      | …    | N entries                                       |
//!
//! Each entry is one of:
//!
//! | size | field                                                      |
//! |------|------------------------------------------------------------|
//! | 1    | kind: 0 = data chunk                                       |
//! | 4    | length, 1 ≤ len ≤ `max` of the chunk parameters            |
//! | 32   | BLAKE3 hash of the chunk's bytes                           |
//!
//! | size | field                                                      |
//! |------|------------------------------------------------------------|
//! | 1    | kind: 1 = zero run                                         |
//! | 8    | length ≥ 1                                                 |
//!
//! An entry shorter than the chunk parameters' `min` may only end the file,
//! so a manifest has at most `size / min + 1` entries: a peer cannot make us
//! store more than that. The stream ends with `MANIFEST_END`, which carries
//! the entry count and the [`FileDigest`] for a final cross-check.
//!
//! # Pieces: not sending what the receiver already has
//!
//! A nightly run against an unchanged (or barely changed) destination would
//! otherwise send the whole manifest, 37 bytes per data chunk. A receiver
//! that has its destination's manifest in its cache cuts it into *pieces*
//! and sends their [`PieceDigest`]s first (`PIECES`); the sender cuts its
//! manifest the same way and sends a piece the receiver holds as a 5-byte
//! reference (`MANIFEST_REF`) instead of its entries. Piece boundaries are
//! content-defined ([`Piecer`]): a piece ends after a data entry whose hash
//! says so (about one in [`PIECE_AVG`]) or at [`PIECE_MAX`] entries, so
//! after a change both sides fall back into step at the next boundary. A
//! piece's digest covers its entries' kinds, lengths and hashes, not their
//! offsets: a referenced piece is placed where the manifest has got to, and
//! the receiver's validator checks it like any batch.

use anyhow::Result;

use crate::content::chunk::ChunkParams;
use crate::content::hash::{ChunkHash, FileDigest, HASH_LEN};
use crate::content::scan::{ChunkRec, Content};
use crate::error::{fail, Exit};

/// Most entries in one batch (a batch of data entries is about 600 KiB).
pub const MAX_BATCH: usize = 16384;

const KIND_DATA: u8 = 0;
const KIND_ZERO: u8 = 1;

/// One manifest entry, placed at its file offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Data { len: u32, hash: ChunkHash },
    Zero { len: u64 },
}

impl Entry {
    pub fn len(&self) -> u64 {
        match self.kind {
            Kind::Data { len, .. } => u64::from(len),
            Kind::Zero { len } => len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn end(&self) -> u64 {
        self.offset + self.len()
    }
}

/// Turns scanned chunk records into manifest entries, merging zero runs, and
/// computes the file digest on the way.
#[derive(Default)]
pub struct Builder {
    zero_run: Option<(u64, u64)>,
    digest: FileDigest,
    count: u64,
}

impl Builder {
    pub fn push(&mut self, rec: &ChunkRec, out: &mut Vec<Entry>) {
        match rec.content {
            Content::Zero => match &mut self.zero_run {
                Some((_, len)) => *len += u64::from(rec.len),
                None => self.zero_run = Some((rec.offset, u64::from(rec.len))),
            },
            Content::Data(hash) => {
                self.end_zero_run(out);
                self.emit(
                    Entry {
                        offset: rec.offset,
                        kind: Kind::Data { len: rec.len, hash },
                    },
                    out,
                );
            }
        }
    }

    /// Ends a pending zero run here, so none spans a gap (`--sample`).
    pub fn break_run(&mut self, out: &mut Vec<Entry>) {
        self.end_zero_run(out);
    }

    /// Flushes a pending zero run; returns the entry count and the digest.
    pub fn finish(mut self, out: &mut Vec<Entry>) -> (u64, ChunkHash) {
        self.end_zero_run(out);
        (self.count, self.digest.finish())
    }

    fn end_zero_run(&mut self, out: &mut Vec<Entry>) {
        if let Some((offset, len)) = self.zero_run.take() {
            self.emit(
                Entry {
                    offset,
                    kind: Kind::Zero { len },
                },
                out,
            );
        }
    }

    fn emit(&mut self, e: Entry, out: &mut Vec<Entry>) {
        match e.kind {
            Kind::Data { len, hash } => self.digest.add_data(u64::from(len), &hash),
            Kind::Zero { len } => self.digest.add_zero(len),
        }
        self.count += 1;
        out.push(e);
    }
}

/// About one data entry in this many ends a piece.
pub const PIECE_AVG: u16 = 64;
/// Most entries in a piece.
pub const PIECE_MAX: usize = 1024;
/// Identifies a piece: 16 bytes of BLAKE3 over its batch encoding.
pub type PieceDigest = [u8; 16];

/// Cuts a stream of manifest entries into pieces (see the module doc).
#[derive(Default)]
pub struct Piecer {
    pending: Vec<Entry>,
}

impl Piecer {
    /// Adds `e`; returns the piece it completes, if any.
    pub fn push(&mut self, e: Entry) -> Option<Vec<Entry>> {
        let ends = match e.kind {
            Kind::Data { hash, .. } => u16::from_le_bytes([hash.0[0], hash.0[1]]) % PIECE_AVG == 0,
            Kind::Zero { .. } => false,
        };
        self.pending.push(e);
        (ends || self.pending.len() >= PIECE_MAX).then(|| std::mem::take(&mut self.pending))
    }

    /// The last, unfinished piece.
    pub fn finish(self) -> Option<Vec<Entry>> {
        (!self.pending.is_empty()).then_some(self.pending)
    }

    /// A whole manifest, cut into pieces.
    pub fn cut(entries: &[Entry]) -> Vec<Vec<Entry>> {
        let mut p = Piecer::default();
        let mut out: Vec<Vec<Entry>> = entries.iter().filter_map(|e| p.push(*e)).collect();
        out.extend(p.finish());
        out
    }
}

/// The digest of a piece.
pub fn piece_digest(piece: &[Entry]) -> PieceDigest {
    let mut buf = Vec::with_capacity(piece.len() * 37 + 4);
    encode_batch(piece, &mut buf);
    let h = blake3::hash(&buf);
    h.as_bytes()[..16].try_into().expect("16 of 32 bytes")
}

/// Appends the batch encoding of `entries` (at most [`MAX_BATCH`]) to `buf`.
pub fn encode_batch(entries: &[Entry], buf: &mut Vec<u8>) {
    assert!(!entries.is_empty() && entries.len() <= MAX_BATCH);
    buf.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        match e.kind {
            Kind::Data { len, hash } => {
                buf.push(KIND_DATA);
                buf.extend_from_slice(&len.to_le_bytes());
                buf.extend_from_slice(&hash.0);
            }
            Kind::Zero { len } => {
                buf.push(KIND_ZERO);
                buf.extend_from_slice(&len.to_le_bytes());
            }
        }
    }
}

/// Checks a manifest as it arrives from an untrusted peer and places its
/// entries at their offsets.
pub struct Validator {
    size: u64,
    min: u64,
    max: u64,
    offset: u64,
    count: u64,
    digest: FileDigest,
    /// A sampled manifest's ranges (see [`Validator::restrict`]), and the
    /// one being filled.
    ranges: Vec<(u64, u64)>,
    range: usize,
    /// Bytes the entries cover.
    covered: u64,
}

fn bad(msg: impl std::fmt::Display) -> anyhow::Error {
    fail(
        Exit::Protocol,
        format!("malformed manifest from peer: {msg}"),
    )
}

impl Validator {
    pub fn new(size: u64, params: ChunkParams) -> Validator {
        Validator {
            size,
            min: params.min().into(),
            max: params.max().into(),
            offset: 0,
            count: 0,
            digest: FileDigest::default(),
            ranges: vec![(0, size)],
            range: 0,
            covered: 0,
        }
    }

    /// A manifest of only these ranges of the file (sorted, disjoint,
    /// non-empty; `--check --sample`): implicit offsets run through them in
    /// order, no entry crosses a range's end, and only an entry that ends a
    /// range may be short.
    pub fn restrict(mut self, ranges: Vec<(u64, u64)>) -> Validator {
        self.offset = ranges.first().map_or(self.size, |r| r.0);
        self.ranges = ranges;
        self
    }

    /// The end of the range the next entry falls in.
    fn range_end(&self) -> u64 {
        self.ranges.get(self.range).map_or(self.size, |r| r.1)
    }

    /// Decodes one batch, appending its entries to `out`.
    pub fn decode_batch(&mut self, payload: &[u8], out: &mut Vec<Entry>) -> Result<()> {
        let mut r = payload;
        let n = take_u32(&mut r)? as usize;
        if n == 0 || n > MAX_BATCH {
            return Err(bad(format!("batch of {n} entries (limit {MAX_BATCH})")));
        }
        out.reserve(n);
        for _ in 0..n {
            let kind = take(&mut r, 1)?[0];
            let k = match kind {
                KIND_DATA => {
                    let len = take_u32(&mut r)?;
                    let mut h = [0u8; HASH_LEN];
                    h.copy_from_slice(take(&mut r, HASH_LEN)?);
                    if len == 0 || u64::from(len) > self.max {
                        return Err(bad(format!(
                            "chunk of {len} bytes at offset {} (limit {})",
                            self.offset, self.max
                        )));
                    }
                    Kind::Data {
                        len,
                        hash: ChunkHash(h),
                    }
                }
                KIND_ZERO => {
                    let len = take_u64(&mut r)?;
                    if len == 0 {
                        return Err(bad(format!("empty zero run at offset {}", self.offset)));
                    }
                    Kind::Zero { len }
                }
                k => return Err(bad(format!("unknown entry kind {k}"))),
            };
            let e = Entry {
                offset: self.offset,
                kind: k,
            };
            let limit = self.range_end();
            let end = self
                .offset
                .checked_add(e.len())
                .filter(|&end| end <= limit)
                .ok_or_else(|| {
                    bad(format!(
                        "entry at offset {} of {} bytes runs past {} (the file size is {})",
                        self.offset,
                        e.len(),
                        limit,
                        self.size
                    ))
                })?;
            if e.len() < self.min && end != limit {
                return Err(bad(format!(
                    "short entry ({} bytes) at offset {} before the end of the file",
                    e.len(),
                    self.offset
                )));
            }
            match k {
                Kind::Data { len, hash } => self.digest.add_data(u64::from(len), &hash),
                Kind::Zero { len } => self.digest.add_zero(len),
            }
            self.offset = end;
            self.covered += e.len();
            if end == limit && self.range + 1 < self.ranges.len() {
                self.range += 1;
                self.offset = self.ranges[self.range].0;
            }
            self.count += 1;
            out.push(e);
        }
        if !r.is_empty() {
            return Err(bad(format!("{} trailing bytes in a batch", r.len())));
        }
        Ok(())
    }

    /// Checks the end marker against what arrived.
    pub fn finish(&self, count: u64, digest: &ChunkHash) -> Result<ChunkHash> {
        let want: u64 = self.ranges.iter().map(|(a, b)| b - a).sum();
        if self.covered != want {
            return Err(bad(format!(
                "entries cover {} bytes but {want} were due (the file has {})",
                self.covered, self.size
            )));
        }
        if count != self.count {
            return Err(bad(format!(
                "peer counted {count} entries, {} arrived",
                self.count
            )));
        }
        let mine = self.digest.finish();
        if &mine != digest {
            return Err(bad("digest of the entries does not match the peer's"));
        }
        Ok(mine)
    }

    pub fn covered(&self) -> u64 {
        self.covered
    }
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if r.len() < n {
        return Err(bad("batch truncated"));
    }
    let (a, b) = r.split_at(n);
    *r = b;
    Ok(a)
}

fn take_u32(r: &mut &[u8]) -> Result<u32> {
    Ok(u32::from_le_bytes(take(r, 4)?.try_into().unwrap()))
}

fn take_u64(r: &mut &[u8]) -> Result<u64> {
    Ok(u64::from_le_bytes(take(r, 8)?.try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(seed: u8, n: usize) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                offset: i as u64 * 4096,
                kind: Kind::Data {
                    len: 4096,
                    hash: ChunkHash::of(&[seed, (i % 251) as u8, (i / 251) as u8]),
                },
            })
            .collect()
    }

    /// Pieces are content-defined: after an inserted entry the two
    /// manifests' pieces match again from the next boundary on, and a
    /// piece's digest does not depend on its offset.
    #[test]
    fn pieces_fall_back_into_step_after_a_change() {
        let a = entries(1, 5000);
        let mut b = a.clone();
        b.insert(2500, entries(9, 1)[0]);
        let (pa, pb) = (Piecer::cut(&a), Piecer::cut(&b));
        assert_eq!(pa.iter().map(Vec::len).sum::<usize>(), 5000);
        assert!(pa.iter().all(|p| !p.is_empty() && p.len() <= PIECE_MAX));
        assert!(
            pa.len() > 5000 / PIECE_AVG as usize / 3,
            "{} pieces",
            pa.len()
        );
        let da: std::collections::HashSet<_> = pa.iter().map(|p| piece_digest(p)).collect();
        let shared = pb.iter().filter(|p| da.contains(&piece_digest(p))).count();
        assert!(
            shared >= pb.len() - 2,
            "{shared} of {} pieces shared",
            pb.len()
        );
        let mut moved = pa[3].clone();
        for e in &mut moved {
            e.offset += 12345;
        }
        assert_eq!(piece_digest(&moved), piece_digest(&pa[3]));
    }

    fn params() -> ChunkParams {
        ChunkParams::new(4096).unwrap() // min 1024, max 16384
    }

    fn data(offset: u64, len: u32, tag: u8) -> ChunkRec {
        ChunkRec {
            offset,
            len,
            content: Content::Data(ChunkHash([tag; 32])),
        }
    }

    fn zero(offset: u64, len: u32) -> ChunkRec {
        ChunkRec {
            offset,
            len,
            content: Content::Zero,
        }
    }

    fn build(recs: &[ChunkRec]) -> (Vec<Entry>, u64, ChunkHash) {
        let mut b = Builder::default();
        let mut out = Vec::new();
        for r in recs {
            b.push(r, &mut out);
        }
        let (n, d) = b.finish(&mut out);
        (out, n, d)
    }

    #[test]
    fn zero_runs_merge_and_round_trip() {
        let recs = [
            data(0, 2000, 1),
            zero(2000, 16384),
            zero(18384, 16384),
            data(34768, 5000, 2),
            zero(39768, 100),
        ];
        let (entries, n, digest) = build(&recs);
        assert_eq!(n, 4);
        assert_eq!(entries[1].kind, Kind::Zero { len: 32768 });
        let mut buf = Vec::new();
        encode_batch(&entries, &mut buf);
        let mut v = Validator::new(39868, params());
        let mut got = Vec::new();
        v.decode_batch(&buf, &mut got).unwrap();
        assert_eq!(got, entries);
        assert_eq!(v.finish(n, &digest).unwrap(), digest);
    }

    fn decode(size: u64, entries: &[Entry]) -> Result<Vec<Entry>> {
        let mut buf = Vec::new();
        encode_batch(entries, &mut buf);
        let mut v = Validator::new(size, params());
        let mut got = Vec::new();
        v.decode_batch(&buf, &mut got)?;
        Ok(got)
    }

    #[test]
    fn rejects_lies() {
        let e = |len: u32| Entry {
            offset: 0,
            kind: Kind::Data {
                len,
                hash: ChunkHash([0; 32]),
            },
        };
        // Longer than max.
        assert!(decode(1 << 20, &[e(16385)]).is_err());
        // Runs past the file size.
        assert!(decode(1000, &[e(1001)]).is_err());
        // A short chunk before the end.
        assert!(decode(5000, &[e(10), e(4990)]).is_err());
        // A zero run overflowing u64.
        let z = Entry {
            offset: 0,
            kind: Kind::Zero { len: u64::MAX },
        };
        assert!(decode(u64::MAX, &[e(2000), z]).is_err());
        // Sum short of the size is caught at the end.
        let mut buf = Vec::new();
        encode_batch(&[e(2000)], &mut buf);
        let mut v = Validator::new(4000, params());
        v.decode_batch(&buf, &mut Vec::new()).unwrap();
        assert!(v.finish(1, &ChunkHash([0; 32])).is_err());
    }

    #[test]
    fn rejects_malformed_bytes() {
        let mut v = Validator::new(100, params());
        let mut out = Vec::new();
        assert!(v.decode_batch(&[], &mut out).is_err());
        assert!(v.decode_batch(&0u32.to_le_bytes(), &mut out).is_err());
        assert!(v.decode_batch(&[1, 0, 0, 0, 7], &mut out).is_err());
        // A count claiming far more entries than bytes present.
        assert!(v.decode_batch(&[0, 64, 0, 0, 0], &mut out).is_err());
    }
}
