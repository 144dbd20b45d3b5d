//! The read-only paths: `--check` compares the destination with the
//! source's manifest as it streams in, and `-n/--dry-run` counts what a
//! sync would fetch and reuse. Neither writes nor creates anything; both
//! hold only a shared lock (see [`super::basis::Target`]).
//!
//! `--check` compares a device up to the source's size, so a larger device
//! that starts with the source is identical.

use std::fs::File;
use std::io::{Read, Write};

use anyhow::{Context, Result};

use crate::content::manifest::{Entry, Kind, Validator};
use crate::content::scan;
use crate::content::verify::Comparer;
use crate::error::{fail, Exit, WithExit};
use crate::progress::Progress;
use crate::roles::receive::basis::{index_seeds, open_nofollow, quick_check, Basis, Target};
use crate::roles::receive::commit::up_to_date;
use crate::roles::receive::options::{RecvOptions, Seed};
use crate::wire::{FileInfo, FrameReader, FrameWriter, Msg, StartMode, Summary, MAX_RANGES};

/// `--check` of `target`: opens what is there (a device up to the source's
/// size), compares it, and sends the summary.
pub(super) fn run_check<R: Read, W: Write>(
    target: &Target,
    info: &FileInfo,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    opts: &RecvOptions,
    progress: &Progress,
) -> Result<Summary> {
    let dest = &target.dest;
    let file = match (&target.lock, target.regular()) {
        (Some(l), _) if target.device => {
            let file = l.file().try_clone().context("duplicate a file handle")?;
            let size = scan::device_size(&file)
                .with_context(|| format!("cannot get the size of device {}", dest.display()))
                .exit_with(Exit::Io)?;
            // Only the source's size is compared: a larger device is
            // identical when it starts with the source.
            Some((file, size.min(info.size)))
        }
        (_, Some(m)) => Some((
            open_nofollow(dest)
                .with_context(|| format!("cannot open destination {}", dest.display()))
                .exit_with(Exit::Io)?,
            m.len(),
        )),
        _ => None,
    };
    writer.send_now(&Msg::Start(StartMode::Manifest))?;
    let summary = check(file, info, reader, opts, progress)?;
    writer.send_now(&Msg::Done(summary.clone()))?;
    Ok(summary)
}

/// `--check`: compare the destination (`target`: the open file and the size
/// to compare, `None` when there is none) with the manifest as it streams in.
fn check<R: Read>(
    target: Option<(File, u64)>,
    info: &FileInfo,
    reader: &mut FrameReader<R>,
    opts: &RecvOptions,
    progress: &Progress,
) -> Result<Summary> {
    progress.set_total(info.size);
    let exists = target.is_some();
    let mut cmp = target.as_ref().map(|(f, size)| Comparer::new(f, *size));
    let (validator, checked) = match opts.sample {
        Some((k, n)) => (
            Validator::new(info.size, opts.params)
                .restrict(crate::content::sample::ranges(info.size, k, n)),
            crate::content::sample::covered(info.size, k, n),
        ),
        None => (Validator::new(info.size, opts.params), info.size),
    };
    progress.set_total(checked);
    for_each_batch(reader, validator, |batch| {
        let n = match &mut cmp {
            Some(c) => c.compare(batch)?,
            None => batch.iter().map(Entry::len).sum(),
        };
        progress.advance(n);
        Ok(())
    })?;
    progress.finish();
    let diffs = match cmp {
        Some(c) => c.finish(info.size),
        None => {
            // No destination: everything checked differs.
            let mut r = crate::content::ranges::RangeSet::default();
            match opts.sample {
                Some((k, n)) => {
                    for (a, b) in crate::content::sample::ranges(info.size, k, n) {
                        r.insert(a, b);
                    }
                }
                None => r.insert(0, info.size),
            }
            r
        }
    };
    let mut s = Summary {
        source_bytes: info.size,
        identical: exists && diffs.is_empty(),
        checked_bytes: checked,
        ..Summary::default()
    };
    set_ranges(&mut s, &diffs);
    Ok(s)
}

/// Reads the rest of the manifest through `validator`, handing each
/// decoded batch to `each`.
fn for_each_batch<R: Read>(
    reader: &mut FrameReader<R>,
    mut validator: Validator,
    mut each: impl FnMut(&[Entry]) -> Result<()>,
) -> Result<()> {
    let mut batch = Vec::new();
    loop {
        match reader.read_msg()? {
            Msg::Manifest(p) => {
                batch.clear();
                validator.decode_batch(&p, &mut batch)?;
                each(&batch)?;
            }
            Msg::ManifestEnd { count, digest, .. } => {
                return validator.finish(count, &digest).map(drop)
            }
            m => return Err(m.unexpected("MANIFEST or MANIFEST_END")),
        }
    }
}

/// The byte ranges a summary reports (differences, or what a dry run
/// would fetch): their total, their count, and the first [`MAX_RANGES`].
fn set_ranges(s: &mut Summary, ranges: &crate::content::ranges::RangeSet) {
    s.differing_bytes = ranges.total();
    s.range_count = ranges.len() as u64;
    s.ranges = ranges
        .iter()
        .take(MAX_RANGES)
        .map(|(a, b)| (a, b - a))
        .collect();
}

