//! Which byte ranges of a new snapshot may differ from the previous one,
//! told from where the two reflink clones' bytes live (DESIGN-NOTES point
//! 9), so a `--snapshot` run reads only those.
//!
//! While the previous clone is kept, the blocks it references cannot be
//! freed, so a file offset that both clones map to the same physical
//! address holds the same byte in both; a rewritten block of the source was
//! copied on write and maps elsewhere in the new clone. What is compared is
//! the mapping of each offset, not the extent records: a filesystem splits
//! and merges its records as it likes (a rewrite in the middle of a record
//! splits it in three, an untouched file may be reported in other pieces),
//! so [`compare`] sweeps both maps together over the offsets. The
//! `FIEMAP_EXTENT_SHARED` flag says nothing here: the previous clone's
//! rewritten blocks lose it, the rest keep it.
//!
//! Per offset, with every range rounded outward to whole blocks:
//! * a hole in both: unchanged (both read zeros); a hole in one: changed;
//!   an extent that is only unwritten (allocated, never written: a
//!   preallocated image) reads zeros too and counts as a hole;
//! * plain data at the same address in both: unchanged; elsewhere: changed;
//! * an encoded (btrfs compressed) extent: its address is that of the
//!   compressed bytes, not of this offset's byte, so it is unchanged only
//!   where both maps have the very same record (logical start, physical
//!   start, length);
//! * anything the map cannot vouch for counts as changed: delayed
//!   (also when unwritten), unknown, inline, tail-packed, not aligned, encrypted, flags
//!   this code does not know, and offsets more than one record claims.
//!
//! A wrong "changed" only costs a read. A wrong "unchanged" would leave the
//! destination stale, so whatever the reasoning misses (a dedupe tool
//! remapping one clone to different bytes at a reused address, say) is
//! left to the sampled re-read of the skipped ranges (`--snapshot-verify`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result};

pub use crate::sys::fiemap::{self, Extent};
use crate::sys::fiemap::{
    FIEMAP_EXTENT_ENCODED, FIEMAP_EXTENT_LAST, FIEMAP_EXTENT_MERGED, FIEMAP_EXTENT_SHARED,
    FIEMAP_EXTENT_UNWRITTEN,
};

/// Flags that say nothing about the bytes. Every other flag but ENCODED
/// makes an extent count as changed.
const HARMLESS: u32 = FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_MERGED;

/// Alignment used where the filesystem reports no block size.
const FALLBACK_BLOCK: u64 = 4096;
/// The largest block size believed: beyond it ranges would be rounded out
/// to more than a block could mean.
const MAX_BLOCK: u64 = 1 << 20;

/// What one file offset maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Map {
    Hole,
    /// Plain data at `offset + delta` (wrapping): equal deltas mean equal
    /// addresses for every offset both cover.
    Direct(u64),
    /// Somewhere in this encoded record `(logical, physical, len)`.
    Record(u64, u64, u64),
    /// Not comparable: never equal, not even to itself.
    Opaque,
}

impl Map {
    fn of(e: &Extent) -> Map {
        // Allocated but never written: reads as zeros, like a hole, wherever
        // it sits (a preallocated image is mostly this). Nobody writes the
        // clones, so no write is pending that would turn it into data.
        if e.flags & !HARMLESS == FIEMAP_EXTENT_UNWRITTEN {
            return Map::Hole;
        }
        if e.flags & !(HARMLESS | FIEMAP_EXTENT_ENCODED) != 0 {
            Map::Opaque
        } else if e.flags & FIEMAP_EXTENT_ENCODED != 0 {
            Map::Record(e.logical, e.physical, e.len)
        } else if e.physical.checked_add(e.len).is_none() {
            Map::Opaque
        } else {
            Map::Direct(e.physical.wrapping_sub(e.logical))
        }
    }

    fn same(self, other: Map) -> bool {
        self == other && self != Map::Opaque
    }
}

/// A stretch `start..end` of one file mapped one way.
#[derive(Debug)]
struct Seg {
    start: u64,
    end: u64,
    map: Map,
}

