//! Extended attributes (and the ACLs stored in them) of the entry an
//! `O_PATH` descriptor holds, for `-X` and `-A`.
//!
//! There is no `fgetxattr` on an `O_PATH` descriptor, and rustix has no
//! `getxattrat`; so every call goes through `/proc/self/fd/N`, which
//! reaches the inode the descriptor holds without a lookup by name. For a
//! symlink's `O_PATH | O_NOFOLLOW` descriptor that is the link itself, not
//! its target; a device node is never opened (tested on Linux 6.18: a
//! symlink keeps its own `trusted.*`, and `user.*` on it is `EPERM`, as
//! the kernel allows `user.` only on files and directories).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use rustix::fs::{self as rfs, XattrFlags};
use rustix::io::Errno;

/// Extended attributes: (name, value), sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The kernel's `XATTR_LIST_MAX` and `XATTR_SIZE_MAX`.
const LIST_MAX: usize = 64 << 10;
const VALUE_MAX: usize = 64 << 10;

fn proc_path(fd: &OwnedFd) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

fn unsupported(e: Errno) -> bool {
    e == Errno::OPNOTSUPP || e == Errno::NOTSUP
}

/// The names of the attributes on `fd`'s entry; none where the filesystem
/// has no extended attributes.
fn names(fd: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; LIST_MAX];
    let n = match rfs::listxattr(proc_path(fd).as_c_str(), &mut buf[..]) {
        Ok(n) => n,
        Err(e) if unsupported(e) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    Ok(buf[..n]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// The attributes of `fd`'s entry whose names `want` accepts, sorted.
pub fn read(fd: &OwnedFd, want: impl Fn(&[u8]) -> bool) -> io::Result<Xattrs> {
    let path = proc_path(fd);
    let mut out = Vec::new();
    let mut buf = vec![0u8; VALUE_MAX];
    for name in names(fd)? {
        if !want(&name) {
            continue;
        }
        let cname = CString::new(name.clone()).map_err(|_| Errno::INVAL)?;
        match rfs::getxattr(path.as_c_str(), cname.as_c_str(), &mut buf[..]) {
            Ok(n) => out.push((name, buf[..n].to_vec())),
            // Removed since it was listed.
            Err(Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sort();
    Ok(out)
}

/// Makes the attributes of `fd`'s entry that `in_play` accepts exactly
/// `want` (sorted, all accepted by `in_play`): removes the others of those
/// names, sets those that differ. Whether anything changed.
pub fn set_exactly(
    fd: &OwnedFd,
    want: &[(Vec<u8>, Vec<u8>)],
    in_play: impl Fn(&[u8]) -> bool,
) -> io::Result<bool> {
    let have = read(fd, &in_play)?;
    let path = proc_path(fd);
    let mut changed = false;
    for (name, _) in &have {
        if !want.iter().any(|(n, _)| n == name) {
            let cname = CString::new(name.clone()).map_err(|_| Errno::INVAL)?;
            match rfs::removexattr(path.as_c_str(), cname.as_c_str()) {
                Ok(()) | Err(Errno::NODATA) => changed = true,
                Err(e) => return Err(e.into()),
            }
        }
    }
    for (name, value) in want {
        if have.iter().any(|(n, v)| n == name && v == value) {
            continue;
        }
        let cname = CString::new(name.clone()).map_err(|_| Errno::INVAL)?;
        rfs::setxattr(
            path.as_c_str(),
            cname.as_c_str(),
            value,
            XattrFlags::empty(),
        )
        .map_err(|e| {
            io::Error::other(format!(
                "{}: {}",
                String::from_utf8_lossy(name),
                io::Error::from(e)
            ))
        })?;
        changed = true;
    }
    Ok(changed)
}
