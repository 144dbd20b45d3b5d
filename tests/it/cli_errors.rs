//! Failures and their exit codes: usage errors (2), file I/O errors (3),
//! connection errors (4) and protocol errors (5). Every failure must leave
//! the destination as it was, print a useful message (never a panic), and
//! with `--json` still print the full JSON object with `error` set.

use crate::common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A source and an existing destination, both with known content.
fn pair_with_old_dst() -> (Pair, Vec<u8>) {
    let pair = Pair::new();
    pair.write_src(&random_bytes(1, 300_000));
    let old = random_bytes(2, 200_000);
    pair.write_dst(&old);
    (pair, old)
}

/// An executable "remote vmsync" that answers with endless garbage.
fn garbage_server(dir: &Path) -> String {
    let path = dir.join("garbage-server.sh");
    write_file(
        &path,
        b"#!/bin/sh\nexec yes 'this is not the vmsync protocol, sorry'\n",
    );
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

#[test]
fn missing_operands_are_usage_errors() {
    let pair = Pair::new();
    pair.write_src(b"x");
    run(&[]).assert_code(exit::USAGE);
    run(&[&pair.src]).assert_code(exit::USAGE);
    run(&[&pair.src, &pair.dst, &"extra"]).assert_code(exit::USAGE);
    assert!(!pair.dst.exists());
}

#[test]
fn unknown_option_is_a_usage_error() {
    let (pair, old) = pair_with_old_dst();
    let r = run(&[&"--no-such-option", &pair.src, &pair.dst]);
    r.assert_code(exit::USAGE);
    assert!(r.stderr.contains("--no-such-option"), "{r}");
    assert_old_destination(&pair, &old);
}

#[test]
fn remote_to_remote_is_refused() {
    let r = run(&[
        &"-e",
        &"/nonexistent/ssh",
        &"hosta:/tmp/a.img",
        &"hostb:/tmp/b.img",
    ]);
    r.assert_code(exit::USAGE);
    assert!(!r.stderr.trim().is_empty(), "explain why: {r}");
}

#[test]
fn bad_chunk_sizes_are_usage_errors() {
    let (pair, old) = pair_with_old_dst();
    for bad in ["3K", "0", "banana", "", "2K", "2M", "5000", "-64K", "64X"] {
        let r = run(&[&"--chunk-size", &bad, &pair.src, &pair.dst]);
        assert_eq!(r.code, exit::USAGE, "--chunk-size {bad:?}\n{r}");
        assert_no_panic(&r);
        assert_old_destination(&pair, &old);
    }
}

#[test]
fn bad_compression_level_is_a_usage_error() {
    let (pair, old) = pair_with_old_dst();
    for bad in ["banana", "", "3.5"] {
        let r = run(&[&"--compress-level", &bad, &pair.src, &pair.dst]);
        assert_eq!(r.code, exit::USAGE, "--compress-level {bad:?}\n{r}");
        assert_no_panic(&r);
    }
    assert_old_destination(&pair, &old);
}

#[test]
fn missing_source_exits_3_naming_the_path() {
    let (pair, old) = pair_with_old_dst();
    let missing = pair.tmp.path().join("src/no-such-image.raw");

    let (r, v) = run_json(&[&missing, &pair.dst]);

    r.assert_code(exit::IO);
    assert_json_contract(&r, &v);
    assert!(
        r.stderr.contains("no-such-image.raw"),
        "stderr should name the missing source: {r}"
    );
    assert!(
        v["error"].as_str().unwrap().contains("no-such-image.raw"),
        "JSON error should name the missing source: {v}"
    );
    assert_old_destination(&pair, &old);
}

#[test]
fn missing_source_with_missing_destination_creates_nothing() {
    let pair = Pair::new();
    let r = run(&[&pair.src, &pair.dst]);
    r.assert_code(exit::IO);
    assert!(dir_entries(&pair.dst_dir()).is_empty());
}

#[test]
fn missing_destination_directory_exits_3() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(3, 100_000));
    let dst = pair.tmp.path().join("no/such/dir/disk.img");

    let (r, v) = run_json(&[&pair.src, &dst]);

    r.assert_code(exit::IO);
    assert_json_contract(&r, &v);
    assert!(
        !pair.tmp.path().join("no").exists(),
        "nothing may be created"
    );
}

