//! Every rsync option of the README's table (`src/app/rsync.rs`), run one
//! by one with the real binary and checked against what the table says:
//! "same" options do rsync's thing (asserted on bytes, inodes, modes,
//! times, attributes), "no-op" ones give the same result as leaving them
//! out, "refused" ones exit 2 with the table's words for what to use
//! instead. The table is read from the README itself, so a row without a
//! case here fails.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::common::*;
use serde_json::Value;

/// A source tree (`src/`) and where destinations go, in one tempdir.
struct Trees {
    tmp: tempfile::TempDir,
    src: PathBuf,
}

impl Trees {
    fn new() -> Trees {
        let tmp = tempdir();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        write_file(&src.join("a.img"), &random_bytes(1, 300_000));
        write_file(&src.join("sub/b.img"), &mixed_bytes(2, 200_000));
        write_file(&src.join("x.tmp"), b"scratch");
        std::os::unix::fs::symlink("a.img", src.join("link")).unwrap();
        fs::set_permissions(src.join("sub/b.img"), fs::Permissions::from_mode(0o640)).unwrap();
        for (i, f) in ["a.img", "sub/b.img", "x.tmp"].iter().enumerate() {
            set_mtime_ns(&src.join(f), SOURCE_MTIME_NS + i as i128);
        }
        Trees { tmp, src }
    }

    /// A fresh destination directory's path (not created).
    fn dst(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `vmsync ARGS src/ DST/`.
    fn sync(&self, args: &[&str], dst: &Path) -> Run {
        vmsync()
            .args(args)
            .arg(format!("{}/", self.src.display()))
            .arg(format!("{}/", dst.display()))
            .run()
    }

    fn sync_json(&self, args: &[&str], dst: &Path) -> (Run, Value) {
        vmsync()
            .args(args)
            .arg(format!("{}/", self.src.display()))
            .arg(format!("{}/", dst.display()))
            .run_json()
    }
}

/// (kind, mode, mtime, content or link text) of every entry beneath `root`.
fn snapshot(root: &Path) -> Vec<(String, String, u32, i128, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let rel = rel.join(name);
            let path = root.join(&rel);
            let m = fs::symlink_metadata(&path).unwrap();
            let t = m.file_type();
            let (kind, body) = if t.is_symlink() {
                (
                    "link",
                    fs::read_link(&path).unwrap().into_os_string().into_vec(),
                )
            } else if t.is_dir() {
                stack.push(rel.clone());
                ("dir", Vec::new())
            } else if t.is_file() {
                ("file", fs::read(&path).unwrap())
            } else if t.is_fifo() {
                ("fifo", Vec::new())
            } else {
                ("other", m.rdev().to_le_bytes().to_vec())
            };
            let mtime = if t.is_symlink() { 0 } else { mtime_ns(&path) };
            out.push((
                rel.display().to_string(),
                kind.to_string(),
                m.mode() & 0o7777,
                mtime,
                body,
            ));
        }
    }
    out.sort();
    out
}

use std::os::unix::ffi::OsStringExt;

#[track_caller]
fn assert_same_tree(a: &Path, b: &Path) {
    let (x, y) = (snapshot(a), snapshot(b));
    let names = |v: &[(String, String, u32, i128, Vec<u8>)]| {
        v.iter()
            .map(|e| format!("{} {} {:o} {}", e.0, e.1, e.2, e.3))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&x), names(&y), "{} vs {}", a.display(), b.display());
    for (e, f) in x.iter().zip(&y) {
        assert!(e.4 == f.4, "{}: contents differ", e.0);
    }
}

/// The flags of the README's table, in its order.
fn readme_flags() -> Vec<String> {
    let readme =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let b = readme.find("<!-- rsync-options:begin").expect("markers");
    let e = readme.find("<!-- rsync-options:end -->").expect("markers");
    let mut flags = Vec::new();
    for line in readme[b..e].lines().skip(3) {
        let first = line.split('|').nth(1).unwrap_or_default();
        for f in first.split(',') {
            flags.push(f.trim().trim_matches('`').to_string());
        }
    }
    assert!(flags.len() > 40, "{flags:?}");
    flags
}

