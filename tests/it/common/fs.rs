//! Real file systems for the write-mode tests (issue 12): a freshly made,
//! loop-mounted XFS (with reflink), btrfs or ext4 per test, and the probes
//! that tell what a write did to it.
//!
//! The reflink-clone and redo-journal modes only mean something on the file
//! systems they are for, so these tests cannot run on whatever `/tmp` is.
//! [`Scratch::new`] makes a sparse image under `/var/tmp` (a disk, unlike a
//! tmpfs `/tmp`), runs `mkfs` on it, attaches it to a loop device and mounts
//! it on a new directory; dropping the [`Scratch`] (also while a test
//! panics) unmounts it (lazily if it is still busy), detaches the device and
//! deletes the image.
//!
//! That needs root, `/dev/loop-control`, the `mkfs` tools (xfsprogs,
//! btrfs-progs, e2fsprogs; `.ci/test` installs them) and the kernel's file
//! system. Where one of them is missing, `new` prints `SKIPPED test: why` and
//! returns `None`, and the test returns early; under `VMSYNC_REQUIRE_LOOP=1`
//! (set by `.ci/test` where root and loop devices exist) it panics with why.
//!
//! The probes:
//! * [`Scratch::used`]: bytes in use on the file system (statvfs after
//!   syncfs), for "this write allocated about N bytes";
//! * [`shared_bytes`], [`extents`], [`physical_blocks`], [`moved_blocks`]:
//!   FIEMAP, for "these blocks are shared with the clone" and "exactly these
//!   blocks were rewritten";
//! * [`proc_write_bytes`], [`wait_write_bytes`]: a process's `write_bytes`
//!   from `/proc/PID/io`, for "this run wrote about N bytes to storage".
//!
//! Compiled into the benches too (through `common`'s `#[path]`), so it uses
//! only std, libc, rustix and tempfile.

use std::fmt;
use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::MIB;

/// A size that every [`Fs`] accepts and that leaves room for tests of some
/// tens of MiB (XFS alone wants at least 300 MiB). The image is sparse, so
/// only what the file system writes takes disk space.
pub const SCRATCH_SIZE: u64 = 512 * MIB;

/// The file systems the write modes are tested on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fs {
    /// XFS with `-m reflink=1`: FICLONE works.
    Xfs,
    /// btrfs (no compression): FICLONE works.
    Btrfs,
    /// ext4: no reflink, so the redo journal is what keeps writes safe.
    Ext4,
}

impl Fs {
    pub const ALL: [Fs; 3] = [Fs::Xfs, Fs::Btrfs, Fs::Ext4];

    /// The smallest image its `mkfs` accepts: mkfs.xfs refuses less than
    /// 300 MiB, mkfs.btrfs less than about 114 MiB.
    pub fn min_size(self) -> u64 {
        match self {
            Fs::Xfs => 300 * MIB,
            Fs::Btrfs => 128 * MIB,
            Fs::Ext4 => 16 * MIB,
        }
    }

    /// Whether FICLONE (`cp --reflink=always`) works on it.
    pub fn supports_reflink(self) -> bool {
        matches!(self, Fs::Xfs | Fs::Btrfs)
    }

    /// The mkfs command for `image`, quiet; and the package that has it.
    fn mkfs(self, image: &Path) -> (Command, &'static str) {
        let (tool, args, package): (_, &[&str], _) = match self {
            Fs::Xfs => ("mkfs.xfs", &["-q", "-f", "-m", "reflink=1"], "xfsprogs"),
            Fs::Btrfs => ("mkfs.btrfs", &["-q", "-f"], "btrfs-progs"),
            // Inode tables and journal written now, so no ext4lazyinit
            // thread writes behind the test's back after mounting.
            Fs::Ext4 => (
                "mkfs.ext4",
                &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
                "e2fsprogs",
            ),
        };
        let mut cmd = Command::new(tool);
        cmd.args(args).arg(image);
        (cmd, package)
    }
}

impl fmt::Display for Fs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fs::Xfs => "xfs",
            Fs::Btrfs => "btrfs",
            Fs::Ext4 => "ext4",
        })
    }
}

/// `cp --reflink=always SRC DST`: a clone, or a failure where the file
/// system cannot make one (its output says why).
pub fn reflink_copy(src: &Path, dst: &Path) -> std::process::Output {
    Command::new("cp")
        .arg("--reflink=always")
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .output()
        .expect("run cp")
}

