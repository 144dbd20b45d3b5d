//! Local-to-local syncs (vmsync spawns its own `--server` over pipes):
//! first copies, edits, shifted content, size changes, empty files, the
//! quick check and `-c`, `--inplace`, `--verify`, compression, and the
//! output options (`--json`, `-q`, `--stats`). Every test checks the bytes,
//! size and nanosecond mtime of the result and the reported byte counts.

use crate::common::*;

/// Syncs `pair.src` to `pair.dst` with extra options and returns the JSON.
fn sync(pair: &Pair, opts: &[&str]) -> (Run, serde_json::Value) {
    let (run, v) = vmsync().args(opts).arg(&pair.src).arg(&pair.dst).run_json();
    run.assert_ok();
    (run, v)
}

/// `data` with `insert` inserted at `at`.
fn with_insertion(data: &[u8], at: usize, insert: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + insert.len());
    v.extend_from_slice(&data[..at]);
    v.extend_from_slice(insert);
    v.extend_from_slice(&data[at..]);
    v
}

/// `data` with `n` bytes removed at `at`.
fn with_deletion(data: &[u8], at: usize, n: usize) -> Vec<u8> {
    let mut v = data[..at].to_vec();
    v.extend_from_slice(&data[at + n..]);
    v
}

/// `data` with `len` random bytes overwritten at `at`.
fn with_edit(data: &[u8], at: usize, len: usize, seed: u64) -> Vec<u8> {
    let mut v = data.to_vec();
    v[at..at + len].copy_from_slice(&random_bytes(seed, len));
    v
}

/// Highly compressible, zero-free text.
fn log_text(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 100);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(
            format!("{i:010} kernel: eth0: link up, 1000 Mbps, full duplex\n").as_bytes(),
        );
        i += 1;
    }
    v.truncate(len);
    v
}

#[test]
fn first_copy_of_random_data_sends_every_byte_once() {
    let pair = Pair::new();
    let data = random_bytes(1, (8 * MIB) as usize);
    pair.write_src(&data);

    let (run, v) = sync(&pair, &[]);

    assert_json_contract(&run, &v);
    pair.assert_synced();
    assert_eq!(json_u64(&v, "source_bytes"), 8 * MIB);
    assert_eq!(json_u64(&v, "literal_bytes"), 8 * MIB, "{v}");
    assert_eq!(json_u64(&v, "reused_bytes"), 0, "{v}");
    assert_eq!(json_u64(&v, "zero_bytes"), 0, "{v}");
    assert!(!json_bool(&v, "up_to_date"));
    // Random data does not compress: everything crosses the wire once.
    let wire = json_u64(&v, "wire_bytes");
    assert!(
        (8 * MIB..8 * MIB + 512 * KIB).contains(&wire),
        "wire_bytes {wire}"
    );
}

#[test]
fn first_copy_of_mixed_image_sends_nonzero_content_and_skips_zero_runs() {
    let pair = Pair::new();
    let data = mixed_bytes(2, (32 * MIB) as usize);
    pair.write_src(&data);
    let nonzero = count_nonzero(&data);

    let (run, v) = sync(&pair, &[]);

    assert_json_contract(&run, &v);
    pair.assert_synced();
    assert_accounting(&v);
    assert_eq!(json_u64(&v, "reused_bytes"), 0, "nothing to reuse: {v}");
    let literal = json_u64(&v, "literal_bytes");
    let zero = json_u64(&v, "zero_bytes");
    assert!(literal >= nonzero, "every non-zero byte must be sent: {v}");
    assert!(zero > 0, "the image has long zero runs: {v}");
    // Zero runs are only partly covered by whole chunks; allow 512 KiB of
    // zeros per MiB-scale run edge, i.e. a few MiB here.
    assert!(
        literal <= nonzero + 8 * MIB,
        "literal_bytes {literal} far above the {nonzero} non-zero bytes"
    );
    assert!(
        json_u64(&v, "wire_bytes") < literal,
        "mixed data compresses at the default level: {v}"
    );
}