/// The byte ranges `start..end` within `0..size` in which the file mapped
/// by `new` may hold other bytes than the one mapped by `old`: sorted,
/// disjoint, adjacent ones merged, rounded outward to multiples of `block`
/// and clamped to `size`. The lists may come in any order and overlap
/// (an offset claimed twice counts as changed); extents past `size` are
/// ignored.
pub fn compare(old: &[Extent], new: &[Extent], size: u64, block: u64) -> Vec<(u64, u64)> {
    let block = block.max(1);
    let (a, b) = (segments(old, size), segments(new, size));
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let (ma, ea) = at(&a, &mut i, pos, size);
        let (mb, eb) = at(&b, &mut j, pos, size);
        let end = ea.min(eb);
        if !ma.same(mb) {
            add(&mut out, pos, end, block, size);
        }
        pos = end;
    }
    out
}

/// The total length of `ranges`.
pub fn bytes(ranges: &[(u64, u64)]) -> u64 {
    ranges
        .iter()
        .fold(0, |n, &(s, e)| n.saturating_add(e.saturating_sub(s)))
}

/// The ranges of `new` that may differ from `old`, both being `size` bytes
/// long (the caller checks that), as [`compare`] says from their FIEMAP
/// maps, rounded to `new`'s filesystem block size. `None` when the maps
/// cannot be compared: the filesystem cannot map extents, a file has more
/// than [`fiemap::MAX_EXTENTS`], the files are on different filesystems
/// (addresses are per filesystem), or `new`'s map changed while `old`'s
/// was taken. I/O errors are errors.
///
/// The order: `new` is mapped first, then `old`, then `new` again and
/// checked to be the same (the SHARED flag aside, which the source's own
/// writes clear). Both clones being untouched, the maps are fixed and the
/// order would not matter; what could still move data meanwhile is the
/// filesystem (btrfs balance, defragmenting, dedupe). A false "unchanged"
/// needs an address that held `new`'s byte when `new` was mapped and a
/// different byte of `old` when `old` was: that address was freed in
/// between, so `new`'s block moved away from it, which the second map of
/// `new` sees.
pub fn changed(old: &File, new: &File, size: u64) -> Result<Option<Vec<(u64, u64)>>> {
    let dev = |f: &File, what: &str| {
        f.metadata()
            .map(|m| m.dev())
            .with_context(|| format!("cannot stat {what}"))
    };
    if dev(old, "the previous snapshot")? != dev(new, "the new snapshot")? {
        return Ok(None);
    }
    let Some(now) = usable(fiemap::extents(new), "the new snapshot")? else {
        return Ok(None);
    };
    let Some(then) = usable(fiemap::extents(old), "the previous snapshot")? else {
        return Ok(None);
    };
    let key = |e: &Extent| Extent {
        flags: e.flags & !FIEMAP_EXTENT_SHARED,
        ..*e
    };
    let mut seen = 0;
    let mut same = true;
    let again = fiemap::each_batch(new, |batch| {
        for e in batch {
            same &= now.get(seen).map(key) == Some(key(e));
            seen += 1;
        }
        Ok(())
    });
    if usable(again, "the new snapshot")?.is_none() || !same || seen != now.len() {
        return Ok(None);
    }
    let st = rustix::fs::fstatvfs(new).context("cannot statvfs the new snapshot")?;
    let block = match st.f_bsize {
        0 => FALLBACK_BLOCK,
        b => b.min(MAX_BLOCK),
    };
    Ok(Some(compare(&then, &now, size, block)))
}

/// A map, `None` if the filesystem cannot give one that is of use.
fn usable<T>(map: io::Result<T>, what: &str) -> Result<Option<T>> {
    match map {
        Ok(m) => Ok(Some(m)),
        Err(e) if matches!(e.kind(), ErrorKind::Unsupported | ErrorKind::FileTooLarge) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot map the extents of {what}")),
    }
}

