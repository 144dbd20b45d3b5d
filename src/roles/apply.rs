//! The `Apply` role of `-r`: carry out the client's operations on a tree
//! (make a directory, a symlink, a hard link or a special file, set
//! attributes, delete).
//!
//! The server serves it ([`serve_apply`]); the client applies to a local
//! destination with the same [`Applier`]. Every name is resolved one
//! component at a time beneath the tree's root without following a symlink
//! ([`TreeDir`]), and validated first
//! ([`crate::wire::valid_rel_path`]), so no `..` and no link is
//! ever crossed, whatever was swapped in since the listing. Links are made
//! as links, deleted as links, and never given a mode. What replaces an
//! existing name (a symlink, a hard link, a special file) is made beside
//! it and renamed over it, so that the name never goes missing.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::dest::confine::Root;
use crate::error::{exit_code_of, fail, message_of, Exit, WithExit};
use crate::roles::list::{join, kind_of, open_root, shown, xattr_wanted};
use crate::sys::dirfd::{self, OFlags, TreeDir};
use crate::sys::xattr;
use crate::wire::{
    attrs, list_flags, valid_rel_path, xattr_in_play, EntryKind, FrameReader, FrameWriter, Msg, Op,
    OpResult, MAX_PATH,
};

/// Carries out [`Op`]s on one tree: the server's `Apply` role, and the
/// client's own destination when it is local.
pub struct Applier<'a> {
    path: PathBuf,
    confine: Option<&'a Root>,
    root: Option<TreeDir>,
    /// Owners are set only by root, as rsync does: nobody else may.
    as_root: bool,
    temp_count: usize,
}

impl<'a> Applier<'a> {
    pub fn new(path: &Path, confine: Option<&'a Root>) -> Applier<'a> {
        Applier {
            path: path.to_path_buf(),
            confine,
            root: None,
            as_root: rustix::process::geteuid().is_root(),
            temp_count: 0,
        }
    }

    /// Carries out one operation; its failure is its result, not ours.
    pub fn apply(&mut self, op: &Op) -> OpResult {
        match self.apply_op(op) {
            Ok(warning) => OpResult {
                status: 0,
                message: warning.unwrap_or_default(),
            },
            // The client names the entry.
            Err(e) => OpResult {
                status: exit_code_of(&e).code(),
                message: message_of(&e),
            },
        }
    }

    fn root(&mut self, create: Option<u32>) -> Result<&TreeDir> {
        if self.root.is_none() {
            let mut fd = open_root(&self.path, self.confine)?;
            if let (None, Some(mode)) = (&fd, create) {
                match self.confine {
                    Some(r) => r.make_dir(&self.path, mode)?,
                    None => {
                        use std::os::unix::fs::DirBuilderExt;
                        match std::fs::DirBuilder::new().mode(mode).create(&self.path) {
                            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                                return Err(e)
                                    .context("cannot create the directory")
                                    .exit_with(Exit::Io)
                            }
                            _ => {}
                        }
                    }
                }
                fd = open_root(&self.path, self.confine)?;
            }
            let Some(fd) = fd else {
                return Err(fail(Exit::Io, "no such directory"));
            };
            let st = dirfd::stat_fd(&fd)?;
            if kind_of(st.st_mode) != EntryKind::Dir {
                return Err(fail(Exit::Io, "not a directory"));
            }
            self.root = Some(TreeDir::new(fd));
        }
        Ok(self.root.as_ref().expect("opened above"))
    }

    /// `Ok(Some(warning))` for an operation skipped for a harmless reason.
    fn apply_op(&mut self, op: &Op) -> Result<Option<String>> {
        let create = match op {
            Op::Mkdir { path, mode } if path.is_empty() => Some(*mode),
            _ => None,
        };
        self.root(create)?;
        match op {
            Op::Mkdir { path, .. } if path.is_empty() => Ok(None),
            Op::Mkdir { path, mode } => self.mkdir(path, *mode).map(|_| None),
            Op::Symlink { path, target } => self.symlink(path, target).map(|_| None),
            Op::Attrs {
                path,
                which,
                mode,
                uid,
                gid,
                mtime_sec,
                mtime_nsec,
                xattrs,
            } => self
                .attrs(
                    path,
                    *which,
                    *mode,
                    (*uid, *gid),
                    (*mtime_sec, *mtime_nsec),
                    xattrs,
                )
                .map(|_| None),
            Op::Delete { path } => self.delete(path),
            Op::Link { path, target } => self.link(path, target).map(|_| None),
            Op::Mknod { path, mode, rdev } => self.mknod(path, *mode, *rdev).map(|_| None),
        }
    }