#[test]
fn small_edit_in_256mib_image_sends_under_1mib() {
    let pair = Pair::new();
    let new = mixed_bytes(3, (256 * MIB) as usize);
    let old = with_edit(&new, (128 * MIB + 12_345) as usize, 4096, 33);
    pair.write_src(&new);
    pair.write_dst(&old);

    let (_, v) = sync(&pair, &[]);

    pair.assert_synced();
    assert_accounting(&v);
    let literal = json_u64(&v, "literal_bytes");
    let reused = json_u64(&v, "reused_bytes");
    let zero = json_u64(&v, "zero_bytes");
    assert!(literal > 0 && literal < MIB, "literal_bytes {literal}: {v}");
    assert!(reused + zero > 250 * MIB, "reused + zero too small: {v}");
    assert!(json_u64(&v, "wire_bytes") < 4 * MIB, "wire_bytes: {v}");
}

#[test]
fn scattered_edits_send_only_the_touched_chunks() {
    let pair = Pair::new();
    let old = mixed_bytes(4, (64 * MIB) as usize);
    let mut new = old.clone();
    for (i, at) in [MIB, 20 * MIB + 7, 40 * MIB + 4095, 63 * MIB]
        .iter()
        .enumerate()
    {
        let at = *at as usize;
        new[at..at + 100].copy_from_slice(&random_bytes(40 + i as u64, 100));
    }
    pair.write_src(&new);
    pair.write_dst(&old);

    let (_, v) = sync(&pair, &[]);

    pair.assert_synced();
    assert_accounting(&v);
    let literal = json_u64(&v, "literal_bytes");
    // 4 edits, each inside at most 2 chunks of at most 256 KiB.
    assert!(
        literal > 0 && literal <= 2 * MIB,
        "literal_bytes {literal}: {v}"
    );
}

#[test]
fn insertion_in_the_middle_sends_little() {
    let old = mixed_bytes(5, (64 * MIB) as usize);
    let new = with_insertion(&old, (32 * MIB + 333) as usize, b"INSERT!");
    assert_shift_sends_little(&old, &new);
}

#[test]
fn deletion_in_the_middle_sends_little() {
    let old = mixed_bytes(6, (64 * MIB) as usize);
    let new = with_deletion(&old, (32 * MIB + 333) as usize, 5);
    assert_shift_sends_little(&old, &new);
}

/// Syncs `new` over `old` (64 MiB, shifted by a few bytes in the middle):
/// content-defined chunks resynchronise, so little is sent and most reused.
#[track_caller]
fn assert_shift_sends_little(old: &[u8], new: &[u8]) {
    let pair = Pair::new();
    pair.write_src(new);
    pair.write_dst(old);

    let (_, v) = sync(&pair, &[]);

    pair.assert_synced();
    assert_accounting(&v);
    let literal = json_u64(&v, "literal_bytes");
    assert!(
        literal > 0 && literal < 2 * MIB,
        "literal_bytes {literal}: {v}"
    );
    assert!(json_u64(&v, "reused_bytes") > 50 * MIB, "{v}");
}

#[test]
fn larger_destination_is_truncated_to_the_source() {
    let pair = Pair::new();
    let src = random_bytes(7, (4 * MIB) as usize);
    let mut old = src.clone();
    old.extend_from_slice(&random_bytes(77, (3 * MIB) as usize));
    pair.write_src(&src);
    pair.write_dst(&old);

    let (_, v) = sync(&pair, &[]);

    pair.assert_synced();
    assert_accounting(&v);
    // Only the chunk at the old/new boundary can differ.
    assert!(json_u64(&v, "literal_bytes") <= 512 * KIB, "{v}");
}

#[test]
fn smaller_destination_is_extended_to_the_source() {
    let pair = Pair::new();
    let src = random_bytes(8, (4 * MIB) as usize);
    pair.write_src(&src);
    pair.write_dst(&src[..(2 * MIB) as usize]);

    let (_, v) = sync(&pair, &[]);

    pair.assert_synced();
    assert_accounting(&v);
    let literal = json_u64(&v, "literal_bytes");
    assert!(
        (2 * MIB..=2 * MIB + 512 * KIB).contains(&literal),
        "only the missing half (plus one boundary chunk) is sent: {v}"
    );
}

