//! The receiving end: index what the destination already holds, request the
//! rest, write only verified chunks, commit atomically.
//!
//! The phases, in order, and the file that holds each:
//!
//! 1. `basis.rs`: find the destination, refuse what is not written through
//!    (a symlink to a device, a directory), take its lock
//!    ([`crate::dest::lock`], held throughout).
//! 2. `check.rs`: `--check` and `-n/--dry-run` stop here, comparing or
//!    counting as the manifest streams in; nothing is written.
//! 3. The quick check (size + mtime, `basis.rs`); then `plan.rs` decides how
//!    the transfer starts: every chunk sent unasked when there is nothing to
//!    reuse, else a manifest to compare, with the pieces of the cached
//!    manifest the sender need not send.
//! 4. `basis.rs` indexes the old data: the destination, the `--seed` files,
//!    the partial file an interrupted run left.
//! 5. `exchange.rs` runs the conversation (a reader thread, bounded queue)
//!    over the shared state in `run.rs`: `plan.rs` decides, entry by entry,
//!    what to copy, defer for refinement, or request within the window;
//!    `write.rs` writes what arrives and what old data holds, verified.
//! 6. `commit.rs`: verify, commit, cache the manifest, send the summary.
//!
//! A chunk found in the basis is copied from it and re-hashed on the way, so
//! a basis that changed under us is caught and the chunk is fetched instead.
//! Requests are windowed ([`WINDOW`] bytes outstanding), which bounds the
//! memory that chunks in flight can take. For a chunk found nowhere whole,
//! its 4 KiB pieces are looked for ([`crate::content::refine`]). A file whose
//! content did not change is not rewritten: the partial file is only filled
//! once the new file differs from the old one at the same offsets.
//!
//! A block device at the destination path (not behind a symlink: a link to
//! a device is refused, never followed nor replaced) is written in place
//! whatever the options ([`crate::dest::writer::Output::device`]): it is its
//! own basis, scanned up to the source's size, and a chunk moved within it
//! is copied only from a range not yet overwritten. It has no partial file
//! and no manifest-cache entry, its lock is on the device node, and it is
//! always compared by content: there is no quick check against a device,
//! nor for a device source, whose mtime is only the time of the copy.

mod basis;
mod check;
mod commit;
mod exchange;
mod options;
mod plan;
mod run;
mod write;

use std::io::{Read, Write};
use std::path::Path;

use anyhow::Result;

pub use self::options::{RecvOptions, Seed};
use crate::error::{fail, Exit};
use crate::progress::Progress;
use crate::wire::messages::snapshot::{check_ranges, MAX_DELTA_RANGES};
use crate::wire::messages::{DeltaRange, SnapshotMsg, SnapshotStats};
use crate::wire::{FileInfo, FrameReader, FrameWriter, Msg, Summary, WriteMode};

