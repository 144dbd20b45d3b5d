//! `--metrics-file`: the outcome of each run as a Prometheus textfile.
//!
//! A sync run from cron fails silently: nobody reads its mail, and a job
//! that stopped running (a removed crontab, a host that was down, a run
//! that hangs) reports nothing at all. So each run ends by recording its
//! outcome in a file for node_exporter's textfile collector (which exports
//! every `*.prom` file in its `--collector.textfile.directory`), and an
//! alert fires when a destination has had no successful run for too long,
//! which catches failures and missing runs alike.
//!
//! Every sample carries `destination` (the destination operand as typed)
//! and `mode` (`sync` or `check`, so a `--check` job does not hide a broken
//! sync of the same destination). Several cron jobs may share one file:
//! a run replaces only its own series and keeps all others. The result for
//! two destinations looks like this:
//!
//! ```text
//! # HELP vmsync_last_run_timestamp_seconds End time of the last vmsync run, in seconds since the epoch.
//! # TYPE vmsync_last_run_timestamp_seconds gauge
//! vmsync_last_run_timestamp_seconds{destination="backup:/srv/vm.img",mode="sync"} 1718002800.25
//! vmsync_last_run_timestamp_seconds{destination="vm.img",mode="check"} 1718006400.5
//! # HELP vmsync_last_success_timestamp_seconds End time of the last vmsync run that exited with 0 (for --check: files identical), in seconds since the epoch.
//! # TYPE vmsync_last_success_timestamp_seconds gauge
//! vmsync_last_success_timestamp_seconds{destination="backup:/srv/vm.img",mode="sync"} 1717916400.75
//! vmsync_last_success_timestamp_seconds{destination="vm.img",mode="check"} 1718006400.5
//! # HELP vmsync_last_exit_code Exit code of the last vmsync run (see vmsync --help).
//! # TYPE vmsync_last_exit_code gauge
//! vmsync_last_exit_code{destination="backup:/srv/vm.img",mode="sync"} 4
//! vmsync_last_exit_code{destination="vm.img",mode="check"} 0
//! # HELP vmsync_last_run_duration_seconds Duration of the last vmsync run, in seconds.
//! # TYPE vmsync_last_run_duration_seconds gauge
//! vmsync_last_run_duration_seconds{destination="backup:/srv/vm.img",mode="sync"} 30.012
//! vmsync_last_run_duration_seconds{destination="vm.img",mode="check"} 41.5
//! # HELP vmsync_source_bytes Size of the source in the last vmsync run, in bytes.
//! # TYPE vmsync_source_bytes gauge
//! vmsync_source_bytes{destination="backup:/srv/vm.img",mode="sync"} 0
//! vmsync_source_bytes{destination="vm.img",mode="check"} 21474836480
//! ```
//!
//! and so on for `vmsync_wire_bytes` (both directions), `vmsync_literal_bytes`
//! (chunk data sent), `vmsync_reused_bytes` (taken from the old destination),
//! for syncs `vmsync_dest_written_bytes` (what the receiver wrote to storage)
//! and `vmsync_write_mode` (1 clone, 2 journal, 3 copy, 4 unjournaled in
//! place, 0 nothing written), and for check runs only
//! `vmsync_differing_bytes`; `--snapshot` runs add `vmsync_source_read_bytes`,
//! `vmsync_source_skipped_bytes`, `vmsync_snapshot_seconds`,
//! `vmsync_frozen_seconds` (with `--freeze`), `vmsync_snapshot_delta` (1: only
//! what changed was read) and `vmsync_snapshot_verify_mismatch_bytes`
//! (alert on it: the verify slice found what the extent maps missed). All are gauges of the
//! last run; counters would need state that survives a failed write or a
//! replaced file, and the alerts only ever ask about the last run.
//!
//! Check series also carry the cycle of `--check --sample K/N` runs, which
//! spans runs (see `cycle.rs`): `vmsync_check_sample_slices` (N),
//! `vmsync_check_slice_success_timestamp_seconds{slice="K"}` (slices found
//! identical in the current cycle), `vmsync_check_cycle_started_timestamp_seconds`
//! and `vmsync_check_cycle_completed_timestamp_seconds` (when every slice
//! had been found identical: the whole file was checked).
//!
//! The alert rules that go with these metrics are
//! `deploy/prometheus/vmsync.rules.yml` (a stale last success, a series that
//! never succeeded, failed and repeatedly failed runs, differences, verify
//! mismatches, overdue check cycles and restore drills), with unit tests
//! beside them and a Grafana dashboard in `deploy/grafana/`;
//! `deploy/README.md` has the table of every family and its labels.
//!
//! Choices:
//!
//! * A series that has never had a successful run has no
//!   `vmsync_last_success_timestamp_seconds` sample at all, rather than 0:
//!   0 would claim a success in 1970 and put a 50-year "age" on dashboards.
//!   The rules alert on such a series separately (`VmsyncNeverSucceeded`); a
//!   failed run after a success keeps the earlier success time, so the
//!   staleness alert measures the time since the last real success.
//! * The file belongs to vmsync: samples it does not recognise (another
//!   program's metrics, families of a newer vmsync, samples with other
//!   labels) are dropped, and a file that does not parse at all is replaced
//!   rather than failing the run. Only a file over [`MAX_EXISTING`] bytes, or
//!   one that is not a regular file, is refused instead: that is more likely
//!   a mistyped path to something precious than an old metrics file.
//! * The file is written to a temporary file ending in `.tmp` beside it (so
//!   the collector, which reads only `*.prom`, never sees half a file),
//!   fsync'd, made mode 0644 and renamed over it. Concurrent runs serialize
//!   the read-merge-write on an exclusive `flock` of `PATH.lock`, which stays
//!   behind (removing it would let two writers lock different files).
//! * Values are written so they read back exactly; timestamps are rounded to
//!   milliseconds. Families come in a fixed order and series sorted by label
//!   values, so the same runs give the same bytes.