#[test]
fn empty_source_creates_an_empty_destination() {
    let pair = Pair::new();
    pair.write_src(b"");

    let (run, v) = sync(&pair, &[]);

    assert_json_contract(&run, &v);
    pair.assert_synced();
    assert_eq!(file_len(&pair.dst), 0);
    assert_eq!(json_u64(&v, "source_bytes"), 0);
    assert_eq!(json_u64(&v, "literal_bytes"), 0);
}

#[test]
fn empty_source_empties_an_existing_destination() {
    let pair = Pair::new();
    pair.write_src(b"");
    pair.write_dst(&random_bytes(9, 100_000));

    sync(&pair, &[]);

    pair.assert_synced();
    assert_eq!(file_len(&pair.dst), 0);
}

#[test]
fn unchanged_destination_is_skipped_by_the_quick_check() {
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(10, (16 * MIB) as usize));
    sync(&pair, &[]);
    pair.assert_synced();

    let (run, v) = sync(&pair, &[]);

    assert_json_contract(&run, &v);
    pair.assert_synced();
    assert!(json_bool(&v, "up_to_date"), "{v}");
    assert_eq!(json_u64(&v, "literal_bytes"), 0, "{v}");
    assert!(json_u64(&v, "wire_bytes") < 64 * KIB, "{v}");
}

#[test]
fn quick_check_trusts_size_and_mtime_and_checksum_mode_does_not() {
    let pair = Pair::new();
    let src = random_bytes(11, (2 * MIB) as usize);
    let stale = with_edit(&src, 1000, 10, 111);
    pair.write_src(&src);
    pair.write_dst(&stale);
    set_mtime_ns(&pair.dst, SOURCE_MTIME_NS); // same size, same mtime

    let (_, v) = sync(&pair, &[]);
    assert!(json_bool(&v, "up_to_date"), "{v}");
    assert_content(&pair.dst, &stale); // by design: nothing was read

    let (_, v) = sync(&pair, &["-c"]);
    assert!(!json_bool(&v, "up_to_date"), "{v}");
    assert!(json_u64(&v, "literal_bytes") > 0, "{v}");
    pair.assert_synced();
}

#[test]
fn checksum_sync_repairs_a_destination_changed_behind_its_back() {
    // The receiver may remember what it wrote (manifest cache); a later
    // write to the destination that keeps size and mtime must not fool -c.
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(30, (8 * MIB) as usize));
    sync(&pair, &[]);
    pair.assert_synced();
    patch_file(&pair.dst, 3 * MIB, &random_bytes(300, 4096));
    assert_eq!(mtime_ns(&pair.dst), mtime_ns(&pair.src));

    let (_, v) = sync(&pair, &["-c"]);

    pair.assert_synced();
    assert!(json_u64(&v, "literal_bytes") >= 4096, "{v}");
}

#[test]
fn checksum_mode_on_identical_files_sends_no_literals() {
    let pair = Pair::new();
    let data = mixed_bytes(12, (16 * MIB) as usize);
    pair.write_src(&data);
    pair.write_dst(&data);
    set_mtime_ns(&pair.dst, SOURCE_MTIME_NS);

    let (_, v) = sync(&pair, &["--checksum"]);

    pair.assert_synced();
    assert_accounting(&v);
    assert!(
        !json_bool(&v, "up_to_date"),
        "-c must not use the quick check: {v}"
    );
    assert_eq!(json_u64(&v, "literal_bytes"), 0, "{v}");
    assert!(json_u64(&v, "wire_bytes") < MIB, "{v}");
}