    fn tree(&self) -> &TreeDir {
        self.root
            .as_ref()
            .expect("root opened before any operation")
    }

    /// The directory holding `rel` (a non-empty path the protocol allows)
    /// and its last name.
    fn split(&self, rel: &[u8]) -> io::Result<(OwnedFd, CString)> {
        if !valid_rel_path(rel, false) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.tree().split(rel)
    }

    fn mkdir(&self, rel: &[u8], mode: u32) -> Result<()> {
        let (dir, name) = self.split(rel)?;
        let make = || {
            // Writable by us until its attributes are set at the end.
            dirfd::mkdir_at(&dir, &name, mode | 0o700)
                .context("cannot create the directory")
                .exit_with(Exit::Io)
        };
        match dirfd::stat_at(&dir, &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => make(),
            Err(e) => Err(e).exit_with(Exit::Io),
            Ok(st) => match kind_of(st.st_mode) {
                EntryKind::Dir => Ok(()),
                EntryKind::Symlink => {
                    dirfd::unlink_at(&dir, &name, false)
                        .context("cannot remove the symlink where a directory belongs")
                        .exit_with(Exit::Io)?;
                    make()
                }
                _ => Err(fail(
                    Exit::Io,
                    "exists and is not a directory; the source has a directory there",
                )),
            },
        }
    }

