//! The real-file-system harness (`common::fs`) checked against tools that
//! are known to work, before the write-mode tests of issue 12 rely on it:
//! `used()` grows by what a write allocates, a reflink clone shows as shared
//! extents that cost no space, rewriting one block of a clone moves exactly
//! that block, ext4 refuses to clone (so the fallback has somewhere to fall
//! back), and a child's `write_bytes` counts what it wrote.
//!
//! Each test makes its own file system and skips (or fails, under
//! `VMSYNC_REQUIRE_LOOP=1`) where it cannot; see `common::fs`.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::fs::*;
use crate::common::*;

const LEN: usize = 16 << 20;
const BLOCK: u64 = 4096;

#[track_caller]
fn assert_near(what: &str, got: u64, want: u64, slack: u64) {
    assert!(
        got.abs_diff(want) <= slack,
        "{what}: {got} bytes, expected {want} ± {slack}"
    );
}

fn used_grows_by_a_written_file(fs: Fs) {
    let test = format!("used_grows_by_a_written_file ({fs})");
    let Some(s) = Scratch::new(fs, SCRATCH_SIZE, &test) else {
        return;
    };
    let before = s.used();
    let a = s.path("a");
    write_file(&a, &random_bytes(1, LEN));
    sync_file(&a);
    let grew = s.used() - before;
    assert_near(&format!("{fs}: used() growth"), grew, LEN as u64, MIB);
    assert_eq!(std::fs::read(&a).unwrap(), random_bytes(1, LEN));
}

#[test]
fn xfs_used_grows_by_a_written_file() {
    used_grows_by_a_written_file(Fs::Xfs);
}

#[test]
fn btrfs_used_grows_by_a_written_file() {
    used_grows_by_a_written_file(Fs::Btrfs);
}

#[test]
fn ext4_used_grows_by_a_written_file() {
    used_grows_by_a_written_file(Fs::Ext4);
}

/// `cp --reflink=always src dst`, with its output.
fn clone_shares_every_block_until_one_is_rewritten(fs: Fs) {
    let test = format!("clone_shares_every_block ({fs})");
    let Some(s) = Scratch::new(fs, SCRATCH_SIZE, &test) else {
        return;
    };
    assert!(s.supports_reflink());
    let (a, b) = (s.path("a"), s.path("b"));
    let data = random_bytes(2, LEN);
    write_file(&a, &data);
    sync_file(&a);
    assert_eq!(
        shared_bytes(&a),
        (0, LEN as u64),
        "{fs}: a fresh file shares nothing"
    );

    let before = s.used();
    let out = reflink_copy(&a, &b);
    assert!(
        out.status.success(),
        "{fs}: cp --reflink=always failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grew = s.used() - before;
    assert!(grew < MIB, "{fs}: a clone of {LEN} bytes took {grew} bytes");
    assert_eq!(shared_bytes(&b), (LEN as u64, LEN as u64), "{fs}: clone");
    assert_eq!(shared_bytes(&a), (LEN as u64, LEN as u64), "{fs}: original");
    assert_eq!(moved_blocks(&a, &b, BLOCK), [] as [u64; 0], "{fs}: clone");

    // Rewrite one block in the middle of b: copy-on-write gives exactly that
    // block a new home, and a keeps its old one.
    let at = 5 * MIB + 3 * BLOCK;
    let new = random_bytes(3, BLOCK as usize);
    let f = OpenOptions::new().write(true).open(&b).unwrap();
    f.write_all_at(&new, at).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let old_a = extents(&a);
    assert_eq!(
        moved_blocks(&a, &b, BLOCK),
        [at / BLOCK],
        "{fs}: blocks of b on new disk blocks after rewriting block {}\na: {old_a:?}\nb: {:?}",
        at / BLOCK,
        extents(&b)
    );
    let (shared, mapped) = shared_bytes(&b);
    assert_eq!(
        (shared, mapped),
        (LEN as u64 - BLOCK, LEN as u64),
        "{fs}: b after the rewrite"
    );
    assert_eq!(std::fs::read(&a).unwrap(), data, "{fs}: a changed");
    let mut want = data;
    want[at as usize..(at + BLOCK) as usize].copy_from_slice(&new);
    assert_eq!(std::fs::read(&b).unwrap(), want, "{fs}: b");
}

#[test]
fn xfs_clone_shares_every_block_until_one_is_rewritten() {
    clone_shares_every_block_until_one_is_rewritten(Fs::Xfs);
}

#[test]
fn btrfs_clone_shares_every_block_until_one_is_rewritten() {
    clone_shares_every_block_until_one_is_rewritten(Fs::Btrfs);
}

#[test]
fn ext4_refuses_to_clone() {
    let Some(s) = Scratch::new(Fs::Ext4, SCRATCH_SIZE, "ext4_refuses_to_clone") else {
        return;
    };
    assert!(!s.supports_reflink());
    let (a, b) = (s.path("a"), s.path("b"));
    write_file(&a, &random_bytes(4, 1 << 20));
    let out = reflink_copy(&a, &b);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("clone"),
        "ext4: cp --reflink=always was expected to fail to clone: {:?} {err}",
        out.status
    );
    assert_eq!(shared_bytes(&a), (0, 1 << 20));
}

