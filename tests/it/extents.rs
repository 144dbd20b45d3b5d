//! `vmsync::source::extents::changed` on real filesystems: which ranges of
//! a new reflink clone of a source may differ from the previous clone.
//!
//! Each test makes a fresh loop-mounted XFS (reflink=1), btrfs or ext4
//! (`common::fs::Scratch`; skipped where it cannot, failing instead under
//! `VMSYNC_REQUIRE_LOOP=1`), writes a source of a few MiB, clones it
//! (`cp --reflink=always`) as the "previous snapshot", changes the source
//! by `pwrite`, hole punching or not at all, clones it again as the "new
//! snapshot", and holds `changed` against what the test did to the bytes:
//!
//! * XFS and btrfs: exactly the 4 KiB blocks written (a partial write
//!   counts its whole blocks), holes in both unchanged, a punched hole
//!   changed, identical clones nothing; a map longer than one FIEMAP call
//!   returns comes whole; in a preallocated (unwritten) image only what
//!   was written;
//! * btrfs mounted with `compress-force=zstd` (by remount, since `Scratch`
//!   mounts with default options): a compressed extent cannot be compared
//!   block by block, so a write in one makes the whole extent (up to
//!   128 KiB) count as changed, and untouched extents still count as
//!   unchanged;
//! * ext4 has no reflink, but FIEMAP: two copies of a file live in
//!   different blocks, so everything with data counts as changed, and a
//!   file against itself as unchanged;
//! * tmpfs cannot map at all: `None`, not an error.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use vmsync::source::extents::{changed, fiemap, Extent};

use crate::common::fs::*;
use crate::common::*;

const BLOCK: u64 = 4096;
/// The source: 4 MiB, with a hole (punched) at 1 MiB.
const SIZE: u64 = 4 * MIB;
const HOLE: (u64, u64) = (MIB, MIB + 256 * KIB);
/// Scattered single blocks rewritten.
const REWRITES: usize = 12;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `cp --reflink=always src dst`; whether the filesystem allowed it.
fn reflink(src: &Path, dst: &Path) -> bool {
    reflink_copy(src, dst).status.success()
}

#[track_caller]
fn clone_of(src: &Path, dst: &Path) {
    assert!(reflink(src, dst), "cp --reflink=always {}", src.display());
}

fn open(path: &Path) -> File {
    File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// `changed(prev, new, size of new)`.
#[track_caller]
fn changed_between(prev: &Path, new: &Path) -> Option<Vec<(u64, u64)>> {
    changed(&open(prev), &open(new), file_len(new))
        .unwrap_or_else(|e| panic!("changed({}, {}): {e:#}", prev.display(), new.display()))
}

/// `ranges` sorted, overlapping and touching ones joined.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Block indices as merged byte ranges.
fn block_ranges(blocks: &[u64]) -> Vec<(u64, u64)> {
    merged(
        blocks
            .iter()
            .map(|b| (b * BLOCK, (b + 1) * BLOCK))
            .collect(),
    )
}

/// Writes each `(offset, bytes)` into `path` and fsyncs it; the indices of
/// the blocks touched, sorted.
fn rewrite(path: &Path, writes: &[(u64, Vec<u8>)]) -> Vec<u64> {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let mut blocks = Vec::new();
    for (at, data) in writes {
        f.write_all_at(data, *at).unwrap();
        let end = at + data.len() as u64;
        blocks.extend(at / BLOCK..end.div_ceil(BLOCK));
    }
    f.sync_all().unwrap();
    blocks.sort_unstable();
    blocks.dedup();
    blocks
}

fn punch(path: &Path, (start, end): (u64, u64)) {
    use rustix::fs::{fallocate, FallocateFlags};
    let f = OpenOptions::new().write(true).open(path).unwrap();
    fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        start,
        end - start,
    )
    .unwrap_or_else(|e| panic!("punch a hole in {}: {e}", path.display()));
    f.sync_all().unwrap();
}

/// A source of [`SIZE`] bytes made of `block(i)` for each block `i`, with
/// the [`HOLE`] punched, on disk.
fn source(path: &Path, block: impl Fn(u64) -> Vec<u8>) {
    let data: Vec<u8> = (0..SIZE / BLOCK).flat_map(block).collect();
    assert_eq!(data.len() as u64, SIZE);
    write_file(path, &data);
    punch(path, HOLE);
}

