//! End-to-end reliability of the real binary: corruption in flight, two
//! syncs of one destination, symlinks, odd remote paths, unreadable and
//! unwritable files, a source that changes while it is read, edits past
//! 4 GiB in a sparse image, and `--check` finding one changed byte.
//!
//! "Remote" operands go through the fault relay (`tests/fixtures/relay.py`)
//! as `-e`; a second sync is made to wait deterministically by holding the
//! destination's lock with a scripted server (`tests/it/peer.rs`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::*;

/// A sync through the relay with `relay_opts`; waits for the relay's
/// server side to exit before returning.
fn via_relay(
    tmp: &Path,
    relay_opts: &str,
    extra: &[&str],
    src: &str,
    dst: &str,
) -> (Run, serde_json::Value) {
    let relay = Relay::new(tmp, relay_opts);
    let (run, v) = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .args(extra)
        .args([src, dst])
        .timeout(std::time::Duration::from_secs(60))
        .run_json();
    relay.wait_server_gone();
    (run, v)
}

fn remote(p: &Path) -> String {
    format!("127.0.0.1:{}", p.display())
}

/// The destination holds `old` with the old mtime, and nothing but a
/// hidden partial file beside it.
#[track_caller]
fn assert_old(pair: &Pair, old: &[u8]) {
    assert_content(&pair.dst, old);
    assert_eq!(mtime_ns(&pair.dst), OLD_MTIME_NS, "destination mtime");
    assert_no_stray_files(&pair.dst_dir(), &["disk.img"]);
}

#[track_caller]
fn assert_error_mentions(run: &Run, v: &serde_json::Value, words: &[&str]) {
    let err = v["error"].as_str().unwrap_or_default();
    for w in words {
        assert!(
            err.contains(w),
            "error {err:?} does not mention {w:?}\n{run}"
        );
    }
}

// ---------------------------------------------------------------------------
// A bit flipped in flight
// ---------------------------------------------------------------------------

fn flip_in_flight(pull: bool, existing: bool) {
    let pair = Pair::new();
    pair.write_src(&random_bytes(1, 4 << 20));
    let old = random_bytes(2, 4 << 20);
    if existing {
        pair.write_dst(&old);
    }
    let (src, dst) = if pull {
        (remote(&pair.src), pair.dst.display().to_string())
    } else {
        (pair.src.display().to_string(), remote(&pair.dst))
    };
    // Two MiB into the stream that carries the chunks: inside chunk data.
    let opts = if pull {
        "--flip-bit-after 2097152 --flip-direction down"
    } else {
        "--flip-bit-after 2097152"
    };

    let (run, v) = via_relay(pair.tmp.path(), opts, &[], &src, &dst);

    assert_no_panic(&run);
    assert!(
        run.code == exit::PROTOCOL || run.code == exit::CONNECTION,
        "a flipped bit must fail the run with 5 (or 4)\n{run}"
    );
    assert_json_contract(&run, &v);
    assert!(
        run.stderr.contains("relay: flipped"),
        "the relay did not flip\n{run}"
    );
    if existing {
        assert_old(&pair, &old);
    } else {
        assert!(!pair.dst.exists(), "destination created\n{run}");
        assert_no_stray_files(&pair.dst_dir(), &[]);
    }

    // The next clean run completes (resuming from whatever was kept).
    let (run, _) = via_relay(pair.tmp.path(), "", &[], &src, &dst);
    run.assert_ok();
    pair.assert_synced();
}

#[test]
fn bit_flipped_in_flight_to_a_new_destination_fails_5_and_writes_nothing() {
    flip_in_flight(false, false);
}

#[test]
fn bit_flipped_in_flight_to_an_old_destination_fails_5_and_keeps_it() {
    flip_in_flight(false, true);
}

#[test]
fn bit_flipped_in_flight_on_a_pull_fails_5_and_keeps_the_destination() {
    flip_in_flight(true, true);
}

// ---------------------------------------------------------------------------
// Two syncs of one destination
// ---------------------------------------------------------------------------