mod cycle;
mod families;
mod text;

use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::signals::TempGuard;
pub use families::RunMetrics;
use families::*;
use text::{parse, render, round_ms, seconds};

/// An existing file larger than this is refused rather than replaced. One
/// series is under 2 KiB, so this leaves room for thousands of them.
pub const MAX_EXISTING: u64 = 16 << 20;

/// Records `run` in the textfile at `path`, keeping the other series there.
pub fn write_textfile(path: &Path, run: &RunMetrics) -> Result<()> {
    let _lock = lock(path)?;
    let mut samples = read_existing(path)?;
    merge(&mut samples, run);
    write_atomically(path, &render(&samples))
}

fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// Takes the exclusive lock on `PATH.lock`, held until the file is dropped.
/// Not a lock on PATH itself: the rename replaces PATH's inode, so a writer
/// waiting on the old one would be let in beside the next.
fn lock(path: &Path) -> Result<File> {
    let lock_path = lock_path(path);
    // Read-only first: flock needs no write access, and a lock file created
    // by a cron job of another user may not be writable by this one.
    let opened = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path),
        other => other,
    };
    let file = opened.with_context(|| format!("cannot open lock file {}", lock_path.display()))?;
    // Blocking is fine: a holder keeps the lock only for one small read
    // and write. rustix retries on EINTR.
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(std::io::Error::from)
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;
    Ok(file)
}

/// The samples of the current file; none if there is no file or it does
/// not parse (it will be replaced).
fn read_existing(path: &Path) -> Result<Samples> {
    let context = || format!("cannot read metrics file {}", path.display());
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Samples::new()),
        Err(e) => return Err(e).with_context(context),
    };
    let meta = file.metadata().with_context(context)?;
    if !meta.is_file() {
        bail!(
            "metrics file {} is not a regular file; refusing to replace it",
            path.display()
        );
    }
    if meta.len() > MAX_EXISTING {
        bail!(
            "metrics file {} is {} bytes, too large to be a metrics file; \
             refusing to replace it (check the path, or remove the file)",
            path.display(),
            meta.len()
        );
    }
    let mut bytes = Vec::new();
    // take: the file may grow between the stat and the read.
    (&mut file)
        .take(MAX_EXISTING + 1)
        .read_to_end(&mut bytes)
        .with_context(context)?;
    Ok(String::from_utf8(bytes)
        .ok()
        .and_then(|text| parse(&text))
        .unwrap_or_default())
}

