//! The messages of `-r`: a listing (`LIST`, `ENTRIES`) and operations on
//! the server's tree (`APPLY`, `APPLIED`), with the checks that keep every
//! path inside the tree.
//!
//! A relative path here is at most [`MAX_PATH`] bytes of `/`-separated
//! names, none empty, `.` or `..`, with no NUL, no leading and no trailing
//! `/` ([`valid_rel_path`]): it cannot name anything outside the directory
//! it is relative to. Only the first entry of a listing has the empty path
//! (the listed path itself).
//!
//! An extended attribute list (`xattrs`, in [`ListEntry`] and in `ATTRS`)
//! is count u32 (≤ [`MAX_XATTRS`]) × (name bytes, value bytes): each name 1
//! to [`MAX_XATTR_NAME`] bytes without NUL, in the `user.`, `trusted.` or
//! `security.` namespace or one of the two ACL names
//! (`system.posix_acl_access`, `system.posix_acl_default`), no name twice;
//! each value ≤ [`MAX_XATTR_VALUE`]; names and values together ≤
//! [`MAX_XATTR_BYTES`] ([`valid_xattrs`]). ACLs travel as the kernel's raw
//! values, with numeric ids (as rsync `--numeric-ids` keeps them).

use anyhow::Result;
use rustix::fs::FileType;

use crate::filter::{FilterRule, MAX_PATTERN, MAX_RULES};
use crate::wire::codec::{malformed, put_bytes, truncate_utf8, Rd};
use crate::wire::messages::file::MAX_PATH;

/// Most entries in one `ENTRIES` (at most ~8 KiB each without extended
/// attributes; a lister also cuts a batch by bytes, see
/// [`ListEntry::wire_size`], so that attributes keep it inside a frame).
pub const MAX_LIST_BATCH: usize = 512;
/// Most extended attributes on one entry.
pub const MAX_XATTRS: usize = 128;
/// Longest extended attribute name (the kernel's `XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME: usize = 255;
/// Largest extended attribute value (the kernel's `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE: usize = 64 << 10;
/// Most bytes of names and values on one entry.
pub const MAX_XATTR_BYTES: usize = 128 << 10;
/// The ACL names, carried by `-A` (all other `system.` names never are).
pub const ACL_NAMES: [&[u8]; 2] = [b"system.posix_acl_access", b"system.posix_acl_default"];
/// Most entries in a listing: directories of disk images hold few files,
/// and the client keeps the whole listing in memory.
pub const MAX_ENTRIES: u64 = 1 << 20;
/// Most operations in one `APPLY` (at most ~8 KiB each).
pub const MAX_OPS: usize = 512;
/// Longest message about one operation in `APPLIED`.
pub const MAX_OP_MESSAGE: usize = 1024;

/// `LIST` flags.
pub mod list_flags {
    /// A path that does not exist is an empty listing, not an error (a
    /// destination not created yet).
    pub const MISSING_OK: u32 = 1;
    /// `-X`: list extended attributes (`user.`; also `trusted.` and
    /// `security.` when the lister runs as root).
    pub const XATTRS: u32 = 2;
    /// `-A`: list the ACLs (their two `system.` attributes).
    pub const ACLS: u32 = 4;
    /// `-x`: a directory on another filesystem than the root is listed,
    /// not entered.
    pub const ONE_FILE_SYSTEM: u32 = 8;
    pub const ALL: u32 = MISSING_OK | XATTRS | ACLS | ONE_FILE_SYSTEM;
}

/// `LIST` (after `OPEN` with role 2): flags u32 ([`list_flags`]), rule
/// count u32 (≤ [`MAX_RULES`]) × (exclude u8: 0 include, 1 exclude; pattern
/// bytes, 1 to [`MAX_PATTERN`] bytes of UTF-8 without NUL).
pub(super) fn put_list(out: &mut Vec<u8>, flags: u32, rules: &[FilterRule]) {
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(rules.len() as u32).to_le_bytes());
    for r in rules {
        out.push(u8::from(r.exclude));
        put_bytes(out, r.pattern.as_bytes());
    }
}

pub(super) fn get_list(r: &mut Rd<'_>) -> Result<(u32, Vec<FilterRule>)> {
    let flags = r.u32()?;
    if flags & !list_flags::ALL != 0 {
        return Err(malformed(format!("LIST with unknown flags {flags:#x}")));
    }
    let n = r.u32()? as usize;
    if n > MAX_RULES {
        return Err(malformed(format!("LIST with {n} rules")));
    }
    let mut rules = Vec::with_capacity(n);
    for _ in 0..n {
        let exclude = match r.u8()? {
            0 => false,
            1 => true,
            x => return Err(malformed(format!("LIST rule of kind {x}"))),
        };
        let p = r.bytes(MAX_PATTERN)?;
        let pattern = std::str::from_utf8(p)
            .ok()
            .filter(|p| !p.is_empty() && !p.contains('\0'))
            .ok_or_else(|| malformed("LIST with an empty or invalid pattern"))?;
        rules.push(FilterRule {
            exclude,
            pattern: pattern.to_string(),
        });
    }
    Ok((flags, rules))
}