#[test]
fn second_sync_of_a_locked_destination_exits_8_and_the_first_completes() {
    use crate::peer::*;
    let pair = Pair::new();
    pair.write_src(&random_bytes(3, 1 << 20));
    // The first sync: a server receiving into the destination, kept
    // waiting after START (it holds the lock from before START).
    let first = Source::new(random_bytes(4, 300_000), 64 * 1024);
    let mut holder = Server::connect();
    let mode = holder.open_receive(open_receive(&pair.dst), first.info());
    assert_eq!(mode, vmsync::wire::StartMode::Inline);

    let (run, v) = vmsync().arg(&pair.src).arg(&pair.dst).run_json();
    run.assert_code(exit::LOCKED);
    assert_json_contract(&run, &v);
    assert_error_mentions(&run, &v, &["disk.img"]);
    assert!(!pair.dst.exists(), "the refused sync wrote the destination");

    // A check of the destination is refused too, while the sync runs.
    let (run, _) = vmsync()
        .arg("--check")
        .arg(&pair.src)
        .arg(&pair.dst)
        .run_json();
    run.assert_code(exit::LOCKED);

    // The first one completes undisturbed.
    send_inline(&mut holder, &first, &mut Chunker::compressed());
    holder.finish().assert_code(0);
    assert_content(&pair.dst, &first.data);

    // And with the lock released, the second one now goes through.
    vmsync().arg(&pair.src).arg(&pair.dst).run().assert_ok();
    pair.assert_synced();
}

// ---------------------------------------------------------------------------
// Symlinks
// ---------------------------------------------------------------------------

/// A sentinel file elsewhere, and the destination path a symlink to it.
fn symlinked_destination(pair: &Pair) -> (PathBuf, Vec<u8>) {
    let sentinel = pair.tmp.path().join("sentinel");
    let content = b"sentinel: must never change\n".repeat(1000);
    write_file(&sentinel, &content);
    set_mtime_ns(&sentinel, OLD_MTIME_NS);
    std::os::unix::fs::symlink(&sentinel, &pair.dst).unwrap();
    (sentinel, content)
}

#[track_caller]
fn assert_sentinel(sentinel: &Path, content: &[u8]) {
    assert_content(sentinel, content);
    assert_eq!(mtime_ns(sentinel), OLD_MTIME_NS, "sentinel mtime changed");
}

#[test]
fn symlink_destination_is_replaced_and_its_target_untouched() {
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(5, 2 << 20));
    let (sentinel, content) = symlinked_destination(&pair);

    let (run, v) = vmsync().arg(&pair.src).arg(&pair.dst).run_json();

    run.assert_ok();
    assert_json_contract(&run, &v);
    assert_sentinel(&sentinel, &content);
    let meta = std::fs::symlink_metadata(&pair.dst).unwrap();
    assert!(meta.file_type().is_file(), "destination is still a symlink");
    pair.assert_synced();
}

#[test]
fn symlink_destination_with_inplace_is_refused() {
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(6, 1 << 20));
    let (sentinel, content) = symlinked_destination(&pair);

    let (run, v) = vmsync()
        .arg("--inplace")
        .arg(&pair.src)
        .arg(&pair.dst)
        .run_json();

    run.assert_code(exit::IO);
    assert_json_contract(&run, &v);
    assert_sentinel(&sentinel, &content);
    assert_eq!(std::fs::read_link(&pair.dst).unwrap(), sentinel);
    assert_no_stray_files(&pair.dst_dir(), &["disk.img"]);
}

