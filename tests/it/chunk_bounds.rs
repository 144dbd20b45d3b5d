//! Files whose sizes sit exactly at and around the chunk bounds. With
//! `--chunk-size 4K` chunks are 1 KiB..16 KiB, so sizes 0, 1, 1023, 1024,
//! 1025, 16383, 16384, 16385 hit every edge of the chunker. Each size is
//! copied fresh, then synced over a one-byte change and over an unrelated
//! file, then confirmed with `--check -c`. A property test does the same for
//! random sizes and random insert/delete/overwrite/zero edits.

use crate::common::*;
use proptest::prelude::*;

const BOUNDARY_SIZES: &[usize] = &[0, 1, 1023, 1024, 1025, 16383, 16384, 16385];

/// Syncs with 4 KiB average chunks and checks the result fully.
fn sync_4k(pair: &Pair) -> serde_json::Value {
    let (run, v) = vmsync()
        .args(["--chunk-size", "4K"])
        .arg(&pair.src)
        .arg(&pair.dst)
        .run_json();
    run.assert_ok();
    pair.assert_synced();
    assert_eq!(
        json_u64(&v, "source_bytes"),
        file_len(&pair.src),
        "source_bytes: {v}"
    );
    v
}

fn check_identical(pair: &Pair) {
    vmsync()
        .args(["--check", "-c", "--chunk-size", "4K"])
        .arg(&pair.src)
        .arg(&pair.dst)
        .run()
        .assert_code(exit::OK);
}

fn exercise_size(size: usize, seed: u64) {
    let data = random_bytes(seed, size);

    // Fresh copy.
    let pair = Pair::new();
    pair.write_src(&data);
    let v = sync_4k(&pair);
    assert_eq!(
        json_u64(&v, "literal_bytes"),
        size as u64,
        "size {size}: {v}"
    );
    check_identical(&pair);

    // Over a copy with one byte changed (last byte: the tail chunk).
    if size > 0 {
        let mut old = data.clone();
        old[size - 1] ^= 0x55;
        let pair = Pair::new();
        pair.write_src(&data);
        pair.write_dst(&old);
        let v = sync_4k(&pair);
        assert!(
            json_u64(&v, "literal_bytes") <= (16 * KIB).min(size as u64),
            "size {size}: one changed byte sends at most one max-size chunk: {v}"
        );
        check_identical(&pair);
    }

    // Over an unrelated, larger file.
    let pair = Pair::new();
    pair.write_src(&data);
    pair.write_dst(&random_bytes(seed + 1000, size + 5000));
    sync_4k(&pair);
    check_identical(&pair);
}

#[test]
fn sizes_at_chunk_bounds_sync_exactly() {
    for (i, &size) in BOUNDARY_SIZES.iter().enumerate() {
        exercise_size(size, i as u64);
    }
}

#[test]
fn sizes_around_multiples_of_the_max_chunk_sync_exactly() {
    for (i, size) in [32767, 32768, 32769, 65535, 65536, 65537, 1 << 20]
        .into_iter()
        .enumerate()
    {
        exercise_size(size, 100 + i as u64);
    }
}

#[test]
fn all_zero_files_at_chunk_bounds_are_holes() {
    for &size in BOUNDARY_SIZES {
        let pair = Pair::new();
        pair.write_src(&vec![0u8; size]);
        let v = sync_4k(&pair);
        assert_eq!(json_u64(&v, "literal_bytes"), 0, "size {size}: {v}");
        assert_eq!(json_u64(&v, "zero_bytes"), size as u64, "size {size}: {v}");
    }
}

#[test]
fn extreme_chunk_sizes_are_accepted() {
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(7, (3 * MIB) as usize));
    for size in ["4K", "1M", "64K"] {
        let _ = std::fs::remove_file(&pair.dst);
        vmsync()
            .args(["--chunk-size", size])
            .arg(&pair.src)
            .arg(&pair.dst)
            .run()
            .assert_ok();
        pair.assert_synced();
    }
}

/// One edit applied to the old file to get the new one.
#[derive(Debug, Clone)]
enum Edit {
    Insert { at: f64, len: usize },
    Delete { at: f64, len: usize },
    Overwrite { at: f64, len: usize },
    Zero { at: f64, len: usize },
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    let at = 0.0..1.0f64;
    prop_oneof![
        (at.clone(), 1..5000usize).prop_map(|(at, len)| Edit::Insert { at, len }),
        (at.clone(), 1..5000usize).prop_map(|(at, len)| Edit::Delete { at, len }),
        (at.clone(), 1..5000usize).prop_map(|(at, len)| Edit::Overwrite { at, len }),
        (at, 1..40_000usize).prop_map(|(at, len)| Edit::Zero { at, len }),
    ]
}

fn apply(data: &mut Vec<u8>, edit: &Edit, seed: u64) {
    let pos = |at: f64, data: &Vec<u8>| ((data.len() as f64) * at) as usize;
    match *edit {
        Edit::Insert { at, len } => {
            let p = pos(at, data);
            data.splice(p..p, random_bytes(seed, len));
        }
        Edit::Delete { at, len } => {
            let p = pos(at, data);
            let end = (p + len).min(data.len());
            data.drain(p..end);
        }
        Edit::Overwrite { at, len } => {
            let p = pos(at, data);
            let end = (p + len).min(data.len());
            data[p..end].copy_from_slice(&random_bytes(seed, end - p));
        }
        Edit::Zero { at, len } => {
            let p = pos(at, data);
            let end = (p + len).min(data.len());
            data[p..end].fill(0);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_sizes_and_edits_sync_exactly(
        seed in any::<u64>(),
        size in 0usize..300_000,
        edits in proptest::collection::vec(edit_strategy(), 0..6),
        inplace in any::<bool>(),
    ) {
        let old = mixed_bytes(seed, size);
        let mut new = old.clone();
        for (i, e) in edits.iter().enumerate() {
            apply(&mut new, e, seed ^ i as u64);
        }
        let pair = Pair::new();
        pair.write_src(&new);
        pair.write_dst(&old);
        let mut cmd = vmsync().args(["--chunk-size", "4K"]);
        if inplace {
            cmd = cmd.arg("--inplace");
        }
        let (run, v) = cmd.arg(&pair.src).arg(&pair.dst).run_json();
        run.assert_ok();
        pair.assert_synced();
        if !inplace {
            assert_accounting(&v);
        }
        check_identical(&pair);
    }
}