#[test]
fn full_disk_exits_3_and_keeps_the_old_destination() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(4, (8 * MIB) as usize));
    let old = random_bytes(5, MIB as usize);
    pair.write_dst(&old);

    // RLIMIT_FSIZE makes every write past 2 MiB fail with EFBIG, in the
    // server child as well: a disk that fills up during the transfer.
    let (r, v) = vmsync()
        .file_size_limit(2 * MIB)
        .arg(&pair.src)
        .arg(&pair.dst)
        .run_json();

    r.assert_code(exit::IO);
    assert_json_contract(&r, &v);
    assert_old_destination(&pair, &old);
}

/// Syncs an 8 MiB random source over a 1 MiB destination that lives on a
/// 4 MiB tmpfs: a real ENOSPC in the middle of the transfer (the temporary
/// file can be sized, being sparse, but not filled). Needs root, as in CI.
fn fill_the_disk(pull: bool) {
    let Some(fs) = Tmpfs::mount(4 * MIB) else {
        eprintln!("skipping: cannot mount a tmpfs (not root?)");
        return;
    };
    let tmp = tempdir();
    let src = tmp.path().join("disk.img");
    write_file(&src, &random_bytes(6, (8 * MIB) as usize));
    let dst = fs.path().join("disk.img");
    let old = random_bytes(7, MIB as usize);
    write_file(&dst, &old);
    set_mtime_ns(&dst, OLD_MTIME_NS);
    let relay = Relay::new(tmp.path(), "");

    let (r, v) = if pull {
        // The client receives and writes.
        run_json(&[
            &"-e",
            &relay.rsh(),
            &"--remote-path",
            &bin(),
            &format!("127.0.0.1:{}", src.display()),
            &dst,
        ])
    } else {
        // Local to local: the spawned server receives and writes.
        run_json(&[&src, &dst])
    };
    relay.wait_server_gone();

    r.assert_code(exit::IO);
    assert_json_contract(&r, &v);
    assert_content(&dst, &old);
    assert_eq!(mtime_ns(&dst), OLD_MTIME_NS);
    assert_no_stray_files(fs.path(), &["disk.img"]);
}

#[test]
fn disk_filling_up_on_the_receiving_server_exits_3() {
    fill_the_disk(false);
}

#[test]
fn disk_filling_up_on_the_receiving_client_exits_3() {
    fill_the_disk(true);
}

#[test]
fn unknown_rsh_program_is_a_connection_error() {
    let (pair, old) = pair_with_old_dst();
    let (r, v) = run_json(&[
        &"-e",
        &"/nonexistent/ssh",
        &pair.src,
        &format!("127.0.0.1:{}", pair.dst.display()),
    ]);
    r.assert_code(exit::CONNECTION);
    assert_json_contract(&r, &v);
    assert_old_destination(&pair, &old);
}

#[test]
fn rsh_that_fails_at_once_is_a_connection_error() {
    let (pair, old) = pair_with_old_dst();
    let r = run(&[
        &"-e",
        &"false",
        &pair.src,
        &format!("127.0.0.1:{}", pair.dst.display()),
    ]);
    r.assert_code(exit::CONNECTION);
    assert_old_destination(&pair, &old);
}

#[test]
fn missing_remote_vmsync_is_a_connection_error_naming_the_host() {
    let (pair, old) = pair_with_old_dst();
    let relay = Relay::new(pair.tmp.path(), "");
    let r = run(&[
        &"-e",
        &relay.rsh(),
        &"--remote-path",
        &"/nonexistent/vmsync",
        &pair.src,
        &format!("127.0.0.1:{}", pair.dst.display()),
    ]);
    r.assert_code(exit::CONNECTION);
    assert!(r.stderr.contains("127.0.0.1"), "name the host: {r}");
    assert_old_destination(&pair, &old);
}

