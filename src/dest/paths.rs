//! Where a destination's hidden companions live, and the directory fsync
//! that makes a rename or removal among them durable.
//!
//! Beside a regular file `NAME`: its partial file `.NAME.vmsync-partial`
//! (the copy or clone being written, and the lock every run takes,
//! [`crate::dest::lock`]) and its journal `.NAME.vmsync-journal`
//! ([`crate::dest::journal`]), on the same filesystem, so a rename is
//! atomic and a journal costs no copy across filesystems. A block device
//! has nowhere beside it (its directory is `/dev`, a tmpfs lost at boot):
//! its journal goes to the receiving host's state directory (`--state-dir`,
//! default [`DEFAULT_STATE_DIR`]), never on the device. One module for the
//! names so that the writer, the lock and the recovery agree on them.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};

use crate::error::{Exit, WithExit};

/// The hidden partial file for `dest`: `.NAME.vmsync-partial` beside it, or
/// `.vmsync-partial-HASH` when NAME is too long for that to be a file name.
pub fn partial_path(dest: &Path) -> PathBuf {
    hidden_path(dest, "vmsync-partial")
}

/// `.NAME.KIND` beside `dest`, or `.KIND-HASH` when NAME is too long for
/// that to be a file name.
pub fn hidden_path(dest: &Path, kind: &str) -> PathBuf {
    let name = dest.file_name().unwrap_or(OsStr::new("vmsync"));
    let mut p = std::ffi::OsString::from(".");
    if name.len() + 2 + kind.len() <= 255 {
        p.push(name);
        p.push(".");
        p.push(kind);
    } else {
        let h = blake3::hash(name.as_encoded_bytes());
        p.push(format!("{kind}-{}", &h.to_hex()[..32]));
    }
    dest.with_file_name(p)
}

/// Where journals of block devices go unless `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmsync";

static STATE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Sets the state directory (`--state-dir`), once, before any run.
pub fn set_state_dir(dir: PathBuf) {
    let _ = STATE_DIR.set(dir);
}

/// The receiving host's state directory.
pub fn state_dir() -> &'static Path {
    STATE_DIR.get_or_init(|| PathBuf::from(DEFAULT_STATE_DIR))
}

/// The journal of a write of `dest`: beside a regular file; for a device,
/// in the state directory's `journal/`, named after the device's path (the
/// name only helps a reader: the identity inside decides, see the module
/// doc).
pub fn journal_path(dest: &Path, device: bool) -> PathBuf {
    if !device {
        return hidden_path(dest, "vmsync-journal");
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let h = blake3::hash(dest.as_os_str().as_encoded_bytes());
    state_dir()
        .join("journal")
        .join(format!("{name}-{}.vmsync-journal", &h.to_hex()[..16]))
}

/// Makes the directory a device's journal goes into (mode 0700: a journal
/// holds the device's data).
pub fn make_journal_dir(journal: &Path) -> Result<()> {
    let Some(dir) = journal.parent() else {
        return Ok(());
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the journal directory {}", dir.display()))
        .exit_with(Exit::Io)
}

/// Room a journal at `journal` may take: the free space of its
/// filesystem (for an unprivileged user) less a reserve of 1% or 64 MiB,
/// whichever is less, so that a run does not fill the disk to the last
/// block. `u64::MAX` when the filesystem does not say.
pub fn journal_room(journal: &Path) -> u64 {
    let dir = match journal.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match rustix::fs::statvfs(dir) {
        Ok(s) => {
            let free = s.f_bavail.saturating_mul(s.f_frsize);
            let total = s.f_blocks.saturating_mul(s.f_frsize);
            free.saturating_sub((total / 100).min(64 << 20))
        }
        Err(_) => u64::MAX,
    }
}

/// Fsyncs the directory holding `dest`, so a rename into it is durable.
pub fn sync_dir(dest: &Path) -> Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of directory {} failed", dir.display()))
        .exit_with(Exit::Io)
}