/// Replaces `run`'s series in `samples`, and carries its sampled-check
/// cycle on.
fn merge(samples: &mut Samples, run: &RunMetrics) {
    let mode = if run.check { "check" } else { "sync" };
    let key = |family| Key::new(family, &run.destination, mode);
    let previous_success = samples.remove(&key(LAST_SUCCESS));
    samples.retain(|k, _| {
        !(k.destination == run.destination && k.mode == mode && k.family < SAMPLE_SLICES)
    });
    let end = seconds(round_ms(run.end_unix));
    let success = if run.exit_code == 0 {
        Some(end.clone())
    } else {
        previous_success
    };
    let values = [
        (LAST_RUN, Some(end)),
        (LAST_SUCCESS, success),
        (EXIT_CODE, Some(run.exit_code.to_string())),
        (DURATION, Some(seconds(run.duration_secs))),
        (SOURCE, Some(run.source_bytes.to_string())),
        (WIRE, Some(run.wire_bytes.to_string())),
        (LITERAL, Some(run.literal_bytes.to_string())),
        (REUSED, Some(run.reused_bytes.to_string())),
        (
            DIFFERING,
            run.differing_bytes
                .filter(|_| run.check)
                .map(|b| b.to_string()),
        ),
        (
            DEST_WRITTEN,
            run.dest_written_bytes
                .filter(|_| !run.check)
                .map(|b| b.to_string()),
        ),
        (
            WRITE_MODE,
            run.write_mode
                .filter(|_| !run.check)
                .map(|m| m.map_or(0, |m| m as u8).to_string()),
        ),
    ];
    let snap = run.snapshot;
    let snap_values = [
        (SOURCE_READ, snap.map(|s| s.read_bytes.to_string())),
        (SOURCE_SKIPPED, snap.map(|s| s.skipped_bytes.to_string())),
        (
            SNAPSHOT_SECONDS,
            snap.map(|s| seconds(s.snapshot_us as f64 / 1e6)),
        ),
        (
            FROZEN_SECONDS,
            snap.and_then(|s| s.frozen_us)
                .map(|f| seconds(f as f64 / 1e6)),
        ),
        (
            VERIFY_MISMATCH,
            snap.map(|s| s.verify_mismatch_bytes.to_string()),
        ),
        (SNAPSHOT_DELTA, snap.map(|s| u8::from(s.delta).to_string())),
    ];
    for (family, value) in values.into_iter().chain(snap_values) {
        if let Some(v) = value {
            samples.insert(key(family), v);
        }
    }
    cycle::advance(samples, run);
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let context = || format!("cannot write metrics file {}", path.display());
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".vmsync-metrics.")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(context)?;
    let _guard = TempGuard::new(tmp.path());
    tmp.write_all(text.as_bytes()).with_context(context)?;
    // 0644 whatever the umask: node_exporter usually runs as its own user.
    tmp.as_file()
        .set_permissions(Permissions::from_mode(0o644))
        .with_context(context)?;
    tmp.as_file().sync_all().with_context(context)?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(context)?;
    crate::dest::paths::sync_dir(path)
}

#[cfg(test)]
#[path = "../../../tests/it/prom.rs"]
mod prom;

#[cfg(test)]
mod tests {
    use super::*;
    use prom::{get, Sample};

