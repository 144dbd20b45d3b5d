//! `-r` on the invoking end: keep a directory of images in sync, one file
//! at a time.
//!
//! A recursive run lists both trees (the source, and the destination as
//! far as it exists), then works in three phases:
//!
//! 1. directories are created (writable by us until phase 3, so that a
//!    read-only directory can still be filled);
//! 2. each regular file is synced by the single-file engine in a session of
//!    its own (`client::transfer`: a new ssh, or a new local
//!    server, per file), up to [`WORKERS`] at once, largest first;
//! 3. symlinks are made, `--delete` removes what the source lacks (only
//!    when nothing failed), then permissions, owners (when the receiving
//!    end is root) and modification times are set, deepest directory first,
//!    so that nothing done afterwards moves a directory's mtime.
//!
//! A remote tree is listed and changed through the `List` and `Apply`
//! roles of the protocol ([`crate::roles::list`], [`crate::roles::apply`]);
//! a local one directly, with the same code ([`list_local`], [`Applier`]).
//! One file's failure does not stop the others: it is reported, and the run
//! exits 23.

use std::collections::HashSet;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::client;
use crate::client::config::Config;
use crate::client::spawn::{Operand, Remote};
use crate::error::{exit_code_of, fail, message_of, Exit, WithExit};
use crate::filter::Filter;
use crate::progress::Progress;
use crate::roles::apply::Applier;
use crate::roles::list::{join, list_local, parent_of, read_listing, shown, within, Listing};
use crate::units::bytes_path;
use crate::wire::frame::LOCAL_PEER;
use crate::wire::{list_flags, EntryKind, ListEntry, Msg, Op, OpResult, Open, Role, MAX_OPS};

mod meta;
mod report;
mod sync;

pub use report::{EntryError, FileResult, TreeReport};

/// File sessions run at once: enough to overlap one file's fsync and
/// network round trips with another's transfer, few enough that image-sized
/// files do not compete for the disk.
pub const WORKERS: usize = 3;
/// One end of a recursive run: where its tree is.
#[derive(Clone)]
enum End<'a> {
    Local,
    Remote(&'a Remote),
}

impl End<'_> {
    fn operand(&self, path: Vec<u8>) -> Operand {
        match self {
            End::Local => Operand::Local(bytes_path(&path)),
            End::Remote(r) => Operand::Remote(Remote {
                path,
                ..(*r).clone()
            }),
        }
    }
}

fn operand_parts(op: &Operand) -> (End<'_>, Vec<u8>) {
    match op {
        Operand::Local(p) => (End::Local, p.as_os_str().as_bytes().to_vec()),
        Operand::Remote(r) => (End::Remote(r), r.path.clone()),
    }
}

/// Lists `path` at `end`; `None` when it does not exist and `missing_ok`.
fn list(
    cfg: &Config,
    end: &End,
    path: &[u8],
    missing_ok: bool,
    filter: &Filter,
    wire: &mut u64,
) -> Result<Option<Listing>> {
    let mut flags = 0;
    for (on, flag) in [
        (cfg.tree.xattrs, list_flags::XATTRS),
        (cfg.tree.acls, list_flags::ACLS),
        (cfg.tree.one_file_system, list_flags::ONE_FILE_SYSTEM),
    ] {
        if on {
            flags |= flag;
        }
    }
    let (all, peer) = match end {
        End::Local => {
            let p = bytes_path(path);
            match list_local(&p, filter, flags)? {
                Some(all) => (all, LOCAL_PEER.to_string()),
                None if missing_ok => return Ok(None),
                None => {
                    return Err(io::Error::from_raw_os_error(libc::ENOENT))
                        .with_context(|| format!("cannot open source {}", p.display()))
                        .exit_with(Exit::Io)
                }
            }
        }
        End::Remote(r) => {
            let open = Open {
                role: Role::List,
                path: path.to_vec(),
                ..meta_open(cfg)
            };
            let rules = cfg.filters.clone();
            if missing_ok {
                flags |= list_flags::MISSING_OK;
            }
            let (all, w) = client::session(
                Some(r),
                &client::launch(cfg),
                open,
                &mut Progress::hidden(),
                |mut reader, writer, _| {
                    writer.send_now(&Msg::List { flags, rules })?;
                    read_listing(&mut reader)
                },
            )?;
            *wire += w;
            if all.is_empty() {
                return Ok(None);
            }
            (all, r.host.clone())
        }
    };
    let all = match &cfg.files_from {
        Some(only) => select(all, only),
        None => all,
    };
    Listing::new(all, &peer).map(Some)
}

