//! What a run prints: the `--stats` summary, `--check` differences, the
//! `--json` object, and errors.
//!
//! Results go to stdout, errors and progress to stderr. A closed stdout (as
//! in `vmsync --json … | head -c 10`) is not an error worth reporting, so
//! write failures on stdout are ignored.

use std::io::Write;

use serde_json::{json, Value};

use crate::client::tree::TreeReport;
use crate::client::Report;
use crate::error::{exit_code_of, message_of, Exit};
use crate::units::bytes;

/// Ranges listed before "… and N more".
const SCREENFUL: usize = 20;

/// Prints a completed run as the user asked.
pub fn print(report: &Report, stats: bool, json_out: bool, quiet: bool) {
    let mut out = std::io::stdout().lock();
    if json_out {
        let _ = writeln!(out, "{}", to_json(report));
        return;
    }
    let s = &report.summary;
    if report.check {
        if s.identical {
            if !quiet {
                let _ = writeln!(out, "identical ({})", bytes(report.source_bytes));
            }
        } else {
            let _ = writeln!(
                out,
                "files differ: {} ({} bytes) in {} range{}",
                bytes(s.differing_bytes),
                s.differing_bytes,
                s.range_count,
                if s.range_count == 1 { "" } else { "s" }
            );
            print_ranges(&mut out, s);
        }
    } else if s.dry_run && !quiet {
        if s.up_to_date {
            let _ = writeln!(
                out,
                "dry run: up to date (size and modification time match)"
            );
        } else {
            let _ = writeln!(
                out,
                "dry run: would send {} in {} range{} (at most: sub-chunk refinement may send less), \
                 reuse {}, leave {} of zeros; nothing was written",
                bytes(s.literal_bytes),
                s.range_count,
                if s.range_count == 1 { "" } else { "s" },
                bytes(s.reused_bytes),
                bytes(s.zero_bytes)
            );
            print_ranges(&mut out, s);
        }
    }
    if stats {
        print_stats(&mut out, report);
    }
}

/// The first screenful of a summary's byte ranges.
fn print_ranges(out: &mut impl Write, s: &crate::wire::Summary) {
    for (o, l) in s.ranges.iter().take(SCREENFUL) {
        let _ = writeln!(out, "  offset {o}..{} ({})", o + l, bytes(*l));
    }
    if s.range_count > SCREENFUL as u64 {
        let _ = writeln!(
            out,
            "  … and {} more ranges",
            s.range_count - SCREENFUL as u64
        );
    }
}

/// The `--stats` lines for one file, or a tree's totals.
fn print_stats(out: &mut impl Write, report: &Report) {
    let s = &report.summary;
    {
        let secs = report.duration.as_secs_f64();
        let speedup = if report.wire_bytes == 0 {
            0.0
        } else {
            report.source_bytes as f64 / report.wire_bytes as f64
        };
        let _ = writeln!(
            out,
            "source size      {:>12}  ({} bytes)",
            bytes(report.source_bytes),
            report.source_bytes
        );
        if s.up_to_date {
            let _ = writeln!(out, "up to date       size and modification time match; nothing read (use -c to compare contents)");
        }
        if !report.check {
            let _ = writeln!(
                out,
                "reused           {:>12}  (from the existing destination)",
                bytes(s.reused_bytes)
            );
            let _ = writeln!(
                out,
                "literal          {:>12}  (chunk data sent, before compression)",
                bytes(s.literal_bytes)
            );
            let _ = writeln!(
                out,
                "zeros            {:>12}  (never sent, left as holes)",
                bytes(s.zero_bytes)
            );
        }
        let _ = writeln!(
            out,
            "wire             {:>12}  (both directions)",
            bytes(report.wire_bytes)
        );
        let _ = writeln!(
            out,
            "time             {:>10.2} s  ({}/s)",
            secs,
            bytes((report.source_bytes as f64 / secs.max(1e-9)) as u64)
        );
        let _ = writeln!(
            out,
            "speed-up         {speedup:>11.1}x  (source size / wire bytes)"
        );
        if s.verified {
            let _ = writeln!(
                out,
                "verified         re-read from disk, matches the source"
            );
        }
        if s.source_changed {
            let _ = writeln!(
                out,
                "source changed   while it was read; committed anyway (--allow-changing-source)"
            );
        }
        if s.dry_run {
            let _ = writeln!(out, "dry run          nothing was written");
        }
    }
}