/// The writes of a typical run between two snapshots: [`REWRITES`] single
/// blocks at random (one of them in the hole, filling it), an 8 KiB page,
/// a 100-byte write across a block boundary, the last block; no append.
fn scattered_writes(seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut rng = Rng::new(seed);
    let mut writes: Vec<(u64, Vec<u8>)> = (0..REWRITES as u64)
        .map(|i| {
            let at = rng.below(SIZE / BLOCK) * BLOCK;
            (at, random_bytes(seed * 100 + i, BLOCK as usize))
        })
        .collect();
    writes.push((HOLE.0 + 16 * BLOCK, random_bytes(seed + 1, BLOCK as usize)));
    writes.push((
        2 * MIB + 40 * BLOCK,
        random_bytes(seed + 2, 2 * BLOCK as usize),
    ));
    writes.push((3 * MIB + 7 * BLOCK - 50, random_bytes(seed + 3, 100)));
    writes.push((SIZE - BLOCK, random_bytes(seed + 4, BLOCK as usize)));
    writes
}

// ---------------------------------------------------------------------------
// XFS and btrfs
// ---------------------------------------------------------------------------

/// On a reflink filesystem: exactly the blocks written count as changed;
/// the hole both clones have does not, a punched one does, and clones of
/// the same bytes compare as unchanged.
fn exactly_the_rewritten_blocks(fs: Fs) {
    let test = format!("exactly_the_rewritten_blocks ({fs})");
    let Some(s) = Scratch::new(fs, SCRATCH_SIZE, &test) else {
        return;
    };
    let (src, prev, new) = (s.path("disk.img"), s.path("prev"), s.path("new"));
    source(&src, |i| random_bytes(i, BLOCK as usize));
    clone_of(&src, &prev);

    assert_eq!(
        changed_between(&prev, &prev),
        Some(vec![]),
        "a file and itself"
    );
    let same = s.path("same");
    clone_of(&src, &same);
    assert_eq!(changed_between(&prev, &same), Some(vec![]), "two clones");

    let touched = rewrite(&src, &scattered_writes(7));
    clone_of(&src, &new);
    assert_eq!(
        moved_blocks(&prev, &new, BLOCK),
        touched,
        "{fs}: the written blocks moved, and only they (what point 9 relies on)"
    );
    let got = changed_between(&prev, &new).expect("comparable maps");
    assert_eq!(got, block_ranges(&touched), "{fs}: changed ranges");
    // Which makes "a hole in both is unchanged" part of what was checked.
    let map = physical_blocks(&prev, BLOCK);
    let hole = HOLE.0 / BLOCK..HOLE.1 / BLOCK;
    assert!(
        hole.clone().all(|b| map[b as usize].is_none()),
        "{fs}: no hole"
    );

    // A hole punched after the previous snapshot: hole against data.
    let (punched, after) = ((2 * MIB + 64 * KIB, 2 * MIB + 192 * KIB), s.path("after"));
    punch(&src, punched);
    clone_of(&src, &after);
    assert_eq!(
        changed_between(&new, &after),
        Some(vec![punched]),
        "{fs}: punched"
    );
    // And against the first snapshot: both changes, merged where they meet.
    let mut both = block_ranges(&touched);
    both.push(punched);
    assert_eq!(changed_between(&prev, &after), Some(merged(both)));
}

/// A preallocated image (`fallocate`: allocated, never written, FIEMAP's
/// UNWRITTEN): its unwritten extents read as zeros, so only what was
/// written between the clones counts as changed, not the preallocation
/// either clone still has (nor the one a punched hole replaced).
fn preallocated_counts_only_what_was_written(fs: Fs) {
    let test = format!("preallocated_counts_only_what_was_written ({fs})");
    let Some(s) = Scratch::new(fs, 64 * MIB, &test) else {
        return;
    };
    let (src, prev, new) = (s.path("disk.img"), s.path("prev"), s.path("new"));
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&src)
        .unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, SIZE).unwrap();
    f.write_all_at(&random_bytes(1, 64 * KIB as usize), 0)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    clone_of(&src, &prev);
    let touched = rewrite(
        &src,
        &[
            (MIB, random_bytes(2, BLOCK as usize)),
            (3 * MIB, random_bytes(3, 2 * BLOCK as usize)),
        ],
    );
    clone_of(&src, &new);
    let got = changed_between(&prev, &new).expect("comparable maps");
    assert_eq!(got, block_ranges(&touched), "{fs}: changed ranges");
    // Unwritten against a hole: both zeros.
    punch(&src, (2 * MIB, 2 * MIB + 256 * KIB));
    let after = s.path("after");
    clone_of(&src, &after);
    assert_eq!(
        changed_between(&new, &after),
        Some(vec![]),
        "{fs}: punched zeros"
    );
}

