//! `--seed FILE` (more local chunks for the receiver, e.g. the golden image
//! a VM disk was cloned from) and `-n/--dry-run` (compare and count, write
//! nothing), locally and through the relay (where seeds are remote paths).

use std::path::Path;

use crate::common::*;

/// A 24 MiB "golden image" and a clone of it with two small changes.
fn base_and_clone(pair: &Pair) -> (std::path::PathBuf, Vec<u8>) {
    let base = pair.tmp.path().join("base.img");
    let golden = mixed_bytes(61, (24 * MIB) as usize);
    write_file(&base, &golden);
    set_mtime_ns(&base, OLD_MTIME_NS);
    let mut clone = golden.clone();
    clone[(5 * MIB) as usize..(5 * MIB + 5000) as usize].copy_from_slice(&random_bytes(62, 5000));
    clone[(17 * MIB) as usize..(18 * MIB) as usize]
        .copy_from_slice(&random_bytes(63, MIB as usize));
    pair.write_src(&clone);
    (base, golden)
}

#[track_caller]
fn assert_seed_untouched(base: &Path, golden: &[u8]) {
    assert_content(base, golden);
    assert_eq!(mtime_ns(base), OLD_MTIME_NS, "seed mtime changed");
}

#[test]
fn seed_makes_a_clones_first_copy_send_only_the_difference() {
    let pair = Pair::new();
    let (base, golden) = base_and_clone(&pair);
    let (run, v) = run_json(&[&"--seed", &base, &pair.src, &pair.dst]);
    run.assert_ok();
    pair.assert_synced();
    let literal = json_u64(&v, "literal_bytes");
    assert!(
        literal < 24 * MIB / 10,
        "a clone of the seed sent {literal} bytes of 24 MiB\n{v}"
    );
    assert!(json_u64(&v, "reused_bytes") > 20 * MIB, "{v}");
    assert_seed_untouched(&base, &golden);

    // Several seeds, the useful one last; and pushed through the relay,
    // where the seed is a path on the receiving host.
    std::fs::remove_file(&pair.dst).unwrap();
    let decoy = pair.tmp.path().join("decoy.img");
    write_file(&decoy, &random_bytes(64, MIB as usize));
    let relay = Relay::new(pair.tmp.path(), "");
    let (run, v) = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .arg("--seed")
        .arg(&decoy)
        .arg("--seed")
        .arg(&base)
        .arg(&pair.src)
        .arg(format!("127.0.0.1:{}", pair.dst.display()))
        .run_json();
    relay.wait_server_gone();
    run.assert_ok();
    pair.assert_synced();
    assert!(json_u64(&v, "literal_bytes") < 24 * MIB / 10, "{v}");
    assert!(json_u64(&v, "wire_bytes") < 24 * MIB / 10, "{v}");
    assert_seed_untouched(&base, &golden);
}

#[test]
fn a_missing_or_unusable_seed_is_an_error_naming_it() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(65, 100_000));
    let missing = pair.tmp.path().join("no-such-base.img");
    let run = run(&[&"--seed", &missing, &pair.src, &pair.dst]);
    run.assert_code(exit::IO);
    assert!(run.stderr.contains("no-such-base.img"), "{run}");
    assert!(!pair.dst.exists());
    assert_no_stray_files(&pair.dst_dir(), &[]);

    let dir = pair.tmp.path().join("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let run = crate::common::run(&[&"--seed", &dir, &pair.src, &pair.dst]);
    run.assert_code(exit::IO);
    assert!(run.stderr.contains("a-directory"), "{run}");
    assert!(!pair.dst.exists());
}

