//! Block devices as source and destination, against the real binary, on
//! loop devices backed by files in a temporary directory.
//!
//! Attaching a loop device needs root and `/dev/loop-control`. Where that is
//! missing (`losetup` absent, `losetup -f` failing, as in most containers)
//! each test says so on stderr and passes, unless `VMSYNC_REQUIRE_LOOP=1`
//! makes it fail instead (CI, where loop devices must be tested). Every
//! device is detached by a drop guard, also when a test panics.
//!
//! The tests read and write the devices through their nodes, never through
//! the backing files (the device's page cache would hide such writes); the
//! backing files are only looked at for how much of them is allocated, which
//! shows whether zeros were written where the device already held zeros.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// A loop device attached to a backing file; detached on drop.
struct LoopDev {
    path: PathBuf,
}

impl LoopDev {
    /// Attaches `backing`; `None` (after saying why) where loop devices
    /// cannot be used, a panic there under `VMSYNC_REQUIRE_LOOP=1`.
    fn attach(backing: &Path, test: &str) -> Option<LoopDev> {
        let run = |args: &[&std::ffi::OsStr]| match Command::new("losetup").args(args).output() {
            Err(e) => Err(format!("losetup cannot be run ({e})")),
            Ok(o) if !o.status.success() => Err(format!(
                "losetup {} failed: {}",
                args[0].to_string_lossy(),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(o) => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        };
        let attached = run(&["-f".as_ref()])
            .and_then(|_| run(&["--find".as_ref(), "--show".as_ref(), backing.as_os_str()]));
        match attached {
            Ok(name) => {
                let path = PathBuf::from(name);
                assert!(path.starts_with("/dev/"), "losetup attached {path:?}");
                Some(LoopDev { path })
            }
            Err(why) => {
                if std::env::var("VMSYNC_REQUIRE_LOOP").as_deref() == Ok("1") {
                    panic!("{test}: loop devices are required (VMSYNC_REQUIRE_LOOP=1), but {why}");
                }
                eprintln!(
                    "SKIPPED {test}: no loop devices here ({why}); \
                     they need root and /dev/loop-control"
                );
                None
            }
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// `len` bytes of the device at `offset`.
fn read_dev(dev: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(dev).unwrap_or_else(|e| panic!("open {}: {e}", dev.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {}: {e}", dev.display()));
    buf
}

/// Writes `data` at `offset` of the device, through to the backing file.
fn write_dev(dev: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {}: {e}", dev.display()));
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// A backing file of `len` bytes: holes, with `extents` written.
fn backing(dir: &Path, name: &str, len: u64, extents: &[(u64, &[u8])]) -> PathBuf {
    let p = dir.join(name);
    sparse_file(&p, len, extents);
    p
}

/// Nothing vmsync could have left in `/dev` (a partial file or a copy).
#[track_caller]
fn assert_nothing_in_dev() {
    let stray: Vec<String> = dir_entries(Path::new("/dev"))
        .into_iter()
        .filter(|n| n.contains("vmsync"))
        .collect();
    assert!(stray.is_empty(), "vmsync left files in /dev: {stray:?}");
}

/// Bytes in the 4 KiB blocks of `data` that are not all zero.
fn nonzero_blocks(data: &[u8]) -> u64 {
    data.chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| b.len() as u64)
        .sum()
}

#[track_caller]
fn assert_error_names(run: &Run, v: &serde_json::Value, words: &[&str]) {
    let msg = v["error"].as_str().unwrap_or_default();
    for w in words {
        assert!(
            msg.contains(w) && run.stderr.contains(w),
            "the error does not mention {w:?}\n{run}"
        );
    }
}

#[test]
fn file_to_a_larger_device_writes_its_start_and_leaves_the_rest() {
    let tmp = tempdir();
    const N: usize = 24 << 20;
    const DEV: u64 = 32 << 20;
    // Source: data, mixed data with zero runs, a long zero run, data.
    let mut src_data = random_bytes(1, N);
    src_data[4 << 20..12 << 20].copy_from_slice(&mixed_bytes(2, 8 << 20));
    src_data[12 << 20..18 << 20].fill(0);
    let src = tmp.path().join("disk.img");
    write_file(&src, &src_data);
    // Device: old garbage under the first 8 MiB (where the source's zeros
    // must be made zeros), holes up to N, a tail that must stay as it is.
    let garbage = random_bytes(3, 8 << 20);
    let tail = random_bytes(4, (DEV as usize) - N);
    let back = backing(
        tmp.path(),
        "dev.img",
        DEV,
        &[(0, &garbage), (N as u64, &tail)],
    );
    let Some(dev) = LoopDev::attach(&back, "file_to_a_larger_device") else {
        return;
    };

    let (run, v) = vmsync().arg(&src).arg(&dev.path).run_json();
    run.assert_ok();
    assert_json_contract(&run, &v);
    assert_accounting(&v);
    assert_eq!(json_u64(&v, "source_bytes"), N as u64);
    assert!(!json_bool(&v, "up_to_date"));
    assert_eq!(read_dev(&dev.path, 0, N), src_data, "device start");
    assert_eq!(
        read_dev(&dev.path, N as u64, tail.len()),
        tail,
        "device tail"
    );
    assert_nothing_in_dev();
    assert_eq!(dir_entries(tmp.path()), ["dev.img", "disk.img"]);
    // Zeros were written only over the old garbage, never over holes: the
    // backing file holds the source's data blocks, the garbage range at
    // most, and the tail.
    sync_file(&back);
    let in_garbage = nonzero_blocks(&src_data[8 << 20..]) + (8 << 20);
    let limit = in_garbage + tail.len() as u64 + (256 << 10);
    assert!(
        allocated_bytes(&back) <= limit,
        "device backing file has {} bytes allocated, at most {limit} expected: zeros written over zeros",
        allocated_bytes(&back)
    );

    // Change 1 MiB of the source: about that much is sent.
    let patch = random_bytes(5, 1 << 20);
    patch_file(&src, 5 << 20, &patch);
    src_data[5 << 20..6 << 20].copy_from_slice(&patch);
    let (run, v) = vmsync().arg(&src).arg(&dev.path).run_json();
    run.assert_ok();
    assert_json_contract(&run, &v);
    assert_accounting(&v);
    let literal = json_u64(&v, "literal_bytes");
    assert!(
        (1 << 20..=2 << 20).contains(&literal),
        "literal_bytes {literal} for a 1 MiB change\n{v}"
    );
    assert!(json_u64(&v, "reused_bytes") >= 16 << 20, "{v}");
    assert_eq!(read_dev(&dev.path, 0, N), src_data, "device start");
    assert_eq!(
        read_dev(&dev.path, N as u64, tail.len()),
        tail,
        "device tail"
    );

    // Nothing changed: still compared by content, never "up to date".
    let (run, v) = vmsync().arg(&src).arg(&dev.path).run_json();
    run.assert_ok();
    assert!(!json_bool(&v, "up_to_date"), "quick check on a device\n{v}");
    assert_eq!(json_u64(&v, "literal_bytes"), 0, "{v}");

    // The device starts with the source: identical, whatever follows.
    let (run, v) = vmsync().arg("--check").arg(&src).arg(&dev.path).run_json();
    run.assert_ok();
    assert_json_contract(&run, &v);
    assert!(json_bool(&v, "identical"), "{v}");
    assert_nothing_in_dev();
}

#[test]
fn a_device_smaller_than_the_source_or_busy_or_forbidden_is_refused() {
    let tmp = tempdir();
    // Readable by `nobody` for the permission case below.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let old = random_bytes(10, 8 << 20);
    let back = backing(tmp.path(), "dev.img", 8 << 20, &[(0, &old)]);
    let src = tmp.path().join("disk.img");
    write_file(&src, &random_bytes(11, 12 << 20));
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
    let Some(dev) = LoopDev::attach(&back, "a_device_smaller_than_the_source") else {
        return;
    };
    let shown = dev.path.display().to_string();

    let (run, v) = vmsync().arg(&src).arg(&dev.path).run_json();
    run.assert_code(exit::IO);
    assert_json_contract(&run, &v);
    assert_error_names(&run, &v, &[&shown, "8388608", "12582912"]);
    assert_eq!(read_dev(&dev.path, 0, old.len()), old, "device changed");
    assert_nothing_in_dev();

    // In use (opened exclusively, as a mount or LVM does): refused too.
    let small = tmp.path().join("small.img");
    write_file(&small, &random_bytes(12, 1 << 20));
    let claim = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev.path)
        .expect("claim the device exclusively");
    let (run, v) = vmsync().arg(&small).arg(&dev.path).run_json();
    run.assert_code(exit::IO);
    assert_error_names(&run, &v, &[&shown, "in use"]);
    drop(claim);
    assert_eq!(read_dev(&dev.path, 0, old.len()), old, "device changed");

    // Not ours to open.
    if let Some((uid, gid)) = unprivileged_user() {
        let (run, v) = vmsync()
            .arg(&small)
            .arg(&dev.path)
            .run_as(uid, gid)
            .run_json();
        run.assert_code(exit::IO);
        assert_error_names(&run, &v, &[&shown]);
        assert_eq!(read_dev(&dev.path, 0, old.len()), old, "device changed");
    }
    assert_nothing_in_dev();
}

#[test]
fn device_source_to_a_file_keeps_zeros_as_holes() {
    let tmp = tempdir();
    const DEV: u64 = 16 << 20;
    let back = backing(tmp.path(), "dev.img", DEV, &[]);
    let Some(dev) = LoopDev::attach(&back, "device_source_to_a_file") else {
        return;
    };
    let dst_dir = tmp.path().join("dst");
    std::fs::create_dir(&dst_dir).unwrap();

    // An empty (all-zero) device: nothing sent, a sparse copy.
    let dst = dst_dir.join("zero.img");
    let (run, v) = vmsync().arg(&dev.path).arg(&dst).run_json();
    run.assert_ok();
    assert_json_contract(&run, &v);
    assert_accounting(&v);
    assert_eq!(json_u64(&v, "source_bytes"), DEV);
    assert_eq!(json_u64(&v, "literal_bytes"), 0, "{v}");
    assert_eq!(file_len(&dst), DEV);
    assert_content(&dst, &vec![0u8; DEV as usize]);
    sync_file(&dst);
    assert!(
        allocated_bytes(&dst) <= 64 << 10,
        "copy of an empty device has {} bytes allocated",
        allocated_bytes(&dst)
    );

    // Data in the middle: the copy equals the device, its zeros are holes.
    let data = mixed_bytes(20, 2 << 20);
    write_dev(&dev.path, 3 << 20, &data);
    let dst = dst_dir.join("disk.img");
    let (run, v) = vmsync().arg(&dev.path).arg(&dst).run_json();
    run.assert_ok();
    assert_accounting(&v);
    assert!(
        json_u64(&v, "literal_bytes") <= (2 << 20) + (512 << 10),
        "{v}"
    );
    let expected = read_dev(&dev.path, 0, DEV as usize);
    assert_eq!(file_len(&dst), DEV);
    assert_content(&dst, &expected);
    sync_file(&dst);
    assert!(
        allocated_bytes(&dst) <= (2 << 20) + (256 << 10),
        "{} bytes allocated for 2 MiB of data",
        allocated_bytes(&dst)
    );
    assert_no_stray_files(&dst_dir, &["disk.img", "zero.img"]);

    // Again, one byte changed on the device: a device source is never
    // "up to date" by size and time, and the change arrives.
    write_dev(
        &dev.path,
        (3 << 20) + 12345,
        &[!expected[(3 << 20) + 12345]],
    );
    let (run, v) = vmsync().arg(&dev.path).arg(&dst).run_json();
    run.assert_ok();
    assert!(!json_bool(&v, "up_to_date"), "{v}");
    assert!(json_u64(&v, "literal_bytes") > 0, "{v}");
    assert!(json_u64(&v, "reused_bytes") > 0, "{v}");
    assert_content(&dst, &read_dev(&dev.path, 0, DEV as usize));
}

#[test]
fn check_compares_a_device_with_a_file_either_way() {
    let tmp = tempdir();
    const DEV: u64 = 16 << 20;
    let mut content = mixed_bytes(30, DEV as usize);
    // Data around the byte changed below, so its range is one chunk (a
    // changed byte in a zero run marks the whole run).
    content[8 << 20..10 << 20].copy_from_slice(&random_bytes(31, 2 << 20));
    let back = backing(tmp.path(), "dev.img", DEV, &[(0, &content)]);
    let Some(dev) = LoopDev::attach(&back, "check_compares_a_device_with_a_file") else {
        return;
    };
    let file = tmp.path().join("disk.img");
    write_file(&file, &content);

    for (a, b) in [(&dev.path, &file), (&file, &dev.path)] {
        let (run, v) = vmsync().arg("--check").arg(a).arg(b).run_json();
        run.assert_ok();
        assert_json_contract(&run, &v);
        assert!(json_bool(&v, "identical"), "{v}");
        assert_eq!(json_u64(&v, "differing_bytes"), 0, "{v}");
    }

    let at: u64 = (9 << 20) + 777;
    write_dev(&dev.path, at, &[!content[at as usize]]);
    for (a, b) in [(&dev.path, &file), (&file, &dev.path)] {
        let (run, v) = vmsync().arg("--check").arg(a).arg(b).run_json();
        run.assert_code(exit::DIFFERENT);
        assert_json_contract(&run, &v);
        assert!(!json_bool(&v, "identical"), "{v}");
        let diffs = json_differences(&v);
        assert_eq!(diffs.len(), 1, "one changed byte, one range: {v}");
        let (offset, length) = diffs[0];
        assert!(
            offset <= at && at < offset + length && length <= 256 << 10,
            "the range {offset}+{length} does not locate offset {at}\n{v}"
        );
        assert_eq!(json_u64(&v, "differing_bytes"), length, "{v}");
    }
    assert_nothing_in_dev();
}

#[test]
fn a_second_sync_to_a_device_in_use_by_vmsync_exits_8() {
    use crate::peer::*;
    let tmp = tempdir();
    let back = backing(tmp.path(), "dev.img", 8 << 20, &[]);
    let Some(dev) = LoopDev::attach(&back, "a_second_sync_to_a_device") else {
        return;
    };
    let src = tmp.path().join("disk.img");
    write_file(&src, &random_bytes(40, 4 << 20));

    // The first sync: a server receiving into the device, kept waiting
    // after START (it holds the device's lock from before START).
    let first = Source::new(random_bytes(41, 3 << 20), 64 * 1024);
    let mut holder = Server::connect();
    let mode = holder.open_receive(open_receive(&dev.path), first.info());
    assert_eq!(mode, vmsync::wire::StartMode::Manifest);

    let (run, v) = vmsync().arg(&src).arg(&dev.path).run_json();
    run.assert_code(exit::LOCKED);
    assert_json_contract(&run, &v);
    assert_error_names(&run, &v, &[&dev.path.display().to_string(), "(pid "]);
    let (run, _) = vmsync().arg("--check").arg(&src).arg(&dev.path).run_json();
    run.assert_code(exit::LOCKED);

    // The first one completes undisturbed.
    for m in first.manifest() {
        let _ = holder.send(&m);
    }
    let _ = holder.send(&first.manifest_end());
    let end = answer_requests(&mut holder, &first, &mut Chunker::compressed(), |_| {});
    assert!(
        matches!(end, In::Msg(vmsync::wire::Msg::Done(_))),
        "{end:?}"
    );
    holder.finish().assert_code(0);
    assert_eq!(read_dev(&dev.path, 0, first.data.len()), first.data);

    // With the lock released, the second one goes through.
    vmsync().arg(&src).arg(&dev.path).run().assert_ok();
    assert_eq!(
        read_dev(&dev.path, 0, 4 << 20),
        std::fs::read(&src).unwrap()
    );
    assert_nothing_in_dev();
}

#[test]
fn verify_rereads_a_device_destination() {
    let tmp = tempdir();
    const SIZE: u64 = 8 << 20;
    let a_back = backing(
        tmp.path(),
        "a.img",
        SIZE,
        &[(0, &mixed_bytes(50, SIZE as usize))],
    );
    let b_back = backing(
        tmp.path(),
        "b.img",
        SIZE,
        &[(1 << 20, &random_bytes(51, 1 << 20))],
    );
    let Some(a) = LoopDev::attach(&a_back, "verify_rereads_a_device_destination") else {
        return;
    };
    let Some(b) = LoopDev::attach(&b_back, "verify_rereads_a_device_destination") else {
        return;
    };
    let src = tmp.path().join("disk.img");
    write_file(&src, &mixed_bytes(52, SIZE as usize));

    // File to a device of exactly its size.
    let (run, v) = vmsync().arg("--verify").arg(&src).arg(&b.path).run_json();
    run.assert_ok();
    assert_json_contract(&run, &v);
    assert!(json_bool(&v, "verified"), "{v}");
    assert_eq!(
        read_dev(&b.path, 0, SIZE as usize),
        std::fs::read(&src).unwrap()
    );

    // Device to device.
    let (run, v) = vmsync()
        .arg("--verify")
        .arg(&a.path)
        .arg(&b.path)
        .run_json();
    run.assert_ok();
    assert!(json_bool(&v, "verified"), "{v}");
    assert_eq!(
        read_dev(&b.path, 0, SIZE as usize),
        read_dev(&a.path, 0, SIZE as usize)
    );
    let (run, _) = vmsync().arg("--check").arg(&a.path).arg(&b.path).run_json();
    run.assert_ok();
    assert_nothing_in_dev();
}
