//! `--snapshot`: the sending side reads a reflink clone of its source, and
//! keeps it as the base of the next run.
//!
//! A run clones the source (`FICLONE`: a metadata operation, milliseconds
//! even for a large image) to `.NAME.vmsync-snapshot.new` beside it, between
//! the optional `--freeze`/`--thaw` hooks ([`super::quiesce`]), and reads
//! only the clone: a VM writing meanwhile changes the source, not what is
//! sent, so the copy is the image as of one instant and the run never fails
//! with "source changed". After the destination committed, the clone
//! replaces the kept one, `.NAME.vmsync-snapshot`, and its state file
//! ([`super::state`]) names it; on any failure it is removed and the kept
//! one stays the base. (`--snapshot-dir DIR` keeps the three in DIR, which
//! must be on the source's filesystem, as `NAME.HASH.vmsync-snapshot…`.)
//!
//! The next run compares the two clones' extent maps
//! ([`super::extents`]): a range that maps to the same physical blocks in
//! both holds the same bytes, because the kept clone pins those blocks (a
//! write to the source after the clone is copied on write elsewhere). If the
//! destination still holds the kept clone's bytes (its receiver recorded the
//! clone's id, [`crate::dest::cache`]), only the changed ranges are read and
//! sent ([`Snapshot::ranges`]), plus a rotating verify slice of what was
//! skipped (1/N per run, `--snapshot-verify N`) that the receiver compares
//! with its destination, catching what the reasoning misses (dedupe moving
//! data is only a cost; a filesystem bug, or a destination changed behind
//! its own timestamps, is caught here). Anything that breaks the chain (no
//! kept clone, a damaged state, a size change, extents that cannot be
//! compared) makes a full read, and says why ([`Reason`]).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::content::ranges::RangeSet;
use crate::error::{fail, Exit, WithExit};
use crate::source::quiesce::{self, Hooks};
use crate::source::state::{self, Found, Identity, State};
use crate::wire::messages::snapshot::MAX_DELTA_RANGES;
use crate::wire::messages::{DeltaRange, Reason, SnapshotId, SnapshotMsg};
use crate::wire::FileInfo;

/// `--snapshot-verify` when not given: every skipped byte re-read about
/// once a month of nightly runs.
pub const DEFAULT_VERIFY: u16 = 30;
/// Largest `--snapshot-verify` (what travels in `OPEN`).
pub const MAX_VERIFY: u16 = 1000;

/// How the sending side snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// `--snapshot-dir`: where the clones live, instead of beside the source.
    pub dir: Option<PathBuf>,
    /// `--snapshot-verify N`: re-read 1/N of the skipped bytes; 0 = none.
    pub verify: u16,
    pub hooks: Hooks,
}

/// The kept clone, its state, and the clone being taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub kept: PathBuf,
    pub state: PathBuf,
    pub new: PathBuf,
}

impl Paths {
    /// Beside `source` (hidden), or in `dir`, named by the source's name and
    /// a hash of its absolute path (two sources of one name do not meet).
    pub fn of(source: &Path, dir: Option<&Path>) -> Result<Paths> {
        let base = match dir {
            None => crate::dest::paths::hidden_path(source, "vmsync-snapshot"),
            Some(d) => {
                let abs = std::path::absolute(source)
                    .with_context(|| format!("cannot resolve {}", source.display()))
                    .exit_with(Exit::Io)?;
                let hash = blake3::hash(abs.as_os_str().as_encoded_bytes());
                let name = source.file_name().unwrap_or("source".as_ref());
                let mut n = name.to_os_string();
                n.push(format!(".{}.vmsync-snapshot", &hash.to_hex()[..16]));
                d.join(n)
            }
        };
        let with = |ext: &str| {
            let mut p = base.clone().into_os_string();
            p.push(ext);
            PathBuf::from(p)
        };
        Ok(Paths {
            state: with(".state"),
            new: with(".new"),
            kept: base,
        })
    }
}

