//! `-r`: keep a directory of images in sync, one file at a time.
//!
//! A recursive run lists both trees (the source, and the destination as
//! far as it exists), then works in three phases:
//!
//! 1. directories are created (writable by us until phase 3, so that a
//!    read-only directory can still be filled);
//! 2. each regular file is synced by the single-file engine in a session of
//!    its own (`client::transfer`: a new ssh, or a new local
//!    server, per file), up to [`WORKERS`] at once, largest first;
//! 3. symlinks are made, `--delete` removes what the source lacks (only
//!    when nothing failed), then permissions, owners (when the receiving
//!    end is root) and modification times are set, deepest directory first,
//!    so that nothing done afterwards moves a directory's mtime.
//!
//! A remote tree is listed and changed through the `List` and `Apply`
//! roles of the protocol ([`crate::wire::protocol`]); a local one directly, with
//! the same code ([`walk`], [`Applier`]). One file's failure does not stop
//! the others: it is reported, and the run exits 23.
//!
//! Nothing beneath a tree's root is reached through a symlink. The root
//! itself is opened by path (a symlink there is followed, as the user named
//! it; under `--server --root` it is resolved with `openat2` beneath DIR,
//! [`crate::dest::confine`]); below it, every lookup opens one name at a time
//! from a directory descriptor with `O_NOFOLLOW`, and names are validated
//! ([`crate::wire::protocol::valid_rel_path`]), so no `..` and no link is ever
//! crossed, whatever was swapped in since the listing. (walkdir works on
//! path strings, which a concurrent rename could redirect, so the walk here
//! is descriptor-based too.) Links are listed and recreated as links with
//! the same text, deleted as links, and never given a mode.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::app::config::Config;
use crate::client::{self, Report};
use crate::dest::confine::Root;
use crate::error::{exit_code_of, fail, message_of, Exit, WithExit};
use crate::filter::Filter;
use crate::progress::Progress;
use crate::wire::protocol::{
    attrs, list_flags, valid_rel_path, EntryKind, FrameReader, FrameWriter, ListEntry, Msg, Op,
    OpResult, Open, Role, Summary, MAX_ENTRIES, MAX_LIST_BATCH, MAX_OPS, MAX_PATH,
};
use crate::wire::transport::{self, bytes_path, Operand, Remote};

/// File sessions run at once: enough to overlap one file's fsync and
/// network round trips with another's transfer, few enough that image-sized
/// files do not compete for the disk.
pub const WORKERS: usize = 3;

