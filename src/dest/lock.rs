//! One writer per destination: an exclusive `flock` on its partial file.
//!
//! A sync creates (or reopens) the hidden partial file beside the
//! destination, `.NAME.vmsync-partial` ([`crate::dest::paths::partial_path`]),
//! and holds an exclusive lock on it for its whole run; `--check` holds a
//! shared lock on it when it exists. A second sync of the same destination
//! fails at once (exit 8) naming the holder's pid and host, which the holder
//! recorded in an extended attribute of the file where the filesystem allows.
//!
//! Locking the partial file itself, rather than a lock file of its own,
//! means a run killed with SIGKILL leaves nothing behind but the partial
//! file the next run resumes from (the kernel drops the lock). A process
//! that locked a file which was meanwhile renamed or removed notices by
//! comparing inodes and tries again, so removal never lets two holders in.
//!
//! A block device destination has no partial file (it is written in place,
//! and nothing may be created in `/dev`): the lock is a `flock` on the device
//! node itself, exclusive for a sync and shared for `--check`. A device node
//! takes no user extended attributes, so the holder is looked up in
//! `/proc/locks` instead (same host by construction: the lock is local).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::dest::paths::partial_path;
use rustix::fs::FlockOperation;

use crate::error::{fail, Exit, WithExit};
use crate::signals::TempGuard;

const HOLDER_XATTR: &str = "user.vmsync.holder";

/// A held lock on `dest`'s partial file, or on `dest` itself for a block
/// device.
pub struct Lock {
    file: File,
    path: PathBuf,
    exclusive: bool,
    /// Locked on the device node: nothing to clean up.
    device: bool,
    /// An exclusive holder's partial file is removed on a signal if it is
    /// still empty (nothing to resume from).
    _guard: Option<TempGuard>,
}

impl Lock {
    /// Takes the exclusive lock for a sync of `dest`, creating its partial
    /// file if needed.
    pub fn exclusive(dest: &Path) -> Result<Lock> {
        Ok(Lock::acquire(dest, true)?.expect("an exclusive lock creates its file"))
    }

    /// Takes the shared lock for a check of `dest`; `None` when there is no
    /// partial file (no sync is running, and a check must not create files).
    pub fn shared(dest: &Path) -> Result<Option<Lock>> {
        Lock::acquire(dest, false)
    }

    fn acquire(dest: &Path, exclusive: bool) -> Result<Option<Lock>> {
        let path = partial_path(dest);
        for _ in 0..100 {
            let opened = OpenOptions::new()
                .read(true)
                .write(exclusive)
                .create(exclusive)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path);
            let file = match opened {
                Ok(f) => f,
                Err(e) if !exclusive && e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(None)
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot open {}", path.display()))
                        .exit_with(Exit::Io)
                }
            };
            let op = if exclusive {
                FlockOperation::NonBlockingLockExclusive
            } else {
                FlockOperation::NonBlockingLockShared
            };
            try_flock(&file, op, dest, &path, || holder(&file))?;
            // The holder before us may have renamed or removed the file after
            // we opened it: then this lock guards nothing, so start again.
            let same = match (file.metadata(), std::fs::symlink_metadata(&path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            if exclusive {
                set_holder(&file);
            }
            let guard = exclusive.then(|| TempGuard::if_empty(&path));
            return Ok(Some(Lock {
                file,
                path,
                exclusive,
                device: false,
                _guard: guard,
            }));
        }
        Err(fail(
            Exit::Locked,
            format!("cannot lock {}: it keeps being replaced", path.display()),
        ))
    }