/// A clone taken for this run, and what it is compared with.
pub struct Snapshot {
    pub paths: Paths,
    /// The new clone, open (read and write: `FICLONE` wrote into it).
    pub file: File,
    /// The source as of the clone: its size, mtime and mode, taken just
    /// before it (so the copy never claims a newer mtime than its bytes).
    pub info: FileInfo,
    /// What `SNAPSHOT` announces.
    pub msg: SnapshotMsg,
    /// With a base: the ranges that changed since it.
    changed: Vec<(u64, u64)>,
    runs: u64,
    verify: u16,
    committed: bool,
    /// A signal removes the clone being taken.
    _on_signal: crate::signals::TempGuard,
}

impl Snapshot {
    /// Clones `src` (open, at `path`) between the hooks, and finds what
    /// changed since the kept clone, unless `full` says why not to look.
    pub fn take(
        src: &File,
        path: &Path,
        opts: &SnapshotOptions,
        full: Option<Reason>,
    ) -> Result<Snapshot> {
        let meta = src
            .metadata()
            .with_context(|| format!("cannot stat source {}", path.display()))
            .exit_with(Exit::Io)?;
        if !meta.is_file() {
            return Err(fail(
                Exit::Usage,
                format!(
                    "--snapshot needs a regular file on a reflink filesystem; {} is not one \
                     (snapshot a device with LVM or your storage, and sync the snapshot)",
                    path.display()
                ),
            ));
        }
        let paths = Paths::of(path, opts.dir.as_deref())?;
        match std::fs::remove_file(&paths.new) {
            Ok(()) => crate::vlog!(
                1,
                "sender: removed {}, left by an earlier run",
                paths.new.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot remove {}", paths.new.display()))
                    .exit_with(Exit::Io)
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&paths.new)
            .with_context(|| format!("cannot create the snapshot {}", paths.new.display()))
            .exit_with(Exit::Io)?;
        let mut snap = Snapshot {
            _on_signal: crate::signals::TempGuard::new(&paths.new),
            info: FileInfo::default(),
            msg: SnapshotMsg {
                base: None,
                next: new_id(&meta),
                reason: Reason::NoBase,
                snapshot_us: 0,
                frozen_us: None,
            },
            paths,
            file,
            changed: Vec::new(),
            runs: 0,
            verify: opts.verify,
            committed: false,
        };
        let ((info, took), frozen) = quiesce::around(&opts.hooks, path, || {
            let m = src
                .metadata()
                .with_context(|| format!("cannot stat source {}", path.display()))
                .exit_with(Exit::Io)?;
            let t = Instant::now();
            rustix::fs::ioctl_ficlone(&snap.file, src).map_err(|e| refused(path, e))?;
            Ok((info_of(&m), t.elapsed()))
        })?;
        snap.info = info;
        snap.msg.snapshot_us = took.as_micros() as u64;
        snap.msg.frozen_us = frozen.map(|f| f.as_micros() as u64);
        crate::vlog!(
            1,
            "sender: snapshot {} taken in {:.1} ms{}",
            snap.paths.new.display(),
            took.as_secs_f64() * 1e3,
            frozen.map_or(String::new(), |f| format!(
                ", source frozen {:.1} ms",
                f.as_secs_f64() * 1e3
            ))
        );
        match full {
            Some(why) => snap.msg.reason = why,
            None => snap.compare()?,
        }
        if let Some(why) = snap.msg.reason.text() {
            crate::vlog!(1, "sender: reading all of the snapshot: {why}");
        }
        Ok(snap)
    }

    /// Compares with the kept clone: sets the base and the changed ranges,
    /// or the reason there is none.
    fn compare(&mut self) -> Result<()> {
        let state = match state::read(&self.paths.state) {
            Found::Intact(s) => s,
            Found::Missing => return self.no_base(Reason::NoBase),
            Found::Damaged => return self.no_base(Reason::StateDamaged),
        };
        self.runs = state.runs;
        let kept = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.paths.kept)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return self.no_base(Reason::NoBase)
            }
            Err(_) => return self.no_base(Reason::StateDamaged),
        };
        if state::identity(&kept)? != state.clone {
            return self.no_base(Reason::StateDamaged);
        }
        if state.clone.size != self.info.size {
            return self.no_base(Reason::SizeChanged);
        }
        let changed = crate::source::extents::changed(&kept, &self.file, self.info.size)
            .with_context(|| format!("cannot map the extents of {}", self.paths.kept.display()))?;
        let Some(changed) = changed else {
            return self.no_base(Reason::NoExtents);
        };
        crate::vlog!(
            1,
            "sender: {} bytes in {} ranges changed since the previous snapshot",
            changed.iter().map(|(a, b)| b - a).sum::<u64>(),
            changed.len()
        );
        self.changed = changed;
        self.msg.base = Some(state.id);
        self.msg.reason = Reason::Delta;
        Ok(())
    }

    fn no_base(&mut self, why: Reason) -> Result<()> {
        self.msg.reason = why;
        Ok(())
    }

    /// Offers no base: this run reads all of the clone, for `why`.
    pub fn read_all(&mut self, why: Reason) {
        self.msg.base = None;
        self.msg.reason = why;
        crate::vlog!(
            1,
            "sender: reading all of the snapshot: {}",
            why.text().unwrap_or("")
        );
    }

    /// The ranges a delta run scans: the changed ones, and this run's
    /// verify slice of the rest (slice `runs mod N` of N, see
    /// [`crate::content::sample`]), at most [`MAX_DELTA_RANGES`] of them
    /// (nearby changed ranges merged when there would be more).
    pub fn ranges(&self) -> Vec<DeltaRange> {
        let size = self.info.size;
        let changed = bounded(&self.changed, MAX_DELTA_RANGES / 2);
        let mut set = RangeSet::default();
        for &(a, b) in &changed {
            set.insert(a, b);
        }
        let mut out: Vec<DeltaRange> = changed
            .iter()
            .map(|&(a, b)| DeltaRange {
                offset: a,
                len: b - a,
                verify: false,
            })
            .collect();
        if self.verify > 0 && size > 0 {
            let n = u32::from(self.verify);
            let k = (self.runs % u64::from(n)) as u32 + 1;
            let mut slice = Vec::new();
            for (a, b) in crate::content::sample::ranges(size, k, n) {
                slice.extend(gaps(&set, a, b));
            }
            for (a, b) in bounded(&slice, MAX_DELTA_RANGES / 2) {
                out.push(DeltaRange {
                    offset: a,
                    len: b - a,
                    verify: true,
                });
            }
        }
        out.sort_by_key(|r| r.offset);
        out
    }

    /// Makes this clone the kept one, the base of the next run, once the
    /// destination holds its bytes.
    pub fn commit(mut self) -> Result<()> {
        let _held = crate::signals::critical();
        self.file
            .sync_all()
            .with_context(|| format!("cannot sync {}", self.paths.new.display()))
            .exit_with(Exit::Io)?;
        std::fs::rename(&self.paths.new, &self.paths.kept)
            .with_context(|| format!("cannot rename {}", self.paths.new.display()))
            .exit_with(Exit::Io)?;
        self.committed = true;
        let state = State {
            id: self.msg.next,
            clone: state::identity(&self.file)?,
            runs: self.runs + 1,
        };
        state::write(&self.paths.state, &state)?;
        crate::dest::paths::sync_dir(&self.paths.kept)?;
        crate::vlog!(
            1,
            "sender: kept {} for the next run",
            self.paths.kept.display()
        );
        Ok(())
    }
}