/// A freshly made file system of kind `fs`, mounted on `mnt`; unmounted,
/// detached and deleted on drop.
pub struct Scratch {
    pub mnt: PathBuf,
    pub fs: Fs,
    image: PathBuf,
    dev: Option<PathBuf>,
    mounted: bool,
}

impl Scratch {
    /// A new file system of kind `fs` and `size` bytes (raised to
    /// [`Fs::min_size`]) on a loop device backed by a sparse file under
    /// `/var/tmp`, mounted with default options on a fresh directory.
    /// `None`, after `SKIPPED test: why` on stderr, where it cannot be made;
    /// a panic with why instead under `VMSYNC_REQUIRE_LOOP=1`.
    pub fn new(fs: Fs, size: u64, test: &str) -> Option<Scratch> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("vmsync-scratch-{}-{n}-{fs}", std::process::id());
        let mut s = Scratch {
            mnt: std::env::temp_dir().join(&name),
            fs,
            image: Path::new("/var/tmp").join(format!("{name}.img")),
            dev: None,
            mounted: false,
        };
        // On an error `s` drops here and undoes whatever was done.
        match s.make(size.max(fs.min_size())) {
            Ok(()) => Some(s),
            Err(why) => {
                if std::env::var("VMSYNC_REQUIRE_LOOP").as_deref() == Ok("1") {
                    panic!(
                        "{test}: a real {fs} file system is required (VMSYNC_REQUIRE_LOOP=1), \
                         but {why}"
                    );
                }
                eprintln!(
                    "SKIPPED {test}: no {fs} file system here ({why}); it needs root, \
                     loop devices, the mkfs tool and the kernel's {fs}"
                );
                None
            }
        }
    }

    fn make(&mut self, size: u64) -> Result<(), String> {
        let fs = self.fs;
        let image = File::create(&self.image)
            .map_err(|e| format!("cannot create {}: {e}", self.image.display()))?;
        image
            .set_len(size)
            .map_err(|e| format!("cannot size {}: {e}", self.image.display()))?;
        drop(image);

        let (mut mkfs, package) = fs.mkfs(&self.image);
        let tool = mkfs.get_program().to_string_lossy().into_owned();
        output(&mut mkfs).map_err(|e| match e {
            Failure::NotRun(e) => format!("{tool} cannot be run ({e}; it is in {package})"),
            Failure::Failed(msg) => format!("{tool} failed: {msg}"),
        })?;

        let dev = output(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&self.image),
        )
        .map_err(|e| format!("losetup --find --show: {e}"))?;
        let dev = PathBuf::from(dev.trim());
        if !dev.starts_with("/dev/") {
            return Err(format!("losetup attached {dev:?}"));
        }
        self.dev = Some(dev.clone());

        fs::create_dir(&self.mnt)
            .map_err(|e| format!("cannot create {}: {e}", self.mnt.display()))?;
        let mut mount = Command::new("mount");
        mount.arg("-t").arg(fs.to_string()).arg(&dev).arg(&self.mnt);
        let mut mounted = output(&mut mount);
        if mounted.is_err() && !kernel_has(fs) {
            // Not built in and its module not loaded yet.
            let _ = Command::new("modprobe")
                .arg(fs.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            mounted = output(&mut mount);
        }
        mounted.map_err(|e| {
            let loaded = if kernel_has(fs) {
                ""
            } else {
                " (not in /proc/filesystems, even after modprobe)"
            };
            format!("mount -t {fs} {}: {e}{loaded}", dev.display())
        })?;
        self.mounted = true;
        Ok(())
    }

    /// `name` inside the mounted file system.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// Bytes in use on the file system, `(f_blocks - f_bfree) * f_frsize`,
    /// after a syncfs so delayed allocations and CoW remaps are settled.
    pub fn used(&self) -> u64 {
        let dir = File::open(&self.mnt).expect("open the scratch mount point");
        rustix::fs::syncfs(&dir).expect("syncfs");
        let st = rustix::fs::statvfs(&self.mnt).expect("statvfs");
        (st.f_blocks - st.f_bfree) * st.f_frsize
    }

    pub fn supports_reflink(&self) -> bool {
        self.fs.supports_reflink()
    }

    /// The loop device it is mounted from (`/dev/loopN`).
    pub fn device(&self) -> &Path {
        self.dev.as_deref().expect("a made Scratch has a device")
    }

    /// The sparse image file behind the loop device.
    pub fn image(&self) -> &Path {
        &self.image
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Never panics: it may run while a test is already panicking.
        if self.mounted {
            let quiet = |args: &[&str]| {
                Command::new("umount")
                    .args(args)
                    .arg(&self.mnt)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            };
            // Busy (a child still holds a file open): detach it now, the
            // kernel finishes when the last user lets go.
            if !quiet(&[]) && !quiet(&["-l"]) {
                eprintln!("warning: cannot unmount {}", self.mnt.display());
                return; // leave the rest, rather than delete files on it
            }
        }
        if let Some(dev) = &self.dev {
            // On a device still in use after a lazy unmount this sets
            // autoclear: the kernel detaches it once the mount is gone.
            let ok = Command::new("losetup")
                .arg("-d")
                .arg(dev)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                eprintln!("warning: cannot detach {}", dev.display());
            }
        }
        let _ = fs::remove_file(&self.image);
        let _ = fs::remove_dir(&self.mnt);
    }
}