/// Prints a completed recursive run: differences or failures, and the
/// totals with `--stats`, or one JSON object.
pub fn print_tree(report: &TreeReport, stats: bool, json_out: bool, quiet: bool) {
    // Failures go to stderr whatever the output mode, like any error.
    for f in &report.files {
        if let Err((_, m)) = &f.outcome {
            eprintln!("vmsync: error: {}: {m}", f.path);
        }
    }
    for e in &report.errors {
        eprintln!("vmsync: error: {}: {}", e.path, e.message);
    }
    if let Some(m) = report.error() {
        eprintln!("vmsync: error: {m}");
    }
    let mut out = std::io::stdout().lock();
    if json_out {
        let _ = writeln!(out, "{}", tree_json(report));
        return;
    }
    if report.itemize {
        for (_, line) in &report.items {
            let _ = writeln!(out, "{line}");
        }
    }
    let totals = report.totals();
    if report.check {
        if report.differing.is_empty() && report.exit() == Exit::Ok {
            if !quiet {
                let _ = writeln!(
                    out,
                    "identical ({} files, {})",
                    report.files.len(),
                    bytes(totals.source_bytes)
                );
            }
        } else if !report.differing.is_empty() {
            let n = report.differing.len();
            let _ = writeln!(
                out,
                "trees differ: {n} path{}",
                if n == 1 { "" } else { "s" }
            );
            for (path, why) in report.differing.iter().take(SCREENFUL) {
                let _ = writeln!(out, "  {path}: {why}");
            }
            if n > SCREENFUL {
                let _ = writeln!(out, "  … and {} more", n - SCREENFUL);
            }
        }
    }
    // `-i` has said it already (`*deleting`).
    if report.dry_run && !quiet && !report.itemize {
        for d in &report.deleted {
            let _ = writeln!(out, "would delete {d}");
        }
    }
    if stats {
        let failed = report.files_failed();
        let up_to_date = report
            .files
            .iter()
            .filter(|f| f.outcome.as_ref().is_ok_and(|r| r.summary.up_to_date))
            .count();
        let _ = writeln!(
            out,
            "files            {:>12}  ({} up to date, {} failed)",
            report.files.len(),
            up_to_date,
            failed
        );
        if !report.deleted.is_empty() {
            let _ = writeln!(
                out,
                "deleted          {:>12}  (--delete{})",
                report.deleted.len(),
                if report.dry_run { ", would be" } else { "" }
            );
        }
        print_stats(&mut out, &totals);
        for f in &report.files {
            if let Err((_, m)) = &f.outcome {
                let _ = writeln!(out, "failed           {}: {m}", f.path);
            }
        }
        for e in &report.errors {
            let _ = writeln!(out, "failed           {}: {}", e.path, e.message);
        }
    }
}

/// The `--json` object of a recursive run: the single-file keys, for the
/// totals, plus the files one by one.
pub fn tree_json(report: &TreeReport) -> Value {
    let mut v = to_json(&report.totals());
    let exit = report.exit();
    v["exit_code"] = json!(exit.code());
    v["error"] = match report.error() {
        Some(m) => json!(m),
        None => Value::Null,
    };
    v["identical"] = if report.check {
        json!(exit == Exit::Ok)
    } else {
        Value::Null
    };
    v["files_total"] = json!(report.files.len());
    v["files_failed"] = json!(report.files_failed());
    v["files"] = report
        .files
        .iter()
        .map(|f| match &f.outcome {
            Ok(r) => json!({
                "path": f.path,
                "exit_code": r.exit().code(),
                "error": Value::Null,
                "source_bytes": r.source_bytes,
                "literal_bytes": r.summary.literal_bytes,
                "reused_bytes": r.summary.reused_bytes,
                "zero_bytes": r.summary.zero_bytes,
                "wire_bytes": r.wire_bytes,
                "write_mode": write_mode_json(r.summary.write_mode),
                "dest_written_bytes": r.summary.dest_written_bytes,
                "up_to_date": r.summary.up_to_date,
                "verified": r.summary.verified,
                "identical": if r.check { Value::Bool(r.summary.identical) } else { Value::Null },
                "differing_bytes": r.summary.differing_bytes,
            }),
            Err((exit, m)) => json!({
                "path": f.path,
                "exit_code": exit.code(),
                "error": m,
                "source_bytes": f.size,
                "literal_bytes": 0,
                "reused_bytes": 0,
                "zero_bytes": 0,
                "wire_bytes": 0,
                "write_mode": Value::Null,
                "dest_written_bytes": 0,
                "up_to_date": false,
                "verified": false,
                "identical": Value::Null,
                "differing_bytes": 0,
            }),
        })
        .collect();
    v["errors"] = report
        .errors
        .iter()
        .map(|e| json!({"path": e.path, "exit_code": e.exit.code(), "error": e.message}))
        .collect();
    v["deleted"] = json!(report.deleted);
    v["differing_paths"] = report
        .differing
        .iter()
        .map(|(p, why)| json!({"path": p, "reason": why}))
        .collect();
    v
}

