//! The receiver's first phases: find and lock the destination, then index
//! the old data a sync can take chunks from.
//!
//! The basis (the current destination) is cut with the same parameters as
//! the source, so unchanged content yields the same chunk hashes wherever it
//! now sits. Three kinds of old data are indexed the same way ([`Basis`]):
//! the destination itself, the partial file an interrupted run left, and
//! the `--seed` files. An index comes from the manifest cache when the cache
//! knows that very file (never for a device: its content changes without its
//! node's times moving), else from reading the file.

use std::collections::HashMap;
use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::content::chunk::{ChunkParams, Cutter};
use crate::content::hash::{ChunkHash, ChunkHashMap};
use crate::content::manifest::{Entry, Kind};
use crate::content::scan::{self, Content, Extents};
use crate::dest::cache;
use crate::dest::journal::Journal;
use crate::dest::lock::Lock;
use crate::dest::recover;
use crate::dest::writer::Output;
use crate::error::{fail, Exit, WithExit};
use crate::roles::receive::options::{RecvOptions, Seed};
use crate::wire::messages::DeltaRange;
use crate::wire::{FileInfo, WriteMode};

/// The destination as found, and locked, before anything is written.
pub(super) struct Target {
    /// The path written (the source's name inside a directory destination).
    pub dest: PathBuf,
    /// What is there now (not following a symlink).
    existing: Option<Metadata>,
    /// A block device, written in place (see `Output::device`).
    pub device: bool,
    /// Exclusive for a sync; shared (or none, when there is no file) for a
    /// check or a dry run; on the device node for a device.
    pub lock: Option<Lock>,
    /// The uncommitted journal an interrupted run left, to reuse.
    pub uncommitted: Option<PathBuf>,
}

impl Target {
    /// Resolves `dest`, refuses what vmsync will not write (a symlink to a
    /// device, a directory or other special file) and takes the lock.
    pub fn open(dest: &Path, source_name: &[u8], opts: &RecvOptions) -> Result<Target> {
        let dest = resolve_dest(dest, source_name)?;
        let stat = || match std::fs::symlink_metadata(&dest) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e)
                .with_context(|| format!("cannot stat destination {}", dest.display()))
                .exit_with(Exit::Io),
        };
        let mut existing = stat()?;
        if let Some(m) = &existing {
            refuse_type(&dest, m)?;
        }
        // A block device is written in place (see `writer`), never replaced.
        let device = existing.as_ref().is_some_and(scan::is_block_device);
        // A crash may have left a committed journal: finish it before
        // anything reads the destination (a check too), and look again.
        let mut uncommitted = None;
        if existing
            .as_ref()
            .is_none_or(|m| !m.file_type().is_symlink())
        {
            let found = recover::finish_pending(&dest, device)?;
            if found.applied.is_some() {
                existing = stat()?;
            }
            uncommitted = found.uncommitted.map(|(p, _)| p);
        }

        check_parent(&dest)?;
        // A check or a dry run only reads: a shared lock, and no partial file
        // is made for it.
        let read_only = opts.check || opts.dry_run;
        let lock = if device {
            Some(Lock::device(&dest, !read_only)?)
        } else if read_only {
            Lock::shared(&dest)?
        } else {
            Some(Lock::exclusive(&dest)?)
        };
        Ok(Target {
            dest,
            existing,
            device,
            lock,
            uncommitted,
        })
    }

    /// The destination when it is a regular file. A symlink is never
    /// followed: its target is not the basis, and the atomic rename replaces
    /// the link itself.
    pub fn regular(&self) -> Option<&Metadata> {
        self.existing.as_ref().filter(|m| m.file_type().is_file())
    }

    /// The lock of a sync (not a check or dry run), which it always holds.
    pub fn sync_lock(&self) -> &Lock {
        self.lock.as_ref().expect("a sync holds the exclusive lock")
    }

    pub fn is_symlink(&self) -> bool {
        self.existing
            .as_ref()
            .is_some_and(|m| m.file_type().is_symlink())
    }
}

