//! What a recursive run reports: each file's outcome, the other entries'
//! failures, and the totals shared with single-file runs.

use std::time::Duration;

use crate::client::Report;
use crate::error::Exit;
use crate::wire::Summary;

/// One file's outcome.
#[derive(Debug)]
pub struct FileResult {
    /// As shown: relative to the destination operand.
    pub path: String,
    pub size: u64,
    pub outcome: std::result::Result<Report, (Exit, String)>,
}

/// A failure of something other than a file's transfer: a listing, a
/// directory, a symlink, a deletion.
#[derive(Debug, Clone)]
pub struct EntryError {
    pub path: String,
    pub exit: Exit,
    pub message: String,
}

/// The outcome of a recursive run.
#[derive(Debug, Default)]
pub struct TreeReport {
    pub check: bool,
    pub dry_run: bool,
    pub files: Vec<FileResult>,
    pub errors: Vec<EntryError>,
    /// Deleted (or, in a dry run, to be deleted) by `--delete`.
    pub deleted: Vec<String>,
    /// `--check`: paths that differ, and how.
    pub differing: Vec<(String, String)>,
    /// Entries made, changed or deleted (files sent among them).
    pub changed_entries: u64,
    /// `-i`: whether to print [`TreeReport::items`].
    pub itemize: bool,
    /// `-i`'s lines (rsync's `YXcstpoguax path`), each with the
    /// tree-relative path it is sorted by.
    pub items: Vec<(Vec<u8>, String)>,
    /// Wire bytes of listings and operations (the files' are their own).
    pub other_wire_bytes: u64,
    pub duration: Duration,
    /// What stopped the run early (a lost connection, an interrupt).
    pub fatal: Option<(Exit, String)>,
}

impl TreeReport {
    pub fn files_failed(&self) -> usize {
        self.files.iter().filter(|f| f.outcome.is_err()).count()
    }

    pub fn exit(&self) -> Exit {
        if let Some((exit, _)) = &self.fatal {
            *exit
        } else if self.files_failed() > 0 || !self.errors.is_empty() {
            Exit::Partial
        } else if self.check && !self.differing.is_empty() {
            Exit::Differ
        } else {
            Exit::Ok
        }
    }

    /// The run's error message; `None` for a success or a check's differences.
    pub fn error(&self) -> Option<String> {
        if let Some((_, m)) = &self.fatal {
            return Some(m.clone());
        }
        let failed = self.files_failed();
        if failed == 0 && self.errors.is_empty() {
            return None;
        }
        let mut m = format!(
            "partial transfer: {failed} of {} files failed",
            self.files.len()
        );
        if !self.errors.is_empty() {
            m.push_str(&format!(
                ", and {} other entr{}",
                self.errors.len(),
                if self.errors.len() == 1 { "y" } else { "ies" }
            ));
        }
        Some(m)
    }

    /// The totals, as one single-file report (for the summary lines shared
    /// with single-file runs, `--metrics-file` and `--log-file`).
    pub fn totals(&self) -> Report {
        let ok: Vec<&Report> = self
            .files
            .iter()
            .filter_map(|f| f.outcome.as_ref().ok())
            .collect();
        let sum = |f: fn(&Report) -> u64| ok.iter().map(|r| f(r)).sum::<u64>();
        let all = |f: fn(&Summary) -> bool| !ok.is_empty() && ok.iter().all(|r| f(&r.summary));
        let summary = Summary {
            up_to_date: ok.iter().all(|r| r.summary.up_to_date)
                && self.changed_entries == 0
                && self.exit() == Exit::Ok,
            identical: self.check && self.exit() == Exit::Ok,
            verified: all(|s| s.verified),
            basis_cached: ok.iter().any(|r| r.summary.basis_cached),
            source_changed: ok.iter().any(|r| r.summary.source_changed),
            dry_run: self.dry_run,
            source_bytes: sum(|r| r.summary.source_bytes),
            reused_bytes: sum(|r| r.summary.reused_bytes),
            literal_bytes: sum(|r| r.summary.literal_bytes),
            zero_bytes: sum(|r| r.summary.zero_bytes),
            dest_written_bytes: sum(|r| r.summary.dest_written_bytes),
            // One mode when every file written was written one way.
            write_mode: {
                let mut modes = ok.iter().filter_map(|r| r.summary.write_mode);
                let first = modes.next();
                first.filter(|m| modes.all(|n| n == *m))
            },
            differing_bytes: sum(|r| r.summary.differing_bytes),
            checked_bytes: sum(|r| r.summary.checked_bytes),
            range_count: self.differing.len() as u64,
            ranges: Vec::new(),
            verify_mismatch_bytes: sum(|r| r.summary.verify_mismatch_bytes),
            // `-r` takes no snapshots (refused by the configuration).
            snapshot: None,
        };
        Report {
            summary,
            source_bytes: self
                .files
                .iter()
                .map(|f| match &f.outcome {
                    Ok(r) => r.source_bytes,
                    Err(_) => 0,
                })
                .sum(),
            wire_bytes: sum(|r| r.wire_bytes) + self.other_wire_bytes,
            duration: self.duration,
            check: self.check,
        }
    }
}
