//! `vmsync -r -aHAX` against `rsync -aHAX` on the same tree: both copy it
//! (locally, and over the real sshd both ways), and the two destinations
//! are walked and compared field by field ([`snapshot`], [`assert_alike`]):
//! type, mode, owner, size, nanosecond mtime (links included: rsync keeps
//! them), device number, hard-link classes, xattrs (ACLs among them, as
//! their raw `system.posix_acl_*` values), link text, contents, and the
//! sparse file's allocation (vmsync's at most rsync's).
//!
//! The tree ([`make_tree`]) needs root (devices, `trusted.*`, owners):
//! without root, rsync, setfacl or setfattr the tests are skipped, and
//! under `VMSYNC_REQUIRE_LOOP=1` (CI, as root) they fail instead.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::*;

/// Whether the tools and privileges the tests need are here; a failure
/// under `VMSYNC_REQUIRE_LOOP=1`, a skip otherwise.
fn can_run(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for tool in ["rsync", "setfacl", "setfattr", "mknod", "mount"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("VMSYNC_REQUIRE_LOOP").is_some_and(|v| v == "1") {
        panic!(
            "{test}: needs {} (VMSYNC_REQUIRE_LOOP=1)",
            missing.join(", ")
        );
    }
    eprintln!("SKIPPED {test}: needs {}", missing.join(", "));
    false
}

/// Runs a command that must succeed.
#[track_caller]
fn sh(cmd: &str, dir: &Path) {
    let out = Command::new("sh")
        .args(["-ec", cmd])
        .current_dir(dir)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{cmd} failed in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs rsync with `args`; it must succeed.
#[track_caller]
fn rsync(args: &[&str]) {
    let out = Command::new("rsync")
        .args(args)
        .output()
        .expect("run rsync");
    assert!(
        out.status.success(),
        "rsync {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The tree: hard-link groups (one across directories), xattrs of three
/// namespaces, access and default ACLs, a fifo, a socket, devices, a
/// sparse file, nanosecond mtimes, odd modes, a foreign owner, symlinks
/// (one dangling).
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("d1/d2")).unwrap();
    fs::create_dir_all(root.join("sg")).unwrap();
    fs::create_dir_all(root.join("gone/deeper")).unwrap();
    write_file(&root.join("a"), &random_bytes(1, 100_000));
    write_file(&root.join("pair1"), b"pair");
    write_file(&root.join("gone/deeper/x"), b"x");
    sparse_file(
        &root.join("sparse.img"),
        8 * MIB,
        &[(MIB, &random_bytes(2, 50_000))],
    );
    write_file(&root.join("solo"), b"solo");
    let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    sh(
        "ln a d1/b; ln a d1/d2/c; ln pair1 pair2
         chmod 600 solo; chmod 2750 sg; chown 12345:23456 a d1 sparse.img
         setfattr -n user.colour -v blue a
         setfattr -n trusted.t -v T solo
         setfattr -n security.s -v S d1
         setfattr -n user.big -v 0x$(head -c 3000 /dev/zero | od -An -tx1 -v | tr -d ' \\n') sparse.img
         setfattr -h -n trusted.link -v L link 2>/dev/null || true
         setfacl -m u:1234:rwx,g:4321:r solo
         setfacl -d -m u:1234:rx,g:555:rx d1
         mkfifo fifo; mkfifo fifo2; mknod null c 1 3; mknod loop7 b 7 7
         ln -s a link; ln -s nowhere dangling; ln -s ../a d1/up
         find . -exec touch -h -d '2000-01-01 00:00:00.25' {} +
         touch -d '2001-02-03 04:05:06.123456789' a pair1 solo fifo null
         touch -h -d '2002-02-03 04:05:06.987654321' link dangling d1/up
         touch -d '2003-02-03 04:05:06.000000001' d1/d2 d1 sg gone/deeper gone .",
        root,
    );
}

/// One entry, as compared.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime_ns: i128,
    rdev: u64,
    target: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// Hard links: the other names of its inode, sorted (files only).
    names: Vec<String>,
    blocks: u64,
}

/// The attributes of `path` (not following a link), ACLs included.
fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut list = vec![0u8; 1 << 16];
    let n = rustix::fs::llistxattr(path, &mut list[..]).unwrap();
    let mut out = BTreeMap::new();
    for name in list[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name).unwrap();
        let mut v = vec![0u8; 1 << 16];
        let len = rustix::fs::lgetxattr(path, name, &mut v[..]).unwrap();
        out.insert(name.to_string(), v[..len].to_vec());
    }
    out
}

