//! Interrupted transfers, through the fault-injection relay
//! (`tests/fixtures/relay.py`) used as `-e`: the "remote" `127.0.0.1:PATH` is
//! the local binary run by the relay. A 64 MiB random source is pushed (or
//! pulled) over a different old destination and the transport is cut at
//! about 10%, 50% and 90% of the bytes a full run moves, or the client gets
//! SIGINT / SIGTERM mid-transfer. Every interrupted run must exit with the
//! contract's code (4 for a cut, 130 / 143 for signals) and leave the
//! destination byte-for-byte (and mtime) as it was, with no temporary file
//! other than a hidden `.NAME.vmsync-partial*`; a normal re-run then
//! completes the sync and leaves nothing behind.

use crate::common::*;
use std::sync::OnceLock;

const SIZE: u64 = 64 * MIB;

/// A 64 MiB random source and an unrelated old destination.
fn setup() -> (Pair, Vec<u8>) {
    let pair = Pair::new();
    pair.write_src(&random_bytes(1, SIZE as usize));
    let old = random_bytes(2, SIZE as usize);
    pair.write_dst(&old);
    (pair, old)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Direction {
    Push,
    Pull,
}

/// Runs one sync of `pair` through a relay with `relay_opts`, then waits for
/// the server side to exit so that its cleanup has happened.
fn sync_via_relay(
    pair: &Pair,
    dir: Direction,
    relay_opts: &str,
    extra: &[&str],
) -> (Run, serde_json::Value, Relay) {
    let relay = Relay::new(pair.tmp.path(), relay_opts);
    let remote = |p: &std::path::Path| format!("127.0.0.1:{}", p.display());
    let (src, dst) = match dir {
        Direction::Push => (pair.src.display().to_string(), remote(&pair.dst)),
        Direction::Pull => (remote(&pair.src), pair.dst.display().to_string()),
    };
    let (run, v) = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .args(extra)
        .args([&src, &dst])
        .run_json();
    relay.wait_server_gone();
    (run, v, relay)
}

/// Bytes moved by a complete run of `setup()` in each direction (measured
/// once, through the relay, which counts both directions).
fn full_run_wire_bytes(dir: Direction) -> u64 {
    static PUSH: OnceLock<u64> = OnceLock::new();
    static PULL: OnceLock<u64> = OnceLock::new();
    let cell = match dir {
        Direction::Push => &PUSH,
        Direction::Pull => &PULL,
    };
    *cell.get_or_init(|| {
        let (pair, _) = setup();
        let (run, v, relay) = sync_via_relay(&pair, dir, "", &[]);
        run.assert_ok();
        pair.assert_synced();
        let relayed = relay.relayed_bytes().expect("relay count file");
        let wire = json_u64(&v, "wire_bytes");
        assert!(
            relayed.abs_diff(wire) <= 4 * KIB,
            "{dir:?}: wire_bytes {wire} but the transport carried {relayed}"
        );
        assert!(
            relayed >= SIZE,
            "{dir:?}: random data cannot shrink: {relayed}"
        );
        relayed
    })
}

/// A normal run through the relay completes the sync and leaves nothing
/// behind (a partial file from the interrupted run is used up or removed).
fn resume(pair: &Pair, dir: Direction) {
    let (run, _, _) = sync_via_relay(pair, dir, "", &[]);
    run.assert_ok();
    pair.assert_synced();
}

/// Cuts the transport after `percent`% of a full run's bytes, checks the
/// damage, then re-runs without faults.
fn cut_then_resume(dir: Direction, percent: u64) {
    let cut = full_run_wire_bytes(dir) * percent / 100;
    let (pair, old) = setup();

    let (run, v, relay) = sync_via_relay(&pair, dir, &format!("--cut-after {cut}"), &[]);

    run.assert_code(exit::CONNECTION);
    assert_json_contract(&run, &v);
    assert_eq!(
        relay.relayed_bytes(),
        Some(cut),
        "relay did not reach the cut"
    );
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("127.0.0.1") && l.contains("relay: cutting")),
        "the rsh's stderr should be shown, prefixed by the host: {run}"
    );
    assert_old_destination(&pair, &old);
    resume(&pair, dir);
}

#[test]
fn relay_push_and_pull_without_faults_match_wire_bytes() {
    // The measurement itself asserts the sync and the byte count.
    full_run_wire_bytes(Direction::Push);
    full_run_wire_bytes(Direction::Pull);
}

#[test]
fn push_cut_at_10_percent_keeps_old_destination_and_resumes() {
    cut_then_resume(Direction::Push, 10);
}

#[test]
fn push_cut_at_50_percent_keeps_old_destination_and_resumes() {
    cut_then_resume(Direction::Push, 50);
}

