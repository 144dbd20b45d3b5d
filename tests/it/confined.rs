//! A server confined by an admin: `vmsync --server --root DIR [--read-only]`
//! as the forced command of the client's key in a real sshd's
//! authorized_keys (issue 4, case 9). Whatever path the client names, nothing
//! outside DIR is read or written: `..`, absolute paths elsewhere, symlinks
//! that lead out, and names with control characters are refused; a symlink
//! at the destination is replaced, never written through.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::common::*;

/// One confined sshd and its directories: `root` (served), `outside` (holds
/// a sentinel that must never change) and the source image.
struct Confined {
    sshd: Sshd,
    pair: Pair,
    root: PathBuf,
    outside: PathBuf,
    sentinel: PathBuf,
    sentinel_bytes: Vec<u8>,
}

const SENTINEL: &str = "sentinel.img";

impl Confined {
    /// `None` when SSH tests are skipped.
    fn start(extra: &str) -> Option<Confined> {
        let sshd = Sshd::start()?;
        let pair = Pair::new();
        pair.write_src(&mixed_bytes(21, (3 * MIB) as usize));
        let root = pair.dst_dir();
        let outside = pair.tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let sentinel = outside.join(SENTINEL);
        let sentinel_bytes = random_bytes(22, MIB as usize);
        write_file(&sentinel, &sentinel_bytes);
        sshd.force_command(&format!(
            "{} --server --root {} {extra}",
            bin().display(),
            root.display()
        ));
        Some(Confined {
            sshd,
            pair,
            root,
            outside,
            sentinel,
            sentinel_bytes,
        })
    }

    fn run(&self, extra: &[&str], src: &str, dst: &str) -> Run {
        let run = vmsync()
            .args(self.sshd.args())
            .args(extra)
            .args([src, dst])
            .run();
        assert_no_panic(&run);
        run
    }

    fn push(&self, extra: &[&str], remote_path: &str) -> Run {
        self.run(
            extra,
            &self.pair.src.display().to_string(),
            &format!("127.0.0.1:{remote_path}"),
        )
    }

    fn pull(&self, remote_path: &str, local: &Path) -> Run {
        self.run(
            &[],
            &format!("127.0.0.1:{remote_path}"),
            &local.display().to_string(),
        )
    }

    /// The sentinel outside the root is byte-identical and nothing new
    /// appeared beside it.
    #[track_caller]
    fn assert_outside_untouched(&self) {
        assert_content(&self.sentinel, &self.sentinel_bytes);
        assert!(
            !fs::symlink_metadata(&self.sentinel)
                .unwrap()
                .file_type()
                .is_symlink(),
            "sentinel replaced"
        );
        assert_eq!(
            dir_entries(&self.outside),
            [SENTINEL],
            "files appeared outside the root"
        );
    }

    #[track_caller]
    fn assert_refused(&self, run: &Run, words: &str) {
        run.assert_code(exit::USAGE);
        assert!(
            run.stderr.contains(words) && run.stderr.contains("127.0.0.1"),
            "the refusal names the host and says '{words}':\n{run}"
        );
        self.assert_outside_untouched();
    }
}

macro_rules! confined {
    ($extra:expr) => {
        match Confined::start($extra) {
            Some(c) => c,
            None => return,
        }
    };
}

#[test]
fn paths_inside_the_root_work_absolute_relative_and_as_a_directory() {
    let c = confined!("");
    // Absolute, under the root.
    c.push(&[], &c.root.join("disk.img").display().to_string())
        .assert_ok();
    assert_same_content(&c.pair.src, &c.root.join("disk.img"));
    // Relative to the root.
    c.push(&[], "sub.img").assert_ok();
    assert_same_content(&c.pair.src, &c.root.join("sub.img"));
    // The root itself as the destination directory: the source's name.
    fs::remove_file(c.root.join("disk.img")).unwrap();
    c.push(&[], "").assert_ok();
    assert_same_content(&c.pair.src, &c.root.join("disk.img"));
    // `..` that stays beneath the root, and a symlink that stays inside.
    fs::create_dir(c.root.join("a")).unwrap();
    symlink("a", c.root.join("current")).unwrap();
    c.push(&[], "a/../current/x.img").assert_ok();
    assert_same_content(&c.pair.src, &c.root.join("a/x.img"));
    // Pull and check through the same confinement.
    let back = c.pair.tmp.path().join("back.img");
    c.pull("a/x.img", &back).assert_ok();
    assert_same_content(&c.pair.src, &back);
    c.push(&["--check"], "current/x.img").assert_ok();
    c.assert_outside_untouched();
}