/// Refuses a destination that is neither a regular file, a symlink (to be
/// replaced) nor a block device, and a symlink to a block device.
fn refuse_type(dest: &Path, m: &Metadata) -> Result<()> {
    let t = m.file_type();
    if t.is_symlink() && std::fs::metadata(dest).is_ok_and(|m| scan::is_block_device(&m)) {
        // Not followed, and not replaced either: a link to a device
        // (`/dev/vg/disk`) replaced by an image file would put the image
        // in /dev and leave the device unwritten.
        return Err(fail(
            Exit::Io,
            format!(
                "destination {} is a symlink to a block device; vmsync does not write \
                 through symlinks: give the device's own path (the link's target)",
                dest.display()
            ),
        ));
    }
    if !(t.is_file() || t.is_symlink() || t.is_block_device()) {
        return Err(fail(
            Exit::Io,
            format!(
                "destination {} is neither a regular file nor a block device",
                dest.display()
            ),
        ));
    }
    Ok(())
}

/// A destination that is a directory (or ends in `/`) gets the source's name.
fn resolve_dest(dest: &Path, source_name: &[u8]) -> Result<PathBuf> {
    let is_dir = dest.as_os_str().as_bytes().ends_with(b"/") || dest.is_dir();
    if !is_dir {
        return Ok(dest.to_path_buf());
    }
    Ok(dest.join(crate::dest::confine::entry_name(
        source_name,
        &dest.display().to_string(),
    )?))
}

fn check_parent(dest: &Path) -> Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => return Ok(()),
    };
    if !dir.is_dir() {
        return Err(fail(
            Exit::Io,
            format!("destination directory {} does not exist", dir.display()),
        ));
    }
    Ok(())
}

pub(super) fn open_nofollow(p: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
}

/// Whether the destination counts as up to date without reading it: same
/// size and mtime (to the nanosecond), unless `-c`. A device source's
/// mtime is the time of the copy (see `send`), and a device destination
/// has none worth comparing: both are compared by content.
pub(super) fn quick_check(regular: Option<&Metadata>, info: &FileInfo, opts: &RecvOptions) -> bool {
    let source_is_device = info.mode & libc::S_IFMT == libc::S_IFBLK;
    !opts.checksum
        && !source_is_device
        && regular.is_some_and(|m| {
            m.len() == info.size
                && m.mtime() == info.mtime_sec
                && m.mtime_nsec() == i64::from(info.mtime_nsec)
        })
}

/// An existing file and where each of its chunks sits.
pub(super) struct Basis {
    pub file: File,
    pub size: u64,
    /// Every data chunk of the old file: (offset, length, hash).
    pub chunks: Vec<(u64, u32, ChunkHash)>,
    /// Chunk hash → (offset, length) of its first occurrence.
    pub index: ChunkHashMap<(u64, u32)>,
    /// Offset → hash, to recognise chunks that have not moved.
    pub at: HashMap<u64, ChunkHash>,
    /// The chunk list came from the manifest cache, not from reading the file.
    pub from_cache: bool,
    /// The output starts out holding this file's contents at the same
    /// offsets (it is the output, a clone of it, or the file a journal
    /// changes): a chunk found at its own offset needs no writing.
    pub placed: bool,
    /// This file is also the output: ranges written this run no longer
    /// hold what the index says.
    pub alias: bool,
}

impl Basis {
    /// Indexes the file at `dest` (from the manifest cache when `use_cache`
    /// and the cache knows this very file).
    pub fn index(dest: &Path, opts: &RecvOptions, use_cache: bool) -> Result<Option<Basis>> {
        let file = match open_nofollow(dest) {
            Ok(f) => f,
            // Unreadable old contents only cost bandwidth.
            Err(_) => return Ok(None),
        };
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", dest.display()))
            .exit_with(Exit::Io)?;
        let cached = use_cache
            .then(|| cache::load(dest, &meta, opts.params))
            .flatten();
        Basis::scan(file, meta.len(), cached, dest, opts).map(Some)
    }