#[test]
fn xfs_preallocated_counts_only_what_was_written() {
    preallocated_counts_only_what_was_written(Fs::Xfs);
}

#[test]
fn btrfs_preallocated_counts_only_what_was_written() {
    preallocated_counts_only_what_was_written(Fs::Btrfs);
}

#[test]
fn xfs_changed_is_exactly_the_rewritten_blocks() {
    exactly_the_rewritten_blocks(Fs::Xfs);
}

#[test]
fn btrfs_changed_is_exactly_the_rewritten_blocks() {
    exactly_the_rewritten_blocks(Fs::Btrfs);
}

/// A map of more extents than one FIEMAP call returns (every other block
/// a hole): fetched whole, in the kernel's order, and compared right.
fn many_extents(fs: Fs) {
    let test = format!("many_extents ({fs})");
    let Some(s) = Scratch::new(fs, SCRATCH_SIZE, &test) else {
        return;
    };
    let (src, prev, new) = (s.path("sparse.img"), s.path("prev"), s.path("new"));
    let n = 3 * fiemap::BATCH as u64 + 17;
    let data: Vec<(u64, Vec<u8>)> = (0..n)
        .map(|i| (2 * i * BLOCK, random_bytes(i, BLOCK as usize)))
        .collect();
    let refs: Vec<(u64, &[u8])> = data.iter().map(|(at, d)| (*at, &d[..])).collect();
    sparse_file(&src, 2 * n * BLOCK, &refs);
    clone_of(&src, &prev);
    let map = fiemap::extents(&open(&prev)).unwrap();
    let plain: Vec<(u64, u64, u64)> = map.iter().map(|e| (e.logical, e.physical, e.len)).collect();
    assert_eq!(
        plain,
        extents(&prev),
        "{fs}: the map, against the test's own FIEMAP"
    );
    assert_eq!(map.len() as u64, n, "{fs}: one extent per data block");
    assert!(map.windows(2).all(|w| w[0].logical < w[1].logical));
    assert!(map[map.len() - 1].flags & fiemap::FIEMAP_EXTENT_LAST != 0);

    let touched = rewrite(&src, &[(2 * 300 * BLOCK, random_bytes(9, BLOCK as usize))]);
    clone_of(&src, &new);
    assert_eq!(
        changed_between(&prev, &new),
        Some(block_ranges(&touched)),
        "{fs}"
    );
}

#[test]
fn xfs_many_extents() {
    many_extents(Fs::Xfs);
}

#[test]
fn btrfs_many_extents() {
    many_extents(Fs::Btrfs);
}

/// Compressible bytes, different in every block: 8 copies of 512 bytes.
fn compressible(i: u64) -> Vec<u8> {
    let mut piece = random_bytes(i % 5, 512);
    piece[..8].copy_from_slice(&i.to_le_bytes());
    piece.repeat(8)
}