/// Bytes of entries gathered before an `ENTRIES` frame goes out.
const LIST_FLUSH: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Descriptor-based file system calls that never follow a symlink
// ---------------------------------------------------------------------------

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `openat(dir, name, flags | O_CLOEXEC)`.
fn openat(dir: RawFd, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: a NUL-terminated name; the descriptor is checked below.
        let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: a new descriptor that nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// `lstat` of `name` in `dir`.
fn stat_at(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled in by the call.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers for the duration of the call.
    check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

fn stat_fd(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: as in `stat_at`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; fstat accepts O_PATH descriptors.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

fn read_link_at(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_PATH + 1];
    // SAFETY: the buffer is as long as we say.
    let n = unsafe {
        libc::readlinkat(
            dir,
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len() as libc::size_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize > MAX_PATH {
        return Err(io::Error::other(format!(
            "symlink target longer than {MAX_PATH} bytes"
        )));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// The names in the directory open as `dir` (read-only), sorted, without
/// `.` and `..`.
fn read_names(dir: OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let raw = std::os::fd::IntoRawFd::into_raw_fd(dir);
    // SAFETY: fdopendir takes over the descriptor (closed by closedir).
    let d = unsafe { libc::fdopendir(raw) };
    if d.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: the descriptor is still ours when fdopendir failed.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: readdir signals an error only through errno.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `d` is an open DIR stream.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break match e.raw_os_error() {
                Some(0) | None => Ok(()),
                _ => Err(e),
            };
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    };
    // SAFETY: closes the stream and its descriptor once.
    unsafe { libc::closedir(d) };
    result?;
    names.sort();
    Ok(names)
}

fn kind_of(mode: u32) -> EntryKind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

fn entry_of(st: &libc::stat, path: Vec<u8>, target: Vec<u8>) -> ListEntry {
    ListEntry {
        kind: kind_of(st.st_mode),
        path,
        size: st.st_size.max(0) as u64,
        mtime_sec: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec.clamp(0, 999_999_999) as u32,
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        target,
    }
}

fn unreadable(path: Vec<u8>, why: String) -> ListEntry {
    let mut why = why.into_bytes();
    why.truncate(MAX_PATH);
    ListEntry {
        kind: EntryKind::Unreadable,
        path,
        size: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
        mode: 0,
        uid: 0,
        gid: 0,
        target: why,
    }
}

/// `base` and `rel` joined with one `/` (either may be empty).
pub fn join(base: &[u8], rel: &[u8]) -> Vec<u8> {
    let mut p = base.to_vec();
    if !rel.is_empty() {
        if !p.is_empty() && !p.ends_with(b"/") {
            p.push(b'/');
        }
        p.extend_from_slice(rel);
    }
    p
}

fn shown(p: &[u8]) -> String {
    if p.is_empty() {
        ".".into()
    } else {
        String::from_utf8_lossy(p).into_owned()
    }
}

/// The parent of a relative path (`""` for a top-level name).
fn parent_of(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[..i],
        None => b"",
    }
}

/// Whether `p` is `dir` or lies beneath it.
fn within(p: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || p == dir || p.starts_with(dir) && p.get(dir.len()) == Some(&b'/')
}

/// The directory a tree lives in: every lookup beneath it goes one name at
/// a time, never through a symlink.
pub struct TreeDir {
    fd: OwnedFd,
}

impl TreeDir {
    /// The directory holding `rel` (non-empty) and its last name.
    fn split(&self, rel: &[u8]) -> io::Result<(OwnedFd, CString)> {
        if !valid_rel_path(rel, false) {
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
    fn dir(&self, rel: &[u8]) -> io::Result<OwnedFd> {
        let mut cur = openat(self.fd.as_raw_fd(), c".", libc::O_PATH | libc::O_DIRECTORY)?;
        if rel.is_empty() {
            return Ok(cur);
        }
        for name in rel.split(|&b| b == b'/') {
            cur = openat(
                cur.as_raw_fd(),
                &cstring(name)?,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            )?;
        }
        Ok(cur)
    }
}

/// Opens a tree's root (`O_PATH`, following a symlink there): beneath
/// `confine` when the server is confined. `None` when it does not exist.
pub fn open_root(path: &Path, confine: Option<&Root>) -> Result<Option<OwnedFd>> {
    if let Some(root) = confine {
        return root.open_tree(path);
    }
    match openat(
        libc::AT_FDCWD,
        &cstring(path.as_os_str().as_bytes())?,
        libc::O_PATH,
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e)
            .with_context(|| format!("cannot open {}", path.display()))
            .exit_with(Exit::Io),
    }
}

// ---------------------------------------------------------------------------
// Listing
// ---------------------------------------------------------------------------

/// Lists the tree at `root` (an `O_PATH` descriptor): the root first (path
/// `""`), then each directory's entries, sorted, before what they hold.
/// Entries `filter` excludes are left out, and excluded directories are
/// not entered. A directory that cannot be read becomes an
/// [`EntryKind::Unreadable`] entry; the root's failure is the run's.
pub fn walk(
    root: &OwnedFd,
    shown_root: &str,
    filter: &Filter,
    emit: &mut dyn FnMut(ListEntry) -> Result<()>,
) -> Result<()> {
    let tree = TreeDir {
        fd: root
            .try_clone()
            .context("duplicate a descriptor")
            .exit_with(Exit::Io)?,
    };
    let st = stat_fd(root.as_raw_fd())
        .with_context(|| format!("cannot stat {shown_root}"))
        .exit_with(Exit::Io)?;
    let root_entry = entry_of(&st, Vec::new(), Vec::new());
    let is_dir = root_entry.kind == EntryKind::Dir;
    emit(root_entry)?;
    if !is_dir {
        return Ok(());
    }
    let mut count: u64 = 1;
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(dir_rel) = stack.pop() {
        let names = tree.dir(&dir_rel).and_then(|dir| {
            let readable = openat(dir.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
            Ok((read_names(readable)?, dir))
        });
        let (names, dir) = match names {
            Ok(n) => n,
            Err(e) if dir_rel.is_empty() => {
                return Err(e)
                    .with_context(|| format!("cannot read directory {shown_root}"))
                    .exit_with(Exit::Io)
            }
            Err(e) => {
                emit(unreadable(
                    dir_rel.clone(),
                    format!("cannot read directory: {e}"),
                ))?;
                continue;
            }
        };
        let mut subdirs = Vec::new();
        for name in names {
            let rel = join(&dir_rel, &name);
            if rel.len() > MAX_PATH {
                emit(unreadable(
                    dir_rel.clone(),
                    format!("holds an entry whose path is longer than {MAX_PATH} bytes"),
                ))?;
                continue;
            }
            let cname = cstring(&name)?;
            let st = match stat_at(dir.as_raw_fd(), &cname) {
                Ok(st) => st,
                // Gone since the directory was read.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => {
                    emit(unreadable(rel, format!("cannot stat: {e}")))?;
                    continue;
                }
            };
            let kind = kind_of(st.st_mode);
            if filter.excludes(&rel, kind == EntryKind::Dir) {
                continue;
            }
            let target = if kind == EntryKind::Symlink {
                match read_link_at(dir.as_raw_fd(), &cname) {
                    Ok(t) if !t.is_empty() => t,
                    Ok(_) => continue,
                    Err(e) => {
                        emit(unreadable(rel, format!("cannot read the symlink: {e}")))?;
                        continue;
                    }
                }
            } else {
                Vec::new()
            };
            count += 1;
            if count > MAX_ENTRIES {
                return Err(fail(
                    Exit::Io,
                    format!(
                        "{shown_root} holds more than {MAX_ENTRIES} entries; vmsync -r is for directories of images"
                    ),
                ));
            }
            if kind == EntryKind::Dir {
                subdirs.push(rel.clone());
            }
            emit(entry_of(&st, rel, target))?;
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// A listing as the client holds it, checked for shape: the root first,
/// no path twice, and every entry inside a listed directory (so a lying
/// peer cannot place an entry beneath a symlink).
#[derive(Debug, Default)]
pub struct Listing {
    pub entries: Vec<ListEntry>,
    /// Entries that could not be read: the listing is incomplete.
    pub unreadable: Vec<ListEntry>,
    index: HashMap<Vec<u8>, usize>,
}

impl Listing {
    pub fn new(all: Vec<ListEntry>, peer: &str) -> Result<Listing> {
        let bad = |why: String| fail(Exit::Protocol, format!("{peer}: protocol error: {why}"));
        let mut l = Listing::default();
        for e in all {
            if e.kind == EntryKind::Unreadable {
                l.unreadable.push(e);
                continue;
            }
            if l.entries.is_empty() != e.path.is_empty() {
                return Err(bad(format!(
                    "listing entry {:?} out of place",
                    shown(&e.path)
                )));
            }
            if !e.path.is_empty() {
                match l.get(parent_of(&e.path)) {
                    Some(p) if p.kind == EntryKind::Dir => {}
                    _ => {
                        return Err(bad(format!(
                            "listing entry {:?} is not inside a listed directory",
                            shown(&e.path)
                        )))
                    }
                }
            }
            if l.index.insert(e.path.clone(), l.entries.len()).is_some() {
                return Err(bad(format!("{:?} listed twice", shown(&e.path))));
            }
            l.entries.push(e);
        }
        Ok(l)
    }

    pub fn get(&self, path: &[u8]) -> Option<&ListEntry> {
        self.index.get(path).map(|&i| &self.entries[i])
    }

    /// The listed path itself; `None` when it does not exist.
    pub fn root(&self) -> Option<&ListEntry> {
        self.entries.first()
    }
}

/// Lists a local tree.
fn list_local(path: &Path, filter: &Filter) -> Result<Option<Vec<ListEntry>>> {
    let Some(fd) = open_root(path, None)? else {
        return Ok(None);
    };
    let mut all = Vec::new();
    walk(&fd, &path.display().to_string(), filter, &mut |e| {
        all.push(e);
        Ok(())
    })?;
    Ok(Some(all))
}

/// Serves `LIST` (the server's `List` role): streams the listing of `path`.
pub fn serve_list<R: io::Read, W: io::Write>(
    path: &Path,
    confine: Option<&Root>,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<()> {
    let (flags, rules) = match reader.read_msg()? {
        Msg::List { flags, rules } => (flags, rules),
        m => return Err(m.unexpected("LIST")),
    };
    let filter = Filter::new(&rules)?;
    let Some(fd) = open_root(path, confine)? else {
        if flags & list_flags::MISSING_OK != 0 {
            return writer.send_now(&Msg::ListEnd(0));
        }
        return Err(io::Error::from_raw_os_error(libc::ENOENT))
            .with_context(|| format!("cannot open source {}", path.display()))
            .exit_with(Exit::Io);
    };
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut count = 0u64;
    walk(&fd, &path.display().to_string(), &filter, &mut |e| {
        bytes += e.path.len() + e.target.len() + 64;
        batch.push(e);
        count += 1;
        if batch.len() == MAX_LIST_BATCH || bytes >= LIST_FLUSH {
            writer.send(&Msg::Entries(std::mem::take(&mut batch)))?;
            bytes = 0;
        }
        Ok(())
    })?;
    if !batch.is_empty() {
        writer.send(&Msg::Entries(batch))?;
    }
    writer.send_now(&Msg::ListEnd(count))
}

/// Reads a listing from a server (`ENTRIES` … `LIST_END`).
fn read_listing<R: io::Read>(reader: &mut FrameReader<R>) -> Result<Vec<ListEntry>> {
    let mut all = Vec::new();
    loop {
        match reader.read_msg()? {
            Msg::Entries(v) => {
                if (all.len() + v.len()) as u64 > MAX_ENTRIES {
                    return Err(fail(
                        Exit::Protocol,
                        format!("protocol error: a listing of more than {MAX_ENTRIES} entries"),
                    ));
                }
                all.extend(v);
            }
            Msg::ListEnd(n) if n == all.len() as u64 => return Ok(all),
            Msg::ListEnd(n) => {
                return Err(fail(
                    Exit::Protocol,
                    format!(
                        "protocol error: LIST_END counts {n} entries, {} were sent",
                        all.len()
                    ),
                ))
            }
            m => return Err(m.unexpected("ENTRIES or LIST_END")),
        }
    }
}

// ---------------------------------------------------------------------------
// Applying operations
// ---------------------------------------------------------------------------

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
            // SAFETY: plain syscall.
            as_root: unsafe { libc::geteuid() } == 0,
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
            let st = stat_fd(fd.as_raw_fd())?;
            if kind_of(st.st_mode) != EntryKind::Dir {
                return Err(fail(Exit::Io, "not a directory"));
            }
            self.root = Some(TreeDir { fd });
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
            } => self
                .attrs(path, *which, *mode, (*uid, *gid), (*mtime_sec, *mtime_nsec))
                .map(|_| None),
            Op::Delete { path } => self.delete(path),
        }
    }

    fn tree(&self) -> &TreeDir {
        self.root
            .as_ref()
            .expect("root opened before any operation")
    }

    fn mkdir(&self, rel: &[u8], mode: u32) -> Result<()> {
        let (dir, name) = self.tree().split(rel)?;
        let make = || {
            // Writable by us until its attributes are set at the end.
            // SAFETY: valid descriptor and NUL-terminated name.
            check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), (mode | 0o700) as _) })
                .context("cannot create the directory")
                .exit_with(Exit::Io)
        };
        match stat_at(dir.as_raw_fd(), &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => make(),
            Err(e) => Err(e).exit_with(Exit::Io),
            Ok(st) => match kind_of(st.st_mode) {
                EntryKind::Dir => Ok(()),
                EntryKind::Symlink => {
                    // SAFETY: unlinkat removes the link itself, never its target.
                    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })
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
        let (dir, name) = self.tree().split(rel)?;
        let d = dir.as_raw_fd();
        let target = cstring(target)?;
        match stat_at(d, &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // SAFETY: NUL-terminated strings, valid descriptor.
                return check(unsafe { libc::symlinkat(target.as_ptr(), d, name.as_ptr()) })
                    .context("cannot create the symlink")
                    .exit_with(Exit::Io);
            }
            Err(e) => return Err(e).exit_with(Exit::Io),
            Ok(st) => match kind_of(st.st_mode) {
                EntryKind::Symlink
                    if read_link_at(d, &name).ok().as_deref() == Some(target.to_bytes()) =>
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
        // Made beside it and renamed over it: the name never goes missing.
        self.temp_count += 1;
        let temp =
            cstring(format!(".vmsync-link-{}-{}", std::process::id(), self.temp_count).as_bytes())?;
        // SAFETY: as above.
        check(unsafe { libc::symlinkat(target.as_ptr(), d, temp.as_ptr()) })
            .context("cannot create the symlink")
            .exit_with(Exit::Io)?;
        // SAFETY: both names in the same directory descriptor.
        let r = check(unsafe { libc::renameat(d, temp.as_ptr(), d, name.as_ptr()) });
        if r.is_err() {
            // SAFETY: removes our own temporary link.
            unsafe { libc::unlinkat(d, temp.as_ptr(), 0) };
        }
        r.context("cannot replace it with the symlink")
            .exit_with(Exit::Io)
    }

    fn attrs(
        &self,
        rel: &[u8],
        which: u8,
        mode: u32,
        owner: (u32, u32),
        mtime: (i64, u32),
    ) -> Result<()> {
        // The entry itself, never what a link points to: an O_PATH
        // descriptor of it, and its parent for the calls that take a name.
        let (parent, name) = if rel.is_empty() {
            (None, None)
        } else {
            let (d, n) = self.tree().split(rel)?;
            (Some(d), Some(n))
        };
        let fd = match (&parent, &name) {
            (Some(d), Some(n)) => openat(d.as_raw_fd(), n, libc::O_PATH | libc::O_NOFOLLOW),
            _ => self.tree().dir(b""),
        }
        .context("cannot open")
        .exit_with(Exit::Io)?;
        let st = stat_fd(fd.as_raw_fd()).exit_with(Exit::Io)?;
        let link = kind_of(st.st_mode) == EntryKind::Symlink;
        if which & attrs::OWNER != 0 && self.as_root && (st.st_uid, st.st_gid) != owner {
            // SAFETY: an O_PATH descriptor with AT_EMPTY_PATH: the entry
            // itself, a link included, is given away.
            check(unsafe {
                libc::fchownat(
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    owner.0,
                    owner.1,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })
            .context("cannot set the owner")
            .exit_with(Exit::Io)?;
        }
        // A link has no mode of its own on Linux.
        if which & attrs::MODE != 0 && !link && st.st_mode & 0o7777 != mode {
            let reopen = || match (&parent, &name) {
                (Some(d), Some(n)) => openat(
                    d.as_raw_fd(),
                    n,
                    libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW,
                ),
                _ => openat(fd.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY),
            };
            chmod_fd(&fd, &st, mode, reopen)
                .context("cannot set the permissions")
                .exit_with(Exit::Io)?;
        }
        if which & attrs::MTIME != 0 {
            let times = [
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                libc::timespec {
                    tv_sec: mtime.0,
                    tv_nsec: i64::from(mtime.1),
                },
            ];
            let r = match (&parent, &name) {
                // SAFETY: valid descriptor, name and times; the name's
                // last component is not followed.
                (Some(d), Some(n)) => check(unsafe {
                    libc::utimensat(
                        d.as_raw_fd(),
                        n.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                }),
                _ => via_proc(&fd, |p| {
                    // SAFETY: as above, on the descriptor's own inode.
                    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })
                })
                .or_else(|_| {
                    let d = openat(fd.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
                    // SAFETY: an open directory and valid times.
                    check(unsafe { libc::futimens(d.as_raw_fd(), times.as_ptr()) })
                }),
            };
            r.context("cannot set the modification time")
                .exit_with(Exit::Io)?;
        }
        Ok(())
    }

    fn delete(&self, rel: &[u8]) -> Result<Option<String>> {
        let (dir, name) = self.tree().split(rel)?;
        let d = dir.as_raw_fd();
        let st = match stat_at(d, &name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            r => r.exit_with(Exit::Io)?,
        };
        let flags = if kind_of(st.st_mode) == EntryKind::Dir {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: valid descriptor and name; unlinkat never follows a link.
        match check(unsafe { libc::unlinkat(d, name.as_ptr(), flags) }) {
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

/// Runs `f` on `/proc/self/fd/N` for the descriptor: the inode the
/// descriptor holds, reached without a lookup by name.
fn via_proc(fd: &OwnedFd, f: impl FnOnce(&CStr) -> io::Result<()>) -> io::Result<()> {
    f(&cstring(
        format!("/proc/self/fd/{}", fd.as_raw_fd()).as_bytes(),
    )?)
}

/// `chmod` of what the `O_PATH` descriptor `fd` (not a link) holds: through
/// `/proc/self/fd`, or, without `/proc`, on `reopen()` (read-only, never
/// blocking, not following a link) once it is seen to be the same inode.
fn chmod_fd(
    fd: &OwnedFd,
    st: &libc::stat,
    mode: u32,
    reopen: impl FnOnce() -> io::Result<OwnedFd>,
) -> io::Result<()> {
    // SAFETY: a NUL-terminated path naming the descriptor's inode.
    let r = via_proc(fd, |p| check(unsafe { libc::chmod(p.as_ptr(), mode) }));
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            let f = reopen().map_err(|e| {
                io::Error::other(format!(
                    "no /proc to reach it by its descriptor, and it cannot be opened: {e}"
                ))
            })?;
            let again = stat_fd(f.as_raw_fd())?;
            if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
                return Err(io::Error::other("it was replaced meanwhile"));
            }
            // SAFETY: an open descriptor.
            check(unsafe { libc::fchmod(f.as_raw_fd(), mode) })
        }
        r => r,
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

// ---------------------------------------------------------------------------
// The client: what a recursive run does
// ---------------------------------------------------------------------------

/// One file's outcome.
#[derive(Debug)]
pub struct FileResult {
    /// As shown: relative to the destination operand.
    pub path: String,
    pub size: u64,
    pub outcome: std::result::Result<Report, (Exit, String)>,
}

/// A failure of something other than a file's transfer: a listing, a
/// directory, a symlink, a deletion.
#[derive(Debug, Clone)]
pub struct EntryError {
    pub path: String,
    pub exit: Exit,
    pub message: String,
}

/// The outcome of a recursive run.
#[derive(Debug, Default)]
pub struct TreeReport {
    pub check: bool,
    pub dry_run: bool,
    pub files: Vec<FileResult>,
    pub errors: Vec<EntryError>,
    /// Deleted (or, in a dry run, to be deleted) by `--delete`.
    pub deleted: Vec<String>,
    /// `--check`: paths that differ, and how.
    pub differing: Vec<(String, String)>,
    /// Directories or links made, or entries deleted.
    pub changed_entries: u64,
    /// Wire bytes of listings and operations (the files' are their own).
    pub other_wire_bytes: u64,
    pub duration: Duration,
    /// What stopped the run early (a lost connection, an interrupt).
    pub fatal: Option<(Exit, String)>,
}

impl TreeReport {
    pub fn files_failed(&self) -> usize {
        self.files.iter().filter(|f| f.outcome.is_err()).count()
    }

    pub fn exit(&self) -> Exit {
        if let Some((exit, _)) = &self.fatal {
            *exit
        } else if self.files_failed() > 0 || !self.errors.is_empty() {
            Exit::Partial
        } else if self.check && !self.differing.is_empty() {
            Exit::Differ
        } else {
            Exit::Ok
        }
    }

    /// The run's error message; `None` for a success or a check's differences.
    pub fn error(&self) -> Option<String> {
        if let Some((_, m)) = &self.fatal {
            return Some(m.clone());
        }
        let failed = self.files_failed();
        if failed == 0 && self.errors.is_empty() {
            return None;
        }
        let mut m = format!(
            "partial transfer: {failed} of {} files failed",
            self.files.len()
        );
        if !self.errors.is_empty() {
            m.push_str(&format!(
                ", and {} other entr{}",
                self.errors.len(),
                if self.errors.len() == 1 { "y" } else { "ies" }
            ));
        }
        Some(m)
    }

    /// The totals, as one single-file report (for the summary lines shared
    /// with single-file runs, `--metrics-file` and `--log-file`).
    pub fn totals(&self) -> Report {
        let ok: Vec<&Report> = self
            .files
            .iter()
            .filter_map(|f| f.outcome.as_ref().ok())
            .collect();
        let sum = |f: fn(&Report) -> u64| ok.iter().map(|r| f(r)).sum::<u64>();
        let all = |f: fn(&Summary) -> bool| !ok.is_empty() && ok.iter().all(|r| f(&r.summary));
        let summary = Summary {
            up_to_date: ok.iter().all(|r| r.summary.up_to_date)
                && self.changed_entries == 0
                && self.exit() == Exit::Ok,
            identical: self.check && self.exit() == Exit::Ok,
            verified: all(|s| s.verified),
            basis_cached: ok.iter().any(|r| r.summary.basis_cached),
            source_changed: ok.iter().any(|r| r.summary.source_changed),
            dry_run: self.dry_run,
            source_bytes: sum(|r| r.summary.source_bytes),
            reused_bytes: sum(|r| r.summary.reused_bytes),
            literal_bytes: sum(|r| r.summary.literal_bytes),
            zero_bytes: sum(|r| r.summary.zero_bytes),
            differing_bytes: sum(|r| r.summary.differing_bytes),
            checked_bytes: sum(|r| r.summary.checked_bytes),
            range_count: self.differing.len() as u64,
            ranges: Vec::new(),
        };
        Report {
            summary,
            source_bytes: self
                .files
                .iter()
                .map(|f| match &f.outcome {
                    Ok(r) => r.source_bytes,
                    Err(_) => 0,
                })
                .sum(),
            wire_bytes: sum(|r| r.wire_bytes) + self.other_wire_bytes,
            duration: self.duration,
            check: self.check,
        }
    }
}

/// One end of a recursive run: where its tree is.
#[derive(Clone)]
enum End<'a> {
    Local,
    Remote(&'a Remote),
}

impl End<'_> {
    fn operand(&self, path: Vec<u8>) -> Operand {
        match self {
            End::Local => Operand::Local(bytes_path(&path)),
            End::Remote(r) => Operand::Remote(Remote {
                path,
                ..(*r).clone()
            }),
        }
    }
}

fn operand_parts(op: &Operand) -> (End<'_>, Vec<u8>) {
    match op {
        Operand::Local(p) => (End::Local, p.as_os_str().as_bytes().to_vec()),
        Operand::Remote(r) => (End::Remote(r), r.path.clone()),
    }
}

/// Lists `path` at `end`; `None` when it does not exist and `missing_ok`.
fn list(
    cfg: &Config,
    end: &End,
    path: &[u8],
    missing_ok: bool,
    filter: &Filter,
    wire: &mut u64,
) -> Result<Option<Listing>> {
    let (all, peer) = match end {
        End::Local => {
            let p = bytes_path(path);
            match list_local(&p, filter)? {
                Some(all) => (all, transport::LOCAL_PEER.to_string()),
                None if missing_ok => return Ok(None),
                None => {
                    return Err(io::Error::from_raw_os_error(libc::ENOENT))
                        .with_context(|| format!("cannot open source {}", p.display()))
                        .exit_with(Exit::Io)
                }
            }
        }
        End::Remote(r) => {
            let open = Open {
                role: Role::List,
                path: path.to_vec(),
                ..meta_open(cfg)
            };
            let rules = cfg.filters.clone();
            let flags = if missing_ok {
                list_flags::MISSING_OK
            } else {
                0
            };
            let (all, w) = client::session(
                Some(r),
                &client::launch(cfg),
                open,
                &mut Progress::hidden(),
                |mut reader, writer, _| {
                    writer.send_now(&Msg::List { flags, rules })?;
                    read_listing(&mut reader)
                },
            )?;
            *wire += w;
            if all.is_empty() {
                return Ok(None);
            }
            (all, r.host.clone())
        }
    };
    Listing::new(all, &peer).map(Some)
}

/// `OPEN` fields for the `List` and `Apply` roles (which use few of them).
fn meta_open(cfg: &Config) -> Open {
    Open {
        role: Role::List,
        flags: u32::from(crate::log::level().min(3)) << crate::wire::protocol::flags::VERBOSE_SHIFT,
        compress_level: 0,
        chunking: cfg.params.code(),
        path: Vec::new(),
        source_name: Vec::new(),
        timeout_secs: cfg.timeout_secs,
        bwlimit: cfg.bwlimit,
        sample: None,
        seeds: Vec::new(),
    }
}

/// Applies `ops` to the tree at `path` on `end`; one result per op.
fn apply(
    cfg: &Config,
    end: &End,
    path: &[u8],
    ops: &[Op],
    wire: &mut u64,
) -> Result<Vec<OpResult>> {
    if ops.is_empty() {
        return Ok(Vec::new());
    }
    match end {
        End::Local => {
            let mut a = Applier::new(&bytes_path(path), None);
            Ok(ops.iter().map(|op| a.apply(op)).collect())
        }
        End::Remote(r) => {
            let open = Open {
                role: Role::Apply,
                path: path.to_vec(),
                ..meta_open(cfg)
            };
            let (results, w) = client::session(
                Some(r),
                &client::launch(cfg),
                open,
                &mut Progress::hidden(),
                |mut reader, writer, _| {
                    let mut results = Vec::with_capacity(ops.len());
                    for batch in ops.chunks(MAX_OPS) {
                        writer.send_now(&Msg::Apply(batch.to_vec()))?;
                        match reader.read_msg()? {
                            Msg::Applied(r) if r.len() == batch.len() => results.extend(r),
                            Msg::Applied(r) => {
                                return Err(fail(
                                    Exit::Protocol,
                                    format!(
                                        "protocol error: {} results for {} operations",
                                        r.len(),
                                        batch.len()
                                    ),
                                ))
                            }
                            m => return Err(m.unexpected("APPLIED")),
                        }
                    }
                    writer.send_now(&Msg::End)?;
                    Ok(results)
                },
            )?;
            *wire += w;
            Ok(results)
        }
    }
}

/// A file to sync: its path relative to the tree, its size, and whether
/// its session should scan the source before the receiver asks
/// ([`client::transfer`]'s `prescan`).
struct Job {
    rel: Vec<u8>,
    size: u64,
    prescan: bool,
}

/// Where the tree goes: `dst` itself (`src/`, rsync's trailing slash), or
/// `dst/NAME` for a source named NAME.
fn prefix_of(src_path: &[u8]) -> Option<Vec<u8>> {
    if src_path.ends_with(b"/") {
        return None;
    }
    let name = src_path.rsplit(|&b| b == b'/').next().unwrap_or_default();
    (!name.is_empty() && name != b"." && name != b"..").then(|| name.to_vec())
}

/// Runs a recursive sync or check.
pub fn run(cfg: &Config, umask: u32) -> Result<TreeReport> {
    let start = Instant::now();
    let filter = Filter::new(&cfg.filters)?;
    let (src_end, src_path) = operand_parts(&cfg.src);
    let (dst_end, dst_path) = operand_parts(&cfg.dst);
    let mut report = TreeReport {
        check: cfg.check,
        dry_run: cfg.dry_run,
        ..TreeReport::default()
    };
    let mut wire = 0;
    let src = list(cfg, &src_end, &src_path, false, &filter, &mut wire)?.unwrap_or_default();
    let Some(root) = src.root() else {
        return Err(fail(
            Exit::Protocol,
            format!(
                "protocol error: the listing of {} is empty",
                shown(&src_path)
            ),
        ));
    };
    if root.kind != EntryKind::Dir {
        // One file: the single-file engine, with its rules for naming
        // the destination.
        let r = client::run(cfg, umask)?;
        let name = src_path.rsplit(|&b| b == b'/').next().unwrap_or_default();
        report.files.push(FileResult {
            path: shown(name),
            size: r.source_bytes,
            outcome: Ok(r),
        });
        report.other_wire_bytes = wire;
        report.duration = start.elapsed();
        return Ok(report);
    }
    let prefix = prefix_of(&src_path);
    let tree_root = join(&dst_path, prefix.as_deref().unwrap_or_default());
    let dst = list(cfg, &dst_end, &tree_root, true, &filter, &mut wire)?.unwrap_or_default();
    if let Some(r) = dst.root() {
        if r.kind != EntryKind::Dir {
            return Err(fail(
                Exit::Io,
                format!(
                    "destination {} exists and is not a directory",
                    shown(&tree_root)
                ),
            ));
        }
    }
    let tree = Tree {
        cfg,
        umask,
        src: &src,
        dst: &dst,
        src_end,
        src_path,
        dst_end,
        dst_path,
        prefix,
    };
    for e in src.unreadable.iter().chain(&dst.unreadable) {
        report.errors.push(EntryError {
            path: tree.shown_dst(&e.path),
            exit: Exit::Io,
            message: String::from_utf8_lossy(&e.target).into_owned(),
        });
    }
    for e in &src.entries {
        if e.kind == EntryKind::Other {
            crate::log::warn(&format!(
                "skipping {}: not a regular file, directory or symlink",
                tree.shown_src(&e.path)
            ));
        }
    }
    if cfg.check {
        tree.check(&mut report, &mut wire);
    } else {
        tree.sync(&mut report, &mut wire);
    }
    report.other_wire_bytes = wire;
    report.duration = start.elapsed();
    Ok(report)
}

struct Tree<'a> {
    cfg: &'a Config,
    umask: u32,
    src: &'a Listing,
    dst: &'a Listing,
    src_end: End<'a>,
    src_path: Vec<u8>,
    dst_end: End<'a>,
    dst_path: Vec<u8>,
    /// The source's name, when the tree goes to `dst/NAME`.
    prefix: Option<Vec<u8>>,
}

impl Tree<'_> {
    /// The destination-operand-relative path of a tree entry (what the
    /// `Apply` operations, rooted at the destination operand, name).
    fn dpath(&self, rel: &[u8]) -> Vec<u8> {
        join(self.prefix.as_deref().unwrap_or_default(), rel)
    }

    fn shown_dst(&self, rel: &[u8]) -> String {
        shown(&self.dpath(rel))
    }

    fn shown_src(&self, rel: &[u8]) -> String {
        shown(&join(&self.src_path, rel))
    }

    fn dst_is_dir(&self, rel: &[u8]) -> bool {
        self.dst.get(rel).is_some_and(|e| e.kind == EntryKind::Dir)
    }

    /// Runs the file jobs, [`WORKERS`] at a time, largest first. A lost
    /// connection or an interrupt stops the run (`fatal`): the next file
    /// would only meet it again.
    fn transfer_all(&self, mut jobs: Vec<Job>, report: &mut TreeReport) {
        jobs.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.rel.cmp(&b.rel)));
        let next = AtomicUsize::new(0);
        let fatal: Mutex<Option<(Exit, String)>> = Mutex::new(None);
        let results: Mutex<Vec<FileResult>> = Mutex::new(Vec::new());
        let jobs = &jobs;
        std::thread::scope(|s| {
            for _ in 0..WORKERS.min(jobs.len()) {
                s.spawn(|| loop {
                    if fatal.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(i) else { return };
                    let result = self.transfer(job);
                    if let Err((exit, msg)) = &result.outcome {
                        if matches!(
                            exit,
                            Exit::Connection | Exit::Interrupted | Exit::Terminated
                        ) {
                            let mut f = fatal.lock().unwrap_or_else(|e| e.into_inner());
                            f.get_or_insert((*exit, msg.clone()));
                        }
                    }
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(result);
                });
            }
        });
        let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        results.sort_by(|a, b| a.path.cmp(&b.path));
        report.files.extend(results);
        if let Some(f) = fatal.into_inner().unwrap_or_else(|e| e.into_inner()) {
            report.fatal.get_or_insert(f);
        }
    }

    /// Whether a pushed file's scan should start before its receiver
    /// answers: only when the receiver will ask for a manifest, which is
    /// when its file exists and the quick check (size and mtime) will not
    /// pass it, or `always` (`--checksum`, `--check`). A missing file
    /// takes every chunk inline and an unchanged one nothing, and a tree of
    /// unchanged files must not be read ahead.
    fn worth_prescanning(&self, e: &ListEntry, always: bool) -> bool {
        self.dst.get(&e.path).is_some_and(|d| {
            d.kind == EntryKind::File
                && (always
                    || (d.size, d.mtime_sec, d.mtime_nsec) != (e.size, e.mtime_sec, e.mtime_nsec))
        })
    }

    fn transfer(&self, job: &Job) -> FileResult {
        let path = self.shown_dst(&job.rel);
        let src = self.src_end.operand(join(&self.src_path, &job.rel));
        let dst_rel = self.dpath(&job.rel);
        let dst = self.dst_end.operand(join(&self.dst_path, &dst_rel));
        crate::vlog!(1, "{path}: {} bytes", job.size);
        let outcome = client::transfer(
            self.cfg,
            &src,
            &dst,
            Some(b""),
            job.prescan,
            self.umask,
            &mut Progress::hidden(),
        )
        .map_err(|e| (exit_code_of(&e), message_of(&e)));
        match &outcome {
            Ok(r) => crate::vlog!(
                1,
                "{path}: done: {} reused, {} literal, {} on the wire",
                r.summary.reused_bytes,
                r.summary.literal_bytes,
                r.wire_bytes
            ),
            Err((_, m)) => crate::vlog!(1, "{path}: failed: {m}"),
        }
        FileResult {
            path,
            size: job.size,
            outcome,
        }
    }

    fn apply_ops(&self, ops: &[(Op, Vec<u8>)], wire: &mut u64) -> Result<Vec<OpResult>> {
        let just: Vec<Op> = ops.iter().map(|(op, _)| op.clone()).collect();
        apply(self.cfg, &self.dst_end, &self.dst_path, &just, wire)
    }

    fn sync(&self, report: &mut TreeReport, wire: &mut u64) {
        let cfg = self.cfg;
        let dry = cfg.dry_run;
        let root = self.src.root().expect("listed");
        let dst_exists = self.dst.root().is_some();
        // Directories that could not be made: nothing goes beneath them.
        let mut blocked: Vec<(Vec<u8>, String)> = Vec::new();
        let blocked_by = |blocked: &[(Vec<u8>, String)], rel: &[u8]| -> Option<String> {
            blocked
                .iter()
                .find(|(d, _)| within(rel, d))
                .map(|(d, why)| format!("not synced: {}: {why}", self.shown_dst(d)))
        };

        // Phase 1: directories.
        let mut ops: Vec<(Op, Vec<u8>)> = Vec::new();
        ops.push((
            Op::Mkdir {
                path: Vec::new(),
                // A container made for `dst/NAME` gets the usual mode;
                // the tree's root gets the source's at the end.
                mode: if self.prefix.is_some() {
                    0o777
                } else {
                    root.mode & 0o7777
                },
            },
            Vec::new(),
        ));
        if let Some(p) = &self.prefix {
            ops.push((
                Op::Mkdir {
                    path: p.clone(),
                    mode: root.mode & 0o7777,
                },
                Vec::new(),
            ));
        }
        if !dst_exists {
            report.changed_entries += 1;
        }
        for e in self.src.entries.iter().skip(1) {
            if e.kind != EntryKind::Dir || blocked_by(&blocked, &e.path).is_some() {
                continue;
            }
            match self.dst.get(&e.path).map(|d| d.kind) {
                Some(EntryKind::Dir) => {}
                None | Some(EntryKind::Symlink) => {
                    report.changed_entries += 1;
                    ops.push((
                        Op::Mkdir {
                            path: self.dpath(&e.path),
                            mode: e.mode & 0o7777,
                        },
                        e.path.clone(),
                    ))
                }
                Some(_) => blocked.push((
                    e.path.clone(),
                    "the destination has a file there, the source a directory".into(),
                )),
            }
        }
        // A link (or a fifo, a device node) where a file belongs goes
        // first: the engine would replace a link to a file, but takes a
        // link to a directory for a directory to write into.
        for e in &self.src.entries {
            let old = self.dst.get(&e.path).map(|d| d.kind);
            if e.kind == EntryKind::File
                && matches!(old, Some(EntryKind::Symlink | EntryKind::Other))
                && blocked_by(&blocked, &e.path).is_none()
            {
                ops.push((
                    Op::Delete {
                        path: self.dpath(&e.path),
                    },
                    e.path.clone(),
                ));
            }
        }
        if !dry {
            match self.apply_ops(&ops, wire) {
                Ok(results) => {
                    for ((op, rel), r) in ops.iter().zip(results) {
                        if r.status != 0 {
                            // The tree's root (or its container) could not
                            // be made: nothing can go anywhere.
                            if rel.is_empty() {
                                let at = shown(&join(&self.dst_path, op.path()));
                                report.fatal = Some((
                                    Exit::from_code(r.status),
                                    format!("destination {at}: {}", r.message),
                                ));
                                return;
                            }
                            // What lies beneath a failed directory fails with it.
                            if blocked_by(&blocked, rel).is_none() {
                                blocked.push((rel.clone(), r.message));
                            }
                        } else if !r.message.is_empty() {
                            crate::log::warn(&r.message);
                        }
                    }
                }
                Err(e) => {
                    report.fatal = Some((exit_code_of(&e), message_of(&e)));
                    return;
                }
            }
        }
        for (d, why) in &blocked {
            report.errors.push(EntryError {
                path: self.shown_dst(d),
                exit: Exit::Io,
                message: why.clone(),
            });
        }

        // Phase 2: files.
        let mut jobs = Vec::new();
        for e in &self.src.entries {
            if e.kind != EntryKind::File {
                continue;
            }
            let failed = |why: String| FileResult {
                path: self.shown_dst(&e.path),
                size: e.size,
                outcome: Err((Exit::Io, why)),
            };
            if let Some(why) = blocked_by(&blocked, &e.path) {
                report.files.push(failed(why));
            } else if self.dst_is_dir(&e.path) {
                report.files.push(failed(
                    "the destination is a directory; the source has a file there".into(),
                ));
            } else if dry && !(self.dst_is_dir(parent_of(&e.path))) {
                // Its directory does not exist yet: all of it would be sent.
                report.files.push(FileResult {
                    path: self.shown_dst(&e.path),
                    size: e.size,
                    outcome: Ok(Report {
                        summary: Summary {
                            dry_run: true,
                            source_bytes: e.size,
                            literal_bytes: e.size,
                            ..Summary::default()
                        },
                        source_bytes: e.size,
                        wire_bytes: 0,
                        duration: Duration::ZERO,
                        check: false,
                    }),
                });
            } else {
                jobs.push(Job {
                    rel: e.path.clone(),
                    size: e.size,
                    prescan: self.worth_prescanning(e, cfg.checksum),
                });
            }
        }
        self.transfer_all(jobs, report);
        if report.fatal.is_some() {
            return;
        }
        let synced: HashSet<&str> = report
            .files
            .iter()
            .filter(|f| f.outcome.is_ok())
            .map(|f| f.path.as_str())
            .collect();

        // Phase 3: links, deletions, then attributes, deepest first.
        let mut ops: Vec<(Op, Vec<u8>)> = Vec::new();
        for e in &self.src.entries {
            if e.kind != EntryKind::Symlink {
                continue;
            }
            // Counted with its directory's failure.
            if blocked_by(&blocked, &e.path).is_some() {
                continue;
            }
            let old = self.dst.get(&e.path);
            let same = old.is_some_and(|d| d.kind == EntryKind::Symlink && d.target == e.target);
            if !same {
                report.changed_entries += 1;
                ops.push((
                    Op::Symlink {
                        path: self.dpath(&e.path),
                        target: e.target.clone(),
                    },
                    e.path.clone(),
                ));
            }
            if !same
                || old.is_some_and(|d| {
                    (d.uid, d.gid, d.mtime_sec, d.mtime_nsec)
                        != (e.uid, e.gid, e.mtime_sec, e.mtime_nsec)
                })
            {
                ops.push((
                    attrs_op(self.dpath(&e.path), e, attrs::OWNER | attrs::MTIME),
                    e.path.clone(),
                ));
            }
        }
        let clean = report.files_failed() == 0 && report.errors.is_empty();
        if cfg.delete && !clean {
            crate::log::warn("some entries failed: --delete deletes nothing this run");
        }
        if cfg.delete && clean {
            // Children before their directory: the reverse of the listing.
            for e in self.dst.entries.iter().skip(1).rev() {
                if self.src.get(&e.path).is_none() {
                    report.changed_entries += 1;
                    if dry {
                        report.deleted.push(self.shown_dst(&e.path));
                    } else {
                        ops.push((
                            Op::Delete {
                                path: self.dpath(&e.path),
                            },
                            e.path.clone(),
                        ));
                    }
                }
            }
        }
        for e in &self.src.entries {
            let shown_path = self.shown_dst(&e.path);
            if e.kind != EntryKind::File || !synced.contains(shown_path.as_str()) {
                continue;
            }
            let same = self.dst.get(&e.path).is_some_and(|d| {
                (d.mode & 0o7777, d.uid, d.gid) == (e.mode & 0o7777, e.uid, e.gid)
            });
            if !same {
                ops.push((
                    attrs_op(self.dpath(&e.path), e, attrs::MODE | attrs::OWNER),
                    e.path.clone(),
                ));
            }
        }
        for e in self.src.entries.iter().rev() {
            if e.kind == EntryKind::Dir && blocked_by(&blocked, &e.path).is_none() {
                ops.push((attrs_op(self.dpath(&e.path), e, attrs::ALL), e.path.clone()));
            }
        }
        if dry {
            return;
        }
        match self.apply_ops(&ops, wire) {
            Ok(results) => {
                for ((op, rel), r) in ops.iter().zip(results) {
                    if r.status != 0 {
                        report.errors.push(EntryError {
                            path: self.shown_dst(rel),
                            exit: Exit::from_code(r.status),
                            message: r.message,
                        });
                    } else if !r.message.is_empty() {
                        crate::log::warn(&r.message);
                    } else if let Op::Delete { .. } = op {
                        report.deleted.push(self.shown_dst(rel));
                    }
                }
            }
            Err(e) => report.fatal = Some((exit_code_of(&e), message_of(&e))),
        }
    }

    fn check(&self, report: &mut TreeReport, _wire: &mut u64) {
        let mut differ = |rel: &[u8], why: &str| {
            report
                .differing
                .push((self.shown_dst(rel), why.to_string()));
        };
        if self.dst.root().is_none() {
            differ(b"", "missing: the destination does not exist");
            return;
        }
        // Report a missing or mistyped directory once, not for all it holds.
        let mut reported: Vec<Vec<u8>> = Vec::new();
        let mut jobs = Vec::new();
        for e in self.src.entries.iter().skip(1) {
            if reported.iter().any(|d| within(&e.path, d)) || e.kind == EntryKind::Other {
                continue;
            }
            let d = self.dst.get(&e.path);
            match (e.kind, d.map(|d| d.kind)) {
                (_, None) => {
                    differ(&e.path, "missing from the destination");
                    reported.push(e.path.clone());
                }
                (k, Some(dk)) if k != dk => {
                    differ(&e.path, "of another kind in the destination");
                    reported.push(e.path.clone());
                }
                (EntryKind::Symlink, _) if d.is_some_and(|d| d.target != e.target) => {
                    differ(&e.path, "a symlink to another target in the destination")
                }
                (EntryKind::File, _) => jobs.push(Job {
                    rel: e.path.clone(),
                    size: e.size,
                    prescan: self.worth_prescanning(e, true),
                }),
                _ => {}
            }
        }
        for e in self.dst.entries.iter().skip(1) {
            if self.src.get(&e.path).is_none() && self.src.get(parent_of(&e.path)).is_some() {
                differ(&e.path, "extra: not in the source");
            }
        }
        self.transfer_all(jobs, report);
        for f in &report.files {
            if let Ok(r) = &f.outcome {
                if !r.summary.identical {
                    report.differing.push((
                        f.path.clone(),
                        format!(
                            "contents differ: {} bytes in {} range{}",
                            r.summary.differing_bytes,
                            r.summary.range_count,
                            if r.summary.range_count == 1 { "" } else { "s" }
                        ),
                    ));
                }
            }
        }
        report.differing.sort();
    }
}

fn attrs_op(path: Vec<u8>, e: &ListEntry, which: u8) -> Op {
    Op::Attrs {
        path,
        which,
        mode: e.mode & 0o7777,
        uid: e.uid,
        gid: e.gid,
        mtime_sec: e.mtime_sec,
        mtime_nsec: e.mtime_nsec,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(p: &str) -> Vec<u8> {
        p.as_bytes().to_vec()
    }

    #[test]
    fn trailing_slash_decides_the_prefix() {
        assert_eq!(prefix_of(b"src/"), None);
        assert_eq!(prefix_of(b"/a/src"), Some(rel("src")));
        assert_eq!(prefix_of(b"src"), Some(rel("src")));
        assert_eq!(prefix_of(b"a/."), None);
        assert_eq!(prefix_of(b".."), None);
        assert_eq!(join(b"dst", b""), rel("dst"));
        assert_eq!(join(b"dst/", b"a/b"), rel("dst/a/b"));
        assert_eq!(join(b"", b"a"), rel("a"));
        assert!(within(b"a/b", b"a") && !within(b"ab", b"a") && within(b"x", b""));
    }

    fn entry(kind: EntryKind, path: &str) -> ListEntry {
        let mode = match kind {
            EntryKind::Dir => libc::S_IFDIR,
            EntryKind::Symlink => libc::S_IFLNK,
            _ => libc::S_IFREG,
        } | 0o644;
        ListEntry {
            kind,
            path: rel(path),
            size: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            mode,
            uid: 0,
            gid: 0,
            target: if kind == EntryKind::Symlink {
                rel("/etc")
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn a_listing_must_be_a_tree() {
        use EntryKind::*;
        let ok = vec![entry(Dir, ""), entry(Dir, "a"), entry(File, "a/x")];
        assert!(Listing::new(ok, "p").is_ok());
        for bad in [
            // Beneath a symlink: a lying peer's way out of the tree.
            vec![entry(Dir, ""), entry(Symlink, "a"), entry(File, "a/x")],
            vec![entry(Dir, ""), entry(File, "a/x")],
            vec![entry(Dir, ""), entry(File, "a"), entry(File, "a")],
            vec![entry(File, "a")],
            vec![entry(Dir, ""), entry(Dir, "")],
        ] {
            let e = Listing::new(bad.clone(), "p").unwrap_err();
            assert_eq!(exit_code_of(&e), Exit::Protocol, "{bad:?}");
        }
    }

    #[test]
    fn walk_lists_links_as_links_and_respects_filters() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/x.img"), b"x").unwrap();
        std::fs::write(d.join("a/y.tmp"), b"y").unwrap();
        std::os::unix::fs::symlink("/etc", d.join("a/out")).unwrap();
        let filter = Filter::new(&[crate::wire::protocol::FilterRule {
            exclude: true,
            pattern: "*.tmp".into(),
        }])
        .unwrap();
        let all = list_local(d, &filter).unwrap().unwrap();
        let paths: Vec<(String, EntryKind)> =
            all.iter().map(|e| (shown(&e.path), e.kind)).collect();
        assert_eq!(
            paths,
            [
                (".".to_string(), EntryKind::Dir),
                ("a".into(), EntryKind::Dir),
                ("a/b".into(), EntryKind::Dir),
                ("a/out".into(), EntryKind::Symlink),
                ("a/b/x.img".into(), EntryKind::File),
            ]
        );
        assert_eq!(all[3].target, b"/etc");
        assert!(list_local(&d.join("missing"), &filter).unwrap().is_none());
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
