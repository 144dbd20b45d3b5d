//! The end of a sync: fill in what an unchanged basis left unwritten,
//! verify (`--verify`) and commit the output (an atomic rename, or the
//! in-place file's final size and mtime), record the new manifest in the
//! cache, and send the summary. Also the end of a run the quick check found
//! up to date.

use std::fs::File;
use std::io::Write;

use anyhow::{Context, Result};

use crate::content::verify::Comparer;
use crate::dest::cache;
use crate::dest::writer::{self, Output};
use crate::error::{fail, Exit, WithExit};
use crate::progress::Progress;
use crate::roles::receive::basis::Target;
use crate::roles::receive::options::RecvOptions;
use crate::roles::receive::run::Run;
use crate::wire::messages::SnapshotId;
use crate::wire::{FileInfo, FrameWriter, Msg, StartMode, Summary};

/// The `--snapshot` clone a run wrote the bytes of (see
/// [`crate::wire::messages::snapshot`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Origin {
    pub id: SnapshotId,
    /// Only ranges came: the manifest is not the whole file's.
    pub delta: bool,
}

/// Commits what `run` wrote as `target` and sends the summary.
pub(super) fn commit<W: Write>(
    mut run: Run<'_>,
    target: &Target,
    info: &FileInfo,
    writer: &mut FrameWriter<W>,
    opts: &RecvOptions,
    progress: &Progress,
    origin: Option<Origin>,
) -> Result<Summary> {
    let (dest, device) = (&target.dest, target.device);
    if run.out.is_none() && run.basis.as_ref().is_some_and(|b| b.size != info.size) {
        run.materialize()?;
    }
    let Run {
        out,
        entries,
        mut summary,
        basis,
        journal,
        ..
    } = run;
    summary.basis_cached = basis.as_ref().is_some_and(|b| b.from_cache);
    summary.write_mode = out.as_ref().map(Output::write_mode);
    let in_place = out.as_ref().is_some_and(Output::overwrites_old);
    let size = info.size;
    let verify = |file: &File| -> Result<()> {
        if !opts.verify {
            return Ok(());
        }
        drop_cache(file);
        let mut cmp = Comparer::new(file, size);
        for part in entries.chunks(4096) {
            cmp.compare(part)?;
        }
        let diffs = cmp.finish(size);
        if let Some((s, e)) = diffs.iter().next() {
            let outcome = if in_place {
                "it was written in place, so it holds neither version: run again to repair it"
            } else {
                "the destination was not replaced"
            };
            return Err(fail(
                Exit::Verify,
                format!(
                    "verification failed: {} differs from the source in {} bytes (first at offset {s}..{e}); {outcome}",
                    dest.display(),
                    diffs.total()
                ),
            ));
        }
        Ok(())
    };
    crate::vlog!(1, "receiver: all data written; committing");
    let written = match out {
        Some(out) => {
            let (file, written) = out.commit(info, verify)?;
            summary.dest_written_bytes = written;
            file
        }
        None => {
            // The old file already holds exactly the new contents.
            let file = basis.expect("no output only with a basis").file;
            verify(&file)?;
            file.set_modified(writer::mtime(info))
                .with_context(|| format!("cannot set the modification time of {}", dest.display()))
                .exit_with(Exit::Io)?;
            file
        }
    };
    // The interrupted run's journal served its purpose.
    if let Some(j) = journal {
        crate::dest::recover::remove(&j.moved_to)?;
    }
    // Best effort: without a cache entry the next run reads the file instead.
    // Never for a device (see `Basis::scan`).
    // A delta run's entries cover its ranges only: no manifest is kept,
    // and the origin only while the verify ranges held what they should.
    if !device {
        let _ = match origin {
            None => cache::store(dest, &written, opts.params, Some(&entries), None),
            Some(o) if !o.delta => {
                cache::store(dest, &written, opts.params, Some(&entries), Some(o.id))
            }
            Some(o) if summary.verify_mismatch_bytes == 0 => {
                cache::store(dest, &written, opts.params, None, Some(o.id))
            }
            Some(_) => {
                cache::forget(dest, opts.params);
                Ok(())
            }
        };
    }
    if origin.is_some_and(|o| o.delta) {
        // What lay outside the ranges is kept as it was.
        let covered = summary.reused_bytes + summary.literal_bytes + summary.zero_bytes;
        summary.reused_bytes += info.size.saturating_sub(covered);
    }
    crate::vlog!(1, "receiver: committed {}", dest.display());
    summary.verified = opts.verify;
    summary.source_bytes = info.size;
    progress.finish();
    writer.send_now(&Msg::Done(summary.clone()))?;
    Ok(summary)
}

/// Records that the destination, found up to date, holds the bytes of the
/// clone `id` (best effort: without it the next run reads all).
pub(super) fn remember_origin(target: &Target, opts: &RecvOptions, id: SnapshotId) {
    if target.device {
        return;
    }
    let Ok(file) = File::open(&target.dest) else {
        return;
    };
    let Ok(meta) = file.metadata() else {
        return;
    };
    let entries = cache::load(&target.dest, &meta, opts.params);
    let _ = cache::store(
        &target.dest,
        &file,
        opts.params,
        entries.as_deref(),
        Some(id),
    );
}

/// Ends a run that the quick check found up to date.
pub(super) fn up_to_date<W: Write>(
    info: &FileInfo,
    writer: &mut FrameWriter<W>,
    dry_run: bool,
) -> Result<Summary> {
    let s = Summary {
        up_to_date: true,
        identical: true,
        dry_run,
        source_bytes: info.size,
        ..Summary::default()
    };
    writer.send_now(&Msg::Start(StartMode::UpToDate))?;
    writer.send_now(&Msg::Done(s.clone()))?;
    Ok(s)
}

/// Asks the kernel to forget cached pages, so `--verify` reads the disk.
fn drop_cache(file: &File) {
    // Advice: a file system that ignores it only makes --verify read the cache.
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FrameReader;

    #[test]
    fn up_to_date_says_so_then_sends_the_summary() {
        let info = FileInfo {
            size: 123,
            mtime_sec: 1,
            mtime_nsec: 2,
            mode: 0o644,
        };
        let mut w = FrameWriter::new(Vec::new(), "test");
        let s = up_to_date(&info, &mut w, true).unwrap();
        assert!(s.up_to_date && s.identical && s.dry_run);
        assert_eq!(s.source_bytes, 123);
        let bytes = w.with_inner(std::mem::take).unwrap();
        let mut r = FrameReader::new(&bytes[..], "test");
        assert_eq!(r.read_msg().unwrap(), Msg::Start(StartMode::UpToDate));
        assert_eq!(r.read_msg().unwrap(), Msg::Done(s));
    }
}
