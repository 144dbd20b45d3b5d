//! Where a destination's journal lives, and finishing the journaled write
//! that a crash interrupted, before anything else opens the destination.
//!
//! A regular file's journal sits beside it, `.NAME.vmsync-journal`, on the
//! same filesystem (so it costs no copy across filesystems, and the lock on
//! the partial file, [`crate::dest::lock`], covers both). A block device has
//! nowhere beside it to keep one (its directory is `/dev`, a tmpfs lost at
//! boot), so its journal goes to the receiving host's state directory
//! (`--state-dir`, default [`DEFAULT_STATE_DIR`]), never on the device.
//! A device's name can change between boots (`/dev/sdb` may come back as
//! `/dev/sdc`), so which journal there is a device's is decided by the
//! identity recorded in it ([`crate::dest::journal::Identity`]: size and a
//! stable id such as the LVM UUID or the disk's WWID), not by its file name.
//!
//! What is found:
//! - a **committed** journal is applied ([`Journal::apply`]), then removed
//!   and its directory fsync'd: the destination holds the new version. This
//!   runs inside [`crate::signals::critical`], so a signal waits for it.
//! - an **uncommitted** one is left where it is: the destination holds the
//!   old version, and the next sync reuses its records
//!   ([`crate::dest::journal::Journal::rebuild`]) instead of fetching them.
//!   One written for another file (the destination was replaced since) can
//!   never be applied nor reused: it is removed.
//! - a **damaged** one, or a committed one for another file, is an error
//!   ([`Exit::Journal`]) and nothing is written.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::dest::journal::{Identity, Journal, State};
use crate::dest::paths::{journal_path, state_dir, sync_dir};
use crate::error::{fail, Exit, WithExit};
use crate::sys::crash;

/// The journal files that may be `dest`'s.
fn candidates(dest: &Path, device: bool) -> Vec<PathBuf> {
    if !device {
        let p = journal_path(dest, false);
        return if p.symlink_metadata().is_ok() {
            vec![p]
        } else {
            Vec::new()
        };
    }
    let dir = state_dir().join("journal");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "vmsync-journal"))
        .collect();
    found.sort();
    found
}

/// Whether `dest` may have a journal to finish or reuse, before taking the
/// lock that [`recover`] needs: a look for the file beside a regular file;
/// for a device, a journal in the state directory written for this very
/// device (others' journals there must not make us lock it).
pub fn has_journal(dest: &Path, device: bool) -> bool {
    let found = candidates(dest, device);
    if !device || found.is_empty() {
        return !found.is_empty();
    }
    let Ok(now) = File::open(dest).and_then(|f| Identity::of(&f)) else {
        return false;
    };
    found.iter().any(|p| match Journal::open(p) {
        Ok(Some(j)) => j.header.identity.mismatch(&now).is_none(),
        // One too damaged to say whose it is is not known to be ours.
        Err(_) | Ok(None) => false,
    })
}

/// Whether `dest` (a regular file) has a committed journal, or one too
/// damaged to tell: a write that must be finished before it is read. An
/// uncommitted journal leaves the old version, which may be read.
pub fn has_unfinished_write(dest: &Path) -> bool {
    candidates(dest, false).iter().any(|p| {
        !matches!(
            Journal::open(p),
            Ok(None)
                | Ok(Some(Journal {
                    state: State::Uncommitted,
                    ..
                }))
        )
    })
}

/// What [`recover`] did.
#[derive(Debug, Default)]
pub struct Recovered {
    /// A committed journal was applied: (its path, records, data bytes).
    pub applied: Option<(PathBuf, u64, u64)>,
    /// An uncommitted journal of this very destination was left for the
    /// next sync to reuse: (its path, records).
    pub uncommitted: Option<(PathBuf, u64)>,
}

/// Opens `dest` for a recovery: read-write, never through a symlink, and a
/// device exclusively (never written under a mounted filesystem).
pub fn open_target(dest: &Path, device: bool) -> Result<File> {
    let flags = libc::O_NOFOLLOW | if device { libc::O_EXCL } else { 0 };
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(dest)
        .with_context(|| format!("cannot open {} to finish its journal", dest.display()))
        .exit_with(Exit::Io)
}