#[test]
fn dry_run_counts_what_would_be_sent_and_writes_nothing() {
    let pair = Pair::new();
    let old = mixed_bytes(66, (16 * MIB) as usize);
    pair.write_dst(&old);
    let mut new = old.clone();
    new[(3 * MIB) as usize..(4 * MIB) as usize].copy_from_slice(&random_bytes(67, MIB as usize));
    pair.write_src(&new);

    for extra in [&[][..], &["--inplace"][..], &["-c"][..]] {
        let (run, v) = vmsync()
            .args(["-n"])
            .args(extra)
            .arg(&pair.src)
            .arg(&pair.dst)
            .run_json();
        run.assert_ok();
        assert_json_contract(&run, &v);
        assert!(json_bool(&v, "dry_run"), "{v}");
        let literal = json_u64(&v, "literal_bytes");
        // The changed MiB, plus at most a chunk on each side.
        assert!((MIB..MIB + 2 * 256 * KIB).contains(&literal), "{v}");
        assert_eq!(
            literal + json_u64(&v, "reused_bytes") + json_u64(&v, "zero_bytes"),
            16 * MIB
        );
        let diffs = json_differences(&v);
        assert!(
            diffs
                .iter()
                .all(|&(o, l)| o <= 3 * MIB + MIB && o + l >= 3 * MIB),
            "ranges to fetch lie around the change: {diffs:?}"
        );
        assert_eq!(diffs.iter().map(|d| d.1).sum::<u64>(), literal);
        // Nothing written: same bytes, same mtime, no partial file.
        assert_old_destination(&pair, &old);
    }

    // Without --json it says so in words, with the ranges.
    let run = run(&[&"-n", &pair.src, &pair.dst]);
    run.assert_ok();
    assert!(
        run.stdout.starts_with("dry run: would send ")
            && run.stdout.contains("nothing was written"),
        "{run}"
    );
    assert!(run.stdout.contains("  offset "), "{run}");
    assert_old_destination(&pair, &old);

    // Through the relay, both directions.
    let relay = Relay::new(pair.tmp.path(), "");
    let (run, v) = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .arg("--dry-run")
        .arg(format!("127.0.0.1:{}", pair.src.display()))
        .arg(&pair.dst)
        .run_json();
    relay.wait_server_gone();
    run.assert_ok();
    assert!(
        json_bool(&v, "dry_run") && json_u64(&v, "literal_bytes") >= MIB,
        "{v}"
    );
    assert_old_destination(&pair, &old);

    // A missing destination: everything would be sent, nothing is created.
    std::fs::remove_file(&pair.dst).unwrap();
    let (run, v) = run_json(&[&"-n", &pair.src, &pair.dst]);
    run.assert_ok();
    assert_eq!(json_u64(&v, "literal_bytes"), count_nonzero_chunks(&new));
    assert_no_stray_files(&pair.dst_dir(), &[]);
}

/// What a first copy of `data` sends (every chunk that is not all zeros),
/// measured by a real sync into a scratch directory.
fn count_nonzero_chunks(data: &[u8]) -> u64 {
    let tmp = tempdir();
    let (src, dst) = (tmp.path().join("s"), tmp.path().join("d"));
    write_file(&src, data);
    let (run, v) = run_json(&[&src, &dst]);
    run.assert_ok();
    json_u64(&v, "literal_bytes")
}

#[test]
fn dry_run_of_an_up_to_date_destination_says_so() {
    let pair = Pair::new();
    let data = random_bytes(68, 300_000);
    pair.write_src(&data);
    run(&[&pair.src, &pair.dst]).assert_ok();
    let before = mtime_ns(&pair.dst);
    let (first, v) = run_json(&[&"-n", &pair.src, &pair.dst]);
    first.assert_ok();
    assert!(
        json_bool(&v, "up_to_date") && json_bool(&v, "dry_run"),
        "{v}"
    );
    assert_eq!(json_u64(&v, "literal_bytes"), 0);
    assert_eq!(mtime_ns(&pair.dst), before);
    // -n with --check makes no sense and is refused.
    run(&[&"-n", &"--check", &pair.src, &pair.dst]).assert_code(exit::USAGE);
}