/// btrfs with compression: a write into a compressed extent makes the whole
/// extent count as changed (it is compared as a record); extents no write
/// touched still count as unchanged.
#[test]
fn btrfs_compressed_extents_count_whole() {
    let test = "btrfs_compressed_extents_count_whole";
    let Some(s) = Scratch::new(Fs::Btrfs, SCRATCH_SIZE, test) else {
        return;
    };
    let remount = Command::new("mount")
        .args(["-o", "remount,compress-force=zstd"])
        .arg(&s.mnt)
        .stdin(Stdio::null())
        .output()
        .expect("run mount");
    if !remount.status.success() {
        eprintln!(
            "SKIPPED {test}: mount -o remount,compress-force=zstd failed: {}",
            String::from_utf8_lossy(&remount.stderr).trim()
        );
        return;
    }
    let (src, prev, new) = (s.path("disk.img"), s.path("prev"), s.path("new"));
    source(&src, compressible);
    clone_of(&src, &prev);
    let map = fiemap::extents(&open(&prev)).unwrap();
    let encoded: Vec<&Extent> = map
        .iter()
        .filter(|e| e.flags & fiemap::FIEMAP_EXTENT_ENCODED != 0)
        .collect();
    let encoded_bytes: u64 = encoded.iter().map(|e| e.len).sum();
    assert!(
        encoded_bytes >= (SIZE - (HOLE.1 - HOLE.0)) * 9 / 10,
        "the source is not compressed ({encoded_bytes} bytes in encoded extents): {map:?}"
    );
    assert_eq!(
        changed_between(&prev, &prev),
        Some(vec![]),
        "a file and itself"
    );

    let writes: Vec<(u64, Vec<u8>)> = [5, 200, 201, 700]
        .iter()
        .map(|&b| (b * BLOCK, compressible(b + 1000)))
        .collect();
    let touched = rewrite(&src, &writes);
    clone_of(&src, &new);
    let got = changed_between(&prev, &new).expect("comparable maps");

    // Expected: the written blocks and every encoded extent of the
    // previous snapshot that one of them falls into, whole.
    let mut expected = block_ranges(&touched);
    for e in &encoded {
        let end = e.logical + e.len;
        if touched
            .iter()
            .any(|b| b * BLOCK < end && e.logical < (b + 1) * BLOCK)
        {
            let end = (end.div_ceil(BLOCK) * BLOCK).min(SIZE);
            expected.push((e.logical / BLOCK * BLOCK, end));
        }
    }
    let expected = merged(expected);
    let total = |r: &[(u64, u64)]| r.iter().map(|(s, e)| e - s).sum::<u64>();
    eprintln!(
        "{test}: {} encoded extents, {} KiB written, {} KiB counted as changed",
        encoded.len(),
        touched.len() as u64 * BLOCK / KIB,
        total(&got) / KIB
    );
    assert_eq!(got, expected, "changed ranges; the previous map: {map:?}");
    assert!(
        total(&got) < SIZE / 4,
        "untouched extents count as unchanged"
    );
}

// ---------------------------------------------------------------------------
// ext4: no reflink, but FIEMAP
// ---------------------------------------------------------------------------

/// ext4 refuses the clone; two copies of a file map to different blocks,
/// so all of it counts as changed (`Some`, not `None`: ext4 does map
/// extents), and a file against itself as unchanged.
#[test]
fn ext4_copies_count_as_changed_everywhere() {
    let test = "ext4_copies_count_as_changed_everywhere";
    let Some(s) = Scratch::new(Fs::Ext4, SCRATCH_SIZE, test) else {
        return;
    };
    let (src, copy) = (s.path("disk.img"), s.path("copy"));
    write_file(&src, &random_bytes(3, SIZE as usize));
    assert!(!reflink(&src, &s.path("clone")), "ext4 cloned a file");
    std::fs::copy(&src, &copy).unwrap();
    open(&copy).sync_all().unwrap();
    assert_eq!(changed_between(&src, &copy), Some(vec![(0, SIZE)]));
    assert_eq!(
        changed_between(&src, &src),
        Some(vec![]),
        "a file and itself"
    );
    // A hole in both (punched in each) is unchanged even so.
    punch(&src, HOLE);
    punch(&copy, HOLE);
    assert_eq!(
        changed_between(&src, &copy),
        Some(vec![(0, HOLE.0), (HOLE.1, SIZE)])
    );
}

// ---------------------------------------------------------------------------
// tmpfs: no FIEMAP
// ---------------------------------------------------------------------------

/// Where the filesystem cannot map extents, `changed` says so (`None`, for
/// a full read) instead of failing.
#[test]
fn tmpfs_cannot_be_compared() {
    let Some(fs) = Tmpfs::mount(4 * MIB) else {
        eprintln!("SKIPPED tmpfs_cannot_be_compared: cannot mount a tmpfs (not root?)");
        return;
    };
    let (a, b) = (fs.path().join("a"), fs.path().join("b"));
    write_file(&a, &random_bytes(4, MIB as usize));
    write_file(&b, &random_bytes(4, MIB as usize));
    assert!(
        !reflink(&a, &fs.path().join("clone")),
        "tmpfs cloned a file"
    );
    assert_eq!(changed_between(&a, &b), None);
    assert_eq!(changed_between(&a, &a), None);
}