/// `write_mode` in `--json`: the mode's name, `null` when nothing was
/// written.
fn write_mode_json(m: Option<crate::wire::WriteMode>) -> Value {
    m.map_or(Value::Null, |m| Value::from(m.name()))
}

/// The `--json` object for a completed run.
pub fn to_json(report: &Report) -> Value {
    let s = &report.summary;
    json!({
        "source_bytes": report.source_bytes,
        "reused_bytes": s.reused_bytes,
        "literal_bytes": s.literal_bytes,
        "wire_bytes": report.wire_bytes,
        "zero_bytes": s.zero_bytes,
        "duration_s": report.duration.as_secs_f64(),
        "identical": if report.check { Value::Bool(s.identical) } else { Value::Null },
        "up_to_date": s.up_to_date,
        "verified": s.verified,
        "basis_cached": s.basis_cached,
        "write_mode": write_mode_json(s.write_mode),
        "dest_written_bytes": s.dest_written_bytes,
        "source_changed": s.source_changed,
        "dry_run": s.dry_run,
        "checked_bytes": s.checked_bytes,
        "differing_bytes": s.differing_bytes,
        "difference_count": s.range_count,
        "differences": s.ranges.iter().map(|(o, l)| json!({"offset": o, "length": l})).collect::<Vec<_>>(),
        "snapshot": snapshot_json(s.snapshot.as_deref()),
        "exit_code": report.exit().code(),
        "error": Value::Null,
    })
}

/// `snapshot` in `--json`: what a `--snapshot` run read; `null` without.
fn snapshot_json(s: Option<&crate::wire::messages::SnapshotStats>) -> Value {
    let Some(s) = s else {
        return Value::Null;
    };
    json!({
        "read": if s.delta { "delta" } else { "full" },
        "reason": s.reason,
        "source_read_bytes": s.read_bytes,
        "source_skipped_bytes": s.skipped_bytes,
        "verify_bytes": s.verify_bytes,
        "verify_mismatch_bytes": s.verify_mismatch_bytes,
        "snapshot_ms": s.snapshot_us as f64 / 1e3,
        "frozen_ms": s.frozen_us.map(|f| f as f64 / 1e3),
    })
}

/// The `--json` object of a run that failed before it had a result.
pub fn error_json(exit_code: u8, msg: &str) -> Value {
    json!({
        "source_bytes": 0, "reused_bytes": 0, "literal_bytes": 0, "wire_bytes": 0,
        "zero_bytes": 0, "duration_s": 0.0, "identical": Value::Null, "up_to_date": false,
        "verified": false, "basis_cached": false, "source_changed": false, "dry_run": false,
        "write_mode": Value::Null, "dest_written_bytes": 0,
        "checked_bytes": 0, "differing_bytes": 0, "difference_count": 0,
        "differences": [], "snapshot": Value::Null, "exit_code": exit_code, "error": msg,
    })
}