    fn symlink(&mut self, rel: &[u8], target: &[u8]) -> Result<()> {
        let (dir, name) = self.split(rel)?;
        let target = dirfd::cstring(target)?;
        match dirfd::stat_at(&dir, &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return dirfd::symlink_at(&target, &dir, &name)
                    .context("cannot create the symlink")
                    .exit_with(Exit::Io);
            }
            Err(e) => return Err(e).exit_with(Exit::Io),
            Ok(st) => match kind_of(st.st_mode) {
                EntryKind::Symlink
                    if dirfd::read_link_at(&dir, &name, MAX_PATH).ok().as_deref()
                        == Some(target.to_bytes()) =>
                {
                    return Ok(())
                }
                EntryKind::Dir => {
                    return Err(fail(
                        Exit::Io,
                        "is a directory; the source has a symlink there",
                    ))
                }
                _ => {}
            },
        }
        self.replace(&dir, &name, "the symlink", |dir, temp| {
            dirfd::symlink_at(&target, dir, temp)
        })
    }

    /// Makes `name` in `dir` anew with `make` (given the directory and a
    /// temporary name beside it), then renames it over what is there: the
    /// name never goes missing.
    fn replace(
        &mut self,
        dir: &OwnedFd,
        name: &CString,
        what: &str,
        make: impl FnOnce(&OwnedFd, &CString) -> io::Result<()>,
    ) -> Result<()> {
        self.temp_count += 1;
        let temp = dirfd::cstring(
            format!(".vmsync-link-{}-{}", std::process::id(), self.temp_count).as_bytes(),
        )?;
        make(dir, &temp)
            .with_context(|| format!("cannot create {what}"))
            .exit_with(Exit::Io)?;
        let r = dirfd::rename_at(dir, &temp, name);
        if r.is_err() {
            let _ = dirfd::unlink_at(dir, &temp, false);
        }
        r.with_context(|| format!("cannot replace it with {what}"))
            .exit_with(Exit::Io)
    }

    /// `-H`: `rel` becomes another name of `target`'s inode (a regular
    /// file of the tree), unless it already is.
    fn link(&mut self, rel: &[u8], target: &[u8]) -> Result<()> {
        let (tdir, tname) = self.split(target)?;
        let tst = dirfd::stat_at(&tdir, &tname)
            .with_context(|| format!("cannot link to {}", shown(target)))
            .exit_with(Exit::Io)?;
        if kind_of(tst.st_mode) != EntryKind::File {
            return Err(fail(
                Exit::Io,
                format!("cannot link to {}: not a regular file", shown(target)),
            ));
        }
        let (dir, name) = self.split(rel)?;
        match dirfd::stat_at(&dir, &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return dirfd::link_at(&tdir, &tname, &dir, &name)
                    .context("cannot create the hard link")
                    .exit_with(Exit::Io)
            }
            Err(e) => return Err(e).exit_with(Exit::Io),
            Ok(st) if (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino) => return Ok(()),
            Ok(st) if kind_of(st.st_mode) == EntryKind::Dir => {
                return Err(fail(
                    Exit::Io,
                    "is a directory; the source has a file there",
                ))
            }
            Ok(_) => {}
        }
        self.replace(&dir, &name, "the hard link", |dir, temp| {
            dirfd::link_at(&tdir, &tname, dir, temp)
        })
    }

    /// `-D`: `rel` becomes a fifo, socket or device node of `mode`'s type
    /// (and `rdev`), unless it already is one; permissions come with its
    /// `ATTRS`.
    fn mknod(&mut self, rel: &[u8], mode: u32, rdev: u64) -> Result<()> {
        let (dir, name) = self.split(rel)?;
        match dirfd::stat_at(&dir, &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e).exit_with(Exit::Io),
            Ok(st)
                if st.st_mode & libc::S_IFMT == mode & libc::S_IFMT
                    && (!crate::wire::is_device(mode) || st.st_rdev == rdev) =>
            {
                return Ok(())
            }
            Ok(st) if kind_of(st.st_mode) == EntryKind::Dir => {
                return Err(fail(
                    Exit::Io,
                    "is a directory; the source has a special file there",
                ))
            }
            Ok(_) => {}
        }
        let what = if crate::wire::is_device(mode) {
            "the device node"
        } else {
            "the special file"
        };
        self.replace(&dir, &name, what, |dir, temp| {
            dirfd::mknod_at(dir, temp, mode, rdev)
        })
    }

    fn attrs(
        &self,
        rel: &[u8],
        which: u8,
        mode: u32,
        owner: (u32, u32),
        mtime: (i64, u32),
        xattrs: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        // The entry itself, never what a link points to: an O_PATH
        // descriptor of it, and its parent for the calls that take a name.
        let at = if rel.is_empty() {
            None
        } else {
            Some(self.split(rel)?)
        };
        let fd = match &at {
            Some((d, n)) => dirfd::openat(d, &**n, OFlags::PATH | OFlags::NOFOLLOW),
            None => self.tree().dir(b""),
        }
        .context("cannot open")
        .exit_with(Exit::Io)?;
        let st = dirfd::stat_fd(&fd).exit_with(Exit::Io)?;
        let link = kind_of(st.st_mode) == EntryKind::Symlink;
        if which & attrs::OWNER != 0 && self.as_root && (st.st_uid, st.st_gid) != owner {
            dirfd::chown_fd(&fd, owner.0, owner.1)
                .context("cannot set the owner")
                .exit_with(Exit::Io)?;
        }
        // After the owner (a chown drops `security.capability`), before
        // the mode (setting an ACL sets the group bits; the mode given is
        // the source's, whose group bits are its ACL's mask).
        if which & (attrs::XATTRS | attrs::ACLS) != 0 {
            let mut flags = 0;
            if which & attrs::XATTRS != 0 {
                flags |= list_flags::XATTRS;
            }
            if which & attrs::ACLS != 0 {
                flags |= list_flags::ACLS;
            }
            let ours = xattr_wanted(flags, self.as_root);
            // What this end may not set (`trusted.` when not root) is left out,
            // as rsync does.
            let want: Vec<(Vec<u8>, Vec<u8>)> = xattrs
                .iter()
                .filter(|(n, _)| ours(n) && xattr_in_play(which, n))
                .cloned()
                .collect();
            xattr::set_exactly(&fd, &want, ours)
                .context("cannot set the extended attributes")
                .exit_with(Exit::Io)?;
        }
        // A link has no mode of its own on Linux.
        if which & attrs::MODE != 0 && !link && st.st_mode & 0o7777 != mode {
            let reopen = || match &at {
                Some((d, n)) => dirfd::openat(
                    d,
                    &**n,
                    OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::NOFOLLOW,
                ),
                None => dirfd::openat(&fd, c".", OFlags::RDONLY | OFlags::DIRECTORY),
            };
            dirfd::chmod_fd(&fd, &st, mode, reopen)
                .context("cannot set the permissions")
                .exit_with(Exit::Io)?;
        }
        if which & attrs::MTIME != 0 {
            match &at {
                Some((d, n)) => dirfd::set_mtime_at(d, n, mtime.0, mtime.1),
                None => dirfd::set_dir_mtime_fd(&fd, mtime.0, mtime.1),
            }
            .context("cannot set the modification time")
            .exit_with(Exit::Io)?;
        }
        Ok(())
    }

    fn delete(&self, rel: &[u8]) -> Result<Option<String>> {
        let (dir, name) = self.split(rel)?;
        let st = match dirfd::stat_at(&dir, &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            r => r.exit_with(Exit::Io)?,
        };
        let is_dir = kind_of(st.st_mode) == EntryKind::Dir;
        match dirfd::unlink_at(&dir, &name, is_dir) {
            Ok(()) => Ok(None),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                Ok(Some(format!(
                    "{}: not deleted: the directory holds entries that are excluded or new",
                    shown(&join(self.path.as_os_str().as_bytes(), rel))
                )))
            }
            Err(e) => Err(e).context("cannot delete").exit_with(Exit::Io),
        }
    }
}