    /// Indexes the first `size` bytes of `file`: from `cached` entries, or
    /// by reading it. (Never a device from the cache: a device's content
    /// changes without its node's times moving, so no cache key holds.)
    pub fn scan(
        file: File,
        size: u64,
        cached: Option<Vec<Entry>>,
        dest: &Path,
        opts: &RecvOptions,
    ) -> Result<Basis> {
        let mut index = ChunkHashMap::default();
        let mut at = HashMap::new();
        let mut chunks = Vec::new();
        let mut add = |offset: u64, len: u32, h: ChunkHash| {
            chunks.push((offset, len, h));
            index.entry(h).or_insert((offset, len));
            at.insert(offset, h);
        };
        let from_cache = cached.is_some();
        match cached {
            Some(entries) => {
                for e in entries {
                    if let Kind::Data { len, hash } = e.kind {
                        add(e.offset, len, hash);
                    }
                }
            }
            None => {
                let cutter = Cutter::new(opts.params);
                let mut extents = Extents::of(&file, size);
                scan::scan(&file, size, &mut extents, &cutter, |recs| {
                    for r in recs {
                        if let Content::Data(h) = r.content {
                            add(r.offset, r.len, h);
                        }
                    }
                    Ok(())
                })
                .with_context(|| format!("reading destination {}", dest.display()))?;
            }
        }
        Ok(Basis {
            file,
            size,
            chunks,
            index,
            at,
            from_cache,
            placed: false,
            alias: false,
        })
    }

    /// Some data chunk of this file overlaps `start..end`.
    pub fn data_overlaps(&self, start: u64, end: u64) -> bool {
        let k = self
            .chunks
            .partition_point(|c| c.0 + u64::from(c.1) <= start);
        self.chunks.get(k).is_some_and(|c| c.0 < end)
    }
}

/// The records of the uncommitted journal an interrupted run left: chunks
/// it had received, rebuilt from the destination's old bytes and the
/// journal's pieces (and checked against their hash) instead of fetched.
pub(super) struct JournalBasis {
    pub journal: Journal,
    /// Chunk hash → the offset of the record that rebuilds it.
    pub index: ChunkHashMap<u64>,
    /// The destination, as the records' pieces apply to it.
    pub old: File,
    /// Where the journal was moved to free its name for this run's; removed
    /// once this run committed.
    pub moved_to: PathBuf,
}

impl JournalBasis {
    /// Takes over the uncommitted journal at `path` (found by
    /// [`recover::finish_pending`] for this very destination, `old`).
    fn load(path: &Path, old: File) -> Result<Option<JournalBasis>> {
        let Some(journal) = Journal::open(path)? else {
            return Ok(None);
        };
        let mut index = ChunkHashMap::default();
        for (offset, _, hash) in journal.chunks()? {
            index.insert(hash, offset);
        }
        let mut moved_to = path.as_os_str().to_owned();
        moved_to.push(".prev");
        let moved_to = PathBuf::from(moved_to);
        std::fs::rename(path, &moved_to)
            .with_context(|| format!("cannot move journal {} aside", path.display()))
            .exit_with(Exit::Io)?;
        crate::vlog!(
            1,
            "receiver: reusing {} chunks of the uncommitted journal {}",
            index.len(),
            path.display()
        );
        Ok(Some(JournalBasis {
            journal,
            index,
            old,
            moved_to,
        }))
    }
}

/// The old data a sync takes chunks from.
pub(super) struct Bases {
    /// The destination's old contents.
    pub basis: Option<Basis>,
    /// `--seed` files: read-only, consulted after the basis.
    pub seeds: Vec<Basis>,
    /// What an interrupted run left in the partial file, which is the output.
    pub partial: Option<Basis>,
    /// What an interrupted journaled run left in its journal.
    pub journal: Option<JournalBasis>,
}