/// Runs the receiving end into `dest` until done; returns the summary that
/// was also sent to the peer.
pub fn receive<R, W>(
    dest: &Path,
    source_name: &[u8],
    seeds: Vec<Seed>,
    mut reader: FrameReader<R>,
    writer: &mut FrameWriter<W>,
    opts: &RecvOptions,
    progress: &Progress,
) -> Result<Summary>
where
    R: Read + Send + 'static,
    W: Write,
{
    if opts.sample.is_some() && !opts.check {
        return Err(fail(
            Exit::Protocol,
            "protocol error: a sample was asked for without --check",
        ));
    }
    let (snap, info) = read_info(&mut reader)?;
    let target = basis::Target::open(dest, source_name, opts)?;
    if opts.check {
        return check::run_check(&target, &info, &mut reader, writer, opts, progress);
    }
    if opts.dry_run {
        return check::dry_run(&target, seeds, &info, reader, writer, opts);
    }
    let device_out = run::device_output(&target, &info, opts)?;
    if basis::quick_check(target.regular(), &info, opts) {
        if let Some(s) = &snap {
            commit::remember_origin(&target, opts, s.next);
        }
        let mut summary = commit::up_to_date(&info, writer, false)?;
        summary.snapshot = snap.map(|m| Box::new(SnapshotStats::up_to_date(&m, info.size)));
        return Ok(summary);
    }
    let in_place = matches!(
        opts.write_mode,
        WriteMode::Journal | WriteMode::UnsafeInplace
    );
    if in_place && target.is_symlink() {
        return Err(fail(
            Exit::Io,
            format!(
                "{} is a symlink; --write-mode {} will not write through it",
                target.dest.display(),
                opts.write_mode.name()
            ),
        ));
    }
    let start = plan::negotiate(&target, !seeds.is_empty(), snap.as_ref(), opts, writer)?;
    let delta = if start.delta {
        Some(read_ranges(&mut reader, info.size)?)
    } else {
        None
    };
    let stats = snap.map(|m| SnapshotStats::of(&m, info.size, delta.as_deref()));
    progress.set_total(stats.map_or(info.size, |s| s.read_bytes));
    let mut inbox = exchange::Inbox::spawn(reader, start.inline, info.size, opts.params)?;
    crate::vlog!(
        1,
        "receiver: {} ({} bytes), mode {:?}",
        target.dest.display(),
        info.size,
        match (start.inline, &delta) {
            (true, _) => "inline",
            (_, Some(_)) => "delta",
            _ => "manifest",
        }
    );
    let bases = match &delta {
        Some(ranges) => basis::index_delta(&target, ranges, &info, opts)?,
        None => basis::index_all(
            &target,
            device_out.as_ref(),
            start.inline,
            start.resume,
            seeds,
            &info,
            opts,
        )?,
    };
    let mut run = run::Run::new(
        &target,
        device_out,
        bases,
        start.inline,
        delta.as_deref(),
        &info,
        opts,
        progress,
    )?;
    exchange::exchange(&mut run, &mut inbox, &start.pieces, writer, opts)?;
    let origin = snap.map(|m| commit::Origin {
        id: m.next,
        delta: stats.is_some_and(|s| s.delta),
    });
    let mut summary = commit::commit(run, &target, &info, writer, opts, progress, origin)?;
    summary.snapshot = stats.map(|s| {
        Box::new(SnapshotStats {
            verify_mismatch_bytes: summary.verify_mismatch_bytes,
            ..s
        })
    });
    Ok(summary)
}

/// A delta run's `RANGES`, checked: sorted, disjoint, inside the file.
fn read_ranges<R: Read>(reader: &mut FrameReader<R>, size: u64) -> Result<Vec<DeltaRange>> {
    let mut all = Vec::new();
    loop {
        match reader.read_msg()? {
            Msg::Ranges { last, ranges } => {
                // The count as they come (it bounds memory), the rest once.
                if all.len() + ranges.len() > MAX_DELTA_RANGES {
                    return Err(fail(
                        Exit::Protocol,
                        format!("protocol error: more than {MAX_DELTA_RANGES} delta ranges"),
                    ));
                }
                all.extend(ranges);
                if last {
                    check_ranges(&all, size)?;
                    return Ok(all);
                }
            }
            m => return Err(m.unexpected("RANGES")),
        }
    }
}

/// The sender's `SNAPSHOT`, if any, and `FILE_INFO`, refused when
/// implausible.
fn read_info<R: Read>(reader: &mut FrameReader<R>) -> Result<(Option<SnapshotMsg>, FileInfo)> {
    let mut snap = None;
    let info = loop {
        match reader.read_msg()? {
            Msg::Snapshot(s) if snap.is_none() => snap = Some(*s),
            Msg::FileInfo(i) => break i,
            m => return Err(m.unexpected("FILE_INFO")),
        }
    };
    if info.size > i64::MAX as u64 || info.mtime_nsec > 999_999_999 {
        return Err(fail(
            Exit::Protocol,
            format!("protocol error: implausible file info from peer: {info:?}"),
        ));
    }
    Ok((snap, info))
}
