//! What a recursive run keeps beyond contents (rsync's `-H`, `-D`, `-X`,
//! `-A`), planned from the two listings: hard-link groups, special files,
//! which attributes differ, and the `-i` line that says so.
//!
//! `-H`: source files that are one inode (same device and inode, link
//! count above 1) form a group; its first path, sorted, is synced by the
//! engine and the others become `LINK` operations after it. The engine
//! replaces a destination file by renaming a new one over it, which breaks
//! an existing link group on every change, so the links are checked again
//! by the applier, at apply time, against the inodes it finds.

use std::collections::{BTreeMap, HashMap};

use crate::client::tree::report::EntryError;
use crate::client::tree::{End, Tree, TreeReport};
use crate::error::Exit;
use crate::wire::{attrs, is_device, xattr_in_play, EntryKind, ListEntry, Op, ACL_NAMES};

/// Operations to apply, each with the tree-relative path of the entry it
/// is for (what a failure is reported under).
pub(super) type Planned = Vec<(Op, Vec<u8>)>;

/// `-H`'s groups: each other name of a group, and the group's first name.
pub(super) type Links = BTreeMap<Vec<u8>, Vec<u8>>;

/// What an entry's `-i` line says changed (rsync's `cstpoguax` letters).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Changes {
    pub new: bool,
    /// A file's contents were sent (with `-c`), a link's or a device's
    /// value changed.
    pub value: bool,
    pub size: bool,
    pub time: bool,
    pub perms: bool,
    pub owner: bool,
    pub group: bool,
    pub acl: bool,
    pub xattr: bool,
}

impl Changes {
    /// Whether any attribute (not the contents) differs.
    pub fn attrs(&self) -> bool {
        self.time || self.perms || self.owner || self.group || self.acl || self.xattr
    }

    pub fn any(&self) -> bool {
        self.new || self.value || self.size || self.attrs()
    }

    /// The nine letters after rsync's `YX`.
    fn letters(&self) -> String {
        if self.new {
            return "+".repeat(9);
        }
        [
            (self.value, 'c'),
            (self.size, 's'),
            (self.time, 't'),
            (self.perms, 'p'),
            (self.owner, 'o'),
            (self.group, 'g'),
            (false, 'u'),
            (self.acl, 'a'),
            (self.xattr, 'x'),
        ]
        .iter()
        .map(|&(on, c)| if on { c } else { '.' })
        .collect()
    }
}

fn acls(x: &[(Vec<u8>, Vec<u8>)]) -> Vec<&(Vec<u8>, Vec<u8>)> {
    x.iter()
        .filter(|(n, _)| ACL_NAMES.contains(&n.as_slice()))
        .collect()
}

fn non_acls(x: &[(Vec<u8>, Vec<u8>)]) -> Vec<&(Vec<u8>, Vec<u8>)> {
    x.iter()
        .filter(|(n, _)| !ACL_NAMES.contains(&n.as_slice()))
        .collect()
}

/// rsync's type letter for an entry.
fn type_letter(e: &ListEntry) -> char {
    match e.kind {
        EntryKind::File => 'f',
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'L',
        _ if is_device(e.mode) => 'D',
        _ => 'S',
    }
}