/// Indexes the old data of a sync: the destination (`device_out`, only up to
/// the source's size; else a regular file unless everything comes inline),
/// the seeds, and the partial file when resuming from it.
pub(super) fn index_all(
    target: &Target,
    device_out: Option<&Output>,
    inline: bool,
    resume: bool,
    seeds: Vec<Seed>,
    info: &FileInfo,
    opts: &RecvOptions,
) -> Result<Bases> {
    let dest = &target.dest;
    let mut basis = match (device_out, target.regular()) {
        // Only the part that will be overwritten: a device larger than the
        // source is not read past the source's size.
        (Some(out), _) if info.size > 0 => Some(Basis::scan(
            out.file().try_clone().context("duplicate a file handle")?,
            info.size,
            None,
            dest,
            opts,
        )?),
        (None, Some(_)) if !inline => Basis::index(dest, opts, true)?,
        _ => None,
    };
    if let Some(b) = &basis {
        crate::vlog!(
            1,
            "receiver: old file indexed: {} chunks{}",
            b.chunks.len(),
            if b.from_cache {
                " (from the manifest cache)"
            } else {
                ""
            }
        );
    }
    let seeds = index_seeds(seeds, opts)?;
    // What an interrupted run left: resumed from (written in place), unless
    // --no-partial says to start over.
    let mut partial = None;
    if resume {
        partial = Basis::index(target.sync_lock().path(), opts, false)?;
        if let Some(p) = &mut partial {
            (p.placed, p.alias) = (true, true);
        }
    }
    // The output starts as the destination's contents (it is the
    // destination, or its clone, or a journal will change it), unless it
    // is a new copy or the partial file resumed. (Whether it is also the
    // output, `alias`, is known once the output is: `Run::new`.)
    if let Some(b) = &mut basis {
        b.placed =
            partial.is_none() && (device_out.is_some() || opts.write_mode != WriteMode::Copy);
    }
    // What an interrupted journaled run left: reused, unless --no-partial
    // says to start over or this run does not journal.
    let mut journal = None;
    if let Some(path) = &target.uncommitted {
        let journaled = matches!(opts.write_mode, WriteMode::Auto | WriteMode::Journal);
        if opts.no_partial || !journaled || partial.is_some() {
            recover::remove(path)?;
        } else if let Some(b) = &basis {
            journal =
                JournalBasis::load(path, b.file.try_clone().context("duplicate a file handle")?)?;
        }
    }
    Ok(Bases {
        basis,
        seeds,
        partial,
        journal,
    })
}

/// The old data of a delta run (see [`crate::wire::messages::snapshot`]):
/// the destination's bytes in `ranges` only, cut into the sender's fixed
/// pieces ([`crate::content::sample::scan_pieces`]), so a piece that did not
/// change sits at the sender's offset with the sender's hash. The output
/// starts as the destination (negotiated: never a fresh copy).
pub(super) fn index_delta(
    target: &Target,
    ranges: &[DeltaRange],
    info: &FileInfo,
    opts: &RecvOptions,
) -> Result<Bases> {
    let dest = &target.dest;
    let file = open_nofollow(dest)
        .with_context(|| format!("cannot open destination {}", dest.display()))
        .exit_with(Exit::Io)?;
    let size = file
        .metadata()
        .with_context(|| format!("cannot stat {}", dest.display()))
        .exit_with(Exit::Io)?
        .len();
    if size != info.size {
        return Err(fail(
            Exit::Io,
            format!(
                "destination {} changed size during the run ({size} bytes, {} expected)",
                dest.display(),
                info.size
            ),
        ));
    }
    let spans: Vec<(u64, u64)> = ranges.iter().map(|r| (r.offset, r.end())).collect();
    let mut builder = crate::content::manifest::Builder::default();
    let mut entries = Vec::new();
    crate::content::sample::scan_pieces(&file, &spans, opts.params.avg().into(), |recs, ends| {
        for r in &recs {
            builder.push(r, &mut entries);
        }
        if ends {
            builder.break_run(&mut entries);
        }
        Ok(())
    })
    .with_context(|| format!("reading destination {}", dest.display()))?;
    builder.finish(&mut entries);
    let mut basis = Basis::scan(file, size, Some(entries), dest, opts)?;
    (basis.from_cache, basis.placed) = (false, true);
    crate::vlog!(
        1,
        "receiver: delta: {} ranges of the old file indexed, {} chunks",
        ranges.len(),
        basis.chunks.len()
    );
    Ok(Bases {
        basis: Some(basis),
        seeds: Vec::new(),
        partial: None,
        journal: None,
    })
}

/// Indexes the `--seed` files (from the manifest cache when it knows
/// them; a seed indexed by reading is recorded there for the next run,
/// which is what makes a golden base image cheap night after night).
pub(super) fn index_seeds(seeds: Vec<Seed>, opts: &RecvOptions) -> Result<Vec<Basis>> {
    let mut out = Vec::with_capacity(seeds.len());
    for seed in seeds {
        let meta = seed
            .file
            .metadata()
            .with_context(|| format!("cannot stat seed {}", seed.path.display()))
            .exit_with(Exit::Io)?;
        if !meta.is_file() {
            return Err(fail(
                Exit::Io,
                format!("seed {} is not a regular file", seed.path.display()),
            ));
        }
        let cached = cache::load(&seed.path, &meta, opts.params);
        let hit = cached.is_some();
        let entries = match cached {
            Some(e) => e,
            None => {
                let entries = manifest_of(&seed.file, meta.len(), opts.params)
                    .with_context(|| format!("reading seed {}", seed.path.display()))?;
                // Best effort: a seed we cannot record costs a re-read.
                let _ = cache::store(&seed.path, &seed.file, opts.params, Some(&entries), None);
                entries
            }
        };
        let mut b = Basis::scan(seed.file, meta.len(), Some(entries), &seed.path, opts)?;
        b.from_cache = hit;
        crate::vlog!(
            1,
            "receiver: seed {} indexed: {} chunks{}",
            seed.path.display(),
            b.chunks.len(),
            if b.from_cache {
                " (from the manifest cache)"
            } else {
                ""
            }
        );
        out.push(b);
    }
    Ok(out)
}

