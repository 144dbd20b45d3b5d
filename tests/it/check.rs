//! `--check`: compares source and destination without changing anything.
//! Identical files exit 0 with `identical: true`; differences exit 1 with
//! `identical: false` and byte ranges in `differences` that cover every
//! changed offset. The destination's bytes, mtime and inode are untouched.

use crate::common::*;
use std::path::Path;

/// A source and a destination synced from it (same bytes, size, mtime).
fn synced_pair(seed: u64, len: u64) -> Pair {
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(seed, len as usize));
    vmsync().arg(&pair.src).arg(&pair.dst).run().assert_ok();
    pair.assert_synced();
    pair
}

/// Flips the byte at `offset` of `path`; the file's mtime changes too
/// (to a value different from the source's) unless `keep_mtime`.
fn flip_byte(path: &Path, offset: u64, keep_mtime: bool) {
    let mut data = std::fs::read(path).unwrap();
    data[offset as usize] ^= 0xff;
    if keep_mtime {
        patch_file(path, offset, &data[offset as usize..=offset as usize]);
    } else {
        write_file(path, &data);
        set_mtime_ns(path, OLD_MTIME_NS);
    }
}

/// Runs `--check` with extra options, asserting that nothing changed.
fn check(pair: &Pair, opts: &[&str]) -> (Run, serde_json::Value) {
    let before = std::fs::read(&pair.dst).unwrap();
    let (mtime, ino) = (mtime_ns(&pair.dst), inode(&pair.dst));
    let (run, v) = vmsync()
        .arg("--check")
        .args(opts)
        .arg(&pair.src)
        .arg(&pair.dst)
        .run_json();
    assert_no_panic(&run);
    assert_json_contract(&run, &v);
    assert_content(&pair.dst, &before);
    assert_eq!(mtime_ns(&pair.dst), mtime, "--check changed the mtime");
    assert_eq!(inode(&pair.dst), ino, "--check replaced the file");
    assert_no_stray_files(&pair.dst_dir(), &["disk.img"]);
    (run, v)
}

#[track_caller]
fn assert_covered(v: &serde_json::Value, offset: u64) {
    let diffs = json_differences(v);
    assert!(
        diffs.iter().any(|&(o, l)| o <= offset && offset < o + l),
        "no entry of differences covers offset {offset}: {diffs:?}"
    );
}

#[test]
fn identical_files_exit_0_and_report_identical() {
    let pair = synced_pair(1, 16 * MIB);

    let (run, v) = check(&pair, &[]);

    run.assert_code(exit::OK);
    assert!(json_bool(&v, "identical"), "{v}");
    assert!(json_differences(&v).is_empty(), "{v}");
    assert_eq!(json_u64(&v, "differing_bytes"), 0, "{v}");
}

#[test]
fn identical_files_exit_0_with_checksum() {
    let pair = synced_pair(2, 8 * MIB);

    let (run, v) = check(&pair, &["-c"]);

    run.assert_code(exit::OK);
    assert!(json_bool(&v, "identical"), "{v}");
    assert_eq!(
        json_u64(&v, "literal_bytes"),
        0,
        "--check sends no data: {v}"
    );
}

#[test]
fn one_flipped_byte_exits_1_and_is_located() {
    let pair = synced_pair(3, 16 * MIB);
    let offset = 9 * MIB + 4321;
    flip_byte(&pair.dst, offset, false);

    let (run, v) = check(&pair, &[]);

    run.assert_code(exit::DIFFERENT);
    assert!(!json_bool(&v, "identical"), "{v}");
    assert_covered(&v, offset);
    let differing = json_u64(&v, "differing_bytes");
    assert!(
        (1..=MIB).contains(&differing),
        "one flipped byte is at most a couple of chunks: {v}"
    );
    assert_eq!(
        json_u64(&v, "literal_bytes"),
        0,
        "--check sends no data: {v}"
    );
}

#[test]
fn flip_hidden_behind_equal_size_and_mtime_is_found_with_checksum() {
    let pair = synced_pair(4, 8 * MIB);
    let offset = 3 * MIB + 17;
    flip_byte(&pair.dst, offset, true);
    assert_eq!(mtime_ns(&pair.dst), mtime_ns(&pair.src));

    let (run, v) = check(&pair, &["--checksum"]);

    run.assert_code(exit::DIFFERENT);
    assert!(!json_bool(&v, "identical"), "{v}");
    assert_covered(&v, offset);
}

#[test]
fn several_changed_regions_are_all_reported() {
    let pair = synced_pair(5, 16 * MIB);
    let offsets = [0, 5 * MIB + 1, 11 * MIB + 65_536, 16 * MIB - 1];
    for &o in &offsets {
        flip_byte(&pair.dst, o, false);
    }

    let (run, v) = check(&pair, &[]);

    run.assert_code(exit::DIFFERENT);
    for o in offsets {
        assert_covered(&v, o);
    }
    let diffs = json_differences(&v);
    let sum: u64 = diffs.iter().map(|&(_, l)| l).sum();
    assert_eq!(json_u64(&v, "differing_bytes"), sum, "{v}");
}

#[test]
fn shorter_destination_is_different() {
    let pair = Pair::new();
    let data = random_bytes(6, (2 * MIB) as usize);
    pair.write_src(&data);
    pair.write_dst(&data[..(MIB + 100) as usize]);

    let (run, v) = check(&pair, &[]);

    run.assert_code(exit::DIFFERENT);
    assert!(!json_bool(&v, "identical"), "{v}");
    assert_covered(&v, 2 * MIB - 1);
}

#[test]
fn longer_destination_is_different() {
    let pair = Pair::new();
    let data = random_bytes(7, (2 * MIB) as usize);
    pair.write_src(&data[..MIB as usize]);
    pair.write_dst(&data);

    let (run, v) = check(&pair, &[]);

    run.assert_code(exit::DIFFERENT);
    assert!(!json_bool(&v, "identical"), "{v}");
    assert!(json_u64(&v, "differing_bytes") > 0, "{v}");
}

#[test]
fn exit_codes_without_json() {
    let pair = synced_pair(8, MIB);
    vmsync()
        .arg("--check")
        .arg(&pair.src)
        .arg(&pair.dst)
        .run()
        .assert_code(exit::OK);

    flip_byte(&pair.dst, 1000, false);
    vmsync()
        .arg("--check")
        .arg(&pair.src)
        .arg(&pair.dst)
        .run()
        .assert_code(exit::DIFFERENT);
}

#[test]
fn check_then_sync_then_check_again() {
    let pair = synced_pair(9, 4 * MIB);
    flip_byte(&pair.dst, 2 * MIB, false);
    check(&pair, &[]).0.assert_code(exit::DIFFERENT);

    vmsync().arg(&pair.src).arg(&pair.dst).run().assert_ok();
    pair.assert_synced();

    let (run, v) = check(&pair, &["-c"]);
    run.assert_code(exit::OK);
    assert!(json_bool(&v, "identical"), "{v}");
}