/// Finishes the interrupted journaled write of `dest` (opened as `target`
/// by [`open_target`]; the caller holds its exclusive lock). See the
/// module doc for what each kind of journal found leads to.
pub fn recover(dest: &Path, target: &File, device: bool) -> Result<Recovered> {
    let now = Identity::of(target)
        .with_context(|| format!("cannot identify {}", dest.display()))
        .exit_with(Exit::Io)?;
    let mut done = Recovered::default();
    for path in candidates(dest, device) {
        let opened = match Journal::open(&path) {
            // In the shared state directory a journal too damaged to say
            // which device it is for is not known to be this one's.
            Err(e) if device => {
                crate::log::warn(&format!(
                    "skipping journal {}: {}",
                    path.display(),
                    crate::error::message_of(&e)
                ));
                continue;
            }
            r => r?,
        };
        let Some(j) = opened else {
            // Shorter than its header: it holds nothing.
            remove(&path)?;
            continue;
        };
        let mismatch = j.header.identity.mismatch(&now);
        match (j.state, mismatch) {
            // Another device's journal in the shared state directory.
            (_, Some(_)) if device => continue,
            (State::Committed, Some(why)) => {
                return Err(fail(
                    Exit::Journal,
                    format!(
                        "journal {} was not applied: it is not for {} ({why}); nothing was \
                         changed. Move it away once you know which file it belongs to.",
                        path.display(),
                        dest.display()
                    ),
                ))
            }
            (State::Uncommitted, Some(why)) => {
                crate::vlog!(
                    1,
                    "removing journal {}: written for another file than {} ({why}), never committed",
                    path.display(),
                    dest.display()
                );
                remove(&path)?;
            }
            (State::Uncommitted, None) => {
                done.uncommitted = Some((path, j.records));
            }
            (State::Committed, None) => {
                let _critical = crate::signals::critical();
                crate::vlog!(
                    1,
                    "applying the committed journal {} to {} ({} records)",
                    path.display(),
                    dest.display(),
                    j.records
                );
                j.apply(target)?;
                crash::point(crash::APPLIED);
                remove(&path)?;
                done.applied = Some((path, j.records, j.payload));
            }
        }
    }
    Ok(done)
}

/// Finishes any committed journal of `dest` before it is read or written
/// (`device`: a block device), taking the destination's exclusive lock for
/// the time it takes. Returns what was done; with no journal, nothing is
/// locked or opened. A journal beside a file that no longer exists is
/// stale (never applicable): removed.
pub fn finish_pending(dest: &Path, device: bool) -> Result<Recovered> {
    if !has_journal(dest, device) {
        return Ok(Recovered::default());
    }
    if !device && dest.symlink_metadata().is_err() {
        let path = journal_path(dest, false);
        crate::vlog!(
            1,
            "removing journal {}: {} does not exist",
            path.display(),
            dest.display()
        );
        remove(&path)?;
        return Ok(Recovered::default());
    }
    let _lock = if device {
        crate::dest::lock::Lock::device(dest, true)?
    } else {
        crate::dest::lock::Lock::exclusive(dest)?
    };
    let target = open_target(dest, device)?;
    let done = recover(dest, &target, device)?;
    if let Some((path, records, bytes)) = &done.applied {
        crate::vlog!(
            1,
            "finished the interrupted write of {}: applied journal {} ({records} records, {bytes} bytes)",
            dest.display(),
            path.display()
        );
    }
    Ok(done)
}

/// Before `path` is read as a source: finishes a committed journal of it;
/// `read_only` (a `--read-only` server) writes nothing and refuses a file
/// whose write is unfinished instead (an uncommitted journal leaves the old
/// version, which is fine to read).
pub fn before_reading(path: &Path, read_only: bool) -> Result<()> {
    let device =
        std::fs::symlink_metadata(path).is_ok_and(|m| crate::content::scan::is_block_device(&m));
    if !has_journal(path, device) {
        return Ok(());
    }
    if !read_only {
        return finish_pending(path, device).map(|_| ());
    }
    if device || has_unfinished_write(path) {
        return Err(fail(
            Exit::Journal,
            format!(
                "{} has the journal of an unfinished write, and this server is read-only \
                 (--read-only): finish it with vmsync --recover on the server",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Removes a journal and makes that durable.
pub fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e)
            .with_context(|| format!("cannot remove journal {}", path.display()))
            .exit_with(Exit::Io),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_journal_is_beside_it_and_a_devices_in_the_state_dir() {
        assert_eq!(
            journal_path(Path::new("/srv/vm.img"), false),
            Path::new("/srv/.vm.img.vmsync-journal")
        );
        let dev = journal_path(Path::new("/dev/vg0/disk"), true);
        assert!(dev.starts_with(state_dir().join("journal")), "{dev:?}");
        let name = dev.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("disk-") && name.ends_with(".vmsync-journal"),
            "{name}"
        );
        // Two devices of the same name in different places differ.
        assert_ne!(dev, journal_path(Path::new("/dev/vg1/disk"), true));
    }
}