    /// Locks the block device `dest` itself: exclusive for a sync, shared
    /// for a check. The device is opened read-only and never followed
    /// through a symlink; the writer opens it again for writing (see
    /// [`crate::dest::writer::Output::device`]), after the lock is held, so two
    /// syncs of one device always meet here and the second gets exit 8.
    pub fn device(dest: &Path, exclusive: bool) -> Result<Lock> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dest)
            .with_context(|| format!("cannot open destination device {}", dest.display()))
            .exit_with(Exit::Io)?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat destination device {}", dest.display()))
            .exit_with(Exit::Io)?;
        if !crate::content::scan::is_block_device(&meta) {
            return Err(fail(
                Exit::Io,
                format!(
                    "destination {} stopped being a block device while it was opened",
                    dest.display()
                ),
            ));
        }
        let op = if exclusive {
            FlockOperation::NonBlockingLockExclusive
        } else {
            FlockOperation::NonBlockingLockShared
        };
        try_flock(&file, op, dest, dest, || {
            lock_holder(&meta).map(|pid| format!("pid {pid} on {}", hostname()))
        })?;
        Ok(Lock {
            file,
            path: dest.to_path_buf(),
            exclusive,
            device: true,
            _guard: None,
        })
    }

    /// The locked partial file (read-write for an exclusive lock), or the
    /// locked device (read-only).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Lock {
    /// An empty partial file holds nothing to resume from: remove it (while
    /// still holding the lock; see the module doc for why that is safe).
    fn drop(&mut self) {
        if !self.exclusive || self.device {
            return;
        }
        let same_and_empty = match (self.file.metadata(), std::fs::symlink_metadata(&self.path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino() && b.len() == 0,
            _ => false,
        };
        if same_and_empty {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn set_holder(file: &File) {
    let value = format!("pid {} on {}", std::process::id(), hostname());
    // Best effort: a filesystem without user xattrs just names no holder.
    let _ = rustix::fs::fsetxattr(
        file,
        HOLDER_XATTR,
        value.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    );
}

/// Removes the holder's name from a partial file about to become the
/// destination (the `flock` itself stays until the file is closed, and
/// `/proc/locks` still names the pid).
pub fn clear_holder(file: &File) {
    let _ = rustix::fs::fremovexattr(file, HOLDER_XATTR);
}

fn holder(file: &File) -> Option<String> {
    let mut buf = [0u8; 256];
    let n = rustix::fs::fgetxattr(file, HOLDER_XATTR, &mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The pid holding an exclusive `flock` on the file `meta` describes, from
/// `/proc/locks` (lines like `1: FLOCK  ADVISORY  WRITE 1234 00:05:678 0 EOF`;
/// waiting requests are marked `->` and skipped).
fn lock_holder(meta: &std::fs::Metadata) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [_, "FLOCK", _, "WRITE", pid, id, ..] if *id == want => pid.parse().ok(),
            _ => None,
        }
    })
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// `flock(op)` (a non-blocking operation) on `file` (which guards `dest`); when another
/// process holds it, exit 8 naming that holder (`who`, e.g. its pid and host).
fn try_flock(
    file: &File,
    op: FlockOperation,
    dest: &Path,
    locked: &Path,
    who: impl FnOnce() -> Option<String>,
) -> Result<()> {
    let err = match rustix::fs::flock(file, op) {
        Ok(()) => return Ok(()),
        Err(e) => std::io::Error::from(e),
    };
    if err.kind() == std::io::ErrorKind::WouldBlock {
        let who = match who() {
            Some(h) => format!("another vmsync ({h})"),
            None => "another vmsync".to_string(),
        };
        return Err(fail(
            Exit::Locked,
            format!(
                "{} is being synced by {who}; wait for it to finish",
                dest.display()
            ),
        ));
    }
    Err(err)
        .with_context(|| format!("cannot lock {}", locked.display()))
        .exit_with(Exit::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code_of;

    #[test]
    fn flock_holder_is_found_in_proc_locks() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("node")).unwrap();
        let meta = f.metadata().unwrap();
        assert_eq!(lock_holder(&meta), None);
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
        if std::path::Path::new("/proc/locks").exists() {
            assert_eq!(lock_holder(&meta), Some(std::process::id()));
        }
    }

    #[test]
    fn second_exclusive_holder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("disk.img");
        // No sync running: a check takes no lock and creates nothing.
        assert!(Lock::shared(&dest).unwrap().is_none());
        assert!(!partial_path(&dest).exists());
        let a = Lock::exclusive(&dest).unwrap();
        let e = Lock::exclusive(&dest).err().expect("second lock must fail");
        assert_eq!(exit_code_of(&e), Exit::Locked);
        if holder(a.file()).is_some() {
            assert!(
                e.to_string()
                    .contains(&format!("pid {}", std::process::id())),
                "{e}"
            );
        }
        // A check cannot run under a sync either.
        assert!(Lock::shared(&dest).is_err());
        drop(a);
        assert!(
            !partial_path(&dest).exists(),
            "empty partial removed on release"
        );
        // A partial with data stays for the next run.
        let a = Lock::exclusive(&dest).unwrap();
        a.file().set_len(10).unwrap();
        drop(a);
        assert!(partial_path(&dest).exists());
        let s = Lock::shared(&dest).unwrap();
        assert!(s.is_some());
        assert!(Lock::exclusive(&dest).is_err());
    }
}