/// Every entry beneath `root`, and `root` itself as `.`.
fn snapshot(root: &Path) -> BTreeMap<String, Entry> {
    let mut paths = vec![(String::from("."), root.to_path_buf())];
    let mut i = 0;
    while i < paths.len() {
        let (rel, p) = paths[i].clone();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            let mut names: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                let r = if rel == "." {
                    n.to_string_lossy().into_owned()
                } else {
                    format!("{rel}/{}", n.to_string_lossy())
                };
                paths.push((r, p.join(n)));
            }
        }
        i += 1;
    }
    let mut by_inode: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (rel, p) in &paths {
        let m = fs::symlink_metadata(p).unwrap();
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_symlink() {
            'L'
        } else if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_fifo() {
            'p'
        } else if ft.is_socket() {
            's'
        } else if ft.is_char_device() {
            'c'
        } else {
            'b'
        };
        if kind == 'f' && m.nlink() > 1 {
            by_inode.entry(m.ino()).or_default().insert(rel.clone());
        }
        out.insert(
            rel.clone(),
            Entry {
                kind,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                size: if kind == 'd' { 0 } else { m.size() },
                mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
                rdev: m.rdev(),
                target: ft.is_symlink().then(|| fs::read_link(p).unwrap()),
                xattrs: xattrs(p),
                names: Vec::new(),
                blocks: m.blocks(),
            },
        );
    }
    for names in by_inode.values() {
        for n in names {
            out.get_mut(n).unwrap().names = names.iter().cloned().collect();
        }
    }
    out
}

