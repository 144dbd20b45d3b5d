//! The three phases of a recursive sync (see [`crate::client::tree`]), each a step of
//! its own: plan the directories and make them, plan and run the file
//! jobs, then plan and apply symlinks, special files, hard links ([`super::meta`]),
//! deletions and attributes. Each change planned is also `-i`'s line.

use std::collections::HashMap;
use std::time::Duration;

use crate::client::Report;
use crate::error::{exit_code_of, message_of, Exit};
use crate::roles::list::{join, parent_of, shown, within};
use crate::wire::{attrs, EntryKind, Op, Summary};

use crate::client::tree::meta::{attrs_op, Links, Planned};
use crate::client::tree::report::{EntryError, FileResult, TreeReport};
use crate::client::tree::{Job, Tree};

/// Directories that could not be made, and why.
type Blocked = Vec<(Vec<u8>, String)>;

impl Tree<'_> {
    /// Phases 1 to 3 (see the module doc). Each step that can lose the
    /// whole run sets `report.fatal` and the rest is skipped.
    pub(super) fn sync(&self, report: &mut TreeReport, wire: &mut u64) {
        let dry = self.cfg.dry_run;
        // Directories that could not be made: nothing goes beneath them.
        let mut blocked: Blocked = Vec::new();

        let ops = self.directory_ops(report, &mut blocked);
        if !dry && !self.make_directories(&ops, &mut blocked, report, wire) {
            return;
        }
        for (d, why) in &blocked {
            report.errors.push(EntryError {
                path: self.shown_dst(d),
                exit: Exit::Io,
                message: why.clone(),
            });
        }

        let links = self.link_groups();
        let jobs = self.file_jobs(&blocked, &links, report);
        self.transfer_all(jobs, report);
        if report.fatal.is_some() {
            return;
        }

        let mut ops = self.symlink_ops(&blocked, report);
        self.special_ops(&blocked, &mut ops, report);
        self.link_ops(&links, &blocked, &mut ops, report);
        self.delete_ops(&mut ops, report);
        self.attribute_ops(&blocked, &links, &mut ops, report);
        if !dry {
            self.finish_entries(&ops, report, wire);
        }
    }

    /// Why `rel` cannot be synced: it lies beneath a directory that could
    /// not be made.
    pub(super) fn blocked_by(&self, blocked: &[(Vec<u8>, String)], rel: &[u8]) -> Option<String> {
        blocked
            .iter()
            .find(|(d, _)| within(rel, d))
            .map(|(d, why)| format!("not synced: {}: {why}", self.shown_dst(d)))
    }

    /// Phase 1's operations: the tree's root (and its container), each
    /// directory the destination lacks, and the removal of a link or a
    /// special file where a file belongs.
    fn directory_ops(&self, report: &mut TreeReport, blocked: &mut Blocked) -> Planned {
        let root = self.src.root().expect("listed");
        let mut ops: Planned = Vec::new();
        ops.push((
            Op::Mkdir {
                path: Vec::new(),
                // A container made for `dst/NAME` gets the usual mode;
                // the tree's root gets the source's at the end.
                mode: if self.prefix.is_some() {
                    0o777
                } else {
                    root.mode & 0o7777
                },
            },
            Vec::new(),
        ));
        if let Some(p) = &self.prefix {
            ops.push((
                Op::Mkdir {
                    path: p.clone(),
                    mode: root.mode & 0o7777,
                },
                Vec::new(),
            ));
        }
        if self.dst.root().is_none() {
            self.itemize(report, 'c', root, self.changes(root, None), "");
        }
        for e in self.src.entries.iter().skip(1) {
            if e.kind != EntryKind::Dir || self.blocked_by(blocked, &e.path).is_some() {
                continue;
            }
            match self.dst.get(&e.path).map(|d| d.kind) {
                Some(EntryKind::Dir) => {}
                None | Some(EntryKind::Symlink) => {
                    self.itemize(report, 'c', e, self.changes(e, None), "");
                    ops.push((
                        Op::Mkdir {
                            path: self.dpath(&e.path),
                            mode: e.mode & 0o7777,
                        },
                        e.path.clone(),
                    ))
                }
                Some(_) => blocked.push((
                    e.path.clone(),
                    "the destination has a file there, the source a directory".into(),
                )),
            }
        }
        // A link (or a fifo, a device node) where a file belongs goes
        // first: the engine would replace a link to a file, but takes a
        // link to a directory for a directory to write into.
        for e in &self.src.entries {
            let old = self.dst.get(&e.path).map(|d| d.kind);
            if e.kind == EntryKind::File
                && matches!(old, Some(EntryKind::Symlink | EntryKind::Other))
                && self.blocked_by(blocked, &e.path).is_none()
            {
                ops.push((
                    Op::Delete {
                        path: self.dpath(&e.path),
                    },
                    e.path.clone(),
                ));
            }
        }
        ops
    }

    /// Applies phase 1's operations. A directory that fails blocks what
    /// lies beneath it; `false` when the run cannot go on (the tree's root
    /// could not be made, or the destination is lost).
    fn make_directories(
        &self,
        ops: &[(Op, Vec<u8>)],
        blocked: &mut Blocked,
        report: &mut TreeReport,
        wire: &mut u64,
    ) -> bool {
        let results = match self.apply_ops(ops, wire) {
            Ok(results) => results,
            Err(e) => {
                report.fatal = Some((exit_code_of(&e), message_of(&e)));
                return false;
            }
        };
        for ((op, rel), r) in ops.iter().zip(results) {
            if r.status != 0 {
                // The tree's root (or its container) could not be made:
                // nothing can go anywhere.
                if rel.is_empty() {
                    let at = shown(&join(&self.dst_path, op.path()));
                    report.fatal = Some((
                        Exit::from_code(r.status),
                        format!("destination {at}: {}", r.message),
                    ));
                    return false;
                }
                // What lies beneath a failed directory fails with it.
                if self.blocked_by(blocked, rel).is_none() {
                    blocked.push((rel.clone(), r.message));
                }
            } else if !r.message.is_empty() {
                crate::log::warn(&r.message);
            }
        }
        true
    }

    /// Phase 2's jobs: every regular file that can be synced. Those that
    /// cannot are reported failed here; in a dry run, a file whose
    /// directory does not exist yet is reported as sent whole.
    fn file_jobs(
        &self,
        blocked: &[(Vec<u8>, String)],
        links: &Links,
        report: &mut TreeReport,
    ) -> Vec<Job> {
        let mut jobs = Vec::new();
        for e in &self.src.entries {
            // `-H`: a group's other names are linked, not sent.
            if e.kind != EntryKind::File || links.contains_key(&e.path) {
                continue;
            }
            let failed = |why: String| FileResult {
                path: self.shown_dst(&e.path),
                size: e.size,
                outcome: Err((Exit::Io, why)),
            };
            if let Some(why) = self.blocked_by(blocked, &e.path) {
                report.files.push(failed(why));
            } else if self.dst_is_dir(&e.path) {
                report.files.push(failed(
                    "the destination is a directory; the source has a file there".into(),
                ));
            } else if self.cfg.dry_run && !(self.dst_is_dir(parent_of(&e.path))) {
                // Its directory does not exist yet: all of it would be sent.
                report.files.push(FileResult {
                    path: self.shown_dst(&e.path),
                    size: e.size,
                    outcome: Ok(Report {
                        summary: Summary {
                            dry_run: true,
                            source_bytes: e.size,
                            literal_bytes: e.size,
                            ..Summary::default()
                        },
                        source_bytes: e.size,
                        wire_bytes: 0,
                        duration: Duration::ZERO,
                        check: false,
                    }),
                });
            } else {
                jobs.push(Job {
                    rel: e.path.clone(),
                    size: e.size,
                    prescan: self.worth_prescanning(e, self.cfg.checksum),
                });
            }
        }
        jobs
    }

    /// Phase 3, links: each one the destination lacks (or has with
    /// another target), and its owner and time when they differ.
    fn symlink_ops(&self, blocked: &[(Vec<u8>, String)], report: &mut TreeReport) -> Planned {
        let mut ops: Planned = Vec::new();
        for e in &self.src.entries {
            if e.kind != EntryKind::Symlink {
                continue;
            }
            // Counted with its directory's failure.
            if self.blocked_by(blocked, &e.path).is_some() {
                continue;
            }
            let c = self.changes(e, self.dst.get(&e.path));
            let same = !c.new && !c.value;
            if !same {
                ops.push((
                    Op::Symlink {
                        path: self.dpath(&e.path),
                        target: e.target.clone(),
                    },
                    e.path.clone(),
                ));
            }
            if c.any() {
                let y = if same { '.' } else { 'c' };
                let to = format!(" -> {}", String::from_utf8_lossy(&e.target));
                self.itemize(report, y, e, c, &to);
                ops.push((
                    attrs_op(self, e, attrs::OWNER | attrs::MTIME | self.xbits()),
                    e.path.clone(),
                ));
            }
        }
        ops
    }

    /// Phase 3, `--delete`: what the source lacks, children before their
    /// directory; nothing when anything failed. A dry run only reports it.
    fn delete_ops(&self, ops: &mut Planned, report: &mut TreeReport) {
        if !self.cfg.delete {
            return;
        }
        if report.files_failed() != 0 || !report.errors.is_empty() {
            crate::log::warn("some entries failed: --delete deletes nothing this run");
            return;
        }
        // The reverse of the listing.
        for e in self.dst.entries.iter().skip(1).rev() {
            if self.src.get(&e.path).is_none() {
                report.changed_entries += 1;
                if self.cfg.itemize {
                    let slash = if e.kind == EntryKind::Dir { "/" } else { "" };
                    report.items.push((
                        e.path.clone(),
                        format!("*deleting   {}{slash}", self.shown_dst(&e.path)),
                    ));
                }
                if self.cfg.dry_run {
                    report.deleted.push(self.shown_dst(&e.path));
                } else {
                    ops.push((
                        Op::Delete {
                            path: self.dpath(&e.path),
                        },
                        e.path.clone(),
                    ));
                }
            }
        }
    }

    /// Phase 3, attributes: mode and owner of each file synced, when they
    /// differ, and its extended attributes (after a transfer always: the
    /// engine's rename leaves the old file's behind), then everything of
    /// each directory, deepest first.
    fn attribute_ops(
        &self,
        blocked: &[(Vec<u8>, String)],
        links: &Links,
        ops: &mut Planned,
        report: &mut TreeReport,
    ) {
        let synced: HashMap<String, bool> = report
            .files
            .iter()
            .filter_map(|f| {
                let r = f.outcome.as_ref().ok()?;
                Some((f.path.clone(), !r.summary.up_to_date))
            })
            .collect();
        for e in &self.src.entries {
            if e.kind != EntryKind::File || links.contains_key(&e.path) {
                continue;
            }
            let Some(&sent) = synced.get(&self.shown_dst(&e.path)) else {
                continue;
            };
            let d = self.dst.get(&e.path);
            let mut c = self.changes(e, d);
            let mut which = 0;
            if d.is_none_or(|d| (d.mode & 0o7777, d.uid, d.gid) != (e.mode & 0o7777, e.uid, e.gid))
            {
                which |= attrs::MODE | attrs::OWNER;
            }
            if sent || c.acl || c.xattr {
                which |= self.xbits();
            }
            if sent {
                c.value = self.cfg.checksum;
                self.itemize(report, self.sent_letter(), e, c, "");
            } else if c.attrs() {
                self.itemize(report, '.', e, c, "");
            }
            if which != 0 {
                ops.push((attrs_op(self, e, which), e.path.clone()));
            }
        }
        for e in self.src.entries.iter().rev() {
            if e.kind == EntryKind::Dir && self.blocked_by(blocked, &e.path).is_none() {
                let d = self.dst.get(&e.path).filter(|d| d.kind == EntryKind::Dir);
                if let Some(d) = d {
                    let c = self.changes(e, Some(d));
                    if c.attrs() {
                        self.itemize(report, '.', e, c, "");
                    }
                }
                ops.push((attrs_op(self, e, attrs::ALL | self.xbits()), e.path.clone()));
            }
        }
    }

    /// Applies phase 3's operations; each failure is the entry's.
    fn finish_entries(&self, ops: &[(Op, Vec<u8>)], report: &mut TreeReport, wire: &mut u64) {
        let results = match self.apply_ops(ops, wire) {
            Ok(results) => results,
            Err(e) => {
                report.fatal = Some((exit_code_of(&e), message_of(&e)));
                return;
            }
        };
        for ((op, rel), r) in ops.iter().zip(results) {
            if r.status != 0 {
                report.errors.push(EntryError {
                    path: self.shown_dst(rel),
                    exit: Exit::from_code(r.status),
                    message: r.message,
                });
            } else if !r.message.is_empty() {
                crate::log::warn(&r.message);
            } else if let Op::Delete { .. } = op {
                report.deleted.push(self.shown_dst(rel));
            }
        }
    }
}