/// `-n/--dry-run`: what a sync would do, from the manifest and the indexes
/// of the old file and the seeds; nothing is created or written. Chunks the
/// sync would fetch are counted whole (sub-chunk refinement may then send
/// less), and listed as ranges, as `--check` lists differences.
pub(super) fn dry_run<R: Read, W: Write>(
    target: &Target,
    seeds: Vec<Seed>,
    info: &FileInfo,
    mut reader: FrameReader<R>,
    writer: &mut FrameWriter<W>,
    opts: &RecvOptions,
) -> Result<Summary> {
    let (dest, regular) = (target.dest.as_path(), target.regular());
    if quick_check(regular, info, opts) {
        return up_to_date(info, writer, true);
    }
    writer.send_now(&Msg::Start(StartMode::Manifest))?;
    let basis = if target.device {
        let file = open_nofollow(dest)
            .with_context(|| format!("cannot open destination device {}", dest.display()))
            .exit_with(Exit::Io)?;
        let size = scan::device_size(&file)
            .with_context(|| format!("cannot get the size of device {}", dest.display()))
            .exit_with(Exit::Io)?;
        if size < info.size {
            return Err(fail(
                Exit::Io,
                format!(
                    "destination device {} holds {size} bytes, less than the source's {}",
                    dest.display(),
                    info.size
                ),
            ));
        }
        Some(Basis::scan(file, info.size, None, dest, opts)?)
    } else if regular.is_some() {
        Basis::index(dest, opts, true)?
    } else {
        None
    };
    let seeds = index_seeds(seeds, opts)?;
    let mut s = Summary {
        dry_run: true,
        source_bytes: info.size,
        basis_cached: basis.as_ref().is_some_and(|b| b.from_cache),
        ..Summary::default()
    };
    let mut fetch = crate::content::ranges::RangeSet::default();
    let validator = Validator::new(info.size, opts.params);
    for_each_batch(&mut reader, validator, |batch| {
        for e in batch {
            match e.kind {
                Kind::Zero { len } => s.zero_bytes += len,
                Kind::Data { len, hash } => {
                    if basis
                        .iter()
                        .chain(&seeds)
                        .any(|b| b.index.contains_key(&hash))
                    {
                        s.reused_bytes += u64::from(len);
                    } else {
                        s.literal_bytes += u64::from(len);
                        fetch.insert(e.offset, e.end());
                    }
                }
            }
        }
        Ok(())
    })?;
    set_ranges(&mut s, &fetch);
    crate::vlog!(
        1,
        "receiver: dry run: would fetch {} bytes in {} ranges, reuse {}",
        s.literal_bytes,
        s.range_count,
        s.reused_bytes
    );
    writer.send_now(&Msg::Done(s.clone()))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::content::hash::ChunkHash;
    use crate::content::manifest::{self, Builder};
    use crate::content::scan::{ChunkRec, Content};

    /// The frames a sender sends for a file holding `data` as one chunk.
    fn manifest_stream(data: &[u8]) -> Vec<u8> {
        let mut b = Builder::default();
        let mut entries = Vec::new();
        let rec = ChunkRec {
            offset: 0,
            len: data.len() as u32,
            content: Content::Data(ChunkHash::of(data)),
        };
        b.push(&rec, &mut entries);
        let (count, digest) = b.finish(&mut entries);
        let mut payload = Vec::new();
        manifest::encode_batch(&entries, &mut payload);
        let mut w = FrameWriter::new(Vec::new(), "test");
        w.send(&Msg::Manifest(payload)).unwrap();
        w.send_now(&Msg::ManifestEnd {
            count,
            digest,
            source_changed: false,
        })
        .unwrap();
        w.with_inner(std::mem::take).unwrap()
    }

    fn check_against(target: Option<&[u8]>, source: &[u8]) -> Summary {
        let dir = tempfile::tempdir().unwrap();
        let target = target.map(|t| {
            let path = dir.path().join("dest");
            File::create(&path).unwrap().write_all(t).unwrap();
            (File::open(&path).unwrap(), t.len() as u64)
        });
        let info = FileInfo {
            size: source.len() as u64,
            mtime_sec: 0,
            mtime_nsec: 0,
            mode: 0o644,
        };
        let stream = manifest_stream(source);
        let mut reader = FrameReader::new(&stream[..], "test");
        let opts = RecvOptions::default();
        check(target, &info, &mut reader, &opts, &Progress::hidden()).unwrap()
    }

    #[test]
    fn check_compares_the_destination_with_the_manifest() {
        let source: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let same = check_against(Some(&source), &source);
        assert!(same.identical);
        assert_eq!((same.differing_bytes, same.range_count), (0, 0));
        assert_eq!(same.checked_bytes, 5000);

        let mut changed = source.clone();
        changed[10] ^= 1;
        let s = check_against(Some(&changed), &source);
        assert!(!s.identical);
        assert!(s.differing_bytes > 0 && s.range_count == 1);
        let (start, len) = s.ranges[0];
        assert!(start <= 10 && 10 < start + len, "{:?}", s.ranges);

        // No destination: all of it differs.
        let none = check_against(None, &source);
        assert!(!none.identical);
        assert_eq!(none.differing_bytes, 5000);
        assert_eq!(none.ranges, [(0, 5000)]);
    }

    #[test]
    fn summary_lists_the_first_ranges_and_counts_them_all() {
        let mut r = crate::content::ranges::RangeSet::default();
        let n = MAX_RANGES as u64 + 5;
        for k in 0..n {
            r.insert(k * 10, k * 10 + 3);
        }
        let mut s = Summary::default();
        set_ranges(&mut s, &r);
        assert_eq!(s.range_count, n);
        assert_eq!(s.differing_bytes, 3 * n);
        assert_eq!(s.ranges.len(), MAX_RANGES);
        assert_eq!(s.ranges[1], (10, 3), "(start, length)");
    }
}
