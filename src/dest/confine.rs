//! `vmsync --server --root DIR [--read-only]`: a server confined to one
//! directory tree, for a forced command in `authorized_keys`.
//!
//! Every path the client names is resolved with `openat2(2)` and
//! `RESOLVE_BENEATH` from a descriptor of DIR, so `..`, absolute symlinks and
//! symlinks that climb out are refused by the kernel during the lookup
//! itself: there is no window between a check and the use of its result.
//! An absolute client path is accepted only when it names something under
//! DIR (it is then taken relative to DIR); a relative one is relative to DIR.
//!
//! A destination is entered, not re-resolved: the server resolves the
//! destination's directory beneath DIR, makes it the working directory
//! (`fchdir`), and hands the receiver a single file name. The receiver never
//! follows a symlink at that name (it replaces the link, or refuses with
//! `--inplace`), so nothing outside DIR is read or written. (`--read-only`,
//! which refuses every role that writes, is enforced by the server loop.)

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};

use crate::error::{fail, Exit, WithExit};
use crate::sys::dirfd::{self, OFlags};

/// The directory a confined server may touch.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
    /// DIR with symlinks resolved, to recognise absolute client paths.
    path: PathBuf,
}

/// How a lookup beneath the root failed.
fn lookup_error(e: std::io::Error, shown: &str, what: &str) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::EXDEV) | Some(libc::ELOOP) => refused(shown),
        Some(libc::ENOSYS) => fail(
            Exit::Io,
            "--root needs openat2(2) (Linux 5.6 or later); this kernel lacks it",
        ),
        _ => Err::<(), _>(e)
            .with_context(|| format!("cannot open {what} {shown}"))
            .exit_with(Exit::Io)
            .unwrap_err(),
    }
}

fn refused(shown: &str) -> anyhow::Error {
    fail(
        Exit::Usage,
        format!("{shown} is outside the directory this server is confined to (--root)"),
    )
}

impl Root {
    /// Opens DIR; it must exist and be a directory.
    pub fn open(dir: &Path) -> Result<Root> {
        let path = std::fs::canonicalize(dir)
            .with_context(|| format!("--root {}", dir.display()))
            .exit_with(Exit::Io)?;
        if path.as_os_str().as_bytes().contains(&0) {
            return Err(fail(Exit::Usage, "--root contains a NUL byte"));
        }
        let dir = dirfd::open_path(&path, OFlags::PATH | OFlags::DIRECTORY)
            .with_context(|| format!("--root {}", path.display()))
            .exit_with(Exit::Io)?;
        Ok(Root { dir, path })
    }