/// `got` (vmsync's copy) has every field `want` (rsync's) has, entry by
/// entry, and the same contents; one message lists every difference.
#[track_caller]
fn assert_alike(want_root: &Path, got_root: &Path) {
    let (want, got) = (snapshot(want_root), snapshot(got_root));
    let mut diffs = Vec::new();
    for p in want.keys().chain(got.keys()).collect::<BTreeSet<_>>() {
        let (w, g) = match (want.get(p), got.get(p)) {
            (Some(w), Some(g)) => (w, g),
            (w, _) => {
                diffs.push(format!(
                    "{p}: only in {}",
                    if w.is_some() { "rsync's" } else { "vmsync's" }
                ));
                continue;
            }
        };
        let mut field = |name: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("{p}: {name}: rsync {a}, vmsync {b}"));
            }
        };
        field("type", w.kind.to_string(), g.kind.to_string());
        field("mode", format!("{:o}", w.mode), format!("{:o}", g.mode));
        field("uid", w.uid.to_string(), g.uid.to_string());
        field("gid", w.gid.to_string(), g.gid.to_string());
        field("size", w.size.to_string(), g.size.to_string());
        field("mtime ns", w.mtime_ns.to_string(), g.mtime_ns.to_string());
        field("rdev", format!("{:#x}", w.rdev), format!("{:#x}", g.rdev));
        field(
            "target",
            format!("{:?}", w.target),
            format!("{:?}", g.target),
        );
        field(
            "xattrs",
            format!("{:?}", w.xattrs),
            format!("{:?}", g.xattrs),
        );
        field(
            "hard links",
            format!("{:?}", w.names),
            format!("{:?}", g.names),
        );
        if w.kind == 'f' && g.kind == 'f' {
            if fs::read(want_root.join(p)).unwrap() != fs::read(got_root.join(p)).unwrap() {
                diffs.push(format!("{p}: contents differ"));
            }
            if g.blocks > w.blocks {
                diffs.push(format!(
                    "{p}: vmsync allocates {} blocks, rsync {}",
                    g.blocks, w.blocks
                ));
            }
        }
    }
    assert!(
        diffs.is_empty(),
        "{} and {} differ:\n  {}",
        want_root.display(),
        got_root.display(),
        diffs.join("\n  ")
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `dir/` with the trailing slash.
fn slash(p: &Path) -> String {
    format!("{}/", p.display())
}

/// A vmsync run that must succeed.
#[track_caller]
fn vmsync_ok(args: &[&str]) -> Run {
    let run = vmsync().args(args).run();
    run.assert_ok();
    run
}

/// A run that changes nothing: `-i` prints nothing, and `--json` says
/// every file is up to date.
#[track_caller]
fn assert_nothing_to_do(extra: &[String], src: &str, dst: &str) {
    let run = vmsync()
        .args(["-r", "-aHAX", "-i", "--delete"])
        .args(extra)
        .args([src, dst])
        .run();
    run.assert_ok();
    assert_eq!(run.stdout, "", "a third run changes nothing\n{run}");
    let (run, v) = vmsync()
        .args(["-r", "-aHAX", "--delete"])
        .args(extra)
        .args([src, dst])
        .run_json();
    run.assert_ok();
    assert!(json_bool(&v, "up_to_date"), "{v}");
    assert_eq!(json_u64(&v, "literal_bytes"), 0, "{v}");
    for f in v["files"].as_array().unwrap() {
        assert!(json_bool(f, "up_to_date"), "{f}");
    }
}

/// The changes of the second round.
fn change_tree(root: &Path) {
    sh(
        "printf changed >> a
         rm d1/b; printf 'no longer a link' > d1/b
         ln pair1 d1/pair3
         setfattr -n user.colour -v green a
         setfattr -x trusted.t solo
         setfacl -x u:1234 solo
         setfacl -k d1
         rm fifo2; printf 'was a fifo' > fifo2
         rm -r gone; rm dangling loop7
         touch -d '2004-01-01 00:00:00.5' a d1 d1/b d1/pair3 fifo2 .",
        root,
    );
}

#[test]
fn local_copies_equal_rsyncs_field_by_field() {
    if !can_run("local_copies_equal_rsyncs_field_by_field") {
        return;
    }
    let t = tempdir();
    let src = t.path().join("src");
    make_tree(&src);
    let (by_rsync, by_vmsync) = (t.path().join("rsync"), t.path().join("vmsync"));
    rsync(&["-aHAX", &slash(&src), &s(&by_rsync)]);
    vmsync_ok(&["-r", "-aHAX", &slash(&src), &s(&by_vmsync)]);
    assert_alike(&by_rsync, &by_vmsync);
    assert_alike(&src, &by_vmsync);

    change_tree(&src);
    rsync(&["-aHAX", "--delete", &slash(&src), &s(&by_rsync)]);
    vmsync_ok(&["-r", "-aHAX", "--delete", &slash(&src), &s(&by_vmsync)]);
    assert_alike(&by_rsync, &by_vmsync);
    assert_nothing_to_do(&[], &slash(&src), &s(&by_vmsync));

    // --check sees an attribute, a link and a special file that differ.
    sh(
        "setfattr -n user.colour -v red a; rm d1/d2/c; cp a d1/d2/c; rm fifo; mknod fifo c 1 5",
        &by_vmsync,
    );
    let (run, v) = vmsync()
        .args(["-r", "-aHAX", "--check", &slash(&src), &s(&by_vmsync)])
        .run_json();
    run.assert_code(exit::DIFFERENT);
    let differing: Vec<(String, String)> = v["differing_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap().into(),
                d["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    for (path, word) in [
        ("a", "extended attributes"),
        ("d1/d2/c", "hard link"),
        ("fifo", "special file of another type"),
    ] {
        assert!(
            differing.iter().any(|(p, r)| p == path && r.contains(word)),
            "{path}: {word} in {differing:?}"
        );
    }
    // A dry run says so and changes nothing.
    let before = snapshot(&by_vmsync);
    let run = vmsync_ok(&["-r", "-aHAX", "-n", "-i", &slash(&src), &s(&by_vmsync)]);
    assert!(run.stdout.contains("hf"), "{run}");
    assert_eq!(before, snapshot(&by_vmsync), "a dry run changes nothing");
}

#[test]
fn over_ssh_push_and_pull_equal_rsyncs() {
    if !can_run("over_ssh_push_and_pull_equal_rsyncs") {
        return;
    }
    let Some(sshd) = Sshd::start() else { return };
    let t = tempdir();
    let src = t.path().join("src");
    make_tree(&src);
    let by_rsync = t.path().join("rsync");
    rsync(&["-aHAX", &slash(&src), &s(&by_rsync)]);
    let (pushed, pulled) = (t.path().join("pushed"), t.path().join("pulled"));
    let push = |extra: &[&str]| {
        vmsync()
            .args(sshd.args())
            .args(["-r", "-aHAX"])
            .args(extra)
            .args([slash(&src), sshd.remote(&pushed)])
            .run()
    };
    push(&[]).assert_ok();
    assert_alike(&by_rsync, &pushed);
    let pull = vmsync()
        .args(sshd.args())
        .args([
            "-r",
            "-aHAX",
            &format!("{}/", sshd.remote(&src)),
            &s(&pulled),
        ])
        .run();
    pull.assert_ok();
    assert_alike(&by_rsync, &pulled);

    change_tree(&src);
    rsync(&["-aHAX", "--delete", &slash(&src), &s(&by_rsync)]);
    push(&["--delete"]).assert_ok();
    assert_alike(&by_rsync, &pushed);
    let run = push(&["-i", "--delete"]);
    run.assert_ok();
    assert_eq!(run.stdout, "", "nothing left to change\n{run}");
}

/// A tmpfs mounted inside the source tree, unmounted on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn one_file_system_makes_mount_points_and_does_not_enter_them() {
    if !can_run("one_file_system_makes_mount_points_and_does_not_enter_them") {
        return;
    }
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("mnt")).unwrap();
    write_file(&src.join("here"), b"here");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0710", "tmpfs"])
        .arg(src.join("mnt"))
        .status()
        .unwrap();
    assert!(st.success(), "mount a tmpfs inside the tree");
    let _mount = Mount(src.join("mnt"));
    write_file(&src.join("mnt/elsewhere"), b"on the tmpfs");
    fs::create_dir(src.join("mnt/sub")).unwrap();
    sh(
        "find . -exec touch -h -d '2000-01-01 00:00:00.25' {} +",
        &src,
    );
    let (by_rsync, by_vmsync) = (t.path().join("rsync"), t.path().join("vmsync"));
    // -X: each copy's attributes exactly the source's (vmsync's lock
    // leaves one of its own on a file it writes otherwise).
    rsync(&["-axX", &slash(&src), &s(&by_rsync)]);
    vmsync_ok(&["-r", "-axX", &slash(&src), &s(&by_vmsync)]);
    assert_alike(&by_rsync, &by_vmsync);
    assert!(by_vmsync.join("mnt").is_dir() && !by_vmsync.join("mnt/elsewhere").exists());
    // Without -x the tmpfs is copied.
    let all = t.path().join("all");
    vmsync_ok(&["-r", "-a", &slash(&src), &s(&all)]);
    assert_eq!(
        fs::read(all.join("mnt/elsewhere")).unwrap(),
        b"on the tmpfs"
    );
}