#[test]
fn push_cut_at_90_percent_keeps_old_destination_and_resumes() {
    cut_then_resume(Direction::Push, 90);
}

#[test]
fn pull_cut_at_50_percent_keeps_old_destination_and_resumes() {
    cut_then_resume(Direction::Pull, 50);
}

#[test]
fn push_cut_during_the_handshake_is_a_connection_error() {
    let (pair, old) = setup();
    let (run, _, _) = sync_via_relay(&pair, Direction::Push, "--cut-after 3", &[]);
    run.assert_code(exit::CONNECTION);
    assert_old_destination(&pair, &old);
    resume(&pair, Direction::Push);
}

/// Sends `sig` to the client after `percent`% of a full run's bytes.
fn interrupt(dir: Direction, sig: &str, percent: u64, extra: &[&str]) {
    let after = full_run_wire_bytes(dir) * percent / 100;
    let (pair, old) = setup();
    let opts = format!("--signal-parent-after {after} --signal {sig}");

    let (run, v, _) = sync_via_relay(&pair, dir, &opts, extra);

    let expected = if sig == "INT" {
        exit::SIGINT
    } else {
        exit::SIGTERM
    };
    // Exiting with 128+N and re-raising the signal after cleanup are both
    // fine; `Run::code` maps a death by signal N to 128+N.
    run.assert_code(expected);
    assert_old_destination(&pair, &old);
    resume(&pair, dir);
    assert_json_contract(&run, &v);
}

#[test]
fn sigint_during_push_exits_130_keeps_old_destination_and_resumes() {
    interrupt(Direction::Push, "INT", 40, &[]);
}

#[test]
fn sigterm_during_push_exits_143_keeps_old_destination_and_resumes() {
    interrupt(Direction::Push, "TERM", 40, &[]);
}

#[test]
fn sigint_during_pull_exits_130_keeps_old_destination_and_resumes() {
    interrupt(Direction::Pull, "INT", 40, &[]);
}

#[test]
fn sigterm_during_unjournaled_inplace_push_leaves_no_temp_file() {
    // unsafe-inplace writes into the destination, so only the exit code
    // and the absence of leftovers are promised.
    let after = full_run_wire_bytes(Direction::Push) * 30 / 100;
    let (pair, _) = setup();
    let opts = format!("--signal-parent-after {after} --signal TERM");

    let (run, _, _) = sync_via_relay(
        &pair,
        Direction::Push,
        &opts,
        &["--write-mode", "unsafe-inplace"],
    );

    run.assert_code(exit::SIGTERM);
    assert_eq!(dir_entries(&pair.dst_dir()), ["disk.img"]);
}

#[test]
fn sigterm_during_journaled_inplace_push_keeps_old_destination_and_resumes() {
    // --inplace journals: until the commit the destination is untouched.
    interrupt(Direction::Push, "TERM", 30, &["--inplace"]);
}

/// `-r --json` interrupted mid-transfer ends like any failed `-r` run: one
/// JSON line with the tree's keys (`files`, `errors`, totals), the signal's
/// exit code, and the metrics file written.
#[test]
fn sigint_during_recursive_push_prints_the_tree_json_and_writes_metrics() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    std::fs::create_dir_all(&src).unwrap();
    for (i, name) in ["a.img", "b.img", "c.img"].iter().enumerate() {
        write_file(
            &src.join(name),
            &random_bytes(10 + i as u64, (16 * MIB) as usize),
        );
    }
    let prom_path = tmp.path().join("vmsync.prom");
    // The listing and the first operations move a few KiB: the signal comes
    // during the first file's data.
    let relay = Relay::new(tmp.path(), "--signal-parent-after 4194304 --signal INT");
    let (run, v) = vmsync()
        .args(["-r", "-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .arg("--metrics-file")
        .arg(&prom_path)
        .arg(format!("{}/", src.display()))
        .arg(format!("127.0.0.1:{}", dst.display()))
        .run_json();
    relay.wait_server_gone();

    run.assert_code(exit::SIGINT);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line on stdout: {run}");
    assert_eq!(v["exit_code"], 130, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("SIGINT")),
        "{v}"
    );
    assert!(v["files"].is_array(), "a tree summary has files: {v}");
    assert!(v["errors"].is_array(), "a tree summary has errors: {v}");
    assert!(v["files_total"].is_u64(), "{v}");
    let metrics = std::fs::read_to_string(&prom_path).expect("metrics file written");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("vmsync_last_exit_code{") && l.ends_with(" 130")),
        "{metrics}"
    );
    // Nothing half-written is left as a file of the tree.
    for name in dir_entries(&dst) {
        assert!(
            !name.ends_with(".img") || {
                let n = name.trim_start_matches('.');
                ["a.img", "b.img", "c.img"].contains(&n)
            },
            "{name}"
        );
    }
}