/// Prints an error (and its JSON object under `--json`, with the `-r`
/// keys when `recursive`); returns its exit code.
pub fn error(e: &anyhow::Error, json_out: bool, recursive: bool) -> Exit {
    let exit = exit_code_of(e);
    error_message(exit, &message_of(e), json_out, recursive);
    exit
}

/// [`error`] for a failure known by its exit code and message.
pub fn error_message(exit: Exit, msg: &str, json_out: bool, recursive: bool) {
    if json_out {
        let mut v = error_json(exit.code(), msg);
        if recursive {
            for key in ["files", "errors", "deleted", "differing_paths"] {
                v[key] = json!([]);
            }
            v["files_total"] = json!(0);
            v["files_failed"] = json!(0);
        }
        let _ = writeln!(std::io::stdout().lock(), "{v}");
    }
    eprintln!("vmsync: error: {msg}");
}

/// `--metrics-file`: records this run for the destination `dst`. A failure
/// to write is a warning on stderr (which cron mails), not the run's
/// failure: the sync itself may well have succeeded.
#[allow(clippy::too_many_arguments)]
pub fn write_metrics(
    path: &std::path::Path,
    src: &str,
    dst: &str,
    check: bool,
    sample: Option<(u32, u32)>,
    report: Option<&Report>,
    exit: Exit,
    duration: std::time::Duration,
) {
    let s = report.map(|r| &r.summary);
    let run = crate::app::metrics::RunMetrics {
        source: src.to_string(),
        destination: dst.to_string(),
        check,
        exit_code: exit.code(),
        end_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        duration_secs: duration.as_secs_f64(),
        source_bytes: report.map_or(0, |r| r.source_bytes),
        wire_bytes: report.map_or(0, |r| r.wire_bytes),
        literal_bytes: s.map_or(0, |s| s.literal_bytes),
        reused_bytes: s.map_or(0, |s| s.reused_bytes),
        differing_bytes: if check {
            s.map(|s| s.differing_bytes)
        } else {
            None
        },
        dest_written_bytes: s.map(|s| s.dest_written_bytes),
        write_mode: s.map(|s| s.write_mode),
        snapshot: s.and_then(|s| s.snapshot.as_deref().copied()),
        sample,
    };
    if let Err(e) = crate::app::metrics::write_textfile(path, &run) {
        eprintln!("vmsync: warning: {}", message_of(&e));
    }
}

/// The `--log-file` line that says how the run ended.
pub fn log_outcome(outcome: Result<&Report, &anyhow::Error>, exit: Exit) {
    let what = match outcome {
        Ok(r) if r.check && r.summary.identical => "identical".to_string(),
        Ok(r) if r.check => format!(
            "files differ: {} in {} ranges",
            bytes(r.summary.differing_bytes),
            r.summary.range_count
        ),
        Ok(r) if r.summary.up_to_date => "up to date (size and mtime match)".to_string(),
        Ok(r) => format!(
            "synced {}: {} reused, {} sent, {} on the wire, {:.2} s",
            bytes(r.source_bytes),
            bytes(r.summary.reused_bytes),
            bytes(r.summary.literal_bytes),
            bytes(r.wire_bytes),
            r.duration.as_secs_f64()
        ),
        Err(e) => format!("error: {}", message_of(e)),
    };
    crate::log::to_file(&format!("exit {}: {what}", exit.code()));
}

/// The `--log-file` lines that say how a recursive run ended.
pub fn log_tree_outcome(report: &TreeReport, exit: Exit) {
    for f in &report.files {
        if let Err((_, m)) = &f.outcome {
            crate::log::to_file(&format!("failed: {}: {m}", f.path));
        }
    }
    for e in &report.errors {
        crate::log::to_file(&format!("failed: {}: {}", e.path, e.message));
    }
    let t = report.totals();
    crate::log::to_file(&format!(
        "exit {}: {}{} files ({} failed), {} deleted: {} reused, {} sent, {} on the wire, {:.2} s",
        exit.code(),
        report.error().map(|m| m + "; ").unwrap_or_default(),
        report.files.len(),
        report.files_failed(),
        report.deleted.len(),
        bytes(t.summary.reused_bytes),
        bytes(t.summary.literal_bytes),
        bytes(t.wire_bytes),
        t.duration.as_secs_f64()
    ));
}