#[test]
fn symlink_planted_as_the_partial_file_is_not_followed() {
    for opts in [&[][..], &["--inplace"][..], &["--check"][..]] {
        let pair = Pair::new();
        pair.write_src(&mixed_bytes(7, 1 << 20));
        let old = random_bytes(8, 1 << 20);
        pair.write_dst(&old);
        let sentinel = pair.tmp.path().join("sentinel");
        let content = b"sentinel\n".repeat(5000);
        write_file(&sentinel, &content);
        set_mtime_ns(&sentinel, OLD_MTIME_NS);
        let planted = pair.dst_dir().join(".disk.img.vmsync-partial");
        std::os::unix::fs::symlink(&sentinel, &planted).unwrap();

        let (run, v) = vmsync().args(opts).arg(&pair.src).arg(&pair.dst).run_json();

        assert_no_panic(&run);
        assert_json_contract(&run, &v);
        assert_sentinel(&sentinel, &content);
        match run.code {
            // Refusing is fine; then the destination is as it was.
            exit::IO => assert_content(&pair.dst, &old),
            exit::OK | exit::DIFFERENT if opts == ["--check"] => assert_content(&pair.dst, &old),
            exit::OK => assert_same_content(&pair.src, &pair.dst),
            c => panic!("{opts:?}: unexpected exit {c}\n{run}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Remote paths the shell would love to interpret
// ---------------------------------------------------------------------------

#[test]
fn remote_path_with_newline_and_shell_syntax_is_taken_literally() {
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(9, 512 * 1024));
    let dir = pair.dst_dir();
    // Run from the destination directory: a shell that ran any of this
    // would leave "pwned" files there.
    let name = "a\nb; touch pwned; $(touch pwned2) `touch pwned3` 'q\" *.img";
    let dst = dir.join(name);
    let relay = Relay::new(pair.tmp.path(), "");
    let run = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .arg(&pair.src)
        .arg(remote(&dst))
        .in_dir(&dir)
        .run();
    relay.wait_server_gone();

    run.assert_ok();
    assert_same_content(&pair.src, &dst);
    assert_eq!(
        dir_entries(&dir),
        [name],
        "exactly one file, named as given"
    );
    // And back: pull it from the odd remote name.
    let back = pair.tmp.path().join("back.img");
    let (run, _) = via_relay(
        pair.tmp.path(),
        "",
        &[],
        &remote(&dst),
        &back.display().to_string(),
    );
    run.assert_ok();
    assert_same_content(&pair.src, &back);
}

// ---------------------------------------------------------------------------
// Missing, unreadable and unwritable files
// ---------------------------------------------------------------------------

#[test]
fn missing_remote_source_exits_3_naming_it_and_keeps_the_destination() {
    let pair = Pair::new();
    let old = random_bytes(10, 100_000);
    pair.write_dst(&old);
    let missing = pair.tmp.path().join("src/no-such.img");

    let (run, v) = via_relay(
        pair.tmp.path(),
        "",
        &[],
        &remote(&missing),
        &pair.dst.display().to_string(),
    );

    run.assert_code(exit::IO);
    assert_json_contract(&run, &v);
    assert_error_mentions(&run, &v, &["no-such.img"]);
    assert_old(&pair, &old);
}

/// Makes the test's directories traversable by another user (temp dirs
/// are 0700).
fn open_up(pair: &Pair) {
    for d in [
        pair.tmp.path().to_path_buf(),
        pair.src.parent().unwrap().to_path_buf(),
    ] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(pair.dst_dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
}

fn as_unprivileged(cmd: Vmsync) -> Vmsync {
    match unprivileged_user() {
        Some((uid, gid)) => cmd.run_as(uid, gid),
        None => cmd,
    }
}

#[test]
fn unreadable_source_exits_3_naming_it_and_changes_nothing() {
    if unprivileged_user().is_some() {
        eprintln!("running as root: vmsync runs as nobody for this test");
    }
    let pair = Pair::new();
    pair.write_src(&random_bytes(11, 100_000));
    let old = random_bytes(12, 100_000);
    pair.write_dst(&old);
    open_up(&pair);
    std::fs::set_permissions(&pair.src, std::fs::Permissions::from_mode(0o000)).unwrap();

    // Local to local, and pulled through the relay (the server cannot read).
    let (run, v) = as_unprivileged(vmsync().arg(&pair.src).arg(&pair.dst)).run_json();
    run.assert_code(exit::IO);
    assert_json_contract(&run, &v);
    assert_error_mentions(&run, &v, &[&pair.src.display().to_string()]);
    assert_old(&pair, &old);

    // The relay runs as the same user: its bookkeeping needs a writable place.
    let book = pair.tmp.path().join("relay");
    std::fs::create_dir(&book).unwrap();
    std::fs::set_permissions(&book, std::fs::Permissions::from_mode(0o777)).unwrap();
    let relay = Relay::new(&book, "");
    let (run, v) = as_unprivileged(
        vmsync()
            .args(["-e", &relay.rsh(), "--remote-path"])
            .arg(bin())
            .arg(remote(&pair.src))
            .arg(&pair.dst),
    )
    .run_json();
    relay.wait_server_gone();
    run.assert_code(exit::IO);
    assert_error_mentions(&run, &v, &["src/disk.img"]);
    assert_old(&pair, &old);
}

#[test]
fn read_only_destination_directory_exits_3_naming_it_and_changes_nothing() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(13, 100_000));
    let old = random_bytes(14, 100_000);
    pair.write_dst(&old);
    open_up(&pair);
    std::fs::set_permissions(pair.dst_dir(), std::fs::Permissions::from_mode(0o555)).unwrap();

    for opts in [&[][..], &["--inplace"][..]] {
        let (run, v) =
            as_unprivileged(vmsync().args(opts).arg(&pair.src).arg(&pair.dst)).run_json();
        run.assert_code(exit::IO);
        assert_json_contract(&run, &v);
        assert_error_mentions(&run, &v, &[&pair.dst_dir().display().to_string()]);
        assert_old(&pair, &old);
        assert_eq!(dir_entries(&pair.dst_dir()), ["disk.img"]);
    }
    std::fs::set_permissions(pair.dst_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

// ---------------------------------------------------------------------------
// A source that changes while it is read
// ---------------------------------------------------------------------------

/// Pulls through the relay, which runs `change` on the source right after
/// the server has opened it (before its FILE_INFO reaches the client, so
/// before the client's START can start the scan).
fn pull_while_changing(change: &str, existing: bool) {
    let pair = Pair::new();
    pair.write_src(&random_bytes(15, 8 << 20));
    let old = random_bytes(16, 1 << 20);
    if existing {
        pair.write_dst(&old);
    }
    let cmd = change.replace("SRC", &pair.src.display().to_string());
    // Down-stream byte 16: the first byte after the server's hello.
    let opts = format!("--run-before-byte 16 --run-direction down --run '{cmd}'");

    let (run, v) = via_relay(
        pair.tmp.path(),
        &opts,
        &[],
        &remote(&pair.src),
        &pair.dst.display().to_string(),
    );

    assert!(run.stderr.contains("relay: running"), "hook not run\n{run}");
    run.assert_code(exit::SOURCE_CHANGED);
    assert_json_contract(&run, &v);
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    if existing {
        assert_old(&pair, &old);
    } else {
        assert!(!pair.dst.exists(), "destination created\n{run}");
        assert_no_stray_files(&pair.dst_dir(), &[]);
    }
}

#[test]
fn source_growing_during_the_scan_exits_7_and_keeps_the_destination() {
    pull_while_changing("head -c 65536 /dev/zero >> SRC", true);
}

#[test]
fn source_shrinking_during_the_scan_exits_7_and_writes_nothing() {
    pull_while_changing("truncate -s 1M SRC", false);
}

#[test]
fn source_rewritten_during_the_scan_exits_7_even_with_its_mtime_restored() {
    pull_while_changing(
        "printf XXXXXXXX | dd of=SRC bs=1 seek=5000000 conv=notrunc status=none && \
         touch -m -d @1600000000.123456789 SRC",
        true,
    );
}

// ---------------------------------------------------------------------------
// Past 4 GiB
// ---------------------------------------------------------------------------

const G: u64 = GIB;

/// A 7 GiB sparse source with 1 MiB of data at 0, around 4 GiB and around
/// 6 GiB, synced to the destination.
fn synced_sparse_7g() -> Pair {
    let pair = Pair::new();
    let a = random_bytes(17, MIB as usize);
    let b = random_bytes(18, MIB as usize);
    let c = random_bytes(19, MIB as usize);
    sparse_file(
        &pair.src,
        7 * G,
        &[
            (0, &a[..]),
            (4 * G - MIB / 2, &b[..]),
            (6 * G - MIB / 2, &c[..]),
        ],
    );
    set_mtime_ns(&pair.src, SOURCE_MTIME_NS);
    let (run, v) = vmsync().arg(&pair.src).arg(&pair.dst).run_json();
    run.assert_ok();
    // The data, and the zeros that share its boundary chunks.
    let literal = json_u64(&v, "literal_bytes");
    assert!((3 * MIB..4 * MIB).contains(&literal), "{v}");
    pair.assert_synced();
    pair
}

#[test]
fn edits_at_4_gib_boundaries_and_6_gib_send_only_their_blocks() {
    let pair = synced_sparse_7g();
    for off in [(1u64 << 32) - 1, 1 << 32, 6 * G] {
        patch_file(&pair.src, off, &[0xa5]);
    }
    set_mtime_ns(&pair.src, SOURCE_MTIME_NS + 1_000_000_000);

    let (run, v) = vmsync().arg(&pair.src).arg(&pair.dst).run_json();

    run.assert_ok();
    assert_accounting(&v);
    let literal = json_u64(&v, "literal_bytes");
    // Three 4 KiB pieces: 2^32 - 1 and 2^32 sit in neighbouring blocks.
    assert!(
        literal > 0 && literal <= 3 * 16 * KIB,
        "literal_bytes {literal}: more than the changed blocks\n{v}"
    );
    pair.assert_synced();
    sync_file(&pair.dst);
    assert!(
        allocated_bytes(&pair.dst) < 16 * MIB,
        "the destination is no longer sparse: {} bytes allocated",
        allocated_bytes(&pair.dst)
    );
}

#[test]
fn check_finds_one_corrupted_byte_past_4_gib() {
    let pair = synced_sparse_7g();
    let off = (1u64 << 32) + 12_345;
    let mut byte = [0u8; 1];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&pair.dst)
            .unwrap()
            .read_exact_at(&mut byte, off)
            .unwrap();
    }
    patch_file(&pair.dst, off, &[byte[0] ^ 0x10]);

    let (run, v) = vmsync()
        .arg("--check")
        .arg(&pair.src)
        .arg(&pair.dst)
        .run_json();

    run.assert_code(exit::DIFFERENT);
    assert_json_contract(&run, &v);
    let diffs = json_differences(&v);
    assert!(
        diffs.iter().any(|&(o, l)| o <= off && off < o + l),
        "no reported range covers offset {off}: {diffs:?}"
    );
    assert!(
        json_u64(&v, "differing_bytes") <= 256 * KIB,
        "one byte reported as {}",
        json_u64(&v, "differing_bytes")
    );
}

// ---------------------------------------------------------------------------
// An empty destination
// ---------------------------------------------------------------------------

#[test]
fn sync_into_an_existing_empty_destination_succeeds() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(20, 300_000));
    pair.write_dst(b"");

    let (run, v) = vmsync().arg(&pair.src).arg(&pair.dst).run_json();

    run.assert_ok();
    assert_json_contract(&run, &v);
    pair.assert_synced();
}