/// `list` as sorted, disjoint stretches of `0..size` (holes left out),
/// each mapped one way; where several extents claim an offset, `Opaque`.
fn segments(list: &[Extent], size: u64) -> Vec<Seg> {
    // (start, end, index in `list`): a third the size of a whole extent.
    let mut ext: Vec<(u64, u64, usize)> = list
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let end = e.logical.saturating_add(e.len).min(size);
            (e.logical < end).then_some((e.logical, end, i))
        })
        .collect();
    ext.sort_unstable_by_key(|&(start, _, _)| start);
    let mut out: Vec<Seg> = Vec::with_capacity(ext.len());
    // The extents covering `pos`, by end.
    let mut open: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut next = 0;
    let mut pos = 0;
    loop {
        while open.peek().is_some_and(|Reverse((end, _))| *end <= pos) {
            open.pop();
        }
        // `pos` never passes a start, so what starts here ends after it.
        while let Some(&(_, end, _)) = ext.get(next).filter(|x| x.0 <= pos) {
            open.push(Reverse((end, next)));
            next += 1;
        }
        let upcoming = ext.get(next).map(|x| x.0);
        let (upto, map) = match (open.peek(), upcoming) {
            (None, None) => break,
            (None, Some(start)) => {
                pos = start;
                continue;
            }
            (Some(&Reverse((end, k))), _) => {
                let map = if open.len() == 1 {
                    Map::of(&list[ext[k].2])
                } else {
                    Map::Opaque
                };
                (upcoming.map_or(end, |s| s.min(end)), map)
            }
        };
        match out.last_mut() {
            Some(last) if last.end == pos && last.map == map => last.end = upto,
            _ => out.push(Seg {
                start: pos,
                end: upto,
                map,
            }),
        }
        pos = upto;
    }
    out
}

/// What `segs` maps `pos` to, and up to where; `i` is the index to start
/// looking at, moved forward past what ends by `pos`.
fn at(segs: &[Seg], i: &mut usize, pos: u64, size: u64) -> (Map, u64) {
    while segs.get(*i).is_some_and(|s| s.end <= pos) {
        *i += 1;
    }
    match segs.get(*i) {
        Some(s) if s.start <= pos => (s.map, s.end),
        Some(s) => (Map::Hole, s.start),
        None => (Map::Hole, size),
    }
}