#[test]
fn itemize_lists_each_change_as_rsync_does() {
    if !can_run("itemize_lists_each_change_as_rsync_does") {
        return;
    }
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    write_file(&src.join("disk.img"), b"image");
    write_file(&src.join("old.img"), b"old");
    sh(
        "ln disk.img dir/same.img; ln -s disk.img link; mkfifo fifo; mknod null c 1 3
         touch -d '2001-01-01' disk.img old.img dir .",
        &src,
    );
    let dst = t.path().join("dst");
    let lines = |run: &Run| run.stdout.lines().map(str::to_string).collect::<Vec<_>>();
    let run = vmsync_ok(&["-r", "-aHX", "-i", &slash(&src), &s(&dst)]);
    assert_eq!(
        lines(&run),
        [
            "cd+++++++++ ./",
            "cd+++++++++ dir/",
            // A group's first name, sorted, is sent; the others linked.
            ">f+++++++++ dir/same.img",
            "hf+++++++++ disk.img => dir/same.img",
            "cS+++++++++ fifo",
            "cL+++++++++ link -> disk.img",
            "cD+++++++++ null",
            ">f+++++++++ old.img",
        ],
        "{run}"
    );
    sh(
        "printf more >> disk.img; chmod 600 old.img; setfattr -n user.x -v 1 old.img
         rm fifo; ln -sf old.img link; touch -d '2001-01-01' disk.img; touch -d '2002-01-01' dir",
        &src,
    );
    fs::remove_file(src.join("old.img")).unwrap_or_default();
    write_file(&src.join("old.img"), b"old");
    sh(
        "chmod 600 old.img; setfattr -n user.x -v 1 old.img; touch -d '2001-01-01' old.img .",
        &src,
    );
    let run = vmsync_ok(&["-r", "-aHX", "-i", "--delete", &slash(&src), &s(&dst)]);
    assert_eq!(
        lines(&run),
        [
            ".d..t...... dir/",
            // Its time was put back: only the size says it changed.
            ">f.s....... dir/same.img",
            "hf.s....... disk.img => dir/same.img",
            "*deleting   fifo",
            "cLc.t...... link -> old.img",
            ".f...p....x old.img",
        ],
        "{run}"
    );
    // --json replaces the lines.
    let (run, v) = vmsync()
        .args(["-r", "-aHX", "-i", &slash(&src), &s(&dst)])
        .run_json();
    run.assert_ok();
    assert!(json_bool(&v, "up_to_date"), "{v}");
    // A one-file run (-a means -r): its one line, and none when up to date.
    let one = t.path().join("one.img");
    let run = vmsync_ok(&["-a", "-i", &s(&src.join("disk.img")), &s(&one)]);
    assert_eq!(lines(&run), [">f+++++++++ disk.img"], "{run}");
    let run = vmsync_ok(&["-a", "-i", &s(&src.join("disk.img")), &s(&one)]);
    assert_eq!(run.stdout, "", "{run}");
    sh("printf more >> disk.img", &src);
    let run = vmsync_ok(&["-a", "-i", &s(&src.join("disk.img")), &s(&one)]);
    assert_eq!(lines(&run), [">f.st...... disk.img"], "{run}");
}

