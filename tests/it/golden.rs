//! Golden cut points: both ends of a sync must cut identically, across
//! versions of vmsync and of the `fastcdc` crate. If this test fails after a
//! dependency update, the update changed where chunks are cut: a new vmsync
//! would then see an old destination as entirely different. Do not update
//! the constants without bumping the protocol version.

use std::fs::File;
use std::io::Write;

use vmsync::content::chunk::{ChunkParams, Cutter};
use vmsync::content::scan::{scan, Content, Extents};

/// A fixed pseudo-random input (xorshift64), with a repetitive stretch and
/// a zero run so both kinds of cut show up.
fn input() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v: Vec<u8> = (0..3_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    for (i, b) in v[1_000_000..1_400_000].iter_mut().enumerate() {
        *b = b"the quick brown fox jumps over the lazy dog\n"[i % 44];
    }
    v[2_000_000..2_600_000].fill(0);
    v
}

fn cuts(avg: u64) -> Vec<usize> {
    let data = input();
    let c = Cutter::new(ChunkParams::new(avg).unwrap());
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        pos += c.cut(&data[pos..]);
        out.push(pos);
    }
    out
}

fn digest(cuts: &[usize]) -> String {
    let mut h = blake3::Hasher::new();
    for c in cuts {
        h.update(&(*c as u64).to_le_bytes());
    }
    h.finalize().to_hex()[..16].to_string()
}

#[test]
fn default_64k_cut_points_are_stable() {
    let c = cuts(64 * 1024);
    assert_eq!(
        &c[..8],
        &GOLDEN_64K_FIRST,
        "fastcdc cut points changed (first eight)"
    );
    assert_eq!(c.len(), GOLDEN_64K_COUNT);
    assert_eq!(digest(&c), GOLDEN_64K_DIGEST);
}

#[test]
fn small_4k_cut_points_are_stable() {
    let c = cuts(4096);
    assert_eq!(
        &c[..8],
        &GOLDEN_4K_FIRST,
        "fastcdc cut points changed (first eight)"
    );
    assert_eq!(c.len(), GOLDEN_4K_COUNT);
    assert_eq!(digest(&c), GOLDEN_4K_DIGEST);
}

/// The whole scan pipeline (holes, zero runs, hashing) over a file with a
/// real hole gives the pinned chunk records.
#[test]
fn file_scan_records_are_stable() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img");
    let mut f = File::create(&p).unwrap();
    f.write_all(&input()).unwrap();
    // A 5 MiB hole after the data.
    f.set_len(3_000_000 + (5 << 20)).unwrap();
    drop(f);
    let f = File::open(&p).unwrap();
    let size = f.metadata().unwrap().len();
    let cutter = Cutter::new(ChunkParams::default());
    let mut ext = Extents::of(&f, size);
    let mut h = blake3::Hasher::new();
    let (mut n, mut zeros) = (0usize, 0u64);
    scan(&f, size, &mut ext, &cutter, |recs| {
        for r in recs {
            n += 1;
            h.update(&r.offset.to_le_bytes());
            h.update(&r.len.to_le_bytes());
            match r.content {
                Content::Data(hash) => {
                    h.update(&hash.0);
                }
                Content::Zero => zeros += u64::from(r.len),
            }
        }
        Ok(())
    })
    .unwrap();
    assert_eq!((n, zeros), GOLDEN_SCAN_COUNTS);
    assert_eq!(&h.finalize().to_hex()[..16], GOLDEN_SCAN_DIGEST);
}

const GOLDEN_64K_FIRST: [usize; 8] = [
    107373, 127427, 195752, 311878, 394612, 619882, 679019, 768984,
];
const GOLDEN_64K_COUNT: usize = 27;
const GOLDEN_64K_DIGEST: &str = "229714927d2afd8f";
const GOLDEN_4K_FIRST: [usize; 8] = [3581, 5970, 14192, 19374, 25928, 31663, 37531, 44409];
const GOLDEN_4K_COUNT: usize = 472;
const GOLDEN_4K_DIGEST: &str = "a01f7411dd73274d";
const GOLDEN_SCAN_COUNTS: (usize, u64) = (47, 5248854);
const GOLDEN_SCAN_DIGEST: &str = "633f94dc939c93de";