    /// The client's path relative to the root (`.` for the root itself).
    fn relative(&self, p: &Path) -> Result<PathBuf> {
        let shown = p.display().to_string();
        // Names with control characters are legal, but in a confined
        // server they are far likelier an attack on a log than an image.
        if p.as_os_str()
            .as_bytes()
            .iter()
            .any(|b| b.is_ascii_control())
        {
            return Err(fail(
                Exit::Usage,
                format!("path {shown:?} contains a control character; refused"),
            ));
        }
        let rel = if p.is_absolute() {
            p.strip_prefix(&self.path)
                .map_err(|_| refused(&shown))?
                .to_path_buf()
        } else {
            p.to_path_buf()
        };
        Ok(if rel.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            rel
        })
    }

    /// `rel` opened beneath DIR ([`dirfd::open_beneath`]).
    fn open_beneath(&self, rel: &Path, flags: OFlags) -> std::io::Result<OwnedFd> {
        dirfd::open_beneath(&self.dir, rel, flags)
    }

    /// Opens a source file for reading, beneath the root.
    pub fn open_source(&self, p: &Path) -> Result<File> {
        let rel = self.relative(p)?;
        let fd = self
            .open_beneath(&rel, OFlags::RDONLY)
            .map_err(|e| lookup_error(e, &p.display().to_string(), "source"))?;
        Ok(File::from(fd))
    }

    /// Makes the destination's directory (beneath the root) the working
    /// directory and returns the file name to receive into. A destination
    /// that is a directory receives `source_name`.
    pub fn enter_destination(&self, p: &Path, source_name: &[u8]) -> Result<PathBuf> {
        let shown = p.display().to_string();
        let rel = self.relative(p)?;
        let trailing_slash = p.as_os_str().as_bytes().ends_with(b"/");
        let (dir, name) = match self.open_beneath(&rel, OFlags::PATH | OFlags::DIRECTORY) {
            Ok(dir) => (dir, entry_name(source_name, &shown)?),
            // Not a directory: a file, nothing yet, or a symlink that
            // leads out (EXDEV, ELOOP). In each case the name itself is the
            // destination, in a directory that must lie beneath the root;
            // the receiver replaces a link rather than following it.
            Err(e)
                if trailing_slash
                    || !matches!(
                        e.raw_os_error(),
                        Some(libc::ENOTDIR | libc::ENOENT | libc::EXDEV | libc::ELOOP)
                    ) =>
            {
                return Err(lookup_error(e, &shown, "destination"))
            }
            Err(_) => self.parent_and_name(&rel, &shown, "the directory of destination")?,
        };
        dirfd::enter(&dir)
            .with_context(|| format!("cannot enter the directory of {shown}"))
            .exit_with(Exit::Io)?;
        Ok(PathBuf::from(name))
    }
}

/// The roots of `-r` runs: the listed tree, or the tree that operations
/// apply to. Beneath such a root, the tree roles resolve one name at a
/// time without following symlinks, so nothing they touch leaves the root.
impl Root {
    /// `p` (a tree's root) opened with `O_PATH` beneath DIR, following
    /// symlinks that stay beneath it; `None` when it does not exist.
    pub fn open_tree(&self, p: &Path) -> Result<Option<OwnedFd>> {
        let rel = self.relative(p)?;
        match self.open_beneath(&rel, OFlags::PATH) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(lookup_error(e, &p.display().to_string(), "directory")),
        }
    }

    /// The directory holding `rel` (opened beneath DIR) and `rel`'s last
    /// name, which must be a plain name (not `..`).
    fn parent_and_name(&self, rel: &Path, shown: &str, what: &str) -> Result<(OwnedFd, OsString)> {
        let name = match rel.components().next_back() {
            Some(Component::Normal(n)) => n.to_os_string(),
            _ => return Err(refused(shown)),
        };
        let parent = match rel.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = self
            .open_beneath(&parent, OFlags::PATH | OFlags::DIRECTORY)
            .map_err(|e| lookup_error(e, shown, what))?;
        Ok((dir, name))
    }

    /// Creates the directory `p` beneath DIR; its parent must exist.
    pub fn make_dir(&self, p: &Path, mode: u32) -> Result<()> {
        let shown = p.display().to_string();
        let rel = self.relative(p)?;
        let (dir, name) = self.parent_and_name(&rel, &shown, "the parent directory of")?;
        let name = dirfd::cstring(name.as_bytes())
            .map_err(|_| fail(Exit::Usage, "a path with a NUL byte"))?;
        if let Err(e) = dirfd::mkdir_at(&dir, &name, mode) {
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e)
                    .with_context(|| format!("cannot create directory {shown}"))
                    .exit_with(Exit::Io);
            }
        }
        Ok(())
    }
}

/// `name` as one entry of the directory `dest`, which it must not leave.
pub(crate) fn entry_name(name: &[u8], dest: &str) -> Result<std::ffi::OsString> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(fail(
            Exit::Protocol,
            format!(
                "destination {dest} is a directory and the source name {:?} cannot be used in it",
                String::from_utf8_lossy(name)
            ),
        ));
    }
    Ok(OsStr::from_bytes(name).to_os_string())
}