enum Failure {
    NotRun(std::io::Error),
    Failed(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NotRun(e) => write!(f, "cannot be run ({e})"),
            Failure::Failed(msg) => f.write_str(msg),
        }
    }
}

/// Runs `cmd` to completion; its stdout, or why it failed (with its stderr).
fn output(cmd: &mut Command) -> Result<String, Failure> {
    let out = cmd.stdin(Stdio::null()).output().map_err(Failure::NotRun)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(Failure::Failed(format!("{}: {}", out.status, err.trim())))
    }
}

/// Whether the running kernel knows `fs` (built in or module loaded).
fn kernel_has(fs: Fs) -> bool {
    let name = fs.to_string();
    fs::read_to_string("/proc/filesystems")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().last() == Some(&name))
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// FIEMAP: which physical blocks hold a file
// ---------------------------------------------------------------------------

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: u64 = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
/// Extents asked for per ioctl.
const BATCH: usize = 64;

/// `struct fiemap` (linux/fiemap.h) followed by room for [`BATCH`] extents.
#[repr(C)]
struct FiemapBuf {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    extents: [FiemapExtent; BATCH],
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// One extent: file offset, disk offset, length, FIEMAP_EXTENT_* flags.
#[derive(Clone, Copy, Debug)]
struct Extent {
    logical: u64,
    physical: u64,
    len: u64,
    flags: u32,
}

/// Every extent of `path`, after flushing its dirty data (FIEMAP_FLAG_SYNC),
/// so delayed allocations have their real blocks.
fn fiemap(path: &Path) -> Vec<Extent> {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        let mut buf = FiemapBuf {
            fm_start: start,
            fm_length: u64::MAX - start,
            fm_flags: FIEMAP_FLAG_SYNC,
            fm_mapped_extents: 0,
            fm_extent_count: BATCH as u32,
            fm_reserved: 0,
            extents: [FiemapExtent::default(); BATCH],
        };
        // SAFETY: `buf` is a `struct fiemap` with room for the
        // `fm_extent_count` extents the kernel may fill in, and lives
        // across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut buf) };
        if rc != 0 {
            panic!(
                "FIEMAP on {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        let got = &buf.extents[..buf.fm_mapped_extents as usize];
        out.extend(got.iter().map(|e| Extent {
            logical: e.fe_logical,
            physical: e.fe_physical,
            len: e.fe_length,
            flags: e.fe_flags,
        }));
        match got.last() {
            // No extents past `start` (an empty file, or holes to the end).
            None => break,
            Some(e) if e.fe_flags & FIEMAP_EXTENT_LAST != 0 => break,
            Some(e) => start = e.fe_logical + e.fe_length,
        }
    }
    out
}

/// `(shared, mapped)`: bytes of `path` in extents shared with another file
/// (FIEMAP_EXTENT_SHARED: a reflink clone or a snapshot), and all bytes in
/// its extents.
pub fn shared_bytes(path: &Path) -> (u64, u64) {
    let ext = fiemap(path);
    let shared = ext
        .iter()
        .filter(|e| e.flags & FIEMAP_EXTENT_SHARED != 0)
        .map(|e| e.len)
        .sum();
    (shared, ext.iter().map(|e| e.len).sum())
}

/// The extents of `path` as `(logical, physical, len)` in bytes.
pub fn extents(path: &Path) -> Vec<(u64, u64, u64)> {
    fiemap(path)
        .iter()
        .map(|e| (e.logical, e.physical, e.len))
        .collect()
}

/// The disk offset of each `block`-byte block of `path` (index = file
/// offset / `block`), `None` for a hole; as many entries as the file has
/// blocks.
pub fn physical_blocks(path: &Path, block: u64) -> Vec<Option<u64>> {
    let len = fs::metadata(path).unwrap().len();
    let mut map = vec![None; len.div_ceil(block) as usize];
    for e in fiemap(path) {
        assert!(
            e.logical % block == 0 && e.len % block == 0,
            "{}: extent {e:?} is not in {block}-byte blocks",
            path.display()
        );
        for i in 0..e.len / block {
            let idx = (e.logical / block + i) as usize;
            if idx < map.len() {
                map[idx] = Some(e.physical + i * block);
            }
        }
    }
    map
}

/// Indices of the `block`-byte blocks at which `a` and `b` are held by
/// different disk blocks (or one has a hole, or only one file reaches
/// there): after cloning `a` to `b` and rewriting some blocks of `b`,
/// exactly the rewritten ones.
pub fn moved_blocks(a: &Path, b: &Path, block: u64) -> Vec<u64> {
    let (pa, pb) = (physical_blocks(a, block), physical_blocks(b, block));
    (0..pa.len().max(pb.len()))
        .filter(|&i| pa.get(i).copied().flatten() != pb.get(i).copied().flatten())
        .map(|i| i as u64)
        .collect()
}

// ---------------------------------------------------------------------------
// Bytes a process wrote to storage
// ---------------------------------------------------------------------------

/// Bytes the process `pid` (with its threads and the children it has
/// reaped) has caused to be written to storage: `write_bytes` of
/// `/proc/PID/io`, counted in whole pages when they are dirtied. Metadata
/// counts too: the relatime atime update of the first exec of a binary in a
/// day dirties an inode block on the root file system (4 KiB), so allow a
/// few pages of slack. The process must not have been reaped yet: see
/// [`wait_write_bytes`]. For this test process it also counts the other
/// tests' threads, so measure a child instead.
pub fn proc_write_bytes(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/io");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("read {path}: {e} (the kernel needs CONFIG_TASK_IO_ACCOUNTING)")
    });
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no write_bytes in {path}:\n{text}"))
}