// ---------------------------------------------------------------------------
// Long names
// ---------------------------------------------------------------------------

#[test]
fn destination_with_a_long_but_valid_name_syncs() {
    // 250 bytes is a legal file name (NAME_MAX is 255); the hidden partial
    // file beside it must not need more.
    let pair = Pair::new();
    pair.write_src(&random_bytes(21, 100_000));
    let dst = pair.dst_dir().join("n".repeat(250));

    let (run, v) = vmsync().arg(&pair.src).arg(&dst).run_json();

    run.assert_ok();
    assert_json_contract(&run, &v);
    assert_same_content(&pair.src, &dst);
    assert_eq!(dir_entries(&pair.dst_dir()), ["n".repeat(250)]);
}

// ---------------------------------------------------------------------------
// --timeout: a peer that is gone without closing the connection
// ---------------------------------------------------------------------------

/// The relay (our "ssh") stops itself mid-transfer: nothing moves either
/// way and nothing is closed, as on a dead network path. With `--timeout 2`
/// the client gives up with exit 4 and says why; the old destination is
/// intact, and no process is left behind. Both directions (push and pull).
#[test]
fn timeout_ends_a_run_whose_peer_went_silent() {
    for pull in [false, true] {
        let pair = Pair::new();
        let old = random_bytes(31, (4 * MIB) as usize);
        pair.write_dst(&old);
        pair.write_src(&random_bytes(32, (16 * MIB) as usize));
        // $PPID of the hook's shell is the relay itself; it stops in the
        // direction the data flows.
        let opts = format!(
            "--run-before-byte 2000000 --run-direction {} --run 'kill -STOP $PPID'",
            if pull { "down" } else { "up" }
        );
        let (src, dst) = if pull {
            (remote(&pair.src), pair.dst.display().to_string())
        } else {
            (pair.src.display().to_string(), remote(&pair.dst))
        };
        let (run, v) = via_relay(pair.tmp.path(), &opts, &["--timeout", "2"], &src, &dst);
        run.assert_code(exit::CONNECTION);
        assert_error_mentions(&run, &v, &["nothing received for 2 s", "--timeout"]);
        assert_old_destination(&pair, &old);
    }
}

