//! `-r` (issue 5): trees of images, local and remote, with `--delete`,
//! `--include`/`--exclude`, `--check`, partial failures (exit 23) and a
//! confined server's `List` and `Apply` roles.
//!
//! Every test builds the same kind of tree ([`make_tree`]): nested
//! directories, images (one sparse), a symlink inside the tree and one
//! pointing out of it, an empty directory, a fifo that must be skipped, and
//! fixed modes and mtimes, so that [`assert_same_tree`] can compare bytes,
//! kinds, link texts, permissions and nanosecond mtimes entry by entry.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::*;
use serde_json::Value;

/// The files of [`make_tree`], relative to its root.
const FILES: &[&str] = &["a.img", "sparse.img", "sub/b.img", "sub/deep/c.img"];

/// Builds the test tree in `root` (created).
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("sub/deep")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    write_file(&root.join("a.img"), &random_bytes(1, 300_000));
    sparse_file(
        &root.join("sparse.img"),
        8 * MIB,
        &[
            (MIB, &random_bytes(2, 70_000)),
            (6 * MIB, &random_bytes(3, 5000)),
        ],
    );
    write_file(&root.join("sub/b.img"), &mixed_bytes(4, 200_000));
    write_file(&root.join("sub/deep/c.img"), b"small");
    std::os::unix::fs::symlink("../a.img", root.join("sub/inside")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("outside")).unwrap();
    let fifo = std::ffi::CString::new(root.join("fifo").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    fs::set_permissions(root.join("sub/b.img"), fs::Permissions::from_mode(0o640)).unwrap();
    for (i, f) in FILES.iter().enumerate() {
        set_mtime_ns(&root.join(f), SOURCE_MTIME_NS + i as i128);
    }
    fs::set_permissions(root.join("sub"), fs::Permissions::from_mode(0o750)).unwrap();
    for (i, d) in ["sub/deep", "sub", "empty", ""].iter().enumerate() {
        set_dir_mtime(&root.join(d), SOURCE_MTIME_NS + 100 + i as i128);
    }
}

fn set_dir_mtime(dir: &Path, ns: i128) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64);
    fs::File::open(dir).unwrap().set_modified(t).unwrap();
}

/// What an entry is, as compared between trees.
#[derive(Debug, PartialEq)]
enum Kind {
    File,
    Dir,
    Link(PathBuf),
}

/// Every entry beneath `root` (not following links), fifos left out.
fn entries(root: &Path) -> BTreeMap<String, (Kind, u32, i128)> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<String, (Kind, u32, i128)>) {
        for e in fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let rel = rel.join(e.file_name());
            let m = fs::symlink_metadata(root.join(&rel)).unwrap();
            let kind = if m.file_type().is_symlink() {
                Kind::Link(fs::read_link(root.join(&rel)).unwrap())
            } else if m.is_dir() {
                walk(root, &rel, out);
                Kind::Dir
            } else if m.is_file() {
                Kind::File
            } else {
                continue;
            };
            let mtime = if matches!(kind, Kind::Link(_)) {
                0
            } else {
                m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
            };
            out.insert(rel.display().to_string(), (kind, m.mode() & 0o7777, mtime));
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

/// `dst` holds exactly what `src` holds (fifos aside): the same entries,
/// kinds, link texts, permissions, mtimes and file contents, and the
/// directories themselves have the same mode and mtime.
#[track_caller]
fn assert_same_tree(src: &Path, dst: &Path) {
    let (a, b) = (entries(src), entries(dst));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "entries of {} and {}",
        src.display(),
        dst.display()
    );
    for (path, want) in &a {
        let got = &b[path];
        assert_eq!(got, want, "{path}: (kind, mode, mtime)");
        if want.0 == Kind::File {
            assert_same_content(&src.join(path), &dst.join(path));
        }
    }
    let (ms, md) = (fs::metadata(src).unwrap(), fs::metadata(dst).unwrap());
    assert_eq!(ms.mode() & 0o7777, md.mode() & 0o7777, "mode of the root");
    assert_eq!(mtime_ns(src), mtime_ns(dst), "mtime of the root");
}