#[test]
fn a_childs_write_bytes_count_what_it_wrote() {
    for fs in Fs::ALL {
        let test = format!("a_childs_write_bytes ({fs})");
        let Some(s) = Scratch::new(fs, SCRATCH_SIZE, &test) else {
            continue;
        };
        let x = s.path("x");
        let mut child = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", x.display()))
            .args(["bs=1M", "count=8", "conv=fsync", "status=none"])
            .stdin(Stdio::null())
            .spawn()
            .expect("run dd");
        let (status, written) = wait_write_bytes(&mut child);
        assert!(status.success(), "{fs}: dd: {status}");
        assert_eq!(std::fs::metadata(&x).unwrap().len(), 8 * MIB);
        assert!(
            (8 * MIB..9 * MIB).contains(&written),
            "{fs}: dd wrote 8 MiB, /proc/PID/io says write_bytes {written}"
        );
    }

    // A child that writes no file counts at most a few metadata pages: the
    // first exec of `true` in a day updates its atime (relatime), and the
    // inode block that dirties counts 4 KiB.
    let mut idle = Command::new("true").spawn().expect("run true");
    let (status, written) = wait_write_bytes(&mut idle);
    assert!(status.success());
    assert!(written <= 16 * KIB, "write_bytes of `true`: {written}");
}

/// The file system type mounted exactly at `dir`, from /proc/self/mountinfo.
fn mount_type(dir: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_str().unwrap();
    info.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (left.split(' ').nth(4)? == dir).then(|| right.split(' ').next().unwrap().to_string())
    })
}

/// Whether loop device `dev` is (still) backed by `image`.
fn loop_backs(dev: &Path, image: &Path) -> bool {
    let name = dev.file_name().unwrap().to_str().unwrap();
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .map(|b| b.trim_end_matches('\n').trim_end_matches(" (deleted)") == image.to_str().unwrap())
        .unwrap_or(false)
}

#[test]
fn each_scratch_is_its_own_mount_and_leaves_nothing_behind() {
    for fs in Fs::ALL {
        let test = format!("each_scratch_is_its_own_mount ({fs})");
        let Some(s) = Scratch::new(fs, SCRATCH_SIZE, &test) else {
            continue;
        };
        assert_eq!(
            mount_type(&s.mnt).as_deref(),
            Some(fs.to_string().as_str()),
            "{fs}"
        );
        assert!(
            s.device().to_str().unwrap().starts_with("/dev/loop"),
            "{fs}: {:?}",
            s.device()
        );
        assert!(loop_backs(s.device(), s.image()), "{fs}: loop device");
        assert_eq!(s.supports_reflink(), fs != Fs::Ext4);
        let (mnt, dev, image) = (s.mnt.clone(), s.device().to_owned(), s.image().to_owned());
        // A file still open on it: the unmount has to be lazy.
        let busy = (fs == Fs::Btrfs).then(|| {
            write_file(&s.path("open"), b"held");
            std::fs::File::open(s.path("open")).unwrap()
        });
        drop(s);
        assert_eq!(
            mount_type(&mnt),
            None,
            "{fs}: still mounted on {}",
            mnt.display()
        );
        assert!(!mnt.exists(), "{fs}: mount point left");
        assert!(!image.exists(), "{fs}: image left");
        drop(busy);
        // Detaching a device that was busy finishes in the kernel's own time.
        let deadline = Instant::now() + Duration::from_secs(20);
        while loop_backs(&dev, &image) {
            assert!(
                Instant::now() < deadline,
                "{fs}: {} still attached",
                dev.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