/// Serves `APPLY` … `END` (the server's `Apply` role).
pub fn serve_apply<R: io::Read, W: io::Write>(
    path: &Path,
    confine: Option<&Root>,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<()> {
    let mut applier = Applier::new(path, confine);
    loop {
        match reader.read_msg()? {
            Msg::Apply(ops) => {
                let results = ops.iter().map(|op| applier.apply(op)).collect();
                writer.send_now(&Msg::Applied(results))?;
            }
            Msg::End => return Ok(()),
            m => return Err(m.unexpected("APPLY or END")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(p: &str) -> Vec<u8> {
        p.as_bytes().to_vec()
    }

    #[test]
    fn applier_never_follows_links() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"k").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let mut a = Applier::new(&root, None);
        let attrs = |path: &str| Op::Attrs {
            path: rel(path),
            which: attrs::MODE | attrs::MTIME,
            mode: 0o700,
            uid: 0,
            gid: 0,
            mtime_sec: 1,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        };
        let before = std::fs::metadata(&outside).unwrap();
        // Through the link: refused; on the link: its target is untouched.
        assert_ne!(a.apply(&attrs("link/keep")).status, 0);
        assert_ne!(
            a.apply(&Op::Delete {
                path: rel("link/keep")
            })
            .status,
            0
        );
        assert_eq!(a.apply(&attrs("link")).status, 0);
        let after = std::fs::metadata(&outside).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&before.permissions()),
            std::os::unix::fs::PermissionsExt::mode(&after.permissions())
        );
        assert!(outside.join("keep").exists());
        assert_eq!(a.apply(&Op::Delete { path: rel("link") }).status, 0);
        assert!(outside.join("keep").exists() && !root.join("link").exists());
        // A directory where a link was; a link replacing a file.
        std::os::unix::fs::symlink(&outside, root.join("d2")).unwrap();
        assert_eq!(
            a.apply(&Op::Mkdir {
                path: rel("d2"),
                mode: 0o755
            })
            .status,
            0
        );
        assert!(std::fs::symlink_metadata(root.join("d2")).unwrap().is_dir());
        std::fs::write(root.join("f"), b"f").unwrap();
        let link = Op::Symlink {
            path: rel("f"),
            target: rel("../x"),
        };
        assert_eq!(a.apply(&link).status, 0);
        assert_eq!(
            std::fs::read_link(root.join("f")).unwrap(),
            Path::new("../x")
        );
        assert_ne!(
            a.apply(&Op::Symlink {
                path: rel("d"),
                target: rel("x")
            })
            .status,
            0
        );
        // A directory with content is left, with a warning.
        std::fs::write(root.join("d/keep"), b"k").unwrap();
        let r = a.apply(&Op::Delete { path: rel("d") });
        assert_eq!(r.status, 0);
        assert!(r.message.contains("not deleted"), "{r:?}");
        assert!(root.join("d/keep").exists());
    }
}
