//! Descriptor-relative file system calls: the lookups a tree walk and an
//! applier make, and the `openat2` a `--root` server resolves paths with.
//!
//! A path string can be redirected between a check and its use (a rename,
//! a symlink swapped in); a descriptor cannot. So a tree is reached one name
//! at a time from a directory descriptor ([`TreeDir`]), with `O_NOFOLLOW`
//! wherever a link must not be crossed, and attributes are set on the entry
//! a descriptor holds (through `AT_EMPTY_PATH` or `/proc/self/fd`) rather
//! than on a name looked up again.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, Dir, Gid, Mode, ResolveFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;
use rustix::path::Arg;

pub use rustix::fs::{OFlags, Stat};

/// `b` as a C string; a NUL inside is `EINVAL`, as the kernel would say.
pub fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Retries `f` while it fails with `EINTR` (or with one of `also`).
fn retry<T>(also: &[Errno], mut f: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e == Errno::INTR || also.contains(&e) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// `openat(dir, name, flags | O_CLOEXEC)`.
pub fn openat<P: Arg + Copy>(dir: impl AsFd, name: P, flags: OFlags) -> io::Result<OwnedFd> {
    retry(&[], || {
        rfs::openat(&dir, name, flags | OFlags::CLOEXEC, Mode::empty())
    })
}

/// `open(path, flags | O_CLOEXEC)`, relative to the working directory.
pub fn open_path(path: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    openat(rfs::CWD, path, flags)
}

/// `openat2(dir, rel, flags | O_CLOEXEC, RESOLVE_BENEATH |
/// RESOLVE_NO_MAGICLINKS)`: `..`, absolute symlinks and links that climb out
/// of `dir` fail the lookup itself (`EXDEV`, `ELOOP`).
pub fn open_beneath(dir: impl AsFd, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    // EAGAIN: a concurrent rename raced the lookup; it is safe to retry.
    retry(&[Errno::AGAIN], || {
        rfs::openat2(
            &dir,
            rel,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )
    })
}

/// `fchdir`; `O_PATH` descriptors are accepted.
pub fn enter(dir: impl AsFd) -> io::Result<()> {
    Ok(rustix::process::fchdir(dir)?)
}

/// `lstat` of `name` in `dir`.
pub fn stat_at(dir: impl AsFd, name: &CStr) -> io::Result<Stat> {
    Ok(rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// `fstat`; `O_PATH` descriptors are accepted.
pub fn stat_fd(fd: impl AsFd) -> io::Result<Stat> {
    Ok(rfs::fstat(fd)?)
}

/// The text of the symlink `name` in `dir`, at most `max` bytes.
pub fn read_link_at(dir: impl AsFd, name: &CStr, max: usize) -> io::Result<Vec<u8>> {
    let target = rfs::readlinkat(dir, name, Vec::new())?.into_bytes();
    if target.len() > max {
        return Err(io::Error::other(format!(
            "symlink target longer than {max} bytes"
        )));
    }
    Ok(target)
}

/// The names in the directory `dir` (an `O_PATH` descriptor will do: it
/// is reopened for reading), sorted, without `.` and `..`.
pub fn read_names(dir: impl AsFd) -> io::Result<Vec<Vec<u8>>> {
    let readable = openat(dir, c".", OFlags::RDONLY | OFlags::DIRECTORY)?;
    let mut names = Vec::new();
    for entry in Dir::new(readable)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// `mkdirat(dir, name, mode)` (less the umask, as always).
pub fn mkdir_at(dir: impl AsFd, name: &CStr, mode: u32) -> io::Result<()> {
    Ok(rfs::mkdirat(dir, name, Mode::from_raw_mode(mode))?)
}

/// `symlinkat(target, dir, name)`.
pub fn symlink_at(target: &CStr, dir: impl AsFd, name: &CStr) -> io::Result<()> {
    Ok(rfs::symlinkat(target, dir, name)?)
}

/// `mknodat(dir, name, mode, rdev)`: a fifo, socket or device node (less
/// the umask; its permissions are set afterwards).
pub fn mknod_at(dir: impl AsFd, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    let file_type = rfs::FileType::from_raw_mode(mode);
    Ok(rfs::mknodat(
        dir,
        name,
        file_type,
        Mode::from_raw_mode(mode & 0o7777),
        rdev,
    )?)
}

/// `linkat(from_dir, from, to_dir, to)`, never following a link (a
/// symlink at `from` would be linked itself).
pub fn link_at(from_dir: impl AsFd, from: &CStr, to_dir: impl AsFd, to: &CStr) -> io::Result<()> {
    Ok(rfs::linkat(from_dir, from, to_dir, to, AtFlags::empty())?)
}

/// `renameat(dir, from, dir, to)`: both names in one directory.
pub fn rename_at(dir: impl AsFd, from: &CStr, to: &CStr) -> io::Result<()> {
    Ok(rfs::renameat(&dir, from, &dir, to)?)
}

/// `unlinkat(dir, name)`, with `AT_REMOVEDIR` for a directory. A link is
/// removed itself, never its target.
pub fn unlink_at(dir: impl AsFd, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    Ok(rfs::unlinkat(dir, name, flags)?)
}

/// Gives the entry the `O_PATH` descriptor `fd` holds (a link included:
/// `AT_EMPTY_PATH`) to `uid:gid`; `u32::MAX` leaves that one as it is.
pub fn chown_fd(fd: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    Ok(rfs::chownat(
        fd,
        c"",
        (uid != u32::MAX).then(|| Uid::from_raw(uid)),
        (gid != u32::MAX).then(|| Gid::from_raw(gid)),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Access time left alone, modification time `sec.nsec`.
fn mtime_only(sec: i64, nsec: u32) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: sec,
            tv_nsec: i64::from(nsec),
        },
    }
}

/// Sets the modification time of `name` in `dir`, not following a link.
pub fn set_mtime_at(dir: impl AsFd, name: &CStr, sec: i64, nsec: u32) -> io::Result<()> {
    Ok(rfs::utimensat(
        dir,
        name,
        &mtime_only(sec, nsec),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Sets the modification time of the directory the `O_PATH` descriptor
/// `fd` holds: through `/proc/self/fd`, or, without `/proc`, on the
/// directory reopened for reading from the descriptor itself.
pub fn set_dir_mtime_fd(fd: &OwnedFd, sec: i64, nsec: u32) -> io::Result<()> {
    let times = mtime_only(sec, nsec);
    via_proc(fd, |p| {
        Ok(rfs::utimensat(rfs::CWD, p, &times, AtFlags::empty())?)
    })
    .or_else(|_| {
        let d = openat(fd, c".", OFlags::RDONLY | OFlags::DIRECTORY)?;
        Ok(rfs::futimens(d, &times)?)
    })
}

/// Runs `f` on `/proc/self/fd/N` for the descriptor: the inode the
/// descriptor holds, reached without a lookup by name.
fn via_proc(fd: &OwnedFd, f: impl FnOnce(&CStr) -> io::Result<()>) -> io::Result<()> {
    f(&cstring(
        format!("/proc/self/fd/{}", fd.as_raw_fd()).as_bytes(),
    )?)
}

/// `chmod` of what the `O_PATH` descriptor `fd` (not a link; `st` is its
/// `fstat`) holds: through `/proc/self/fd`, or, without `/proc`, on
/// `reopen()` (read-only, never blocking, not following a link) once it is
/// seen to be the same inode.
pub fn chmod_fd(
    fd: &OwnedFd,
    st: &Stat,
    mode: u32,
    reopen: impl FnOnce() -> io::Result<OwnedFd>,
) -> io::Result<()> {
    let mode = Mode::from_raw_mode(mode);
    match via_proc(fd, |p| Ok(rfs::chmod(p, mode)?)) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            let f = reopen().map_err(|e| {
                io::Error::other(format!(
                    "no /proc to reach it by its descriptor, and it cannot be opened: {e}"
                ))
            })?;
            let again = stat_fd(&f)?;
            if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
                return Err(io::Error::other("it was replaced meanwhile"));
            }
            Ok(rfs::fchmod(f, mode)?)
        }
        r => r,
    }
}

/// Whether `rel` is names joined by `/`, none of them empty, `.` or `..`:
/// a path that can only go down.
fn descends_only(rel: &[u8]) -> bool {
    !rel.contains(&0)
        && rel
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// The directory a tree lives in: every lookup beneath it goes one name at
/// a time, never through a symlink.
pub struct TreeDir {
    fd: OwnedFd,
}

impl TreeDir {
    /// `fd`: the tree's root, a directory (`O_PATH` will do).
    pub fn new(fd: OwnedFd) -> TreeDir {
        TreeDir { fd }
    }

    /// The directory holding `rel` (non-empty) and its last name.
    pub fn split(&self, rel: &[u8]) -> io::Result<(OwnedFd, CString)> {
        if rel.is_empty() || !descends_only(rel) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let (dir, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&b""[..], rel),
        };
        Ok((self.dir(dir)?, cstring(name)?))
    }

    /// The directory `rel` (`""`: the root), as an `O_PATH` descriptor. A
    /// symlink anywhere on the way is `ENOTDIR`.
    pub fn dir(&self, rel: &[u8]) -> io::Result<OwnedFd> {
        let mut cur = openat(&self.fd, c".", OFlags::PATH | OFlags::DIRECTORY)?;
        if rel.is_empty() {
            return Ok(cur);
        }
        if !descends_only(rel) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        for name in rel.split(|&b| b == b'/') {
            cur = openat(
                &cur,
                &*cstring(name)?,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            )?;
        }
        Ok(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_is_never_left_by_name() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("root/a")).unwrap();
        std::os::unix::fs::symlink(t.path(), t.path().join("root/up")).unwrap();
        let root = open_path(&t.path().join("root"), OFlags::PATH).unwrap();
        let tree = TreeDir::new(root);
        assert!(tree.dir(b"a").is_ok());
        for bad in [&b"up"[..], b"..", b"a/..", b"a//b", b"."] {
            assert!(tree.dir(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(tree.split(b"").is_err() && tree.split(b"../x").is_err());
        let (_, name) = tree.split(b"a/x").unwrap();
        assert_eq!(name.as_bytes(), b"x");
        assert_eq!(
            read_names(tree.dir(b"").unwrap()).unwrap(),
            [&b"a"[..], b"up"]
        );
    }
}