/// `--files-from`: the entries of a listing that are listed, lie beneath a
/// listed directory, or are directories leading to a listed path. Applied
/// to both ends' listings alike, so `--delete` only deletes among them.
fn select(all: Vec<ListEntry>, only: &[Vec<u8>]) -> Vec<ListEntry> {
    let listed: HashSet<&[u8]> = only.iter().map(Vec::as_slice).collect();
    let mut leading: HashSet<&[u8]> = HashSet::new();
    for p in only {
        let mut at = p.as_slice();
        while !at.is_empty() {
            at = parent_of(at);
            leading.insert(at);
        }
    }
    all.into_iter()
        .filter(|e| {
            // Unreadable entries stay: they make the listing incomplete.
            if e.kind == EntryKind::Unreadable || e.path.is_empty() {
                return true;
            }
            if leading.contains(e.path.as_slice()) {
                return e.kind == EntryKind::Dir;
            }
            let mut at = e.path.as_slice();
            loop {
                if listed.contains(at) {
                    return true;
                }
                if at.is_empty() {
                    return false;
                }
                at = parent_of(at);
            }
        })
        .collect()
}

/// `OPEN` fields for the `List` and `Apply` roles (which use few of them).
fn meta_open(cfg: &Config) -> Open {
    Open {
        role: Role::List,
        // Only the log level matters to these roles.
        flags: crate::wire::Options {
            verbose: crate::log::level(),
            ..Default::default()
        }
        .to_bits(),
        compress_level: 0,
        chunking: cfg.params.code(),
        path: Vec::new(),
        source_name: Vec::new(),
        timeout_secs: cfg.timeout_secs,
        bwlimit: cfg.bwlimit,
        sample: None,
        seeds: Vec::new(),
    }
}

/// Applies `ops` to the tree at `path` on `end`; one result per op.
fn apply(
    cfg: &Config,
    end: &End,
    path: &[u8],
    ops: &[Op],
    wire: &mut u64,
) -> Result<Vec<OpResult>> {
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    match end {
        End::Local => {
            let mut a = Applier::new(&bytes_path(path), None);
            Ok(ops.iter().map(|op| a.apply(op)).collect())
        }
        End::Remote(r) => {
            let open = Open {
                role: Role::Apply,
                path: path.to_vec(),
                ..meta_open(cfg)
            };
            let (results, w) = client::session(
                Some(r),
                &client::launch(cfg),
                open,
                &mut Progress::hidden(),
                |mut reader, writer, _| {
                    let mut results = Vec::with_capacity(ops.len());
                    for batch in batches(ops) {
                        writer.send_now(&Msg::Apply(batch.to_vec()))?;
                        match reader.read_msg()? {
                            Msg::Applied(r) if r.len() == batch.len() => results.extend(r),
                            Msg::Applied(r) => {
                                return Err(fail(
                                    Exit::Protocol,
                                    format!(
                                        "protocol error: {} results for {} operations",
                                        r.len(),
                                        batch.len()
                                    ),
                                ))
                            }
                            m => return Err(m.unexpected("APPLIED")),
                        }
                    }
                    writer.send_now(&Msg::End)?;
                    Ok(results)
                },
            )?;
            *wire += w;
            Ok(results)
        }
    }
}

