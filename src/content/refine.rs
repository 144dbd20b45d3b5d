//! 4 KiB refinement: sending only the changed blocks of a changed chunk.
//!
//! A 64 KiB chunk that differs from everything the receiver has may still
//! be mostly old data: a database rewrote one 8 KiB page of it, or a qcow2
//! cluster moved. So for a chunk it lacks, the receiver asks for the hashes
//! of the chunk's *blocks* — the chunk cut at absolute 4 KiB file offsets,
//! because disk images write in aligned 4 KiB units (`docs/DESIGN.md`, finding 3:
//! chunk-relative blocks sent 2.5× more) — finds each block in its old data,
//! either at the same offset or anywhere in a [`BlockIndex`] of the old data
//! that no chunk of the new file matched, and requests only the rest. The
//! assembled chunk is verified against its full BLAKE3 hash before it is
//! written, so a block matched by its short hash can never slip in wrong
//! data: a mismatch makes the receiver fetch the whole chunk instead.

use std::collections::HashMap;
use std::fs::File;

use anyhow::Result;
use rayon::prelude::*;

use crate::content::chunk::is_zero;
use crate::content::scan::read_full;

/// Refinement granularity, aligned to absolute file offsets.
pub const BLOCK: u64 = 4096;
/// Length of a block hash: a truncated BLAKE3. Collisions only cost a
/// whole-chunk refetch, since the assembled chunk is verified in full.
pub const BLOCK_HASH_LEN: usize = 8;
/// Most blocks in one chunk: a maximal chunk spans this many 4 KiB blocks.
pub const MAX_BLOCKS: usize = (crate::content::chunk::MAX_CHUNK as usize) / BLOCK as usize + 1;

pub type BlockHash = [u8; BLOCK_HASH_LEN];

pub fn block_hash(data: &[u8]) -> BlockHash {
    let h = blake3::hash(data);
    let mut out = [0u8; BLOCK_HASH_LEN];
    out.copy_from_slice(&h.as_bytes()[..BLOCK_HASH_LEN]);
    out
}

/// The blocks of the chunk `[offset, offset + len)`: `(start, len)` cut at
/// every multiple of [`BLOCK`].
pub fn blocks(offset: u64, len: u32) -> impl Iterator<Item = (u64, u32)> {
    let end = offset + u64::from(len);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let next = ((pos / BLOCK) + 1) * BLOCK;
        let stop = next.min(end);
        let p = (pos, (stop - pos) as u32);
        pos = stop;
        Some(p)
    })
}

pub fn block_count(offset: u64, len: u32) -> usize {
    if len == 0 {
        return 0;
    }
    let end = offset + u64::from(len);
    ((end - 1) / BLOCK - offset / BLOCK + 1) as usize
}

/// Hashes of the blocks of `data`, which sits at file offset `offset`.
pub fn block_hashes(offset: u64, data: &[u8]) -> Vec<BlockHash> {
    blocks(offset, data.len() as u32)
        .map(|(s, l)| {
            let a = (s - offset) as usize;
            block_hash(&data[a..a + l as usize])
        })
        .collect()
}

/// Full 4 KiB blocks of old data, by block hash: where each sits.
#[derive(Default)]
pub struct BlockIndex {
    map: HashMap<BlockHash, u64>,
}

impl BlockIndex {
    /// Indexes the aligned full blocks overlapping `ranges` of `file`
    /// (hashing in parallel). Zero blocks are left out: zeros never travel.
    pub fn build(file: &File, file_size: u64, ranges: &[(u64, u64)]) -> Result<BlockIndex> {
        let mut blocks: Vec<u64> = Vec::new();
        for &(s, e) in ranges {
            let mut b = s / BLOCK * BLOCK;
            while b < e && b + BLOCK <= file_size {
                if blocks.last() != Some(&b) {
                    blocks.push(b);
                }
                b += BLOCK;
            }
        }
        let hashed: Vec<Option<(BlockHash, u64)>> = blocks
            .par_chunks(256)
            .flat_map_iter(|group| {
                let mut buf = vec![0u8; BLOCK as usize];
                group
                    .iter()
                    .map(|&b| {
                        if read_full(file, &mut buf, b).is_err() || is_zero(&buf) {
                            None
                        } else {
                            Some((block_hash(&buf), b))
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut map = HashMap::with_capacity(hashed.len());
        for (h, b) in hashed.into_iter().flatten() {
            map.entry(h).or_insert(b);
        }
        Ok(BlockIndex { map })
    }

    pub fn get(&self, h: &BlockHash) -> Option<u64> {
        self.map.get(h).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Where each block of a chunk being assembled comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSource {
    /// Old data at this offset, same length.
    Basis(u64),
    /// The sender sends it.
    Wire,
}

/// Packs "which blocks to send" as a bitmap, block 0 in bit 0 of byte 0.
pub fn bitmap(plan: &[BlockSource]) -> Vec<u8> {
    let mut bits = vec![0u8; plan.len().div_ceil(8)];
    for (i, p) in plan.iter().enumerate() {
        if *p == BlockSource::Wire {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    bits
}

pub fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// The blocks of a chunk (`data`, at file offset `offset`) whose bits are
/// set in `bitmap`, concatenated: the payload of a `CHUNK` that answers a
/// `BLOCK_FETCH`.
pub fn gather(offset: u64, data: &[u8], bitmap: &[u8]) -> Vec<u8> {
    let mut wanted = Vec::new();
    for (k, (start, len)) in blocks(offset, data.len() as u32).enumerate() {
        if bit(bitmap, k) {
            let a = (start - offset) as usize;
            wanted.extend_from_slice(&data[a..a + len as usize]);
        }
    }
    wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_follow_absolute_4k_offsets() {
        let p: Vec<_> = blocks(1000, 10000).collect();
        assert_eq!(p, [(1000, 3096), (4096, 4096), (8192, 2808)]);
        assert_eq!(block_count(1000, 10000), 3);
        let p: Vec<_> = blocks(8192, 4096).collect();
        assert_eq!(p, [(8192, 4096)]);
        assert_eq!(block_count(8192, 4096), 1);
        assert_eq!(block_count(8191, 2), 2);
        assert_eq!(blocks(5, 0).count(), 0);
        for (o, l) in [(0u64, 1u32), (4095, 1), (4095, 2), (123456, 262144)] {
            assert_eq!(blocks(o, l).count(), block_count(o, l));
            assert_eq!(
                blocks(o, l).map(|p| u64::from(p.1)).sum::<u64>(),
                u64::from(l)
            );
        }
        assert!(block_count(4095, crate::content::chunk::MAX_CHUNK) <= MAX_BLOCKS);
    }

    #[test]
    fn bitmap_round_trips() {
        let plan = [
            BlockSource::Wire,
            BlockSource::Basis(0),
            BlockSource::Wire,
            BlockSource::Basis(1),
            BlockSource::Basis(2),
            BlockSource::Basis(3),
            BlockSource::Basis(4),
            BlockSource::Basis(5),
            BlockSource::Wire,
        ];
        let b = bitmap(&plan);
        assert_eq!(b, [0b101, 1]);
        for (i, p) in plan.iter().enumerate() {
            assert_eq!(bit(&b, i), *p == BlockSource::Wire);
        }
    }
}