impl Drop for Snapshot {
    /// A clone not committed is removed: the kept one stays the base.
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.paths.new);
        }
    }
}

/// The error for a clone the filesystem refused.
fn refused(path: &Path, e: rustix::io::Errno) -> anyhow::Error {
    use rustix::io::Errno;
    let why = match e {
        Errno::OPNOTSUPP | Errno::INVAL | Errno::NOTTY | Errno::XDEV | Errno::PERM => {
            "its filesystem cannot make reflink clones here (--snapshot needs XFS with \
             reflink=1, btrfs, or another reflink filesystem, and a snapshot directory on it)"
        }
        _ => "the clone failed",
    };
    fail(
        Exit::Io,
        format!(
            "--snapshot: cannot clone {}: {why} ({})",
            path.display(),
            std::io::Error::from(e)
        ),
    )
}

/// What `FILE_INFO` says of a snapshot taken of a source with `m`.
fn info_of(m: &std::fs::Metadata) -> FileInfo {
    FileInfo {
        size: m.len(),
        mtime_sec: m.mtime(),
        mtime_nsec: m.mtime_nsec().clamp(0, 999_999_999) as u32,
        mode: m.mode(),
    }
}

/// A fresh id for a clone: random, or (without `/dev/urandom`) a hash of
/// what makes this instant unique here.
fn new_id(m: &std::fs::Metadata) -> SnapshotId {
    let mut id = [0u8; 32];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .is_ok()
    {
        return id;
    }
    let mut h = blake3::Hasher::new_derive_key("vmsync snapshot id v1");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&Identity::of(m).ino.to_le_bytes());
    *h.finalize().as_bytes()
}