/// A test directory with the tree in `src` and an empty `out` for
/// destinations (both readable by everyone, for tests that run as nobody).
struct Setup {
    tmp: tempfile::TempDir,
    src: PathBuf,
    out: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempdir();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let src = tmp.path().join("src");
        make_tree(&src);
        let out = tmp.path().join("out");
        fs::create_dir(&out).unwrap();
        fs::set_permissions(&out, fs::Permissions::from_mode(0o777)).unwrap();
        Setup { tmp, src, out }
    }

    /// `src/` with the trailing slash.
    fn src_slash(&self) -> String {
        format!("{}/", self.src.display())
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The `files` entry for `path`.
#[track_caller]
fn file<'a>(v: &'a Value, path: &str) -> &'a Value {
    v["files"]
        .as_array()
        .unwrap_or_else(|| panic!("no files array in {v}"))
        .iter()
        .find(|f| f["path"] == path)
        .unwrap_or_else(|| panic!("{path} not in files: {v}"))
}

/// The JSON object of a recursive run: every single-file key, the counts,
/// and per-file fields that add up to the totals.
#[track_caller]
fn assert_tree_json(run: &Run, v: &Value, files: usize, failed: usize) {
    for key in JSON_KEYS {
        assert!(v.get(*key).is_some(), "JSON key {key:?} missing\n{v}");
    }
    assert_eq!(v["exit_code"].as_i64(), Some(run.code as i64), "{run}");
    assert_eq!(json_u64(v, "files_total"), files as u64, "{v}");
    assert_eq!(json_u64(v, "files_failed"), failed as u64, "{v}");
    let arr = v["files"].as_array().unwrap();
    assert_eq!(arr.len(), files, "{v}");
    for key in ["literal_bytes", "reused_bytes", "zero_bytes"] {
        let sum: u64 = arr.iter().map(|f| json_u64(f, key)).sum();
        assert_eq!(sum, json_u64(v, key), "{key} totals: {v}");
    }
    assert!(
        arr.iter().map(|f| json_u64(f, "wire_bytes")).sum::<u64>() <= json_u64(v, "wire_bytes"),
        "{v}"
    );
    for f in arr {
        for key in ["path", "exit_code", "error", "source_bytes", "up_to_date"] {
            assert!(f.get(key).is_some(), "{key} missing in {f}");
        }
    }
    if run.code == exit::OK {
        assert!(v["error"].is_null(), "{v}");
    } else if run.code != exit::DIFFERENT {
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
}

#[test]
fn local_trailing_slash_copies_contents_and_without_it_the_directory() {
    let t = Setup::new();
    let dst = t.out.join("mirror");

    let (run, v) = vmsync().args(["-r", &t.src_slash(), &s(&dst)]).run_json();
    run.assert_ok();
    assert_tree_json(&run, &v, FILES.len(), 0);
    assert_same_tree(&t.src, &dst);
    assert!(
        run.stderr.contains("skipping") && run.stderr.contains("fifo"),
        "the fifo is skipped with a warning\n{run}"
    );
    // The link out of the tree is a link, not a copy of its target.
    assert_eq!(
        fs::read_link(dst.join("outside")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert!(dst.join("empty").is_dir());
    assert!(
        allocated_bytes(&dst.join("sparse.img")) < 2 * MIB,
        "holes stay holes"
    );
    let sparse = file(&v, "sparse.img");
    assert_eq!(json_u64(sparse, "source_bytes"), 8 * MIB);
    assert!(json_u64(sparse, "zero_bytes") > 7 * MIB, "{sparse}");
    assert!(json_u64(&v, "source_bytes") > 8 * MIB);

    // Without the slash: the directory itself, inside the destination,
    // which is created.
    let into = t.out.join("into");
    let (run, v) = vmsync().args(["-r", &s(&t.src), &s(&into)]).run_json();
    run.assert_ok();
    assert_tree_json(&run, &v, FILES.len(), 0);
    assert_eq!(dir_entries(&into), ["src"]);
    assert_same_tree(&t.src, &into.join("src"));
    assert!(file(&v, "src/sub/b.img")["error"].is_null());

    // Again: nothing to do, and every file says so.
    let (run, v) = vmsync().args(["-r", &s(&t.src), &s(&into)]).run_json();
    run.assert_ok();
    assert!(json_bool(&v, "up_to_date"), "{v}");
    for f in FILES {
        assert!(json_bool(file(&v, &format!("src/{f}")), "up_to_date"));
    }
    assert_same_tree(&t.src, &into.join("src"));
}

#[test]
fn second_run_updates_adds_and_deletes_with_delete() {
    let t = Setup::new();
    let dst = t.out.join("mirror");
    vmsync()
        .args(["-r", &t.src_slash(), &s(&dst)])
        .run()
        .assert_ok();

    // Change one file, add one, delete one (and its directory), and give
    // the destination a file of its own that an exclude protects.
    patch_file(&t.src.join("a.img"), 1000, &random_bytes(9, 4096));
    set_mtime_ns(&t.src.join("a.img"), SOURCE_MTIME_NS + 50);
    write_file(&t.src.join("sub/new.img"), &random_bytes(10, 50_000));
    fs::remove_file(t.src.join("sub/deep/c.img")).unwrap();
    fs::remove_dir(t.src.join("sub/deep")).unwrap();
    set_dir_mtime(&t.src.join("sub"), SOURCE_MTIME_NS + 7);
    write_file(&dst.join("sub/keep.tmp"), b"mine");
    write_file(&dst.join("stray.img"), b"stray");

    let (run, v) = vmsync()
        .args([
            "-r",
            "--delete",
            "--exclude",
            "*.tmp",
            &t.src_slash(),
            &s(&dst),
        ])
        .run_json();
    run.assert_ok();
    assert_tree_json(&run, &v, 4, 0);
    assert!(!json_bool(file(&v, "a.img"), "up_to_date"));
    assert!(json_u64(file(&v, "a.img"), "reused_bytes") > 200_000, "{v}");
    assert!(!json_bool(file(&v, "sub/new.img"), "up_to_date"));
    assert!(json_bool(file(&v, "sub/b.img"), "up_to_date"));
    assert!(json_bool(file(&v, "sparse.img"), "up_to_date"));
    let mut deleted: Vec<&str> = v["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    deleted.sort();
    assert_eq!(deleted, ["stray.img", "sub/deep", "sub/deep/c.img"]);
    assert_eq!(fs::read(dst.join("sub/keep.tmp")).unwrap(), b"mine");
    fs::remove_file(dst.join("sub/keep.tmp")).unwrap();
    // The excluded file's removal moved the directory's mtime.
    set_dir_mtime(&dst.join("sub"), SOURCE_MTIME_NS + 7);
    assert_same_tree(&t.src, &dst);
}

#[test]
fn include_and_exclude_apply_in_order_first_match_wins() {
    let t = Setup::new();
    write_file(&t.src.join("x.tmp"), b"x");
    write_file(&t.src.join("sub/y.tmp"), b"y");
    write_file(&t.src.join("sub/keep.tmp"), b"k");
    fs::create_dir(t.src.join("sub/cache")).unwrap();
    write_file(&t.src.join("sub/cache/z.img"), b"z");

    let dst = t.out.join("a");
    vmsync()
        .args(["-r", "--exclude", "*.tmp", "--exclude", "cache/"])
        .args([&t.src_slash(), &s(&dst)])
        .run()
        .assert_ok();
    assert!(!dst.join("x.tmp").exists() && !dst.join("sub/y.tmp").exists());
    assert!(!dst.join("sub/cache").exists(), "an excluded directory");
    assert!(dst.join("sub/b.img").exists());

    let dst = t.out.join("b");
    vmsync()
        .args(["-r", "--include", "keep.tmp", "--exclude", "*.tmp"])
        .args([&t.src_slash(), &s(&dst)])
        .run()
        .assert_ok();
    assert!(dst.join("sub/keep.tmp").exists());
    assert!(!dst.join("x.tmp").exists() && !dst.join("sub/y.tmp").exists());

    // Only images: directories are included so they can be entered.
    let dst = t.out.join("c");
    let (run, v) = vmsync()
        .args([
            "-r",
            "--include",
            "*.img",
            "--include",
            "*/",
            "--exclude",
            "*",
        ])
        .args([&t.src_slash(), &s(&dst)])
        .run_json();
    run.assert_ok();
    assert_eq!(json_u64(&v, "files_total"), 5, "{v}");
    assert!(!dst.join("outside").exists() && !dst.join("x.tmp").exists());
    assert_eq!(fs::read(dst.join("sub/cache/z.img")).unwrap(), b"z");

    // A bad pattern is a usage error before anything is done.
    let run = vmsync()
        .args([
            "-r",
            "--exclude",
            "a/[b",
            &t.src_slash(),
            &s(&t.out.join("d")),
        ])
        .run();
    run.assert_code(exit::USAGE);
    assert!(!t.out.join("d").exists());
}

#[test]
fn push_and_pull_through_the_relay() {
    let t = Setup::new();
    let relay = Relay::new(t.tmp.path(), "");
    let dst = t.out.join("pushed");
    let remote = |p: &Path| format!("127.0.0.1:{}", p.display());
    let (run, v) = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .args(["-r", "--delete", &t.src_slash(), &remote(&dst)])
        .run_json();
    run.assert_ok();
    assert_tree_json(&run, &v, FILES.len(), 0);
    assert_same_tree(&t.src, &dst);

    let pulled = t.out.join("pulled");
    let (run, v) = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .args(["-r", &remote(&t.src), &s(&pulled)])
        .run_json();
    run.assert_ok();
    assert_tree_json(&run, &v, FILES.len(), 0);
    assert_eq!(dir_entries(&pulled), ["src"]);
    assert_same_tree(&t.src, &pulled.join("src"));
    relay.wait_server_gone();

    // Remote to remote stays refused.
    let run = vmsync().args(["-r", &remote(&t.src), &remote(&dst)]).run();
    run.assert_code(exit::USAGE);
}

#[test]
fn push_check_and_pull_over_sshd() {
    let Some(sshd) = Sshd::start() else { return };
    let t = Setup::new();
    let dst = t.out.join("remote");
    let over = |args: &[&str]| {
        let (run, v) = vmsync().args(sshd.args()).args(args).run_json();
        if run.code != exit::OK && run.code != exit::DIFFERENT {
            eprintln!("sshd log:\n{}", sshd.log());
        }
        (run, v)
    };
    let remote = sshd.remote(&dst);
    let (run, v) = over(&["-r", &t.src_slash(), &remote]);
    run.assert_ok();
    assert_tree_json(&run, &v, FILES.len(), 0);
    assert_same_tree(&t.src, &dst);

    let (run, v) = over(&["-r", "--check", &t.src_slash(), &remote]);
    run.assert_ok();
    assert_eq!(v["identical"], Value::Bool(true), "{v}");

    patch_file(&dst.join("sub/b.img"), 10, b"changed");
    write_file(&dst.join("extra.img"), b"extra");
    let (run, v) = over(&["-r", "--check", &t.src_slash(), &remote]);
    run.assert_code(exit::DIFFERENT);
    assert_eq!(v["identical"], Value::Bool(false), "{v}");
    let paths: Vec<&str> = v["differing_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["extra.img", "sub/b.img"], "{v}");
    assert!(run.stdout.contains("sub/b.img"));

    let pulled = t.out.join("pulled");
    let (run, _) = over(&["-r", "--delete", &format!("{remote}/"), &s(&pulled)]);
    run.assert_ok();
    assert_same_tree(&dst, &pulled);
}

#[test]
fn one_failing_file_does_not_stop_the_others_and_exits_23() {
    let t = Setup::new();
    // A file where a directory belongs: everything beneath it fails.
    let dst = t.out.join("blocked");
    fs::create_dir(&dst).unwrap();
    write_file(&dst.join("sub"), b"in the way");
    let (run, v) = vmsync().args(["-r", &t.src_slash(), &s(&dst)]).run_json();
    run.assert_code(23);
    assert_tree_json(&run, &v, FILES.len(), 2);
    for f in ["sub/b.img", "sub/deep/c.img"] {
        let e = file(&v, f);
        assert_eq!(e["exit_code"], 3, "{e}");
        assert!(e["error"].as_str().unwrap().contains("sub"), "{e}");
    }
    assert_content(&dst.join("sub"), b"in the way");
    for f in ["a.img", "sparse.img"] {
        assert!(file(&v, f)["error"].is_null());
        assert_same_content(&t.src.join(f), &dst.join(f));
    }
    assert!(run.stderr.contains("partial transfer"), "{run}");

    // An unreadable file (vmsync runs as nobody when we are root).
    fs::set_permissions(t.src.join("sub/b.img"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(t.src.join("sub"), fs::Permissions::from_mode(0o755)).unwrap();
    let dst = t.out.join("unreadable");
    let mut cmd = vmsync().args(["-r", "--delete", &t.src_slash(), &s(&dst)]);
    if let Some((uid, gid)) = unprivileged_user() {
        cmd = cmd.run_as(uid, gid);
    }
    let (run, v) = cmd.run_json();
    run.assert_code(23);
    assert_tree_json(&run, &v, FILES.len(), 1);
    let e = file(&v, "sub/b.img");
    assert_eq!(e["exit_code"], 3, "{e}");
    assert!(e["error"].as_str().unwrap().contains("b.img"), "{e}");
    assert!(!dst.join("sub/b.img").exists());
    for f in ["a.img", "sparse.img", "sub/deep/c.img"] {
        assert_same_content(&t.src.join(f), &dst.join(f));
    }
}

#[test]
fn check_compares_every_file_and_the_layout() {
    let t = Setup::new();
    let dst = t.out.join("mirror");
    vmsync()
        .args(["-r", &t.src_slash(), &s(&dst)])
        .run()
        .assert_ok();
    let check = || {
        vmsync()
            .args(["-r", "--check", &t.src_slash(), &s(&dst)])
            .run_json()
    };
    let (run, v) = check();
    run.assert_ok();
    assert_tree_json(&run, &v, FILES.len(), 0);
    assert_eq!(v["identical"], Value::Bool(true));
    // Same size and mtime, other bytes: a check reads them anyway.
    patch_file(&dst.join("a.img"), 5, b"X");
    fs::remove_file(dst.join("sub/deep/c.img")).unwrap();
    fs::remove_file(dst.join("sub/inside")).unwrap();
    std::os::unix::fs::symlink("elsewhere", dst.join("sub/inside")).unwrap();
    let (run, v) = check();
    run.assert_code(exit::DIFFERENT);
    let diffs: Vec<(String, String)> = v["differing_paths"]
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
    let paths: Vec<&str> = diffs.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["a.img", "sub/deep/c.img", "sub/inside"], "{v}");
    assert!(diffs[0].1.contains("1 range"), "{diffs:?}");
    assert!(diffs[1].1.contains("missing"), "{diffs:?}");
    // Nothing was changed by checking.
    assert_eq!(
        fs::read_link(dst.join("sub/inside")).unwrap(),
        Path::new("elsewhere")
    );
}

#[test]
fn a_directory_without_r_is_refused_with_a_hint() {
    let t = Setup::new();
    let run = vmsync().args([&s(&t.src), &s(&t.out.join("x"))]).run();
    run.assert_code(exit::IO);
    assert!(
        run.stderr.contains("is a directory") && run.stderr.contains("-r"),
        "{run}"
    );
    // -r on a single file is the single-file sync.
    let (run, v) = vmsync()
        .args([
            "-r",
            &s(&t.src.join("a.img")),
            &format!("{}/", t.out.display()),
        ])
        .run_json();
    run.assert_ok();
    assert_eq!(json_u64(&v, "files_total"), 1);
    assert_same_content(&t.src.join("a.img"), &t.out.join("a.img"));
}

/// A confined server (`--server --root DIR`, started by a stand-in for ssh):
/// listing, creating and deleting stay beneath DIR, and a symlink in the
/// served tree that points out is replaced or deleted, never followed.
#[test]
fn confined_server_lists_and_applies_only_beneath_its_root() {
    let t = Setup::new();
    let root = t.tmp.path().join("root");
    let outside = t.tmp.path().join("outside");
    fs::create_dir_all(root.join("tree")).unwrap();
    fs::create_dir(&outside).unwrap();
    write_file(&outside.join("secret.img"), b"secret");
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
    let outside_before = entries(&outside);
    let outside_mode = fs::metadata(&outside).unwrap().mode();
    // Links out of the served tree, where the source has a directory, a
    // file, a link, and nothing (deleted with --delete).
    for name in ["sub", "a.img", "outside", "gone"] {
        std::os::unix::fs::symlink(&outside, root.join("tree").join(name)).unwrap();
    }
    let rsh = format!(
        "sh -c 'exec \"$0\" --server --root \"$1\"' {} {}",
        bin().display(),
        root.display()
    );
    let run = vmsync()
        .args(["-e", &rsh, "-r", "--delete", &t.src_slash(), "h:tree"])
        .run();
    run.assert_ok();
    assert_same_tree(&t.src, &root.join("tree"));
    assert_eq!(entries(&outside), outside_before, "nothing changed outside");
    assert_eq!(fs::metadata(&outside).unwrap().mode(), outside_mode);

    // Paths that lead out are refused, for listing and for changing.
    let away = format!("h:{}", outside.display());
    for (src, dst) in [
        (t.src_slash(), away.clone()),
        (t.src_slash(), "h:tree/../../outside".to_string()),
        (format!("{away}/"), s(&t.out.join("x"))),
    ] {
        let run = vmsync().args(["-e", &rsh, "-r", &src, &dst]).run();
        run.assert_code(exit::USAGE);
        assert!(run.stderr.contains("outside the directory"), "{run}");
    }
    assert_eq!(entries(&outside), outside_before);
    assert!(!t.out.join("x").exists());
}

/// The `Apply` role spoken directly to a confined server, as a hostile
/// client might: nothing it asks for reaches outside the root, and
/// `--read-only` refuses it outright.
#[test]
fn apply_operations_never_follow_links_out_of_the_root() {
    use vmsync::wire::{attrs, FrameReader, FrameWriter, Msg, Op, Open, Role};
    let tmp = tempdir();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(root.join("tree")).unwrap();
    fs::create_dir(&outside).unwrap();
    write_file(&outside.join("secret"), b"secret");
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("tree/link")).unwrap();
    let before = (entries(&outside), fs::metadata(&outside).unwrap().mode());

    let serve = |extra: &[&str], ops: Vec<Op>| -> (Vec<Msg>, i32) {
        let mut child = Command::new(bin())
            .args(["--server", "--root"])
            .arg(&root)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .env("VMSYNC_CACHE_DIR", cache_dir())
            .spawn()
            .unwrap();
        let mut w = FrameWriter::new(child.stdin.take().unwrap(), "server");
        let mut r = FrameReader::new(child.stdout.take().unwrap(), "server");
        w.write_hello().unwrap();
        r.read_hello().unwrap();
        w.send_now(&Msg::Open(Open {
            role: Role::Apply,
            flags: 0,
            compress_level: 0,
            chunking: 65536,
            path: b"tree".to_vec(),
            source_name: Vec::new(),
            timeout_secs: 0,
            bwlimit: 0,
            sample: None,
            seeds: Vec::new(),
        }))
        .unwrap();
        let mut got = Vec::new();
        if w.send_now(&Msg::Apply(ops)).is_ok() {
            match r.read_msg() {
                Ok(m) => got.push(m),
                Err(e) => got.push(Msg::Error {
                    exit: 0,
                    message: format!("{e:#}"),
                }),
            }
            let _ = w.send_now(&Msg::End);
        }
        drop(w);
        let mut rest = Vec::new();
        let _ = child.stdout.take().map(|mut o| o.read_to_end(&mut rest));
        let code = child.wait().unwrap().code().unwrap_or(-1);
        (got, code)
    };
    let p = |s: &str| s.as_bytes().to_vec();
    let attrs_op = |path: &str| Op::Attrs {
        path: p(path),
        which: attrs::MODE | attrs::MTIME,
        mode: 0o777,
        uid: 0,
        gid: 0,
        mtime_sec: 1,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    let ops = vec![
        attrs_op("link"),
        attrs_op("link/secret"),
        Op::Delete {
            path: p("link/secret"),
        },
        Op::Mkdir {
            path: p("link/new"),
            mode: 0o755,
        },
        Op::Symlink {
            path: p("link/new-link"),
            target: p("/"),
        },
        Op::Delete { path: p("link") },
    ];
    let (got, code) = serve(&[], ops);
    assert_eq!(code, 0, "{got:?}");
    let Some(Msg::Applied(results)) = got.first() else {
        panic!("no APPLIED: {got:?}")
    };
    let status: Vec<u8> = results.iter().map(|r| r.status).collect();
    assert_eq!(status, [0, 3, 3, 3, 3, 0], "{results:?}");
    assert!(
        fs::symlink_metadata(root.join("tree/link")).is_err(),
        "the link itself is deleted"
    );
    assert_eq!(
        (entries(&outside), fs::metadata(&outside).unwrap().mode()),
        before
    );

    // A path with `..` does not even decode; read-only refuses the role.
    let (got, _) = serve(&[], vec![Op::Delete { path: p("../x") }]);
    assert!(!matches!(got.first(), Some(Msg::Applied(_))), "{got:?}");
    let (got, code) = serve(
        &["--read-only"],
        vec![Op::Mkdir {
            path: p("d"),
            mode: 0o755,
        }],
    );
    assert_eq!(code, exit::USAGE, "{got:?}");
    assert!(!root.join("tree/d").exists());
    assert_eq!(
        (entries(&outside), fs::metadata(&outside).unwrap().mode()),
        before
    );
    let _ = std::io::stdout().flush();
}
