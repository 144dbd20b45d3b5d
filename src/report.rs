//! What a run prints: the `--stats` summary, `--check` differences, the
//! `--json` object, and errors.
//!
//! Results go to stdout, errors and progress to stderr. A closed stdout (as
//! in `vmsync --json … | head -c 10`) is not an error worth reporting, so
//! write failures on stdout are ignored.

use std::io::Write;

use serde_json::{json, Value};

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
    }
    if stats {
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
    }
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
        "source_changed": s.source_changed,
        "dry_run": s.dry_run,
        "checked_bytes": s.checked_bytes,
        "differing_bytes": s.differing_bytes,
        "difference_count": s.range_count,
        "differences": s.ranges.iter().map(|(o, l)| json!({"offset": o, "length": l})).collect::<Vec<_>>(),
        "exit_code": report.exit().code(),
        "error": Value::Null,
    })
}

/// The `--json` object of a run that failed before it had a result.
pub fn error_json(exit_code: u8, msg: &str) -> Value {
    json!({
        "source_bytes": 0, "reused_bytes": 0, "literal_bytes": 0, "wire_bytes": 0,
        "zero_bytes": 0, "duration_s": 0.0, "identical": Value::Null, "up_to_date": false,
        "verified": false, "basis_cached": false, "source_changed": false, "dry_run": false,
        "checked_bytes": 0, "differing_bytes": 0, "difference_count": 0,
        "differences": [], "exit_code": exit_code, "error": msg,
    })
}

/// Prints an error (and its JSON object under `--json`); returns its exit code.
pub fn error(e: &anyhow::Error, json_out: bool) -> Exit {
    let exit = exit_code_of(e);
    let msg = message_of(e);
    if json_out {
        let _ = writeln!(
            std::io::stdout().lock(),
            "{}",
            error_json(exit.code(), &msg)
        );
    }
    eprintln!("vmsync: error: {msg}");
    exit
}

/// `--metrics-file`: records this run for the destination `dst`. A failure
/// to write is a warning on stderr (which cron mails), not the run's
/// failure: the sync itself may well have succeeded.
pub fn write_metrics(
    path: &std::path::Path,
    src: &str,
    dst: &str,
    check: bool,
    report: Option<&Report>,
    exit: Exit,
    duration: std::time::Duration,
) {
    let s = report.map(|r| &r.summary);
    let run = crate::metrics::RunMetrics {
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
    };
    if let Err(e) = crate::metrics::write_textfile(path, &run) {
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