#[test]
fn dot_dot_and_absolute_paths_outside_the_root_are_refused() {
    let c = confined!("");
    let outside = c.outside.display().to_string();
    for path in [
        format!("../outside/{SENTINEL}"),
        "../outside/new.img".to_string(),
        format!("{outside}/{SENTINEL}"),
        format!("{}/../outside/{SENTINEL}", c.root.display()),
        "/etc/passwd".to_string(),
        "..".to_string(),
    ] {
        let run = c.push(&[], &path);
        c.assert_refused(&run, "outside the directory this server is confined to");
        let run = c.push(&["--inplace"], &path);
        c.assert_refused(&run, "outside the directory");
    }
    // Reading is confined too: neither a sentinel nor /etc/passwd is served.
    let back = c.pair.tmp.path().join("back.img");
    for path in [format!("../outside/{SENTINEL}"), "/etc/passwd".to_string()] {
        let run = c.pull(&path, &back);
        c.assert_refused(&run, "outside the directory");
        assert!(!back.exists(), "nothing pulled from {path}");
    }
    assert_eq!(
        dir_entries(&c.root),
        Vec::<String>::new(),
        "nothing written in the root"
    );
    // Seeds are read beneath the root too.
    let seed = format!("{}/{SENTINEL}", c.outside.display());
    for seed in [seed.as_str(), "../outside/sentinel.img"] {
        let run = c.push(&["--seed", seed], "disk.img");
        c.assert_refused(&run, "outside the directory");
    }
    assert_eq!(dir_entries(&c.root), Vec::<String>::new());
}

#[test]
fn symlinks_leading_out_of_the_root_are_not_followed() {
    let c = confined!("");
    // A directory link and a file link, both pointing outside.
    symlink(&c.outside, c.root.join("escape")).unwrap();
    symlink(&c.sentinel, c.root.join("disk.img")).unwrap();

    let run = c.push(&[], "escape/new.img");
    c.assert_refused(&run, "outside the directory");
    let run = c.push(&[], &format!("escape/{SENTINEL}"));
    c.assert_refused(&run, "outside the directory");
    let back = c.pair.tmp.path().join("back.img");
    let run = c.pull("disk.img", &back);
    c.assert_refused(&run, "outside the directory");

    // --inplace refuses to write through the link at the destination.
    let run = c.push(&["--inplace"], "disk.img");
    run.assert_code(exit::IO);
    assert!(run.stderr.contains("symlink"), "{run}");
    c.assert_outside_untouched();

    // The default mode replaces the link itself with the new file.
    c.push(&[], "disk.img").assert_ok();
    let meta = fs::symlink_metadata(c.root.join("disk.img")).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the link was replaced by a file"
    );
    assert_same_content(&c.pair.src, &c.root.join("disk.img"));
    c.assert_outside_untouched();
}

#[test]
fn control_characters_in_a_confined_path_are_refused() {
    let c = confined!("");
    for path in ["a\nb.img", "tab\there.img", "esc\x1b[31m.img"] {
        let run = c.push(&[], path);
        c.assert_refused(&run, "control character");
    }
    assert_eq!(dir_entries(&c.root), Vec::<String>::new());
}

#[test]
fn read_only_server_sends_and_checks_but_never_writes() {
    let c = confined!("--read-only");
    let old = random_bytes(23, (2 * MIB) as usize);
    let dst = c.root.join("disk.img");
    write_file(&dst, &old);
    for extra in [&[][..], &["--inplace"], &["--no-partial"]] {
        let run = c.push(extra, "disk.img");
        run.assert_code(exit::USAGE);
        assert!(run.stderr.contains("read-only"), "{run}");
        assert_content(&dst, &old);
    }
    let run = c.push(&[], "new.img");
    run.assert_code(exit::USAGE);
    assert_eq!(
        dir_entries(&c.root),
        ["disk.img"],
        "no file created, no partial left"
    );

    // Checking, dry runs and pulling are what a read-only key is for.
    let run = c.push(&["--check"], "disk.img");
    run.assert_code(exit::DIFFERENT);
    c.push(&["--dry-run"], "disk.img").assert_ok();
    assert_content(&dst, &old);
    assert_eq!(dir_entries(&c.root), ["disk.img"]);
    let back = c.pair.tmp.path().join("back.img");
    c.pull("disk.img", &back).assert_ok();
    assert_content(&back, &old);
    c.assert_outside_untouched();
}

#[test]
fn a_missing_root_is_a_clear_error_not_a_hang() {
    let c = confined!("");
    c.sshd.force_command(&format!(
        "{} --server --root {}/does-not-exist",
        bin().display(),
        c.root.display()
    ));
    let run = c.push(&[], "disk.img");
    run.assert_code(exit::IO);
    assert!(run.stderr.contains("does-not-exist"), "{run}");
    c.assert_outside_untouched();
}