/// A no-op option: the same tree and the same byte counts as without it.
fn no_op(flag: &str) {
    let t = Trees::new();
    let (plain, with) = (t.dst("plain"), t.dst("with"));
    let (r1, v1) = t.sync_json(&["-r"], &plain);
    r1.assert_ok();
    let (r2, v2) = t.sync_json(&["-r", flag], &with);
    r2.assert_ok();
    assert_same_tree(&t.src, &with);
    for key in [
        "literal_bytes",
        "reused_bytes",
        "source_bytes",
        "files_total",
    ] {
        assert_eq!(v1[key], v2[key], "{flag}: {key}");
    }
}

/// A refused option: exit 2, the table's words, nothing written.
fn refused(args: &[&str], instead: &str) {
    let t = Trees::new();
    let dst = t.dst("dst");
    let r = t.sync(args, &dst);
    r.assert_code(exit::USAGE);
    assert!(
        r.stderr.contains("is not supported:") && r.stderr.contains(instead),
        "{args:?}: {r}"
    );
    assert!(!dst.exists(), "{args:?}: wrote anyway");
}

fn check_flag(flag: &str) {
    match flag {
        "-a" | "--archive" | "-D" | "--specials" => {
            // -a is -r -D: a fifo is recreated as a fifo.
            let t = Trees::new();
            let fifo =
                std::ffi::CString::new(t.src.join("fifo").into_os_string().into_vec()).unwrap();
            // SAFETY: a NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
            let dst = t.dst("dst");
            let args: &[&str] = if flag.starts_with("-a") || flag == "--archive" {
                &[flag]
            } else {
                &["-r", flag]
            };
            t.sync(args, &dst).assert_ok();
            assert_same_tree(&t.src, &dst);
            assert!(fs::symlink_metadata(dst.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo());
        }
        "-r" | "--recursive" => {
            let t = Trees::new();
            let dst = t.dst("dst");
            t.sync(&[flag], &dst).assert_ok();
            assert_same_tree(&t.src, &dst);
        }
        "-l" | "-p" | "-t" | "-g" | "-o" | "--numeric-ids" | "-z" | "--compress" | "-P"
        | "--progress" | "--partial" | "-h" | "--human-readable" => no_op(flag),
        "-S" | "--sparse" => {
            no_op(flag);
            // Holes stay holes with or without it.
            let t = Trees::new();
            sparse_file(&t.src.join("hole.img"), 64 * MIB, &[(MIB, b"data")]);
            let dst = t.dst("dst");
            t.sync(&["-r", flag], &dst).assert_ok();
            assert_same_content(&t.src.join("hole.img"), &dst.join("hole.img"));
            assert!(allocated_bytes(&dst.join("hole.img")) <= 1024 * 1024);
        }
        "-H" | "--hard-links" => {
            let t = Trees::new();
            fs::hard_link(t.src.join("a.img"), t.src.join("sub/a-again.img")).unwrap();
            let dst = t.dst("dst");
            t.sync(&["-r", flag], &dst).assert_ok();
            assert_same_tree(&t.src, &dst);
            assert_eq!(
                inode(&dst.join("a.img")),
                inode(&dst.join("sub/a-again.img"))
            );
        }
        "-X" | "--xattrs" => {
            let t = Trees::new();
            xattr_set(&t.src.join("a.img"), "user.vmsync-test", b"one");
            xattr_set(&t.src.join("sub"), "user.dir", b"two");
            let dst = t.dst("dst");
            t.sync(&["-r", flag], &dst).assert_ok();
            assert_eq!(
                xattr_get(&dst.join("a.img"), "user.vmsync-test").as_deref(),
                Some(&b"one"[..])
            );
            assert_eq!(
                xattr_get(&dst.join("sub"), "user.dir").as_deref(),
                Some(&b"two"[..])
            );
            // Without it, none.
            let plain = t.dst("plain");
            t.sync(&["-r"], &plain).assert_ok();
            assert_eq!(xattr_get(&plain.join("a.img"), "user.vmsync-test"), None);
            // Nor one of vmsync's own (its lock names its holder on the
            // partial file that becomes the copy).
            assert_eq!(xattr_get(&plain.join("a.img"), "user.vmsync.holder"), None);
        }
        "-A" | "--acls" => {
            let t = Trees::new();
            let acl = "u:12345:r--";
            let set = std::process::Command::new("setfacl")
                .args(["-m", acl])
                .arg(t.src.join("a.img"))
                .status();
            match set {
                Ok(s) if s.success() => {}
                other => {
                    require_tool("setfacl", &format!("{other:?}"));
                    return;
                }
            }
            let dst = t.dst("dst");
            t.sync(&["-r", flag], &dst).assert_ok();
            let acl_of = |p: &Path| {
                let out = std::process::Command::new("getfacl")
                    .args(["-c", "-n"])
                    .arg(p)
                    .output()
                    .unwrap();
                String::from_utf8(out.stdout).unwrap()
            };
            let got = acl_of(&dst.join("a.img"));
            assert_eq!(got, acl_of(&t.src.join("a.img")));
            assert!(got.contains("user:12345:r--"), "{got}");
        }
        "--devices" => {
            if !rustix::process::geteuid().is_root() {
                require_tool("root", "device nodes need root");
                return;
            }
            let t = Trees::new();
            let null =
                std::ffi::CString::new(t.src.join("null").into_os_string().into_vec()).unwrap();
            // SAFETY: a NUL-terminated path; makedev(1, 3) is /dev/null's.
            assert_eq!(
                unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) },
                0
            );
            let dst = t.dst("dst");
            t.sync(&["-r", flag], &dst).assert_ok();
            let m = fs::symlink_metadata(dst.join("null")).unwrap();
            assert!(m.file_type().is_char_device());
            assert_eq!(m.rdev(), libc::makedev(1, 3));
        }
        "-x" | "--one-file-system" => {
            // Nothing is mounted inside this tree: all of it is copied
            // (tests/it/tree_rsync.rs mounts a tmpfs inside one).
            let t = Trees::new();
            let dst = t.dst("dst");
            t.sync(&["-r", flag], &dst).assert_ok();
            assert_same_tree(&t.src, &dst);
        }
        "--compress-level" => {
            let t = Trees::new();
            write_file(
                &t.src.join("log.txt"),
                &b"a line of a log file\n".repeat(20_000),
            );
            let (r, v) = t.sync_json(&["-r", "--compress-level", "0"], &t.dst("raw"));
            r.assert_ok();
            assert!(
                json_u64(&v, "wire_bytes") >= json_u64(&v, "literal_bytes"),
                "{v}"
            );
            let (r, v) = t.sync_json(&["-r", "--compress-level=19"], &t.dst("small"));
            r.assert_ok();
            assert!(
                json_u64(&v, "wire_bytes") < json_u64(&v, "literal_bytes"),
                "{v}"
            );
            // rsync's -z takes no value: `-z 3` makes 3 the source.
            let pair = Pair::new();
            pair.write_src(b"data");
            let r = vmsync()
                .args(["-z", "3"])
                .arg(&pair.src)
                .arg(&pair.dst)
                .run();
            r.assert_code(exit::USAGE);
        }
        "--info=progress2" => {
            let t = Trees::new();
            t.sync(&["-r", flag], &t.dst("dst")).assert_ok();
            assert_same_tree(&t.src, &t.dst("dst"));
            // stats1 is --stats; an unknown flag says which ones exist.
            let r = t.sync(&["-r", "--info=progress0,stats1"], &t.dst("stats"));
            r.assert_ok();
            assert!(r.stdout.contains("speed-up"), "{r}");
            let r = t.sync(&["-r", "--info=name2"], &t.dst("bad"));
            r.assert_code(exit::USAGE);
            assert!(r.stderr.contains("progress2"), "{r}");
        }
        "--inplace" => {
            let pair = Pair::new();
            // A small change: a journal (a big one would switch to a copy).
            let data = random_bytes(3, 1024 * 1024);
            pair.write_src(&data);
            let mut old = data.clone();
            old[5000..5100].fill(7);
            pair.write_dst(&old);
            let before = inode(&pair.dst);
            let (r, v) = vmsync()
                .arg("--inplace")
                .arg(&pair.src)
                .arg(&pair.dst)
                .run_json();
            r.assert_ok();
            pair.assert_synced();
            assert_eq!(v["write_mode"], "journal", "{v}");
            assert_eq!(inode(&pair.dst), before, "written in place");
        }
        "-W" | "--whole-file" => refused(&["-r", flag], "--write-mode copy"),
        "-b" | "--backup" => refused(&["-r", flag], "snapshot the destination"),
        "--backup-dir" => refused(&["-r", "--backup-dir", "/tmp"], "snapshot the destination"),
        "--rsync-path" => refused(&["-r", "--rsync-path", "rsync"], "--remote-path"),
        "--append" | "--append-verify" => refused(&["-r", flag], "partial file"),
        "-u" | "--update" => refused(&["-r", flag], "--exclude"),
        "--delete" | "--delete-after" | "--delete-delay" => {
            let t = Trees::new();
            let dst = t.dst("dst");
            t.sync(&["-r"], &dst).assert_ok();
            write_file(&dst.join("extra.img"), b"not in the source");
            let (r, v) = t.sync_json(&["-r", flag], &dst);
            r.assert_ok();
            assert!(!dst.join("extra.img").exists());
            assert_eq!(v["deleted"], serde_json::json!(["extra.img"]), "{v}");
            assert_same_tree(&t.src, &dst);
        }
        "--include" | "--exclude" => {
            let t = Trees::new();
            let dst = t.dst("dst");
            t.sync(&["-r", "--include", "keep.tmp", "--exclude", "*.tmp"], &dst)
                .assert_ok();
            assert!(!dst.join("x.tmp").exists() && dst.join("a.img").exists());
        }
        "--include-from" | "--exclude-from" => {
            let t = Trees::new();
            let rules = t.tmp.path().join("rules");
            fs::write(&rules, "# scratch files\n\n; and more\n*.tmp\nsub/\n").unwrap();
            let dst = t.dst("dst");
            let rules = rules.display().to_string();
            t.sync(&["-r", "--exclude-from", &rules], &dst).assert_ok();
            let mut names = dir_entries(&dst);
            names.sort();
            assert_eq!(names, ["a.img", "link"]);
            // An include read from a file comes first, in the place of its option.
            let keep = t.tmp.path().join("keep");
            fs::write(&keep, "x.tmp\n").unwrap();
            let dst2 = t.dst("dst2");
            let keep = keep.display().to_string();
            t.sync(
                &["-r", "--include-from", &keep, "--exclude-from", &rules],
                &dst2,
            )
            .assert_ok();
            assert!(dst2.join("x.tmp").exists() && !dst2.join("sub").exists());
            let r = t.sync(
                &["-r", "--exclude-from", "/nonexistent/rules"],
                &t.dst("no"),
            );
            r.assert_code(exit::USAGE);
            assert!(r.stderr.contains("/nonexistent/rules"), "{r}");
        }
        "--files-from" => {
            let t = Trees::new();
            let list = t.tmp.path().join("list");
            fs::write(&list, "sub/b.img\n/x.tmp\n").unwrap();
            let dst = t.dst("dst");
            t.sync(&["-r", "--files-from", &list.display().to_string()], &dst)
                .assert_ok();
            let mut names = dir_entries(&dst);
            names.sort();
            assert_eq!(names, ["sub", "x.tmp"]);
            assert_eq!(dir_entries(&dst.join("sub")), ["b.img"]);
            assert_same_content(&t.src.join("sub/b.img"), &dst.join("sub/b.img"));
            fs::write(&list, "../etc/passwd\n").unwrap();
            let r = t.sync(&["-r", "--files-from", &list.display().to_string()], &dst);
            r.assert_code(exit::USAGE);
        }
        "-i" | "--itemize-changes" => {
            let t = Trees::new();
            let dst = t.dst("dst");
            let r = t.sync(&["-r", flag], &dst);
            r.assert_ok();
            assert!(r.stdout.lines().any(|l| l == ">f+++++++++ a.img"), "{r}");
            assert!(r.stdout.lines().any(|l| l == "cd+++++++++ sub/"), "{r}");
            // Nothing changed: nothing to itemize.
            let r = t.sync(&["-r", flag], &dst);
            r.assert_ok();
            assert_eq!(r.stdout, "", "{r}");
            // One file, without -r: its line, then nothing.
            let one = t.dst("one");
            fs::create_dir(&one).unwrap();
            for want in [">f+++++++++ a.img\n", ""] {
                let r = vmsync()
                    .arg(flag)
                    .arg(t.src.join("a.img"))
                    .arg(format!("{}/", one.display()))
                    .run();
                r.assert_ok();
                assert_eq!(r.stdout, want, "{r}");
            }
            assert_same_content(&t.src.join("a.img"), &one.join("a.img"));
        }
        "-c" | "--checksum" | "-I" | "--ignore-times" => {
            // Same size and time, other bytes: only a content comparison
            // finds it.
            let t = Trees::new();
            let dst = t.dst("dst");
            t.sync(&["-r"], &dst).assert_ok();
            let mut bytes = fs::read(dst.join("a.img")).unwrap();
            bytes[1000] ^= 0xff;
            fs::write(dst.join("a.img"), &bytes).unwrap();
            set_mtime_ns(&dst.join("a.img"), mtime_ns(&t.src.join("a.img")));
            t.sync(&["-r"], &dst).assert_ok();
            assert!(
                fs::read(dst.join("a.img")).unwrap() == bytes,
                "quick check skips it"
            );
            t.sync(&["-r", flag], &dst).assert_ok();
            assert_same_tree(&t.src, &dst);
        }
        "-n" | "--dry-run" => {
            let t = Trees::new();
            let dst = t.dst("dst");
            let (r, v) = t.sync_json(&["-r", flag], &dst);
            r.assert_ok();
            assert!(!dst.exists());
            assert!(json_u64(&v, "literal_bytes") > 0, "{v}");
        }
        "-e" | "--rsh" => {
            // A remote shell that runs the command here, dropping the host:
            // proof that vmsync started the other end through it.
            let t = Trees::new();
            let rsh = t.tmp.path().join("rsh");
            fs::write(&rsh, "#!/bin/sh\nshift\nexec \"$@\"\n").unwrap();
            fs::set_permissions(&rsh, fs::Permissions::from_mode(0o755)).unwrap();
            let dst = t.dst("dst");
            vmsync()
                .args(["-r", flag])
                .arg(&rsh)
                .arg("--remote-path")
                .arg(bin())
                .arg(format!("{}/", t.src.display()))
                .arg(format!("somehost:{}/", dst.display()))
                .run()
                .assert_ok();
            assert_same_tree(&t.src, &dst);
        }
        "--bwlimit" => {
            let t = Trees::new();
            t.sync(&["-r", "--bwlimit", "100M"], &t.dst("dst"))
                .assert_ok();
            assert_same_tree(&t.src, &t.dst("dst"));
            t.sync(&["-r", "--bwlimit", "fast"], &t.dst("bad"))
                .assert_code(exit::USAGE);
        }
        "--timeout" => {
            let t = Trees::new();
            t.sync(&["-r", "--timeout", "60"], &t.dst("dst"))
                .assert_ok();
            t.sync(&["-r", "--timeout", "0"], &t.dst("bad"))
                .assert_code(exit::USAGE);
        }
        "--stats" => {
            let t = Trees::new();
            let r = t.sync(&["-r", flag], &t.dst("dst"));
            r.assert_ok();
            assert!(r.stdout.contains("speed-up"), "{r}");
        }
        "-v" => {
            let t = Trees::new();
            let r = t.sync(&["-r", flag], &t.dst("dst"));
            r.assert_ok();
            assert!(r.stderr.contains("a.img"), "{r}");
        }
        "-q" => {
            let t = Trees::new();
            let r = t.sync(&["-r", flag], &t.dst("dst"));
            r.assert_ok();
            assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""), "{r}");
        }
        other => panic!("the README's rsync table has {other}, which this test does not check"),
    }
}