/// What a listed entry is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EntryKind {
    #[default]
    File,
    Dir,
    Symlink,
    /// A fifo, socket or device: made again only with `-D`
    /// (`--specials`, `--devices`).
    Other,
    /// Could not be read (a directory without permission): its `target`
    /// says why. A listing with one is incomplete.
    Unreadable,
}

/// One entry of a listing (`ENTRIES` holds count u32, 1 to
/// [`MAX_LIST_BATCH`], of them).
///
/// | size  | field                                                          |
/// |-------|----------------------------------------------------------------|
/// | 1     | kind: 0 file, 1 directory, 2 symlink, 3 other (fifo, socket, device), 4 unreadable |
/// | bytes | path, relative (see the module doc)                            |
/// | 8     | size u64                                                       |
/// | 8 + 4 | mtime seconds i64, nanoseconds u32 (< 10⁹)                     |
/// | 4     | mode u32: full `st_mode`, type bits matching the kind for 0–2  |
/// | 4 + 4 | uid u32, gid u32                                               |
/// | bytes | target (≤ [`MAX_PATH`]): the link text of a symlink, never empty; why, for an unreadable entry; empty for the others |
/// | 8 + 8 | device u64, inode u64 (`st_dev`, `st_ino`: which entries are one file, for `-H`; which filesystem, for `-x`) |
/// | 4     | link count u32 (`st_nlink`, at most `u32::MAX`)                |
/// | 8     | rdev u64: the device number of a character or block device; 0 for every other entry |
/// | …     | xattrs: an extended attribute list (module doc); empty unless `LIST` asked for `XATTRS` or `ACLS` |
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListEntry {
    pub kind: EntryKind,
    /// Relative to the listed path; empty for the path itself.
    pub path: Vec<u8>,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Full `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// A symlink's text, or why an entry is unreadable; else empty.
    pub target: Vec<u8>,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u32,
    /// A device node's number; else 0.
    pub rdev: u64,
    /// Extended attributes (and ACLs), sorted by name.
    pub xattrs: Xattrs,
}

/// Extended attributes: (name, value), sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Whether `mode` is a character or block device's.
pub fn is_device(mode: u32) -> bool {
    matches!(
        FileType::from_raw_mode(mode),
        FileType::CharacterDevice | FileType::BlockDevice
    )
}

/// Whether `name` is an attribute `-X` or `-A` may carry.
pub fn xattr_name_ok(name: &[u8]) -> bool {
    (1..=MAX_XATTR_NAME).contains(&name.len())
        && !name.contains(&0)
        && (ACL_NAMES.contains(&name)
            || [&b"user."[..], b"trusted.", b"security."]
                .iter()
                .any(|ns| name.len() > ns.len() && name.starts_with(ns)))
}

/// Whether `x` keeps the limits of the module doc (sorted, no name twice).
pub fn valid_xattrs(x: &[(Vec<u8>, Vec<u8>)]) -> bool {
    x.len() <= MAX_XATTRS
        && x.iter()
            .all(|(n, v)| xattr_name_ok(n) && v.len() <= MAX_XATTR_VALUE)
        && x.windows(2).all(|w| w[0].0 < w[1].0)
        && x.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>() <= MAX_XATTR_BYTES
}

fn put_xattrs(out: &mut Vec<u8>, x: &[(Vec<u8>, Vec<u8>)]) {
    out.extend_from_slice(&(x.len() as u32).to_le_bytes());
    for (n, v) in x {
        put_bytes(out, n);
        put_bytes(out, v);
    }
}

fn get_xattrs(r: &mut Rd<'_>, shown: &str) -> Result<Xattrs> {
    let n = r.u32()? as usize;
    if n > MAX_XATTRS {
        return Err(malformed(format!("{shown:?} with {n} extended attributes")));
    }
    let mut x = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.bytes(MAX_XATTR_NAME)?.to_vec();
        let value = r.bytes(MAX_XATTR_VALUE)?.to_vec();
        x.push((name, value));
    }
    if !valid_xattrs(&x) {
        return Err(malformed(format!(
            "{shown:?} with extended attributes that are unsorted, repeated, too large or of a namespace vmsync does not carry"
        )));
    }
    Ok(x)
}

fn xattrs_size(x: &[(Vec<u8>, Vec<u8>)]) -> usize {
    x.iter().map(|(n, v)| n.len() + v.len() + 8).sum()
}

impl ListEntry {
    pub(super) fn put(&self, out: &mut Vec<u8>) {
        out.push(match self.kind {
            EntryKind::File => 0,
            EntryKind::Dir => 1,
            EntryKind::Symlink => 2,
            EntryKind::Other => 3,
            EntryKind::Unreadable => 4,
        });
        put_bytes(out, &self.path);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mtime_sec.to_le_bytes());
        out.extend_from_slice(&self.mtime_nsec.to_le_bytes());
        for v in [self.mode, self.uid, self.gid] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        put_bytes(out, &self.target);
        out.extend_from_slice(&self.dev.to_le_bytes());
        out.extend_from_slice(&self.ino.to_le_bytes());
        out.extend_from_slice(&self.nlink.to_le_bytes());
        out.extend_from_slice(&self.rdev.to_le_bytes());
        put_xattrs(out, &self.xattrs);
    }

    /// Its encoded size, at most: what a lister cuts batches by.
    pub fn wire_size(&self) -> usize {
        self.path.len() + self.target.len() + 80 + xattrs_size(&self.xattrs)
    }

    pub(super) fn get(r: &mut Rd<'_>) -> Result<ListEntry> {
        let kind = match r.u8()? {
            0 => EntryKind::File,
            1 => EntryKind::Dir,
            2 => EntryKind::Symlink,
            3 => EntryKind::Other,
            4 => EntryKind::Unreadable,
            x => return Err(malformed(format!("entry of kind {x}"))),
        };
        let path = r.bytes(MAX_PATH)?.to_vec();
        let e = ListEntry {
            kind,
            size: r.u64()?,
            mtime_sec: r.u64()? as i64,
            mtime_nsec: r.u32()?,
            mode: r.u32()?,
            uid: r.u32()?,
            gid: r.u32()?,
            target: r.bytes(MAX_PATH)?.to_vec(),
            dev: r.u64()?,
            ino: r.u64()?,
            nlink: r.u32()?,
            rdev: r.u64()?,
            xattrs: get_xattrs(r, &String::from_utf8_lossy(&path))?,
            path,
        };
        let shown = String::from_utf8_lossy(&e.path);
        if !valid_rel_path(&e.path, true) {
            return Err(malformed(format!("entry with the path {shown:?}")));
        }
        if e.mtime_nsec > 999_999_999 {
            return Err(malformed(format!(
                "entry {shown:?} with {} ns",
                e.mtime_nsec
            )));
        }
        let file_type = FileType::from_raw_mode(e.mode);
        let type_ok = match kind {
            EntryKind::File => file_type == FileType::RegularFile,
            EntryKind::Dir => file_type == FileType::Directory,
            EntryKind::Symlink => file_type == FileType::Symlink,
            EntryKind::Other => ![
                FileType::RegularFile,
                FileType::Directory,
                FileType::Symlink,
            ]
            .contains(&file_type),
            EntryKind::Unreadable => true,
        };
        let target_ok = match kind {
            EntryKind::Symlink | EntryKind::Unreadable => {
                !e.target.is_empty() && !e.target.contains(&0)
            }
            _ => e.target.is_empty(),
        };
        let rdev_ok = e.rdev == 0 || kind == EntryKind::Other && is_device(e.mode);
        if !type_ok || !target_ok || !rdev_ok {
            return Err(malformed(format!(
                "entry {shown:?} whose mode, target or device number does not fit its kind"
            )));
        }
        Ok(e)
    }
}

/// `ATTRS` bits: which attributes to set.
pub mod attrs {
    pub const MODE: u8 = 1;
    /// Owner and group; applied only by a server running as root.
    pub const OWNER: u8 = 2;
    pub const MTIME: u8 = 4;
    /// The extended attributes (`-X`): those of `user.` (all but
    /// `system.` when the applier runs as root) become exactly the op's.
    pub const XATTRS: u8 = 8;
    /// The ACLs (`-A`): the two ACL attributes become exactly the op's.
    pub const ACLS: u8 = 16;
    /// Mode, owner and time: what a directory's final `ATTRS` sets.
    pub const ALL: u8 = MODE | OWNER | MTIME;
    pub const ANY: u8 = ALL | XATTRS | ACLS;
}

/// One operation on the server's tree (`APPLY`, after `OPEN` with role 3,
/// holds count u32, 1 to [`MAX_OPS`], of them). Paths are relative to the
/// `OPEN` path and never lead out of it; no operation follows a symlink.
///
/// | size  | field                                                          |
/// |-------|----------------------------------------------------------------|
/// | 1     | code: 0 `MKDIR`, 1 `SYMLINK`, 2 `ATTRS`, 3 `DELETE`, 4 `LINK`, 5 `MKNOD` |
/// | bytes | path (see the module doc; empty = the directory itself, for `MKDIR` and `ATTRS` only) |
/// | …     | `MKDIR`: mode u32 (≤ 0o7777)                                   |
/// | …     | `SYMLINK`: target bytes (1 to [`MAX_PATH`], no NUL)            |
/// | …     | `ATTRS`: which u8 ([`attrs`], not 0), mode u32 (≤ 0o7777), uid u32, gid u32, mtime seconds i64, nanoseconds u32 (< 10⁹), xattrs (an extended attribute list, module doc; empty unless `which` has `XATTRS` or `ACLS`, and only of the namespaces it names) |
/// | …     | `DELETE`: nothing                                              |
/// | …     | `LINK`: target bytes: another path of the same tree (the module doc's rules, not empty), whose inode `path` becomes |
/// | …     | `MKNOD`: mode u32 (the type bits of a fifo, socket, character or block device; permissions ≤ 0o7777), rdev u64 (0 unless a device) |
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a directory (replacing a symlink in the way); an existing
    /// directory is left as it is.
    Mkdir { path: Vec<u8>, mode: u32 },
    /// Make `path` a symlink to `target`, replacing a file or link there.
    Symlink { path: Vec<u8>, target: Vec<u8> },
    /// Set the attributes that `which` ([`attrs`]) names: owner, then
    /// extended attributes, then mode, then time (a change of owner can
    /// drop `security.capability` and the setuid bits).
    Attrs {
        path: Vec<u8>,
        which: u8,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime_sec: i64,
        mtime_nsec: u32,
        xattrs: Xattrs,
    },
    /// Remove a file, a symlink or an empty directory.
    Delete { path: Vec<u8> },
    /// Make `path` another name of `target`'s inode (`-H`), made beside it
    /// and renamed over it; nothing when it already is.
    Link { path: Vec<u8>, target: Vec<u8> },
    /// Make `path` a fifo, socket or device node, replacing what is there
    /// unless it already is one of that type and number.
    Mknod { path: Vec<u8>, mode: u32, rdev: u64 },
}

impl Op {
    pub fn path(&self) -> &[u8] {
        match self {
            Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Attrs { path, .. }
            | Op::Delete { path }
            | Op::Link { path, .. }
            | Op::Mknod { path, .. } => path,
        }
    }

    /// Its encoded size, at most: what a client cuts `APPLY` batches by.
    pub fn wire_size(&self) -> usize {
        let more = match self {
            Op::Symlink { target, .. } | Op::Link { target, .. } => target.len(),
            Op::Attrs { xattrs, .. } => xattrs_size(xattrs),
            _ => 0,
        };
        self.path().len() + more + 48
    }

    pub(super) fn put(&self, out: &mut Vec<u8>) {
        match self {
            Op::Mkdir { path, mode } => {
                out.push(0);
                put_bytes(out, path);
                out.extend_from_slice(&mode.to_le_bytes());
            }
            Op::Symlink { path, target } => {
                out.push(1);
                put_bytes(out, path);
                put_bytes(out, target);
            }
            Op::Attrs {
                path,
                which,
                mode,
                uid,
                gid,
                mtime_sec,
                mtime_nsec,
                xattrs,
            } => {
                out.push(2);
                put_bytes(out, path);
                out.push(*which);
                for v in [mode, uid, gid] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&mtime_sec.to_le_bytes());
                out.extend_from_slice(&mtime_nsec.to_le_bytes());
                put_xattrs(out, xattrs);
            }
            Op::Delete { path } => {
                out.push(3);
                put_bytes(out, path);
            }
            Op::Link { path, target } => {
                out.push(4);
                put_bytes(out, path);
                put_bytes(out, target);
            }
            Op::Mknod { path, mode, rdev } => {
                out.push(5);
                put_bytes(out, path);
                out.extend_from_slice(&mode.to_le_bytes());
                out.extend_from_slice(&rdev.to_le_bytes());
            }
        }
    }

    pub(super) fn get(r: &mut Rd<'_>) -> Result<Op> {
        let code = r.u8()?;
        let path = r.bytes(MAX_PATH)?.to_vec();
        let shown = String::from_utf8_lossy(&path).into_owned();
        // The directory itself may be created or given attributes, never
        // replaced or deleted.
        if !valid_rel_path(&path, matches!(code, 0 | 2)) {
            return Err(malformed(format!("operation on the path {shown:?}")));
        }
        let op = match code {
            0 => Op::Mkdir {
                path,
                mode: r.u32()?,
            },
            1 => {
                let target = r.bytes(MAX_PATH)?.to_vec();
                if target.is_empty() || target.contains(&0) {
                    return Err(malformed(format!(
                        "SYMLINK {shown:?} with an empty or NUL target"
                    )));
                }
                Op::Symlink { path, target }
            }
            2 => {
                let which = r.u8()?;
                if which == 0 || which & !attrs::ANY != 0 {
                    return Err(malformed(format!("ATTRS {shown:?} setting {which:#x}")));
                }
                let op = Op::Attrs {
                    path,
                    which,
                    mode: r.u32()?,
                    uid: r.u32()?,
                    gid: r.u32()?,
                    mtime_sec: r.u64()? as i64,
                    mtime_nsec: r.u32()?,
                    xattrs: get_xattrs(r, &shown)?,
                };
                if let Op::Attrs {
                    mtime_nsec, xattrs, ..
                } = &op
                {
                    if *mtime_nsec > 999_999_999 {
                        return Err(malformed(format!("ATTRS {shown:?} with {mtime_nsec} ns")));
                    }
                    if !xattrs.iter().all(|(n, _)| xattr_in_play(which, n)) {
                        return Err(malformed(format!(
                            "ATTRS {shown:?} with extended attributes it does not set"
                        )));
                    }
                }
                op
            }
            3 => Op::Delete { path },
            4 => {
                let target = r.bytes(MAX_PATH)?.to_vec();
                if !valid_rel_path(&target, false) || target == path {
                    return Err(malformed(format!(
                        "LINK {shown:?} to the path {:?}",
                        String::from_utf8_lossy(&target)
                    )));
                }
                Op::Link { path, target }
            }
            5 => {
                let (mode, rdev) = (r.u32()?, r.u64()?);
                let special = [
                    FileType::Fifo,
                    FileType::Socket,
                    FileType::CharacterDevice,
                    FileType::BlockDevice,
                ]
                .contains(&FileType::from_raw_mode(mode));
                if !special || mode & !(0o7777 | libc::S_IFMT) != 0 || rdev != 0 && !is_device(mode)
                {
                    return Err(malformed(format!(
                        "MKNOD {shown:?} with mode {mode:#o}, device {rdev:#x}"
                    )));
                }
                Op::Mknod { path, mode, rdev }
            }
            x => return Err(malformed(format!("operation {x} on {shown:?}"))),
        };
        match op {
            Op::Mkdir { mode, .. } | Op::Attrs { mode, .. } if mode & !0o7777 != 0 => {
                Err(malformed(format!("mode {mode:#o} for {shown:?}")))
            }
            op => Ok(op),
        }
    }
}

/// How one operation went (`APPLIED` holds one per op of the `APPLY` it
/// answers, in order): status u8 (0 done, else the exit code of the op's
/// failure), message bytes (≤ [`MAX_OP_MESSAGE`] bytes of UTF-8: the
/// failure, or with status 0 a warning or nothing; longer is cut).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpResult {
    /// 0 done, else the exit code of its failure.
    pub status: u8,
    /// The failure, or a warning (status 0), or empty.
    pub message: String,
}

impl OpResult {
    pub(super) fn put(&self, out: &mut Vec<u8>) {
        out.push(self.status);
        put_bytes(out, truncate_utf8(&self.message, MAX_OP_MESSAGE).as_bytes());
    }

    pub(super) fn get(r: &mut Rd<'_>) -> Result<OpResult> {
        let status = r.u8()?;
        let message = std::str::from_utf8(r.bytes(MAX_OP_MESSAGE)?)
            .map_err(|_| malformed("APPLIED with a message that is not UTF-8"))?
            .to_string();
        Ok(OpResult { status, message })
    }
}

/// Whether an `ATTRS` whose `which` is that sets (and so may carry) the
/// attribute `name`.
pub fn xattr_in_play(which: u8, name: &[u8]) -> bool {
    if ACL_NAMES.contains(&name) {
        which & attrs::ACLS != 0
    } else {
        which & attrs::XATTRS != 0
    }
}

/// Whether `p` is a relative path that cannot leave the directory it is
/// relative to (see the module doc); `allow_empty` for the directory itself.
pub fn valid_rel_path(p: &[u8], allow_empty: bool) -> bool {
    if p.is_empty() {
        return allow_empty;
    }
    p.len() <= MAX_PATH
        && !p.contains(&0)
        && p.split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}