#[test]
fn identical_content_with_other_mtime_gets_the_source_mtime() {
    let pair = Pair::new();
    let data = random_bytes(13, (3 * MIB) as usize);
    pair.write_src(&data);
    pair.write_dst(&data);

    let (_, v) = sync(&pair, &[]);

    pair.assert_synced();
    assert_eq!(json_u64(&v, "literal_bytes"), 0, "{v}");
}

#[test]
fn copy_mode_replaces_the_destination_file() {
    let pair = Pair::new();
    let old = mixed_bytes(14, (8 * MIB) as usize);
    pair.write_src(&with_edit(&old, (4 * MIB) as usize, 4096, 141));
    pair.write_dst(&old);
    let ino = inode(&pair.dst);

    let (_, v) = sync(&pair, &["--write-mode", "copy"]);
    assert_eq!(v["write_mode"], "copy", "{v}");

    pair.assert_synced();
    assert_ne!(
        inode(&pair.dst),
        ino,
        "temp file + rename gives a new inode"
    );
}

#[test]
fn inplace_edit_keeps_the_inode_and_matches_the_source() {
    let pair = Pair::new();
    let old = mixed_bytes(15, (32 * MIB) as usize);
    pair.write_src(&with_edit(&old, (16 * MIB + 99) as usize, 4096, 151));
    pair.write_dst(&old);
    let ino = inode(&pair.dst);

    let (_, v) = sync(&pair, &["--inplace"]);

    pair.assert_synced();
    assert_eq!(inode(&pair.dst), ino, "--inplace must write the same file");
    assert!(json_u64(&v, "literal_bytes") < MIB, "{v}");
}

#[test]
fn unjournaled_inplace_insertion_moves_data_forward_correctly() {
    let pair = Pair::new();
    let old = mixed_bytes(16, (32 * MIB) as usize);
    let new = with_insertion(&old, (MIB + 5) as usize, &random_bytes(161, 3000));
    pair.write_src(&new);
    pair.write_dst(&old);
    let ino = inode(&pair.dst);

    // Data moving forward overlaps the old place of the data after it, so
    // --inplace may fetch such chunks from the source instead of copying
    // them (documented in --help); only the result is asserted.
    sync(&pair, &["--write-mode", "unsafe-inplace"]);

    pair.assert_synced();
    assert_eq!(inode(&pair.dst), ino);
}

#[test]
fn unjournaled_inplace_deletion_moves_data_backward_correctly() {
    let pair = Pair::new();
    let old = mixed_bytes(17, (32 * MIB) as usize);
    let new = with_deletion(&old, (MIB + 5) as usize, 3000);
    pair.write_src(&new);
    pair.write_dst(&old);
    let ino = inode(&pair.dst);

    let (_, v) = sync(&pair, &["--write-mode", "unsafe-inplace"]);

    pair.assert_synced();
    assert_eq!(inode(&pair.dst), ino);
    assert!(json_u64(&v, "literal_bytes") < 2 * MIB, "{v}");
}

#[test]
fn unjournaled_inplace_swapped_halves_are_reassembled_correctly() {
    // Every chunk moves, and each half's new place overlaps the other's old
    // place: naive in-place copying would read already-overwritten data.
    let pair = Pair::new();
    let a = random_bytes(18, (4 * MIB) as usize);
    let b = random_bytes(19, (4 * MIB) as usize);
    pair.write_src(&[b.as_slice(), a.as_slice()].concat());
    pair.write_dst(&[a.as_slice(), b.as_slice()].concat());
    let ino = inode(&pair.dst);

    sync(&pair, &["--write-mode", "unsafe-inplace"]);

    pair.assert_synced();
    assert_eq!(inode(&pair.dst), ino);
}

#[test]
fn inplace_into_missing_destination_creates_it() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(20, 300_000));

    sync(&pair, &["--inplace"]);

    pair.assert_synced();
}

#[test]
fn verify_passes_after_a_normal_sync() {
    let pair = Pair::new();
    let old = mixed_bytes(21, (16 * MIB) as usize);
    pair.write_src(&with_edit(&old, 5000, 4096, 211));
    pair.write_dst(&old);

    let (run, v) = sync(&pair, &["--verify"]);

    assert_json_contract(&run, &v);
    pair.assert_synced();
}