/// The parts of `[a, b)` outside `set`.
fn gaps(set: &RangeSet, a: u64, b: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = a;
    for (s, e) in set.iter() {
        if e <= at || s >= b {
            continue;
        }
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
    }
    if at < b {
        out.push((at, b));
    }
    out
}

/// `ranges` (sorted, disjoint) with the smallest gaps closed until at most
/// `max` are left: more bytes read, never fewer.
fn bounded(ranges: &[(u64, u64)], max: usize) -> Vec<(u64, u64)> {
    let mut out = ranges.to_vec();
    let mut gap = 4096u64;
    while out.len() > max {
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
        for &(a, b) in &out {
            match merged.last_mut() {
                Some(last) if a - last.1 <= gap => last.1 = b,
                _ => merged.push((a, b)),
            }
        }
        out = merged;
        gap *= 2;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_beside_the_source_or_in_a_directory() {
        let p = Paths::of(Path::new("/img/vm.raw"), None).unwrap();
        assert_eq!(p.kept, Path::new("/img/.vm.raw.vmsync-snapshot"));
        assert_eq!(p.state, Path::new("/img/.vm.raw.vmsync-snapshot.state"));
        assert_eq!(p.new, Path::new("/img/.vm.raw.vmsync-snapshot.new"));
        let d = Paths::of(Path::new("/img/vm.raw"), Some(Path::new("/snaps"))).unwrap();
        let other = Paths::of(Path::new("/other/vm.raw"), Some(Path::new("/snaps"))).unwrap();
        assert!(d.kept.starts_with("/snaps"));
        assert!(d.kept.to_string_lossy().ends_with(".vmsync-snapshot"));
        assert_ne!(d.kept, other.kept, "same name, other source");
    }

    #[test]
    fn bounded_merges_the_smallest_gaps_first() {
        let r = vec![(0, 10), (4100, 4110), (100_000, 100_010)];
        assert_eq!(bounded(&r, 3), r);
        assert_eq!(bounded(&r, 2), vec![(0, 4110), (100_000, 100_010)]);
        assert_eq!(bounded(&r, 1), vec![(0, 100_010)]);
    }

    #[test]
    fn gaps_are_what_the_set_leaves() {
        let mut s = RangeSet::default();
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(gaps(&s, 0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(gaps(&s, 12, 35), vec![(20, 30)]);
        assert_eq!(gaps(&s, 10, 20), vec![]);
    }
}