#[test]
fn remote_that_exits_silently_is_a_connection_error() {
    let (pair, old) = pair_with_old_dst();
    let relay = Relay::new(pair.tmp.path(), "");
    let r = run(&[
        &"-e",
        &relay.rsh(),
        &"--remote-path",
        &"true",
        &pair.src,
        &format!("127.0.0.1:{}", pair.dst.display()),
    ]);
    r.assert_code(exit::CONNECTION);
    assert_old_destination(&pair, &old);
}

#[test]
fn peer_speaking_garbage_is_a_protocol_error() {
    let (pair, old) = pair_with_old_dst();
    let relay = Relay::new(pair.tmp.path(), "");
    let (r, v) = run_json(&[
        &"-e",
        &relay.rsh(),
        &"--remote-path",
        &garbage_server(pair.tmp.path()),
        &pair.src,
        &format!("127.0.0.1:{}", pair.dst.display()),
    ]);
    r.assert_code(exit::PROTOCOL);
    assert_json_contract(&r, &v);
    assert_old_destination(&pair, &old);
}

#[test]
fn json_is_printed_for_usage_errors_too() {
    let pair = Pair::new();
    pair.write_src(b"abc");
    let (r, v) = run_json(&[&"--chunk-size", &"3K", &pair.src, &pair.dst]);
    r.assert_code(exit::USAGE);
    assert_json_contract(&r, &v);
}

#[test]
fn help_succeeds_and_hides_server_mode() {
    let r = run(&[&"--help"]);
    r.assert_ok();
    assert!(r.stdout.contains("--check"), "{r}");
    assert!(
        !r.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("--server")),
        "--server is not listed as an option: {r}"
    );
}

#[test]
fn server_mode_without_a_peer_ends_without_panicking() {
    // stdin is /dev/null: the peer "vanished" before saying anything.
    let r = run(&[&"--server"]);
    assert_no_panic(&r);
    assert!(r.stdout.len() < 4096, "{r}");
}

/// A journaled sync whose journal cannot fit: a 40 MiB destination on a
/// 64 MiB tmpfs with under 7 MiB free, and about 9 MiB of scattered change
/// (below half the file, so it stays a journal). It ends with the disk-full
/// code before the destination is touched, and removes the journal that
/// could never be finished there.
#[test]
fn journal_that_does_not_fit_exits_3_and_leaves_the_old_destination_and_no_journal() {
    let Some(fs) = Tmpfs::mount(64 * MIB) else {
        eprintln!("skipping: cannot mount a tmpfs (not root?)");
        return;
    };
    let tmp = tempdir();
    let old = random_bytes(8, (40 * MIB) as usize);
    let mut new = old.clone();
    let mut rng = Rng::new(9);
    for _ in 0..600 {
        let at = rng.below(40 * MIB - 16384) as usize;
        rng.fill(&mut new[at..at + 16384]);
    }
    let src = tmp.path().join("disk.img");
    write_file(&src, &new);
    let dst = fs.path().join("disk.img");
    write_file(&dst, &old);
    write_file(&fs.path().join("filler"), &vec![1u8; (17 * MIB) as usize]);

    let (r, v) = run_json(&[&"--inplace", &src, &dst]);

    r.assert_code(exit::IO);
    assert_json_contract(&r, &v);
    assert!(r.stderr.contains("disk full"), "{r}");
    assert_content(&dst, &old);
    assert_no_stray_files(fs.path(), &["disk.img", "filler"]);
    assert!(
        !dir_entries(fs.path()).iter().any(|n| n.contains("journal")),
        "the journal that cannot fit is removed: {:?}",
        dir_entries(fs.path())
    );
}