#[test]
fn verify_passes_with_inplace() {
    let pair = Pair::new();
    let old = mixed_bytes(22, (16 * MIB) as usize);
    pair.write_src(&with_insertion(&old, 70_000, b"abc"));
    pair.write_dst(&old);

    sync(&pair, &["--verify", "--inplace"]);

    pair.assert_synced();
}

#[test]
fn compression_reduces_wire_bytes_and_level_0_turns_it_off() {
    let pair = Pair::new();
    pair.write_src(&log_text((8 * MIB) as usize));

    let (_, v) = sync(&pair, &["--compress-level", "0"]);
    pair.assert_synced();
    let literal = json_u64(&v, "literal_bytes");
    assert_eq!(literal, 8 * MIB, "{v}");
    assert!(
        json_u64(&v, "wire_bytes") >= literal,
        "--compress-level 0 sends raw: {v}"
    );

    for level in ["3", "19"] {
        std::fs::remove_file(&pair.dst).unwrap();
        let (_, v) = sync(&pair, &["--compress-level", level]);
        pair.assert_synced();
        assert_eq!(json_u64(&v, "literal_bytes"), 8 * MIB, "{v}");
        assert!(
            json_u64(&v, "wire_bytes") < 2 * MIB,
            "level {level} should compress log text well: {v}"
        );
    }
}

#[test]
fn chunk_size_bounds_what_a_small_edit_resends() {
    let old = mixed_bytes(23, (16 * MIB) as usize);
    let new = with_edit(&old, (8 * MIB) as usize, 100, 231);
    // A 100-byte edit touches at most two chunks of at most 4 * AVG.
    for (size, bound) in [("16K", 128 * KIB), ("1M", 8 * MIB)] {
        let pair = Pair::new();
        pair.write_src(&new);
        pair.write_dst(&old);
        let (_, v) = sync(&pair, &["--chunk-size", size]);
        pair.assert_synced();
        assert_accounting(&v);
        let literal = json_u64(&v, "literal_bytes");
        assert!(
            (100..=bound).contains(&literal),
            "--chunk-size {size}: literal_bytes {literal}: {v}"
        );
    }
}

#[test]
fn json_output_is_a_single_object_on_stdout() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(24, 10_000));

    let (run, v) = sync(&pair, &["--stats"]);

    assert_json_contract(&run, &v);
    assert_eq!(
        run.stdout.trim().lines().count(),
        1,
        "one line of JSON: {run}"
    );
}

#[test]
fn quiet_success_prints_nothing_on_stderr() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(25, 100_000));

    let run = vmsync().arg("-q").arg(&pair.src).arg(&pair.dst).run();

    run.assert_ok();
    pair.assert_synced();
    assert_eq!(run.stderr, "", "{run}");
}

#[test]
fn stats_prints_a_summary_on_stdout() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(26, 100_000));

    let run = vmsync().arg("--stats").arg(&pair.src).arg(&pair.dst).run();

    run.assert_ok();
    pair.assert_synced();
    assert!(
        !run.stdout.trim().is_empty(),
        "--stats printed nothing: {run}"
    );
}

#[test]
fn path_with_a_colon_after_a_slash_is_local() {
    let tmp = tempdir();
    let src = tmp.path().join("disk:1.img");
    let dst = tmp.path().join("copy:2.img");
    write_file(&src, &random_bytes(27, 50_000));

    let run = vmsync().arg(&src).arg(&dst).run();

    run.assert_ok();
    assert_same_content(&src, &dst);
}

#[test]
fn relative_paths_work() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(28, 70_000));

    let run = vmsync()
        .arg("src/disk.img")
        .arg("dst/disk.img")
        .in_dir(pair.tmp.path())
        .run();

    run.assert_ok();
    pair.assert_synced();
}