/// Appends `start..end`, rounded out to `block` and clamped to `size`,
/// merged with the last range if they touch.
fn add(out: &mut Vec<(u64, u64)>, start: u64, end: u64, block: u64, size: u64) {
    let start = start / block * block;
    let end = end.div_ceil(block).saturating_mul(block).min(size);
    match out.last_mut() {
        Some(last) if last.1 >= start => last.1 = last.1.max(end),
        _ => out.push((start, end)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fiemap::{
        FIEMAP_EXTENT_DATA_ENCRYPTED, FIEMAP_EXTENT_DATA_INLINE, FIEMAP_EXTENT_DELALLOC,
        FIEMAP_EXTENT_NOT_ALIGNED, FIEMAP_EXTENT_UNKNOWN, FIEMAP_EXTENT_UNWRITTEN,
    };
    use proptest::prelude::*;

    const B: u64 = 4096;
    const P: u64 = 1 << 30;
    const Q: u64 = 3 << 30;

    fn x(logical: u64, physical: u64, len: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            len,
            flags,
        }
    }

    /// Plain data, in blocks.
    fn d(block: u64, physical: u64, blocks: u64) -> Extent {
        x(block * B, physical, blocks * B, 0)
    }

    fn enc(block: u64, physical: u64, blocks: u64) -> Extent {
        x(block * B, physical, blocks * B, FIEMAP_EXTENT_ENCODED)
    }

    /// Blocks `from..to` as a byte range.
    fn r(from: u64, to: u64) -> (u64, u64) {
        (from * B, to * B)
    }

    #[test]
    fn the_same_map_is_unchanged() {
        let map = [d(0, P, 4), d(6, Q, 2)];
        assert_eq!(compare(&map, &map, 8 * B, B), []);
        assert_eq!(compare(&[], &[], 8 * B, B), [], "all hole");
        assert_eq!(compare(&map, &map, 0, B), [], "empty file");
    }

    #[test]
    fn records_split_or_merged_differently_compare_by_address() {
        let whole = [d(0, P, 16)];
        let split = [d(0, P, 1), d(1, P + B, 5), d(6, P + 6 * B, 10)];
        assert_eq!(compare(&whole, &split, 16 * B, B), []);
        assert_eq!(compare(&split, &whole, 16 * B, B), []);
        // Physically contiguous but reported in a different order.
        let shuffled = [split[2], split[0], split[1]];
        assert_eq!(compare(&whole, &shuffled, 16 * B, B), []);
    }

    #[test]
    fn a_rewritten_block_is_exactly_what_changed() {
        let old = [d(0, P, 16)];
        let new = [d(0, P, 3), d(3, Q, 1), d(4, P + 4 * B, 12)];
        assert_eq!(compare(&old, &new, 16 * B, B), [r(3, 4)]);
        // Two rewritten neighbours (even at unrelated addresses) merge.
        let new = [d(0, P, 3), d(3, Q, 1), d(4, 7 * Q, 1), d(5, P + 5 * B, 11)];
        assert_eq!(compare(&old, &new, 16 * B, B), [r(3, 5)]);
        // Same offset in the record, another record's address.
        let moved = [d(0, P + B, 16)];
        assert_eq!(compare(&old, &moved, 16 * B, B), [r(0, 16)]);
    }

    #[test]
    fn holes() {
        let old = [d(0, P, 2), d(4, P + 4 * B, 2)];
        assert_eq!(compare(&old, &old, 8 * B, B), [], "holes in both");
        // Filled, punched, and a tail hole against tail data.
        let filled = [d(0, P, 2), d(2, Q, 2), d(4, P + 4 * B, 2)];
        assert_eq!(compare(&old, &filled, 8 * B, B), [r(2, 4)]);
        let punched = [d(0, P, 1), d(4, P + 4 * B, 2)];
        assert_eq!(compare(&old, &punched, 8 * B, B), [r(1, 2)]);
        let tail = [d(0, P, 2), d(4, P + 4 * B, 4)];
        assert_eq!(compare(&old, &tail, 8 * B, B), [r(6, 8)]);
    }

    #[test]
    fn encoded_extents_compare_as_whole_records() {
        let old = [enc(0, P, 32), enc(32, P + 9 * B, 32)];
        assert_eq!(compare(&old, &old, 64 * B, B), []);
        // A block rewritten in the first record: btrfs splits it in three
        // pieces of the same compressed extent; all 32 blocks are suspect.
        let new = [
            enc(0, P, 5),
            d(5, Q, 1),
            x(6 * B, P, 26 * B, FIEMAP_EXTENT_ENCODED),
            enc(32, P + 9 * B, 32),
        ];
        assert_eq!(compare(&old, &new, 64 * B, B), [r(0, 32)]);
        // The same address as plain data is no match either.
        let plain = [d(0, P, 32), enc(32, P + 9 * B, 32)];
        assert_eq!(compare(&old, &plain, 64 * B, B), [r(0, 32)]);
        // A record reaching past the end still compares whole.
        assert_eq!(compare(&old, &old, 40 * B, B), []);
    }

    #[test]
    fn extents_the_map_cannot_vouch_for_count_as_changed() {
        for flags in [
            FIEMAP_EXTENT_UNWRITTEN | FIEMAP_EXTENT_DELALLOC,
            FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN,
            FIEMAP_EXTENT_UNKNOWN,
            FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_NOT_ALIGNED,
            FIEMAP_EXTENT_NOT_ALIGNED,
            FIEMAP_EXTENT_DATA_ENCRYPTED | FIEMAP_EXTENT_ENCODED,
            0x8000_0000, // not known to this code
        ] {
            let map = [
                d(0, P, 2),
                x(2 * B, P + 2 * B, 2 * B, flags),
                d(4, P + 4 * B, 4),
            ];
            assert_eq!(compare(&map, &map, 8 * B, B), [r(2, 4)], "flags {flags:#x}");
        }
        // Unwritten reads as zeros: the same as a hole or another unwritten
        // extent anywhere, not the same as data.
        let unwritten = |l, p, n| x(l * B, p, n * B, FIEMAP_EXTENT_UNWRITTEN);
        let old = [d(0, P, 2), unwritten(2, P + 2 * B, 2), d(4, P + 4 * B, 4)];
        let moved = [d(0, P, 2), unwritten(2, Q, 2), d(4, P + 4 * B, 4)];
        let holed = [d(0, P, 2), d(4, P + 4 * B, 4)];
        let written = [d(0, P, 2), d(2, P + 2 * B, 6)];
        assert_eq!(compare(&old, &moved, 8 * B, B), []);
        assert_eq!(compare(&old, &holed, 8 * B, B), []);
        assert_eq!(compare(&holed, &old, 8 * B, B), []);
        assert_eq!(compare(&old, &written, 8 * B, B), [r(2, 4)]);
        // SHARED, LAST and MERGED say nothing about the bytes.
        let old = [x(0, P, 8 * B, FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_LAST)];
        let new = [x(0, P, 8 * B, FIEMAP_EXTENT_MERGED)];
        assert_eq!(compare(&old, &new, 8 * B, B), []);
    }

    #[test]
    fn ranges_are_clamped_to_the_size() {
        // Differences past the end do not count; the last block is short.
        let old = [d(0, P, 4), d(4, P + 4 * B, 4)];
        let new = [d(0, P, 3), d(3, Q, 5)];
        let size = 3 * B + 100;
        assert_eq!(compare(&old, &new, size, B), [(3 * B, size)]);
        assert_eq!(compare(&old, &new, 3 * B, B), []);
        // A hole at the end of one file against data past the other's.
        assert_eq!(compare(&[d(0, P, 1)], &[d(0, P, 9)], B, B), []);
    }

    #[test]
    fn unaligned_differences_round_out_to_blocks() {
        // Records at byte offsets no filesystem would report.
        let old = [x(0, P, 10_000, 0)];
        let new = [
            x(0, P, 5000, 0),
            x(5000, Q, 100, 0),
            x(5100, P + 5100, 4900, 0),
        ];
        assert_eq!(compare(&old, &new, 10_000, B), [r(1, 2)]);
        assert_eq!(compare(&old, &new, 10_000, 1), [(5000, 5100)]);
        assert_eq!(compare(&old, &new, 10_000, 0), [(5000, 5100)], "0 is 1");
        assert_eq!(compare(&old, &new, 10_000, 1 << 20), [(0, 10_000)]);
    }

    #[test]
    fn odd_lists_never_panic_and_count_as_changed() {
        // Two records claiming blocks 2..4 of one file.
        let overlap = [d(0, P, 4), d(2, P + 2 * B, 4)];
        let plain = [d(0, P, 6)];
        assert_eq!(compare(&plain, &overlap, 6 * B, B), [r(2, 4)]);
        assert_eq!(compare(&overlap, &overlap, 6 * B, B), [r(2, 4)]);
        // Empty, endless and address-overflowing records.
        let odd = [
            x(B, P, 0, 0),
            x(2 * B, u64::MAX - B, 4 * B, 0),
            x(8 * B, 0, u64::MAX, 0),
        ];
        assert_eq!(compare(&odd, &odd, 16 * B, B), [r(2, 6)]);
        assert_eq!(
            compare(&odd, &[], u64::MAX, B),
            [(2 * B, 6 * B), (8 * B, u64::MAX)]
        );
    }

    #[test]
    fn bytes_sums_the_ranges() {
        assert_eq!(bytes(&[]), 0);
        assert_eq!(bytes(&[r(0, 1), r(3, 5), (10 * B, 10 * B + 7)]), 3 * B + 7);
    }

    /// What one byte maps to, found the slow way: every extent asked.
    #[derive(PartialEq)]
    enum Byte {
        Hole,
        At(u64),
        In(u64, u64, u64),
        Odd,
    }

    fn byte(map: &[Extent], at: u64) -> Byte {
        let hits: Vec<&Extent> = map
            .iter()
            .filter(|e| e.logical <= at && at - e.logical < e.len)
            .collect();
        let e = match hits[..] {
            [] => return Byte::Hole,
            [e] => e,
            _ => return Byte::Odd,
        };
        let known = FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_MERGED;
        if e.flags & !known == FIEMAP_EXTENT_UNWRITTEN {
            Byte::Hole
        } else if e.flags & !(known | FIEMAP_EXTENT_ENCODED) != 0 {
            Byte::Odd
        } else if e.flags & FIEMAP_EXTENT_ENCODED != 0 {
            Byte::In(e.logical, e.physical, e.len)
        } else if e.physical.checked_add(e.len).is_none() {
            Byte::Odd
        } else {
            Byte::At(e.physical + (at - e.logical))
        }
    }

    /// [`compare`] the slow way: byte by byte, block by block.
    fn model(old: &[Extent], new: &[Extent], size: u64, block: u64) -> Vec<(u64, u64)> {
        let block = block.max(1);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in 0..size.div_ceil(block) {
            let (start, end) = (b * block, ((b + 1) * block).min(size));
            let differs = (start..end).any(|at| {
                let (o, n) = (byte(old, at), byte(new, at));
                o == Byte::Odd || o != n
            });
            if differs {
                match out.last_mut() {
                    Some(last) if last.1 == start => last.1 = end,
                    _ => out.push((start, end)),
                }
            }
        }
        out
    }

    fn flags() -> impl Strategy<Value = u32> {
        prop_oneof![
            6 => Just(0),
            1 => Just(FIEMAP_EXTENT_SHARED),
            1 => Just(FIEMAP_EXTENT_ENCODED),
            1 => Just(FIEMAP_EXTENT_UNWRITTEN),
            1 => Just(FIEMAP_EXTENT_LAST),
        ]
    }

    fn any_list() -> impl Strategy<Value = Vec<Extent>> {
        proptest::collection::vec(
            (0u64..300, 0u64..400, 0u64..80, flags()).prop_map(|(l, p, n, f)| x(l, p, n, f)),
            0..12,
        )
    }

    /// A map of `units` file units, each a hole or at a physical unit, as
    /// extents cut at every discontinuity and wherever `cuts` says.
    fn to_extents(units: &[Option<u64>], cuts: &[bool], flags: &[u32], unit: u64) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for (i, u) in units.iter().enumerate() {
            let Some(p) = *u else { continue };
            let joins = i > 0
                && units[i - 1].map(|q| q + 1) == Some(p)
                && !cuts.get(i % cuts.len().max(1)).copied().unwrap_or(false);
            match out.last_mut() {
                Some(last) if joins => last.len += unit,
                _ => {
                    let f = flags
                        .get(out.len() % flags.len().max(1))
                        .copied()
                        .unwrap_or(0);
                    out.push(x(i as u64 * unit, p * unit, unit, f));
                }
            }
        }
        out
    }

    /// Two maps that agree mostly: `old` in runs, `new` the same with
    /// `edits`, each cut into records its own way.
    fn related() -> impl Strategy<Value = (Vec<Extent>, Vec<Extent>, u64, u64)> {
        (
            proptest::collection::vec((1u64..6, proptest::option::weighted(0.8, 0u64..60)), 1..12),
            proptest::collection::vec(
                (0usize..64, proptest::option::weighted(0.7, 0u64..60)),
                0..4,
            ),
            proptest::collection::vec(any::<bool>(), 1..8),
            proptest::collection::vec(any::<bool>(), 1..8),
            proptest::collection::vec(flags(), 1..6),
            proptest::collection::vec(flags(), 1..6),
            1u64..9,
            0u64..40,
            prop_oneof![Just(1u64), Just(3), Just(4), Just(8), Just(16)],
            any::<bool>(),
        )
            .prop_map(
                |(runs, edits, cut_a, cut_b, fl_a, fl_b, unit, trim, block, rev)| {
                    let mut old: Vec<Option<u64>> = Vec::new();
                    for (n, p) in runs {
                        old.extend((0..n).map(|k| p.map(|p| p * 8 + k)));
                    }
                    let mut new = old.clone();
                    for (i, p) in edits {
                        let len = new.len();
                        new[i % len] = p;
                    }
                    let mut a = to_extents(&old, &cut_a, &fl_a, unit);
                    let b = to_extents(&new, &cut_b, &fl_b, unit);
                    if rev {
                        a.reverse();
                    }
                    let size =
                        (old.len() as u64 * unit).saturating_sub(trim % (2 * unit)) + trim / 8;
                    (a, b, size, block)
                },
            )
    }

    proptest! {
        #[test]
        fn compare_agrees_with_the_byte_model_on_any_lists(
            old in any_list(),
            new in any_list(),
            size in 0u64..320,
            block in prop_oneof![Just(0u64), Just(1), Just(4), Just(7), Just(16), Just(64)],
        ) {
            prop_assert_eq!(compare(&old, &new, size, block), model(&old, &new, size, block));
        }

        #[test]
        fn compare_agrees_with_the_byte_model_on_related_maps(
            (old, new, size, block) in related(),
        ) {
            let got = compare(&old, &new, size, block);
            prop_assert_eq!(&got, &model(&old, &new, size, block));
            // Every flag drawn is one the map can vouch for.
            prop_assert!(compare(&old, &old, size, block).is_empty());
        }
    }
}