/// Marks a test that needs a tool or privilege: a failure where the CI
/// requires everything, a skip elsewhere.
fn require_tool(what: &str, why: &str) {
    assert!(
        std::env::var_os("VMSYNC_REQUIRE_LOOP").is_none(),
        "{what} is needed: {why}"
    );
    eprintln!("skipping a case: {what}: {why}");
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

fn xattr_get(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::lgetxattr(path, name, &mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

#[test]
fn every_rsync_option_in_the_readme_does_what_it_says() {
    for flag in readme_flags() {
        check_flag(&flag);
    }
}

/// `-h` alone is rsync's way to ask for help.
#[test]
fn lone_h_prints_the_help() {
    let r = vmsync().arg("-h").run();
    r.assert_ok();
    assert!(r.stdout.contains("Usage: vmsync") && r.stdout.contains("--compress-level"));
}

/// The habit of a whole rsync command line: `-avhP --delete`.
#[test]
fn an_rsync_command_line_works_as_typed() {
    let t = Trees::new();
    let dst = t.dst("dst");
    t.sync(&["-avhP", "--delete", "--exclude=*.tmp"], &dst)
        .assert_ok();
    assert!(!dst.join("x.tmp").exists());
    assert_same_content(&t.src.join("a.img"), &dst.join("a.img"));
}