#[test]
fn directory_destination_receives_the_source_file_name() {
    // From --help: DST may be a directory.
    let pair = Pair::new();
    pair.write_src(&random_bytes(29, 80_000));

    vmsync()
        .arg(&pair.src)
        .arg(pair.dst_dir())
        .run()
        .assert_ok();

    pair.assert_synced();
}

#[test]
fn fixed_blocks_send_only_the_changed_pages_but_not_shifted_data() {
    let old = mixed_bytes(41, (32 * MIB) as usize);
    // Two scattered 8 KiB page rewrites, aligned as a database writes them.
    let mut edited = with_edit(&old, (5 * MIB) as usize, 8192, 42);
    edited = with_edit(&edited, (17 * MIB + 64 * KIB) as usize, 8192, 43);
    let pair = Pair::new();
    pair.write_src(&edited);
    pair.write_dst(&old);
    let (_, v) = sync(&pair, &["--block-size", "64K"]);
    pair.assert_synced();
    assert_accounting(&v);
    assert_eq!(json_u64(&v, "literal_bytes"), 2 * 8192, "{v}");

    // One inserted byte moves everything after it off the block grid:
    // fixed blocks resend that part, content-defined chunks do not.
    let shifted = with_insertion(&old, (16 * MIB) as usize, b"!");
    let mut literal = Vec::new();
    for opts in [&["--block-size", "64K"][..], &[][..]] {
        let pair = Pair::new();
        pair.write_src(&shifted);
        pair.write_dst(&old);
        let (_, v) = sync(&pair, opts);
        pair.assert_synced();
        literal.push(json_u64(&v, "literal_bytes"));
    }
    assert!(
        literal[0] > 4 * MIB,
        "fixed blocks after a shift: {literal:?}"
    );
    assert!(
        literal[1] < 512 * KIB,
        "content-defined after a shift: {literal:?}"
    );
}

#[test]
fn bad_block_sizes_and_both_chunkings_are_usage_errors() {
    let pair = Pair::new();
    pair.write_src(b"x");
    for bad in [
        &["--block-size", "3K"][..],
        &["--block-size", "8M"],
        &["--block-size", "64K", "--chunk-size", "16K"],
    ] {
        let run = vmsync().args(bad).arg(&pair.src).arg(&pair.dst).run();
        run.assert_code(exit::USAGE);
    }
    assert!(!pair.dst.exists());
}

#[test]
fn verbose_logs_each_phase_of_both_ends() {
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(44, MIB as usize));
    let run = vmsync().arg("-v").arg(&pair.src).arg(&pair.dst).run();
    run.assert_ok();
    pair.assert_synced();
    for phase in [
        "sender: scanning",
        "sender: scan done",
        "receiver: committed",
    ] {
        assert!(
            run.stderr.contains(phase),
            "no '{phase}' in stderr:\n{}",
            run.stderr
        );
    }
    let quiet = vmsync()
        .args(["-v", "-q", "-c"])
        .arg(&pair.src)
        .arg(&pair.dst)
        .run();
    quiet.assert_ok();
    assert!(
        !quiet.stderr.contains("receiver:"),
        "-q must silence -v:\n{}",
        quiet.stderr
    );
}

#[test]
fn journal_turns_into_a_copy_when_most_of_the_file_changes() {
    // Every chunk moves: the journal would be as large as a copy and be
    // written twice, so the run writes a copy instead (a new inode), and
    // says so.
    let pair = Pair::new();
    let a = random_bytes(21, (4 * MIB) as usize);
    let b = random_bytes(22, (4 * MIB) as usize);
    pair.write_src(&[b.as_slice(), a.as_slice()].concat());
    pair.write_dst(&[a.as_slice(), b.as_slice()].concat());
    let ino = inode(&pair.dst);

    let (_, v) = sync(&pair, &["--inplace"]);

    pair.assert_synced();
    assert_eq!(v["write_mode"], "copy", "{v}");
    assert_ne!(inode(&pair.dst), ino);
    assert_eq!(dir_entries(pair.dst.parent().unwrap()), ["disk.img"]);
}