/// Waits for `child` to exit and returns its status with its
/// [`proc_write_bytes`], read while it is a zombie (waitid WNOWAIT), so
/// everything it wrote up to its exit is counted and nothing after.
pub fn wait_write_bytes(child: &mut Child) -> (ExitStatus, u64) {
    use rustix::process::{waitid, Pid, WaitId, WaitIdOptions};
    let pid = Pid::from_raw(child.id() as i32).expect("child pid");
    loop {
        match waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        ) {
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => panic!("waitid for child {pid:?}: {e}"),
        }
    }
    let written = proc_write_bytes(child.id());
    (child.wait().expect("reap child"), written)
}

/// A loop device over a backing file; detached on drop. (The crash and
/// write-mode tests use it for block-device destinations.)
pub struct LoopDev(pub PathBuf);

impl LoopDev {
    /// Attaches `backing`; `None` (after saying why) where loop devices
    /// cannot be used, a panic there under `VMSYNC_REQUIRE_LOOP=1`.
    pub fn attach(backing: &Path, test: &str) -> Option<LoopDev> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .stdin(Stdio::null())
            .output();
        let why = match out {
            Ok(o) if o.status.success() => {
                let dev = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
                assert!(dev.starts_with("/dev/"), "losetup attached {dev:?}");
                return Some(LoopDev(dev));
            }
            Ok(o) => format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("losetup cannot be run ({e})"),
        };
        if std::env::var("VMSYNC_REQUIRE_LOOP").as_deref() == Ok("1") {
            panic!("{test}: loop devices are required (VMSYNC_REQUIRE_LOOP=1), but {why}");
        }
        eprintln!("SKIPPED {test}: no loop devices here ({why})");
        None
    }

    /// The whole device.
    pub fn read(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap_or_else(|e| panic!("read {}: {e}", self.0.display()))
    }

    /// Writes `data` at the device's start, durably.
    pub fn write(&self, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.0)
            .unwrap();
        f.write_all_at(data, 0).unwrap();
        f.sync_all().unwrap();
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