/// `--timeout` is not a deadline: a run much longer than it completes, the
/// busy end's keepalives covering its quiet phases (here: --verify re-reads
/// and fsyncs the whole file before answering).
#[test]
fn timeout_does_not_end_a_healthy_run() {
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(33, (48 * MIB) as usize));
    let (run, v) = via_relay(
        pair.tmp.path(),
        "",
        &["--timeout", "1", "--verify"],
        &pair.src.display().to_string(),
        &remote(&pair.dst),
    );
    run.assert_ok();
    assert!(json_bool(&v, "verified"));
    pair.assert_synced();
}

// ---------------------------------------------------------------------------
// --allow-changing-source: commit a moving source, and say so
// ---------------------------------------------------------------------------

/// The source is rewritten (same size, mtime moved) after it was opened
/// and before the scan, in a push and in a pull. Without the flag that is
/// exit 7 (above); with it the run commits what it read, warns, and reports
/// `source_changed` (in a pull, the remote sender says so in MANIFEST_END).
#[test]
fn allow_changing_source_commits_a_source_rewritten_before_the_scan() {
    for pull in [false, true] {
        let pair = Pair::new();
        pair.write_src(&random_bytes(51, 4 << 20));
        let cmd = format!(
            "printf XXXXXXXX | dd of={} bs=1 seek=3000000 conv=notrunc status=none",
            pair.src.display()
        );
        let opts = format!("--run-before-byte 16 --run-direction down --run '{cmd}'");
        let (src, dst) = if pull {
            (remote(&pair.src), pair.dst.display().to_string())
        } else {
            (pair.src.display().to_string(), remote(&pair.dst))
        };
        let (run, v) = via_relay(
            pair.tmp.path(),
            &opts,
            &["--allow-changing-source"],
            &src,
            &dst,
        );
        assert!(run.stderr.contains("relay: running"), "hook not run\n{run}");
        run.assert_ok();
        assert!(json_bool(&v, "source_changed"), "pull {pull}: {v}");
        assert!(
            run.stderr.contains("changed while it was being read"),
            "{run}"
        );
        // The scan came after the change: the copy is the source as it is now.
        assert_same_content(&pair.src, &pair.dst);
    }
    // --stats says so too.
    let pair = Pair::new();
    pair.write_src(&random_bytes(54, 1 << 20));
    let cmd = format!(
        "printf XXXXXXXX | dd of={} bs=1 seek=3000 conv=notrunc status=none",
        pair.src.display()
    );
    let relay = Relay::new(
        pair.tmp.path(),
        &format!("--run-before-byte 16 --run-direction down --run '{cmd}'"),
    );
    let run = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .args(["--allow-changing-source", "--stats"])
        .arg(&pair.src)
        .arg(remote(&pair.dst))
        .run();
    relay.wait_server_gone();
    run.assert_ok();
    assert!(
        run.stdout.contains("source changed   while it was read"),
        "{run}"
    );
}

