//! `--check --sample K/N`: slice K of N checks its share of the file, and
//! the N slices together check every byte exactly once.

use crate::common::*;

#[test]
fn samples_cover_the_file_exactly_once_and_find_each_corruption_once() {
    let pair = Pair::new();
    let size = 21 * MIB + 12_345;
    let data = mixed_bytes(71, size as usize);
    pair.write_src(&data);
    run(&[&pair.src, &pair.dst]).assert_ok();
    // One flipped byte in many places, some in the same stripe.
    let spots = [
        0,
        4095,
        MIB,
        3 * MIB + 7,
        10 * MIB,
        10 * MIB + 1,
        20 * MIB,
        size - 1,
    ];
    let mut corrupt = data.clone();
    for &o in &spots {
        corrupt[o as usize] ^= 0x40;
    }
    write_file(&pair.dst, &corrupt);

    for n in [1u64, 3, 7] {
        let mut checked = 0;
        let mut found: Vec<u64> = Vec::new();
        for k in 1..=n {
            let (run, v) = run_json(&[
                &"--check",
                &"--sample",
                &format!("{k}/{n}"),
                &pair.src,
                &pair.dst,
            ]);
            assert_json_contract(&run, &v);
            let diffs = json_differences(&v);
            let hits: Vec<u64> = spots
                .iter()
                .copied()
                .filter(|&o| diffs.iter().any(|&(a, l)| a <= o && o < a + l))
                .collect();
            run.assert_code(if hits.is_empty() {
                exit::OK
            } else {
                exit::DIFFERENT
            });
            let this = json_u64(&v, "checked_bytes");
            assert!(this > 0 && this <= size, "{v}");
            if n > 1 {
                assert!(this < size, "slice {k}/{n} checked the whole file: {v}");
            }
            checked += this;
            found.extend(hits);
        }
        found.sort();
        assert_eq!(
            checked, size,
            "slices of {n} check {checked} of {size} bytes"
        );
        assert_eq!(
            found, spots,
            "each corrupted byte found exactly once over {n} slices"
        );
    }

    // A full check agrees, and --sample needs --check and a sane K/N.
    let (run, v) = run_json(&[&"--check", &pair.src, &pair.dst]);
    run.assert_code(exit::DIFFERENT);
    assert_eq!(json_u64(&v, "checked_bytes"), size);
    for bad in ["0/7", "8/7", "3", "a/b", "1/0"] {
        let r = crate::common::run(&[&"--check", &"--sample", &bad, &pair.src, &pair.dst]);
        r.assert_code(exit::USAGE);
        assert!(r.stderr.contains("--sample"), "{r}");
    }
    crate::common::run(&[&"--sample", &"1/2", &pair.src, &pair.dst]).assert_code(exit::USAGE);
    assert_content(&pair.dst, &corrupt);
}

#[test]
fn a_sampled_check_over_the_relay_and_of_a_missing_destination() {
    let pair = Pair::new();
    let data = random_bytes(72, (9 * MIB) as usize);
    pair.write_src(&data);
    let relay = Relay::new(pair.tmp.path(), "");
    let (run, v) = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .args(["--check", "--sample", "2/3"])
        .arg(format!("127.0.0.1:{}", pair.src.display()))
        .arg(&pair.dst)
        .run_json();
    relay.wait_server_gone();
    run.assert_code(exit::DIFFERENT);
    // Missing: exactly the slice's bytes differ.
    assert_eq!(
        json_u64(&v, "differing_bytes"),
        json_u64(&v, "checked_bytes")
    );
    assert!(json_u64(&v, "checked_bytes") < 9 * MIB);
    assert!(!pair.dst.exists());

    write_file(&pair.dst, &data);
    let relay = Relay::new(pair.tmp.path(), "");
    let (run, _) = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .args(["--check", "--sample", "3/3"])
        .arg(&pair.src)
        .arg(format!("127.0.0.1:{}", pair.dst.display()))
        .run_json();
    relay.wait_server_gone();
    run.assert_ok();
}