#[test]
fn xattrs_of_a_single_file_are_refused_with_what_to_do() {
    let t = tempdir();
    write_file(&t.path().join("disk.img"), b"x");
    let run = vmsync()
        .args(["-r", "-X"])
        .arg(t.path().join("disk.img"))
        .arg(t.path().join("out.img"))
        .run();
    run.assert_code(exit::USAGE);
    assert!(
        run.stderr.contains("-X and -A") && run.stderr.contains("one file"),
        "{run}"
    );
    assert!(!t.path().join("out.img").exists());
}

#[test]
fn devices_as_non_root_fail_that_entry_only() {
    if !can_run("devices_as_non_root_fail_that_entry_only") {
        return;
    }
    let Some((uid, gid)) = unprivileged_user() else {
        return;
    };
    let t = tempdir();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    write_file(&src.join("file"), b"f");
    sh("mknod null c 1 3; mkfifo fifo; chmod -R a+rX .", &src);
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o777)).unwrap();
    let run = vmsync()
        .args(["-r", "-a", &slash(&src), &s(&out.join("t"))])
        .run_as(uid, gid)
        .run();
    run.assert_code(23);
    assert!(run.stderr.contains("null"), "{run}");
    assert_eq!(fs::read(out.join("t/file")).unwrap(), b"f");
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(out.join("t/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(!out.join("t/null").exists());
}