/// Pull into an old copy: after the sender scanned the changed region,
/// and before it reads it again to answer the first request, the region
/// changes once more. Those chunks travel as 'changed' with their new
/// content; the copy equals the source as it is now and says it moved.
#[test]
fn allow_changing_source_sends_chunks_that_changed_after_the_scan() {
    let pair = Pair::new();
    let old = random_bytes(52, 8 << 20);
    pair.write_dst(&old);
    let mut new = old.clone();
    new[(1 << 20)..(3 << 19)].copy_from_slice(&random_bytes(53, 1 << 19));
    pair.write_src(&new);
    // The first client→server byte after hello, OPEN and START is the
    // first REQUEST (with this flag nothing is refined first).
    let open = vmsync::wire::Msg::Open(vmsync::wire::Open {
        role: vmsync::wire::Role::Send,
        flags: 0,
        compress_level: 3,
        chunking: 0,
        path: pair.src.display().to_string().into_bytes(),
        source_name: Vec::new(),
        timeout_secs: 0,
        bwlimit: 0,
        sample: None,
        seeds: Vec::new(),
    });
    let mut frame = Vec::new();
    open.encode(&mut frame);
    let first_request = 16 + 4 + frame.len() + 4 + 2;
    let cmd = format!(
        "head -c 524288 /dev/urandom | dd of={} bs=1M seek=1 conv=notrunc status=none iflag=fullblock",
        pair.src.display()
    );
    let opts = format!("--run-before-byte {first_request} --run-direction up --run '{cmd}'");
    let (run, v) = via_relay(
        pair.tmp.path(),
        &opts,
        &["--allow-changing-source"],
        &remote(&pair.src),
        &pair.dst.display().to_string(),
    );
    assert!(run.stderr.contains("relay: running"), "hook not run\n{run}");
    run.assert_ok();
    assert!(json_bool(&v, "source_changed"), "{v}");
    assert_same_content(&pair.src, &pair.dst);
    assert_ne!(
        std::fs::read(&pair.dst).unwrap(),
        new,
        "the later content won"
    );
}