/// Bytes of operations in one `APPLY`: extended attributes make an op
/// up to ~130 KiB, and a frame holds 8 MiB.
const APPLY_FLUSH: usize = 1 << 20;

/// `ops` cut into `APPLY` batches: at most [`MAX_OPS`] ops, and past
/// [`APPLY_FLUSH`] bytes no more.
fn batches(ops: &[Op]) -> Vec<&[Op]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, op) in ops.iter().enumerate() {
        if i > start && (i - start == MAX_OPS || bytes >= APPLY_FLUSH) {
            out.push(&ops[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += op.wire_size();
    }
    if start < ops.len() {
        out.push(&ops[start..]);
    }
    out
}

/// A file to sync: its path relative to the tree, its size, and whether
/// its session should scan the source before the receiver asks
/// ([`client::transfer`]'s `prescan`).
struct Job {
    rel: Vec<u8>,
    size: u64,
    prescan: bool,
}

/// Where the tree goes: `dst` itself (`src/`, rsync's trailing slash), or
/// `dst/NAME` for a source named NAME.
fn prefix_of(src_path: &[u8]) -> Option<Vec<u8>> {
    if src_path.ends_with(b"/") {
        return None;
    }
    let name = src_path.rsplit(|&b| b == b'/').next().unwrap_or_default();
    (!name.is_empty() && name != b"." && name != b"..").then(|| name.to_vec())
}

/// Runs a recursive sync or check.
pub fn run(cfg: &Config, umask: u32) -> Result<TreeReport> {
    let start = Instant::now();
    let filter = Filter::new(&cfg.filters)?;
    let (src_end, src_path) = operand_parts(&cfg.src);
    let (dst_end, dst_path) = operand_parts(&cfg.dst);
    let mut report = TreeReport {
        check: cfg.check,
        dry_run: cfg.dry_run,
        itemize: cfg.itemize && !cfg.json,
        ..TreeReport::default()
    };
    let mut wire = 0;
    let src = list(cfg, &src_end, &src_path, false, &filter, &mut wire)?.unwrap_or_default();
    let Some(root) = src.root() else {
        return Err(fail(
            Exit::Protocol,
            format!(
                "protocol error: the listing of {} is empty",
                shown(&src_path)
            ),
        ));
    };
    if root.kind != EntryKind::Dir {
        if cfg.tree.xattrs || cfg.tree.acls {
            return Err(fail(
                Exit::Usage,
                format!(
                    "-X and -A keep extended attributes and ACLs within a tree; {} is one file \
                     (sync the directory that holds it, with an --include for its name)",
                    shown(&src_path)
                ),
            ));
        }
        // One file: the single-file engine, with its rules for naming
        // the destination.
        let name = src_path.rsplit(|&b| b == b'/').next().unwrap_or_default();
        let before = if report.itemize && !cfg.check {
            dest_of_one_file(cfg, &dst_end, &dst_path, name, &filter, &mut wire)?
        } else {
            None
        };
        let r = client::run(cfg, umask)?;
        if report.itemize && !cfg.check && !r.summary.up_to_date {
            let tree = Tree {
                cfg,
                umask,
                src: &src,
                dst: &Listing::default(),
                src_end,
                src_path: src_path.clone(),
                dst_end,
                dst_path: dst_path.clone(),
                prefix: Some(name.to_vec()),
            };
            tree.itemize_one(&mut report, root, before.as_ref());
        }
        report.files.push(FileResult {
            path: shown(name),
            size: r.source_bytes,
            outcome: Ok(r),
        });
        report.other_wire_bytes = wire;
        report.duration = start.elapsed();
        return Ok(report);
    }
    if cfg.snapshot.is_some() {
        return Err(fail(
            Exit::Usage,
            "--snapshot works on one file; -r does not take snapshots of a tree yet (snapshot \
             each image, or the filesystem, and sync that)",
        ));
    }
    let prefix = prefix_of(&src_path);
    let tree_root = join(&dst_path, prefix.as_deref().unwrap_or_default());
    let dst = list(cfg, &dst_end, &tree_root, true, &filter, &mut wire)?.unwrap_or_default();
    if let Some(r) = dst.root() {
        if r.kind != EntryKind::Dir {
            return Err(fail(
                Exit::Io,
                format!(
                    "destination {} exists and is not a directory",
                    shown(&tree_root)
                ),
            ));
        }
    }
    let tree = Tree {
        cfg,
        umask,
        src: &src,
        dst: &dst,
        src_end,
        src_path,
        dst_end,
        dst_path,
        prefix,
    };
    for e in src.unreadable.iter().chain(&dst.unreadable) {
        report.errors.push(EntryError {
            path: tree.shown_dst(&e.path),
            exit: Exit::Io,
            message: String::from_utf8_lossy(&e.target).into_owned(),
        });
    }
    for e in &src.entries {
        if e.kind == EntryKind::Other && !tree.special_wanted(e) {
            let what = if crate::wire::is_device(e.mode) {
                "a device node (use -D or --devices to copy it)"
            } else {
                "a fifo or socket (use -D or --specials to copy it)"
            };
            crate::log::warn(&format!("skipping {}: {what}", tree.shown_src(&e.path)));
        }
    }
    if cfg.check {
        tree.check(&mut report, &mut wire);
    } else {
        tree.sync(&mut report, &mut wire);
    }
    report.items.sort_by(|a, b| a.0.cmp(&b.0));
    report.other_wire_bytes = wire;
    report.duration = start.elapsed();
    Ok(report)
}

/// `-i` of a one-file run: what the destination holds before it, where
/// the engine will write (`DST`, or `DST/NAME` when DST is a directory).
fn dest_of_one_file(
    cfg: &Config,
    end: &End,
    dst_path: &[u8],
    name: &[u8],
    filter: &Filter,
    wire: &mut u64,
) -> Result<Option<ListEntry>> {
    // Not a listing of DST itself, which would walk a whole directory of
    // images: DST/NAME exists only where DST is a directory, and where it
    // does not, DST is missing (a new file) or not a directory.
    match list(cfg, end, &join(dst_path, name), true, filter, wire) {
        Ok(d) => Ok(d.and_then(|d| d.root().cloned())),
        Err(_) => Ok(list(cfg, end, dst_path, true, filter, wire)?.and_then(|d| d.root().cloned())),
    }
}

struct Tree<'a> {
    cfg: &'a Config,
    umask: u32,
    src: &'a Listing,
    dst: &'a Listing,
    src_end: End<'a>,
    src_path: Vec<u8>,
    dst_end: End<'a>,
    dst_path: Vec<u8>,
    /// The source's name, when the tree goes to `dst/NAME`.
    prefix: Option<Vec<u8>>,
}

impl Tree<'_> {
    /// The destination-operand-relative path of a tree entry (what the
    /// `Apply` operations, rooted at the destination operand, name).
    fn dpath(&self, rel: &[u8]) -> Vec<u8> {
        join(self.prefix.as_deref().unwrap_or_default(), rel)
    }

    fn shown_dst(&self, rel: &[u8]) -> String {
        shown(&self.dpath(rel))
    }

    fn shown_src(&self, rel: &[u8]) -> String {
        shown(&join(&self.src_path, rel))
    }

    fn dst_is_dir(&self, rel: &[u8]) -> bool {
        self.dst.get(rel).is_some_and(|e| e.kind == EntryKind::Dir)
    }

    /// Runs the file jobs, [`WORKERS`] at a time, largest first. A lost
    /// connection or an interrupt stops the run (`fatal`): the next file
    /// would only meet it again.
    fn transfer_all(&self, mut jobs: Vec<Job>, report: &mut TreeReport) {
        jobs.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.rel.cmp(&b.rel)));
        // One bar for the tree (rsync's --info=progress2): bytes of all
        // the files, and files done of the total.
        let bar = Progress::new(self.cfg.progress && !jobs.is_empty());
        bar.set_total(jobs.iter().map(|j| j.size).sum());
        let files_done = AtomicUsize::new(0);
        let next = AtomicUsize::new(0);
        let fatal: Mutex<Option<(Exit, String)>> = Mutex::new(None);
        let results: Mutex<Vec<FileResult>> = Mutex::new(Vec::new());
        let jobs = &jobs;
        std::thread::scope(|s| {
            for _ in 0..WORKERS.min(jobs.len()) {
                s.spawn(|| loop {
                    if fatal.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(i) else { return };
                    let mut part = bar.part();
                    let result = self.transfer(job, &mut part);
                    bar.finish_part(&part, job.size);
                    let done = files_done.fetch_add(1, Ordering::SeqCst) + 1;
                    bar.set_message(format!("{done}/{} files", jobs.len()));
                    if let Err((exit, msg)) = &result.outcome {
                        if matches!(
                            exit,
                            Exit::Connection | Exit::Interrupted | Exit::Terminated
                        ) {
                            let mut f = fatal.lock().unwrap_or_else(|e| e.into_inner());
                            f.get_or_insert((*exit, msg.clone()));
                        }
                    }
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(result);
                });
            }
        });
        bar.finish();
        let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results.sort_by(|a, b| a.path.cmp(&b.path));
        report.files.extend(results);
        if let Some(f) = fatal.into_inner().unwrap_or_else(|e| e.into_inner()) {
            report.fatal.get_or_insert(f);
        }
    }

    /// Whether a pushed file's scan should start before its receiver
    /// answers: only when the receiver will ask for a manifest, which is
    /// when its file exists and the quick check (size and mtime) will not
    /// pass it, or `always` (`--checksum`, `--check`). A missing file
    /// takes every chunk inline and an unchanged one nothing, and a tree of
    /// unchanged files must not be read ahead.
    fn worth_prescanning(&self, e: &ListEntry, always: bool) -> bool {
        self.dst.get(&e.path).is_some_and(|d| {
            d.kind == EntryKind::File
                && (always
                    || (d.size, d.mtime_sec, d.mtime_nsec) != (e.size, e.mtime_sec, e.mtime_nsec))
        })
    }

    fn transfer(&self, job: &Job, progress: &mut Progress) -> FileResult {
        let path = self.shown_dst(&job.rel);
        let src = self.src_end.operand(join(&self.src_path, &job.rel));
        let dst_rel = self.dpath(&job.rel);
        let dst = self.dst_end.operand(join(&self.dst_path, &dst_rel));
        crate::vlog!(1, "{path}: {} bytes", job.size);
        let outcome = client::transfer(
            self.cfg,
            &src,
            &dst,
            Some(b""),
            job.prescan,
            self.umask,
            progress,
        )
        .map_err(|e| (exit_code_of(&e), message_of(&e)));
        match &outcome {
            Ok(r) => crate::vlog!(
                1,
                "{path}: done: {} reused, {} literal, {} on the wire",
                r.summary.reused_bytes,
                r.summary.literal_bytes,
                r.wire_bytes
            ),
            Err((_, m)) => crate::vlog!(1, "{path}: failed: {m}"),
        }
        FileResult {
            path,
            size: job.size,
            outcome,
        }
    }

    fn apply_ops(&self, ops: &[(Op, Vec<u8>)], wire: &mut u64) -> Result<Vec<OpResult>> {
        let just: Vec<Op> = ops.iter().map(|(op, _)| op.clone()).collect();
        apply(self.cfg, &self.dst_end, &self.dst_path, &just, wire)
    }

    fn check(&self, report: &mut TreeReport, _wire: &mut u64) {
        let mut differ = |rel: &[u8], why: &str| {
            report
                .differing
                .push((self.shown_dst(rel), why.to_string()));
        };
        if self.dst.root().is_none() {
            differ(b"", "missing: the destination does not exist");
            return;
        }
        // Report a missing or mistyped directory once, not for all it holds.
        let mut reported: Vec<Vec<u8>> = Vec::new();
        let mut jobs = Vec::new();
        for e in self.src.entries.iter().skip(1) {
            if reported.iter().any(|d| within(&e.path, d))
                || e.kind == EntryKind::Other && !self.special_wanted(e)
            {
                continue;
            }
            let d = self.dst.get(&e.path);
            match (e.kind, d.map(|d| d.kind)) {
                (_, None) => {
                    differ(&e.path, "missing from the destination");
                    reported.push(e.path.clone());
                }
                (k, Some(dk)) if k != dk => {
                    differ(&e.path, "of another kind in the destination");
                    reported.push(e.path.clone());
                }
                (EntryKind::Symlink, _) if d.is_some_and(|d| d.target != e.target) => {
                    differ(&e.path, "a symlink to another target in the destination")
                }
                (EntryKind::File, _) => jobs.push(Job {
                    rel: e.path.clone(),
                    size: e.size,
                    prescan: self.worth_prescanning(e, true),
                }),
                _ => {}
            }
        }
        for e in self.dst.entries.iter().skip(1) {
            if self.src.get(&e.path).is_none() && self.src.get(parent_of(&e.path)).is_some() {
                differ(&e.path, "extra: not in the source");
            }
        }
        self.check_meta(&mut differ);
        self.transfer_all(jobs, report);
        for f in &report.files {
            if let Ok(r) = &f.outcome {
                if !r.summary.identical {
                    report.differing.push((
                        f.path.clone(),
                        format!(
                            "contents differ: {} bytes in {} range{}",
                            r.summary.differing_bytes,
                            r.summary.range_count,
                            if r.summary.range_count == 1 { "" } else { "s" }
                        ),
                    ));
                }
            }
        }
        report.differing.sort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(p: &str) -> Vec<u8> {
        p.as_bytes().to_vec()
    }

    #[test]
    fn files_from_selects_paths_their_directories_and_what_they_hold() {
        let entry = |kind, path: &str| ListEntry {
            kind,
            path: rel(path),
            mode: if kind == EntryKind::Dir {
                libc::S_IFDIR
            } else {
                libc::S_IFREG
            },
            target: Vec::new(),
            ..ListEntry::default()
        };
        use EntryKind::{Dir, File};
        let all = vec![
            entry(Dir, ""),
            entry(Dir, "a"),
            entry(Dir, "a/b"),
            entry(File, "a/b/x.img"),
            entry(File, "a/b/y.img"),
            entry(File, "a/z.img"),
            entry(Dir, "c"),
            entry(File, "c/1"),
            entry(Dir, "c/d"),
            entry(File, "c/d/2"),
            entry(File, "e"),
        ];
        let kept: Vec<String> = select(all.clone(), &[rel("a/b/x.img"), rel("c")])
            .iter()
            .map(|e| shown(&e.path))
            .collect();
        assert_eq!(
            kept,
            [".", "a", "a/b", "a/b/x.img", "c", "c/1", "c/d", "c/d/2"]
        );
        assert_eq!(select(all.clone(), &[rel("")]).len(), all.len());
        assert_eq!(select(all, &[rel("missing")]).len(), 1);
    }

    #[test]
    fn trailing_slash_decides_the_prefix() {
        assert_eq!(prefix_of(b"src/"), None);
        assert_eq!(prefix_of(b"/a/src"), Some(rel("src")));
        assert_eq!(prefix_of(b"src"), Some(rel("src")));
        assert_eq!(prefix_of(b"a/."), None);
        assert_eq!(prefix_of(b".."), None);
    }
}