    fn run(destination: &str, check: bool, exit_code: u8, end_unix: f64) -> RunMetrics {
        RunMetrics {
            source: "disk.img".into(),
            destination: destination.into(),
            check,
            exit_code,
            end_unix,
            duration_secs: 12.345678,
            source_bytes: 20 << 30,
            wire_bytes: 1_234_567,
            literal_bytes: 1_000_000,
            reused_bytes: (20 << 30) - 1_000_000,
            differing_bytes: check.then_some(4096),
            dest_written_bytes: (!check).then_some(8192),
            write_mode: (!check).then_some(Some(crate::wire::WriteMode::Journal)),
            snapshot: None,
            sample: None,
        }
    }

    /// The file as the strict parser reads it; fails the test if it is not
    /// valid exposition text.
    fn read(path: &Path) -> Vec<Sample> {
        let text = std::fs::read_to_string(path).unwrap();
        prom::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn value(samples: &[Sample], name: &str, destination: &str, mode: &str) -> Option<f64> {
        get(
            samples,
            name,
            &[("destination", destination), ("mode", mode)],
        )
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmsync.prom");
        let r = run("host:/srv/disk.img", false, 0, 1_718_000_000.123_4);
        write_textfile(&path, &r).unwrap();
        let s = read(&path);
        let v = |name| value(&s, name, "host:/srv/disk.img", "sync");
        assert_eq!(
            v("vmsync_last_run_timestamp_seconds"),
            Some(1_718_000_000.123)
        );
        assert_eq!(
            v("vmsync_last_success_timestamp_seconds"),
            Some(1_718_000_000.123)
        );
        assert_eq!(v("vmsync_last_exit_code"), Some(0.0));
        assert_eq!(v("vmsync_last_run_duration_seconds"), Some(12.345678));
        assert_eq!(v("vmsync_source_bytes"), Some((20u64 << 30) as f64));
        assert_eq!(v("vmsync_wire_bytes"), Some(1_234_567.0));
        assert_eq!(v("vmsync_literal_bytes"), Some(1_000_000.0));
        assert_eq!(
            v("vmsync_reused_bytes"),
            Some(((20u64 << 30) - 1_000_000) as f64)
        );
        assert_eq!(v("vmsync_differing_bytes"), None, "sync runs have none");
        assert_eq!(s.len(), 10);

        // Rewriting the same run changes nothing.
        let before = std::fs::read(&path).unwrap();
        write_textfile(&path, &r).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before);

        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["vmsync.prom", "vmsync.prom.lock"],
            "no temp files left"
        );
    }

    #[test]
    fn check_runs_record_differing_bytes_and_identical_is_success() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.prom");
        write_textfile(&path, &run("a", true, 0, 100.0)).unwrap();
        let mut differ = run("a", true, 1, 200.0);
        differ.differing_bytes = Some(8192);
        write_textfile(&path, &differ).unwrap();
        let s = read(&path);
        assert_eq!(
            value(&s, "vmsync_differing_bytes", "a", "check"),
            Some(8192.0)
        );
        assert_eq!(value(&s, "vmsync_last_exit_code", "a", "check"), Some(1.0));
        // Different files is not a success.
        assert_eq!(
            value(&s, "vmsync_last_success_timestamp_seconds", "a", "check"),
            Some(100.0)
        );
        // A check that failed before comparing has no differing bytes.
        let mut failed = run("a", true, 3, 300.0);
        failed.differing_bytes = None;
        write_textfile(&path, &failed).unwrap();
        let s = read(&path);
        assert_eq!(value(&s, "vmsync_differing_bytes", "a", "check"), None);
        assert!(!std::fs::read_to_string(&path)
            .unwrap()
            .contains("vmsync_differing_bytes"));
    }

    #[test]
    fn sampled_checks_write_their_cycle_as_valid_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.prom");
        for (k, end) in [(2, 100.0), (1, 200.0)] {
            let mut r = run("a", true, 0, end);
            r.sample = Some((k, 3));
            r.differing_bytes = Some(0);
            write_textfile(&path, &r).unwrap();
        }
        write_textfile(&path, &run("a", false, 0, 250.0)).unwrap();
        let s = read(&path);
        let slice = |k: &str| {
            get(
                &s,
                "vmsync_check_slice_success_timestamp_seconds",
                &[("destination", "a"), ("mode", "check"), ("slice", k)],
            )
        };
        assert_eq!(
            (slice("1"), slice("2"), slice("3")),
            (Some(200.0), Some(100.0), None)
        );
        let v = |name| value(&s, name, "a", "check");
        assert_eq!(v("vmsync_check_sample_slices"), Some(3.0));
        assert_eq!(
            v("vmsync_check_cycle_started_timestamp_seconds"),
            Some(100.0)
        );
        assert_eq!(v("vmsync_check_cycle_completed_timestamp_seconds"), None);
        let mut last = run("a", true, 0, 300.0);
        last.sample = Some((3, 3));
        write_textfile(&path, &last).unwrap();
        let s = read(&path);
        assert_eq!(
            value(
                &s,
                "vmsync_check_cycle_completed_timestamp_seconds",
                "a",
                "check"
            ),
            Some(300.0)
        );
        assert!(!s
            .iter()
            .any(|x| x.name == "vmsync_check_slice_success_timestamp_seconds"));
        // 9 per check run (differing bytes, no write stats), 10 per sync;
        // the cycle adds N, started and completed.
        assert_eq!(s.len(), 9 + 10 + 3);
    }

    #[test]
    fn merge_keeps_other_destinations_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.prom");
        write_textfile(&path, &run("b", false, 0, 10.0)).unwrap();
        write_textfile(&path, &run("a", false, 0, 20.0)).unwrap();
        write_textfile(&path, &run("a", true, 1, 30.0)).unwrap();
        let mut again = run("b", false, 0, 40.0);
        again.wire_bytes = 7;
        write_textfile(&path, &again).unwrap();
        let s = read(&path);
        let last_run = |d, m| value(&s, "vmsync_last_run_timestamp_seconds", d, m);
        assert_eq!(last_run("a", "sync"), Some(20.0));
        assert_eq!(last_run("a", "check"), Some(30.0));
        assert_eq!(last_run("b", "sync"), Some(40.0));
        assert_eq!(value(&s, "vmsync_wire_bytes", "b", "sync"), Some(7.0));
        assert_eq!(
            value(&s, "vmsync_wire_bytes", "a", "sync"),
            Some(1_234_567.0)
        );
        // 10 samples per sync series (dest written, write mode), 9 for the
        // check series (differing bytes), which failed: no last success.
        assert_eq!(s.len(), 10 + 10 + 8);

        // Deterministic: the same runs in another order give the same bytes.
        let other = dir.path().join("n.prom");
        write_textfile(&other, &run("a", true, 1, 30.0)).unwrap();
        write_textfile(&other, &again).unwrap();
        write_textfile(&other, &run("a", false, 0, 20.0)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            std::fs::read_to_string(&other).unwrap()
        );
        let names: Vec<&str> = s.iter().map(|x| x.name.as_str()).collect();
        let mut families: Vec<&str> = names.clone();
        families.dedup();
        let order: Vec<&str> = FAMILIES
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| families.contains(n))
            .collect();
        assert_eq!(families, order, "families in the fixed order, each once");
    }

    #[test]
    fn failure_keeps_the_last_success() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.prom");
        let success = "vmsync_last_success_timestamp_seconds";

        // Never succeeded: no sample at all, rather than 0.
        write_textfile(&path, &run("d", false, 4, 100.0)).unwrap();
        let s = read(&path);
        assert_eq!(value(&s, success, "d", "sync"), None);
        assert_eq!(value(&s, "vmsync_last_exit_code", "d", "sync"), Some(4.0));

        write_textfile(&path, &run("d", false, 0, 200.5)).unwrap();
        write_textfile(&path, &run("d", false, 3, 300.0)).unwrap();
        write_textfile(&path, &run("d", false, 130, 400.0)).unwrap();
        let s = read(&path);
        assert_eq!(value(&s, success, "d", "sync"), Some(200.5));
        assert_eq!(
            value(&s, "vmsync_last_run_timestamp_seconds", "d", "sync"),
            Some(400.0)
        );
        assert_eq!(value(&s, "vmsync_last_exit_code", "d", "sync"), Some(130.0));
        // A success of the check series is not one of the sync series.
        write_textfile(&path, &run("e", true, 0, 500.0)).unwrap();
        write_textfile(&path, &run("e", false, 3, 600.0)).unwrap();
        let s = read(&path);
        assert_eq!(value(&s, success, "e", "check"), Some(500.0));
        assert_eq!(value(&s, success, "e", "sync"), None);
    }

    #[test]
    fn label_values_are_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.prom");
        let nasty = "h:/a \"b\"\\c\nd} x=\"1\",";
        write_textfile(&path, &run(nasty, false, 0, 1.0)).unwrap();
        write_textfile(&path, &run("plain", false, 0, 2.0)).unwrap();
        write_textfile(&path, &run(nasty, false, 3, 3.0)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(r#"{destination="h:/a \"b\"\\c\nd} x=\"1\",",mode="sync"}"#),
            "{text}"
        );
        let s = read(&path);
        // Read back as one series: the merge found the earlier samples.
        assert_eq!(s.len(), 20);
        assert_eq!(
            value(&s, "vmsync_last_success_timestamp_seconds", nasty, "sync"),
            Some(1.0)
        );
        assert_eq!(
            value(&s, "vmsync_last_run_timestamp_seconds", nasty, "sync"),
            Some(3.0)
        );
    }

    #[test]
    fn garbage_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.prom");
        for garbage in [
            &b"not metrics {{{\n"[..],
            b"\xff\xfe\x00binary",
            b"vmsync_last_exit_code{destination=\"a\",mode=\"sync\"} 0 1718000000000\n",
            b"vmsync_last_exit_code{destination=\"a\\x\",mode=\"sync\"} 0\n",
            b"vmsync_last_exit_code{destination=\"a\",mode=\"sync\"} zero\n",
        ] {
            std::fs::write(&path, garbage).unwrap();
            write_textfile(&path, &run("b", false, 0, 1.0)).unwrap();
            let s = read(&path);
            assert_eq!(s.len(), 10, "{}", String::from_utf8_lossy(garbage));
            assert!(s.iter().all(|x| x.labels[0].1 == "b"));
        }
        // Foreign samples in a valid file are dropped, ours kept.
        std::fs::write(
            &path,
            "# TYPE other gauge\nother 1\n\
             vmsync_wire_bytes{destination=\"a\",mode=\"sync\",extra=\"x\"} 5\n\
             vmsync_wire_bytes{mode=\"sync\",destination=\"a\"} 6\n",
        )
        .unwrap();
        write_textfile(&path, &run("b", false, 0, 1.0)).unwrap();
        let s = read(&path);
        assert_eq!(s.len(), 11);
        assert_eq!(value(&s, "vmsync_wire_bytes", "a", "sync"), Some(6.0));
    }

    #[test]
    fn unreadable_or_unwritable_paths_are_errors_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A directory cannot be read as the old file.
        let sub = dir.path().join("sub.prom");
        std::fs::create_dir(&sub).unwrap();
        let e = write_textfile(&sub, &run("a", false, 0, 1.0)).unwrap_err();
        assert!(
            format!("{e:#}").contains(&sub.display().to_string()),
            "{e:#}"
        );
        // A missing directory cannot be written.
        let missing = dir.path().join("nope").join("m.prom");
        let e = write_textfile(&missing, &run("a", false, 0, 1.0)).unwrap_err();
        assert!(format!("{e:#}").contains("nope"), "{e:#}");
        // A file far too large to be ours is not replaced.
        let big = dir.path().join("disk.img");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_EXISTING + 1)
            .unwrap();
        let e = write_textfile(&big, &run("a", false, 0, 1.0)).unwrap_err();
        assert!(format!("{e:#}").contains("disk.img"), "{e:#}");
        assert_eq!(std::fs::metadata(&big).unwrap().len(), MAX_EXISTING + 1);
    }

    #[test]
    fn concurrent_writers_lose_no_update() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.prom");
        std::thread::scope(|scope| {
            for t in 0..8 {
                let path = &path;
                scope.spawn(move || {
                    for i in 0..10 {
                        let r = run(&format!("dest{t}"), false, 0, f64::from(i));
                        write_textfile(path, &r).unwrap();
                    }
                });
            }
        });
        let s = read(&path);
        assert_eq!(s.len(), 10 * 8);
        for t in 0..8 {
            let d = format!("dest{t}");
            assert_eq!(
                value(&s, "vmsync_last_run_timestamp_seconds", &d, "sync"),
                Some(9.0)
            );
        }
    }

    #[test]
    fn numbers_read_back_exactly() {
        for x in [0.0, 1.5, 1e-7, 12.345678912, 1e21, f64::MAX, -0.0] {
            assert_eq!(seconds(x).parse::<f64>().unwrap(), x, "{}", seconds(x));
        }
        assert_eq!(seconds(f64::INFINITY), "+Inf");
        assert_eq!(seconds(f64::NAN), "NaN");
        assert_eq!(round_ms(1_718_000_000.123_6), 1_718_000_000.124);
        assert_eq!(round_ms(f64::MAX), f64::MAX);
        let mut samples = Samples::new();
        let mut r = run("x", false, 0, f64::NAN);
        r.duration_secs = f64::INFINITY;
        r.source_bytes = u64::MAX;
        merge(&mut samples, &r);
        let s = prom::parse(&render(&samples)).unwrap();
        assert!(value(&s, "vmsync_last_run_timestamp_seconds", "x", "sync")
            .unwrap()
            .is_nan());
        assert_eq!(
            value(&s, "vmsync_source_bytes", "x", "sync"),
            Some(u64::MAX as f64)
        );
        assert!(render(&samples).contains(&format!(" {}\n", u64::MAX)));
    }

    /// The strict parser itself rejects what the collector would.
    #[test]
    fn strict_parser_rejects_invalid_text() {
        let ok = "# HELP m A \\\\ help\\n.\n# TYPE m gauge\nm{a=\"x\\\"y\"} 1.5\nm 2\n";
        assert_eq!(prom::parse(ok).unwrap().len(), 2);
        for bad in [
            "m 1\n",                                                   // no TYPE
            "# TYPE m gauge\n# TYPE m gauge\nm 1\n",                   // TYPE twice
            "# HELP m a\n# HELP m b\n# TYPE m gauge\nm 1\n",           // HELP twice
            "# TYPE m gauge\nm 1\n# TYPE m gauge\n",                   // TYPE after samples
            "# TYPE m gauge\nm{a=\"\\x\"} 1\n",                        // bad escape
            "# TYPE m gauge\nm{a=\"x\"} one\n",                        // not a float
            "# TYPE m gauge\nm{a=\"x\"} 1 1000\n",                     // timestamp
            "# TYPE m gauge\nm{a=\"x\"} 1\nm{a=\"x\"} 2\n",            // duplicate series
            "# TYPE m gauge\nm{1a=\"x\"} 1\n",                         // label name
            "# TYPE m gauge\nm{__a=\"x\"} 1\n",                        // reserved label
            "# TYPE m gauge\nm{a=\"x\",a=\"y\"} 1\n",                  // label twice
            "# TYPE 1m gauge\n",                                       // metric name
            "# TYPE m gauge\n# TYPE n gauge\nm 1\nn 1\nm{a=\"\"} 1\n", // not grouped
            "# TYPE m gauge\nm 1",                                     // no final newline
            "# TYPE m gauge\nm{a=\"x\" 1\n",                           // unterminated
            "# HELP m bad \\t\n# TYPE m gauge\n",                      // HELP escape
        ] {
            assert!(prom::parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