impl Tree<'_> {
    /// The `ATTRS` bits of `-X` and `-A`.
    pub(super) fn xbits(&self) -> u8 {
        let mut b = 0;
        if self.cfg.tree.xattrs {
            b |= attrs::XATTRS;
        }
        if self.cfg.tree.acls {
            b |= attrs::ACLS;
        }
        b
    }

    /// Whether owners are set at the destination: by a receiving end that
    /// runs as root (a remote one is assumed to).
    fn owners_kept(&self) -> bool {
        match self.dst_end {
            End::Local => rustix::process::geteuid().is_root(),
            End::Remote(_) => true,
        }
    }

    /// Whether `-D` (`--devices`, `--specials`) makes this special file.
    pub(super) fn special_wanted(&self, e: &ListEntry) -> bool {
        e.kind == EntryKind::Other
            && if is_device(e.mode) {
                self.cfg.tree.devices
            } else {
                self.cfg.tree.specials
            }
    }

    /// What differs between the source's `e` and the destination's `d`.
    pub(super) fn changes(&self, e: &ListEntry, d: Option<&ListEntry>) -> Changes {
        let Some(d) = d.filter(|d| d.kind == e.kind) else {
            return Changes {
                new: true,
                ..Changes::default()
            };
        };
        let x = self.cfg.tree.xattrs;
        let a = self.cfg.tree.acls;
        let owners = self.owners_kept();
        let special = e.kind == EntryKind::Other;
        Changes {
            new: special && (d.mode ^ e.mode) & libc::S_IFMT != 0,
            value: match e.kind {
                EntryKind::Symlink => d.target != e.target,
                EntryKind::Other => d.rdev != e.rdev,
                _ => false,
            },
            size: e.kind == EntryKind::File && d.size != e.size,
            time: (d.mtime_sec, d.mtime_nsec) != (e.mtime_sec, e.mtime_nsec),
            perms: e.kind != EntryKind::Symlink && (d.mode ^ e.mode) & 0o7777 != 0,
            owner: owners && d.uid != e.uid,
            group: owners && d.gid != e.gid,
            acl: a && acls(&d.xattrs) != acls(&e.xattrs),
            xattr: x && non_acls(&d.xattrs) != non_acls(&e.xattrs),
        }
    }

    /// Records `-i`'s line for the source entry `e` (`y`: rsync's update
    /// letter), and counts it changed.
    pub(super) fn itemize(
        &self,
        report: &mut TreeReport,
        y: char,
        e: &ListEntry,
        c: Changes,
        extra: &str,
    ) {
        report.changed_entries += 1;
        if !self.cfg.itemize {
            return;
        }
        let mut path = self.shown_dst(&e.path);
        if e.kind == EntryKind::Dir {
            path = if path == "." { "./".into() } else { path + "/" };
        }
        report.items.push((
            e.path.clone(),
            format!("{y}{}{} {path}{extra}", type_letter(e), c.letters()),
        ));
    }

    /// `-i` of a one-file run whose file `e` was sent over `before` (what
    /// the destination held).
    pub(super) fn itemize_one(
        &self,
        report: &mut TreeReport,
        e: &ListEntry,
        before: Option<&ListEntry>,
    ) {
        let mut c = self.changes(e, before);
        c.value = self.cfg.checksum && !c.new;
        self.itemize(report, self.sent_letter(), e, c, "");
    }

    /// rsync's update letter for a file whose contents were sent: `<` to a
    /// remote destination, `>` from a remote source or locally.
    pub(super) fn sent_letter(&self) -> char {
        match self.dst_end {
            End::Remote(_) => '<',
            End::Local => '>',
        }
    }

    /// `-H`'s groups among the source's files: other name → first name.
    pub(super) fn link_groups(&self) -> Links {
        let mut groups: HashMap<(u64, u64), Vec<&[u8]>> = HashMap::new();
        if !self.cfg.tree.hard_links {
            return Links::new();
        }
        for e in &self.src.entries {
            if e.kind == EntryKind::File && e.nlink > 1 {
                groups.entry((e.dev, e.ino)).or_default().push(&e.path);
            }
        }
        let mut links = Links::new();
        for mut names in groups.into_values() {
            names.sort();
            for other in &names[1..] {
                links.insert(other.to_vec(), names[0].to_vec());
            }
        }
        links
    }

    /// Phase 3, `-H`: each other name of a group linked to its first, once
    /// the first is synced; a name already of that inode at the
    /// destination is left (the applier checks).
    pub(super) fn link_ops(
        &self,
        links: &Links,
        blocked: &[(Vec<u8>, String)],
        ops: &mut Planned,
        report: &mut TreeReport,
    ) {
        for (other, first) in links {
            if self.blocked_by(blocked, other).is_some() {
                continue;
            }
            let first_shown = self.shown_dst(first);
            let first_result = report.files.iter().find(|f| f.path == first_shown);
            let Some(Ok(r)) = first_result.map(|f| &f.outcome) else {
                report.errors.push(EntryError {
                    path: self.shown_dst(other),
                    exit: Exit::Partial,
                    message: format!("not linked: {first_shown} was not synced"),
                });
                continue;
            };
            let e = self.src.get(other).expect("a listed file");
            let d = self.dst.get(other);
            let linked = d.is_some_and(|d| {
                d.kind == EntryKind::File
                    && self
                        .dst
                        .get(first)
                        .is_some_and(|f| (f.dev, f.ino) == (d.dev, d.ino))
            });
            if !linked || !r.summary.up_to_date {
                let mut c = self.changes(e, d);
                c.new |= !linked;
                self.itemize(report, 'h', e, c, &format!(" => {first_shown}"));
            }
            ops.push((
                Op::Link {
                    path: self.dpath(other),
                    target: self.dpath(first),
                },
                other.clone(),
            ));
        }
    }

    /// Phase 3, `-D`: each fifo, socket or device node the destination
    /// lacks (or has of another type or number), and its attributes.
    pub(super) fn special_ops(
        &self,
        blocked: &[(Vec<u8>, String)],
        ops: &mut Planned,
        report: &mut TreeReport,
    ) {
        for e in &self.src.entries {
            if !self.special_wanted(e) || self.blocked_by(blocked, &e.path).is_some() {
                continue;
            }
            let d = self.dst.get(&e.path);
            let c = self.changes(e, d);
            if c.new || c.value {
                ops.push((
                    Op::Mknod {
                        path: self.dpath(&e.path),
                        mode: e.mode,
                        rdev: e.rdev,
                    },
                    e.path.clone(),
                ));
            }
            if c.any() {
                self.itemize(report, 'c', e, c, "");
                ops.push((attrs_op(self, e, attrs::ALL | self.xbits()), e.path.clone()));
            }
        }
    }

    /// `--check`: how the destination's special files, links and
    /// attributes differ from the source's.
    pub(super) fn check_meta(&self, differ: &mut dyn FnMut(&[u8], &str)) {
        let links = self.link_groups();
        for e in self.src.entries.iter() {
            let Some(d) = self.dst.get(&e.path).filter(|d| d.kind == e.kind) else {
                continue;
            };
            let c = self.changes(e, Some(d));
            if e.kind == EntryKind::Other && (c.new || c.value) {
                differ(&e.path, "a special file of another type or device number");
            }
            if c.acl {
                differ(&e.path, "ACLs differ");
            }
            if c.xattr {
                differ(&e.path, "extended attributes differ");
            }
            if let Some(first) = links.get(&e.path) {
                if self
                    .dst
                    .get(first)
                    .is_none_or(|f| (f.dev, f.ino) != (d.dev, d.ino))
                {
                    differ(
                        &e.path,
                        &format!("not a hard link to {}", self.shown_dst(first)),
                    );
                }
            }
        }
    }
}

/// The `ATTRS` giving the destination's copy of `e` what `which` names of
/// `e`'s.
pub(super) fn attrs_op(t: &Tree, e: &ListEntry, which: u8) -> Op {
    Op::Attrs {
        path: t.dpath(&e.path),
        which,
        mode: e.mode & 0o7777,
        uid: e.uid,
        gid: e.gid,
        mtime_sec: e.mtime_sec,
        mtime_nsec: e.mtime_nsec,
        xattrs: e
            .xattrs
            .iter()
            .filter(|(n, _)| xattr_in_play(which, n))
            .cloned()
            .collect(),
    }
}
