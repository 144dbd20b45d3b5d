//! The messages of `-r`: a listing (`LIST`, `ENTRIES`) and operations on
//! the server's tree (`APPLY`, `APPLIED`), with the checks that keep every
//! path inside the tree.
//!
//! A relative path here is at most [`MAX_PATH`] bytes of `/`-separated
//! names, none empty, `.` or `..`, with no NUL, no leading and no trailing
//! `/` ([`valid_rel_path`]): it cannot name anything outside the directory
//! it is relative to. Only the first entry of a listing has the empty path
//! (the listed path itself).

use anyhow::Result;
use rustix::fs::FileType;

use crate::filter::{FilterRule, MAX_PATTERN, MAX_RULES};
use crate::wire::codec::{malformed, put_bytes, truncate_utf8, Rd};
use crate::wire::messages::file::MAX_PATH;

/// Most entries in one `ENTRIES` (at most ~8 KiB each: well inside a frame).
pub const MAX_LIST_BATCH: usize = 512;
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
    pub const ALL: u32 = MISSING_OK;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A fifo, socket or device: listed, never copied.
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
        if !type_ok || !target_ok {
            return Err(malformed(format!(
                "entry {shown:?} whose mode or target does not fit its kind"
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
    pub const ALL: u8 = MODE | OWNER | MTIME;
}

/// One operation on the server's tree (`APPLY`, after `OPEN` with role 3,
/// holds count u32, 1 to [`MAX_OPS`], of them). Paths are relative to the
/// `OPEN` path and never lead out of it; no operation follows a symlink.
///
/// | size  | field                                                          |
/// |-------|----------------------------------------------------------------|
/// | 1     | code: 0 `MKDIR`, 1 `SYMLINK`, 2 `ATTRS`, 3 `DELETE`            |
/// | bytes | path (see the module doc; empty = the directory itself, for `MKDIR` and `ATTRS` only) |
/// | …     | `MKDIR`: mode u32 (≤ 0o7777)                                   |
/// | …     | `SYMLINK`: target bytes (1 to [`MAX_PATH`], no NUL)            |
/// | …     | `ATTRS`: which u8 ([`attrs`], not 0), mode u32 (≤ 0o7777), uid u32, gid u32, mtime seconds i64, nanoseconds u32 (< 10⁹) |
/// | …     | `DELETE`: nothing                                              |
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a directory (replacing a symlink in the way); an existing
    /// directory is left as it is.
    Mkdir { path: Vec<u8>, mode: u32 },
    /// Make `path` a symlink to `target`, replacing a file or link there.
    Symlink { path: Vec<u8>, target: Vec<u8> },
    /// Set the attributes that `which` ([`attrs`]) names.
    Attrs {
        path: Vec<u8>,
        which: u8,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime_sec: i64,
        mtime_nsec: u32,
    },
    /// Remove a file, a symlink or an empty directory.
    Delete { path: Vec<u8> },
}

impl Op {
    pub fn path(&self) -> &[u8] {
        match self {
            Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Attrs { path, .. }
            | Op::Delete { path } => path,
        }
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
            } => {
                out.push(2);
                put_bytes(out, path);
                out.push(*which);
                for v in [mode, uid, gid] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&mtime_sec.to_le_bytes());
                out.extend_from_slice(&mtime_nsec.to_le_bytes());
            }
            Op::Delete { path } => {
                out.push(3);
                put_bytes(out, path);
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
                if which == 0 || which & !attrs::ALL != 0 {
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
                };
                if let Op::Attrs { mtime_nsec, .. } = op {
                    if mtime_nsec > 999_999_999 {
                        return Err(malformed(format!("ATTRS {shown:?} with {mtime_nsec} ns")));
                    }
                }
                op
            }
            3 => Op::Delete { path },
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
