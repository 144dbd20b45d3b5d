//! The `List` role of `-r`: walk a tree and stream what it holds.
//!
//! The server serves it ([`serve_list`]); the client walks a local tree
//! with the same code ([`list_local`]) and checks what either end sent for
//! shape ([`Listing`]) before trusting a path in it.
//!
//! Nothing beneath a tree's root is reached through a symlink. The root
//! itself is opened by path (a symlink there is followed, as the user named
//! it; under `--server --root` it is resolved with `openat2` beneath DIR,
//! [`crate::dest::confine`]); below it, every lookup opens one name at a time
//! from a directory descriptor ([`TreeDir`]) with `O_NOFOLLOW`. (walkdir
//! works on path strings, which a concurrent rename could redirect, so the
//! walk here is descriptor-based.) Links are listed as links, with their text.
//!
//! What `LIST`'s flags ask for beyond that: extended attributes and ACLs
//! (read through each entry's own `O_PATH | O_NOFOLLOW` descriptor,
//! [`crate::sys::xattr`]), and `-x`'s rule that a directory on another
//! filesystem than the root is listed but not entered.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::{Context, Result};

use crate::dest::confine::Root;
use crate::error::{fail, Exit, WithExit};
use crate::filter::Filter;
use crate::sys::dirfd::{self, OFlags, Stat, TreeDir};
use crate::sys::xattr;
use crate::wire::{
    list_flags, valid_xattrs, xattr_name_ok, EntryKind, FrameReader, FrameWriter, ListEntry, Msg,
    ACL_NAMES, MAX_ENTRIES, MAX_LIST_BATCH, MAX_PATH, MAX_XATTRS, MAX_XATTR_BYTES,
};

/// Bytes of entries gathered before an `ENTRIES` frame goes out.
const LIST_FLUSH: usize = 1 << 20;

pub(crate) fn kind_of(mode: u32) -> EntryKind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

fn entry_of(st: &Stat, path: Vec<u8>, target: Vec<u8>) -> ListEntry {
    let kind = kind_of(st.st_mode);
    ListEntry {
        kind,
        path,
        size: st.st_size.max(0) as u64,
        mtime_sec: st.st_mtime,
        mtime_nsec: (st.st_mtime_nsec as i64).clamp(0, 999_999_999) as u32,
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        target,
        dev: st.st_dev,
        ino: st.st_ino,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        rdev: if crate::wire::is_device(st.st_mode) {
            st.st_rdev
        } else {
            0
        },
        xattrs: Vec::new(),
    }
}

fn unreadable(path: Vec<u8>, why: String) -> ListEntry {
    let mut why = why.into_bytes();
    why.truncate(MAX_PATH);
    ListEntry {
        kind: EntryKind::Unreadable,
        path,
        target: why,
        ..ListEntry::default()
    }
}

/// Which attribute names a listing with `flags` carries: the ACLs for
/// `ACLS`; for `XATTRS`, `user.`, and as root every namespace but
/// `system.` (rsync's rule: others cannot read `trusted.`, nor set
/// `security.`).
pub(crate) fn xattr_wanted(flags: u32, as_root: bool) -> impl Fn(&[u8]) -> bool {
    move |name: &[u8]| {
        if ACL_NAMES.contains(&name) {
            flags & list_flags::ACLS != 0
        } else {
            flags & list_flags::XATTRS != 0
                && xattr_name_ok(name)
                && (as_root || name.starts_with(b"user."))
        }
    }
}

/// The attributes `flags` asks for of the entry `fd` holds (`O_PATH`, not
/// following a link); why not, when they exceed the protocol's limits.
fn read_xattrs(fd: &OwnedFd, flags: u32) -> std::result::Result<crate::wire::Xattrs, String> {
    let x = xattr::read(
        fd,
        xattr_wanted(flags, rustix::process::geteuid().is_root()),
    )
    .map_err(|e| format!("cannot read its extended attributes: {e}"))?;
    if !valid_xattrs(&x) {
        return Err(format!(
            "has extended attributes beyond vmsync's limits ({MAX_XATTRS} of them, {MAX_XATTR_BYTES} bytes)"
        ));
    }
    Ok(x)
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

/// A tree-relative path as a person reads it (`.` for the root).
pub(crate) fn shown(p: &[u8]) -> String {
    if p.is_empty() {
        ".".into()
    } else {
        String::from_utf8_lossy(p).into_owned()
    }
}

/// The parent of a relative path (`""` for a top-level name).
pub(crate) fn parent_of(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[..i],
        None => b"",
    }
}

/// Whether `p` is `dir` or lies beneath it.
pub(crate) fn within(p: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || p == dir || p.starts_with(dir) && p.get(dir.len()) == Some(&b'/')
}

