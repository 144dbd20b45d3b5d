//! `--check --sample K/N`: which bytes slice K of N covers.
//!
//! A huge image checked in full every night costs a full read every night.
//! Sampling splits the file into stripes and deals them round-robin into N
//! slices; slice K is checked tonight, K + 1 tomorrow, so every byte is
//! checked exactly once per cycle of N runs, and each night's reads are
//! spread over the whole file (a bad region is found within one cycle
//! wherever it lies).
//!
//! Both ends compute the stripes from the file size and N alone, so only K
//! and N travel (in `OPEN`). Stripes are at least 1 MiB (long sequential
//! reads) and sized so a slice has at most about 64 of them.
//!
//! In a sampled check the manifest covers only the slice: its entries'
//! implicit offsets run through the slice's ranges in order, jumping the
//! gaps (see [`crate::content::manifest::Validator::restrict`]). Entries are fixed
//! pieces, not content-defined chunks: a check compares the destination at
//! the same offsets, so any cut will do, and fixed ones need no context
//! from outside the slice.
//!
//! A `--snapshot` delta run (see [`crate::wire::messages::snapshot`]) cuts
//! its ranges into the same fixed pieces ([`scan_pieces`]), on both ends:
//! the receiver's old pieces then sit at the sender's offsets.

use std::fs::File;

use anyhow::Result;
use rayon::prelude::*;

use crate::content::chunk::is_zero;
use crate::content::hash::ChunkHash;
use crate::content::scan::{read_full, ChunkRec, Content};

/// Smallest stripe.
const MIN_STRIPE: u64 = 1 << 20;
/// About this many stripes per slice.
const STRIPES_PER_SLICE: u64 = 64;

/// The stripe length for a file of `size` bytes cut into `n` slices: a
/// multiple of 1 MiB.
pub fn stripe_len(size: u64, n: u32) -> u64 {
    let per = size.div_ceil(u64::from(n.max(1)) * STRIPES_PER_SLICE);
    per.div_ceil(MIN_STRIPE).max(1) * MIN_STRIPE
}

/// The byte ranges of slice `k` (1-based) of `n`, in file order.
pub fn ranges(size: u64, k: u32, n: u32) -> Vec<(u64, u64)> {
    let stripe = stripe_len(size, n);
    let step = stripe * u64::from(n);
    let mut out = Vec::new();
    let mut start = stripe * u64::from(k.saturating_sub(1));
    while start < size {
        out.push((start, (start + stripe).min(size)));
        start = match start.checked_add(step) {
            Some(s) => s,
            None => break,
        };
    }
    out
}

/// Bytes slice `k` of `n` covers.
pub fn covered(size: u64, k: u32, n: u32) -> u64 {
    ranges(size, k, n).iter().map(|(a, b)| b - a).sum()
}

/// Reads `ranges` of `file` (sorted, disjoint) in fixed pieces of `piece`
/// bytes from each range's start (the last one of a range shorter), zero
/// checked and hashed in parallel, handing them to `sink` in order, up to
/// 8 MiB at a time; `sink`'s flag says the batch ends a range.
pub fn scan_pieces(
    file: &File,
    ranges: &[(u64, u64)],
    piece: u64,
    mut sink: impl FnMut(Vec<ChunkRec>, bool) -> Result<()>,
) -> Result<()> {
    let piece = piece.max(1);
    let step = ((8 << 20) / piece).max(1) * piece;
    let mut buf = Vec::new();
    for &(start, end) in ranges {
        let mut at = start;
        while at < end {
            let len = (end - at).min(step);
            buf.resize(len as usize, 0);
            read_full(file, &mut buf, at)?;
            let recs: Vec<ChunkRec> = buf
                .par_chunks(piece as usize)
                .enumerate()
                .map(|(j, d)| ChunkRec {
                    offset: at + j as u64 * piece,
                    len: d.len() as u32,
                    content: if is_zero(d) {
                        Content::Zero
                    } else {
                        Content::Data(ChunkHash::of(d))
                    },
                })
                .collect();
            at += len;
            sink(recs, at == end)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_every_byte_exactly_once() {
        for size in [
            0,
            1,
            MIN_STRIPE - 1,
            5 * MIN_STRIPE + 17,
            3 << 30,
            u64::MAX / 2,
        ] {
            for n in [1, 2, 7, 64, 1000] {
                let mut all: Vec<(u64, u64)> = (1..=n).flat_map(|k| ranges(size, k, n)).collect();
                all.sort();
                let mut at = 0;
                for (a, b) in &all {
                    assert_eq!(*a, at, "size {size} n {n}: gap or overlap at {at}");
                    assert!(b > a);
                    at = *b;
                }
                assert_eq!(at, size, "size {size} n {n}");
                if size > 0 {
                    for k in 1..=n.min(8) {
                        assert!(ranges(size, k, n).len() as u64 <= STRIPES_PER_SLICE + 1);
                    }
                }
            }
        }
    }

    #[test]
    fn stripes_are_whole_mebibytes() {
        assert_eq!(stripe_len(0, 7), MIN_STRIPE);
        assert_eq!(stripe_len(100 << 20, 7), MIN_STRIPE);
        assert_eq!(stripe_len(1 << 40, 7) % MIN_STRIPE, 0);
        assert!(stripe_len(1 << 40, 7) * 7 * STRIPES_PER_SLICE >= 1 << 40);
    }
}