/// The manifest entries of the first `size` bytes of `file`.
fn manifest_of(file: &File, size: u64, params: ChunkParams) -> Result<Vec<Entry>> {
    let cutter = Cutter::new(params);
    let mut extents = Extents::of(file, size);
    let mut builder = crate::content::manifest::Builder::default();
    let mut entries = Vec::new();
    scan::scan(file, size, &mut extents, &cutter, |recs| {
        for r in &recs {
            builder.push(r, &mut entries);
        }
        Ok(())
    })?;
    builder.finish(&mut entries);
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn quick_check_needs_same_size_and_mtime_to_the_nanosecond() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::create(&path).unwrap();
        f.set_len(1000).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789))
            .unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let info = FileInfo {
            size: 1000,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 123_456_789,
            mode: libc::S_IFREG | 0o644,
        };
        let opts = RecvOptions::default();
        assert!(quick_check(Some(&meta), &info, &opts));
        assert!(!quick_check(None, &info, &opts), "no file");
        let c = RecvOptions {
            checksum: true,
            ..opts
        };
        assert!(!quick_check(Some(&meta), &info, &c), "-c");
        for other in [
            FileInfo { size: 999, ..info },
            FileInfo {
                mtime_nsec: 123_456_788,
                ..info
            },
            FileInfo {
                mtime_sec: 1_700_000_001,
                ..info
            },
            // A device source's mtime is the time of the copy.
            FileInfo {
                mode: libc::S_IFBLK | 0o660,
                ..info
            },
        ] {
            assert!(!quick_check(Some(&meta), &other, &opts), "{other:?}");
        }
    }

    #[test]
    fn a_directory_destination_gets_the_source_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(resolve_dest(d, b"disk.img").unwrap(), d.join("disk.img"));
        let slash = PathBuf::from(format!("{}/new/", d.display()));
        assert_eq!(
            resolve_dest(&slash, b"disk.img").unwrap(),
            slash.join("disk.img")
        );
        let file = d.join("other.img");
        assert_eq!(resolve_dest(&file, b"disk.img").unwrap(), file);
        // A name that would leave the directory is refused.
        assert!(resolve_dest(d, b"../disk.img").is_err());
        assert!(check_parent(&d.join("missing/x")).is_err());
        assert!(check_parent(&file).is_ok());
    }

    #[test]
    fn basis_from_cache_indexes_first_occurrences_and_data_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old");
        File::create(&path).unwrap().set_len(400).unwrap();
        let (h1, h2) = (ChunkHash::of(b"one"), ChunkHash::of(b"two"));
        let d = |offset, len, hash| Entry {
            offset,
            kind: Kind::Data { len, hash },
        };
        let cached = vec![
            d(0, 100, h1),
            Entry {
                offset: 100,
                kind: Kind::Zero { len: 100 },
            },
            d(200, 100, h2),
            d(300, 100, h1),
        ];
        let opts = RecvOptions::default();
        let b = Basis::scan(File::open(&path).unwrap(), 400, Some(cached), &path, &opts).unwrap();
        assert!(b.from_cache && !b.alias);
        assert_eq!(b.chunks.len(), 3, "zero runs are not chunks");
        assert_eq!(b.index[&h1], (0, 100), "the first occurrence");
        assert_eq!(b.index[&h2], (200, 100));
        assert_eq!(b.at[&300], h1);
        assert!(!b.at.contains_key(&100));
        assert!(!b.data_overlaps(100, 200), "the zero run");
        assert!(b.data_overlaps(150, 201));
        assert!(b.data_overlaps(99, 100));
        assert!(!b.data_overlaps(400, 500));
    }
}