/// Opens a tree's root (`O_PATH`, following a symlink there): beneath
/// `confine` when the server is confined. `None` when it does not exist.
pub fn open_root(path: &Path, confine: Option<&Root>) -> Result<Option<OwnedFd>> {
    if let Some(root) = confine {
        return root.open_tree(path);
    }
    match dirfd::open_path(path, OFlags::PATH) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e)
            .with_context(|| format!("cannot open {}", path.display()))
            .exit_with(Exit::Io),
    }
}

/// Lists the tree at `root` (an `O_PATH` descriptor): the root first (path
/// `""`), then each directory's entries, sorted, before what they hold.
/// Entries `filter` excludes are left out, and excluded directories are
/// not entered. A directory that cannot be read becomes an
/// [`EntryKind::Unreadable`] entry; the root's failure is the run's.
/// `flags` ([`list_flags`]) say what else is listed.
pub fn walk(
    root: &OwnedFd,
    shown_root: &str,
    filter: &Filter,
    flags: u32,
    emit: &mut dyn FnMut(ListEntry) -> Result<()>,
) -> Result<()> {
    let want_xattrs = flags & (list_flags::XATTRS | list_flags::ACLS) != 0;
    let tree = TreeDir::new(
        root.try_clone()
            .context("duplicate a descriptor")
            .exit_with(Exit::Io)?,
    );
    let st = dirfd::stat_fd(root)
        .with_context(|| format!("cannot stat {shown_root}"))
        .exit_with(Exit::Io)?;
    let mut root_entry = entry_of(&st, Vec::new(), Vec::new());
    if want_xattrs {
        root_entry.xattrs = read_xattrs(root, flags)
            .map_err(|why| fail(Exit::Io, format!("{shown_root}: {why}")))?;
    }
    let root_dev = st.st_dev;
    let is_dir = root_entry.kind == EntryKind::Dir;
    emit(root_entry)?;
    if !is_dir {
        return Ok(());
    }
    let mut count: u64 = 1;
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(dir_rel) = stack.pop() {
        let names = tree
            .dir(&dir_rel)
            .and_then(|dir| Ok((dirfd::read_names(&dir)?, dir)));
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
            let cname = dirfd::cstring(&name)?;
            // With attributes to read, the entry's own descriptor: its
            // stat and its attributes are then of one inode.
            let fd = if want_xattrs {
                match dirfd::openat(&dir, &*cname, OFlags::PATH | OFlags::NOFOLLOW) {
                    Ok(fd) => Some(fd),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => {
                        emit(unreadable(rel, format!("cannot open: {e}")))?;
                        continue;
                    }
                }
            } else {
                None
            };
            let st = match fd
                .as_ref()
                .map_or_else(|| dirfd::stat_at(&dir, &cname), dirfd::stat_fd)
            {
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
                match dirfd::read_link_at(&dir, &cname, MAX_PATH) {
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
            let mut entry = entry_of(&st, rel.clone(), target);
            if let Some(fd) = &fd {
                match read_xattrs(fd, flags) {
                    Ok(x) => entry.xattrs = x,
                    Err(why) => {
                        emit(unreadable(rel, why))?;
                        continue;
                    }
                }
            }
            // `-x`: a mount point is made at the destination, not entered.
            let other_fs = flags & list_flags::ONE_FILE_SYSTEM != 0 && st.st_dev != root_dev;
            if kind == EntryKind::Dir && !other_fs {
                subdirs.push(rel);
            }
            emit(entry)?;
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

/// Lists a local tree (`flags`: [`list_flags`]); `None` when `path` does
/// not exist.
pub fn list_local(path: &Path, filter: &Filter, flags: u32) -> Result<Option<Vec<ListEntry>>> {
    let Some(fd) = open_root(path, None)? else {
        return Ok(None);
    };
    let mut all = Vec::new();
    walk(&fd, &path.display().to_string(), filter, flags, &mut |e| {
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
    walk(&fd, &path.display().to_string(), &filter, flags, &mut |e| {
        bytes += e.wire_size();
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
pub fn read_listing<R: io::Read>(reader: &mut FrameReader<R>) -> Result<Vec<ListEntry>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code_of;

    fn rel(p: &str) -> Vec<u8> {
        p.as_bytes().to_vec()
    }

    #[test]
    fn paths_join_and_nest() {
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
            mode,
            target: if kind == EntryKind::Symlink {
                rel("/etc")
            } else {
                Vec::new()
            },
            ..ListEntry::default()
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
        let filter = Filter::new(&[crate::wire::FilterRule {
            exclude: true,
            pattern: "*.tmp".into(),
        }])
        .unwrap();
        let all = list_local(d, &filter, 0).unwrap().unwrap();
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
        assert!(list_local(&d.join("missing"), &filter, 0)
            .unwrap()
            .is_none());
    }
}
