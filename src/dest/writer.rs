//! Writing the destination: atomically (temp file + rename) or in place.
//!
//! Only [`Verified`] data reaches the disk, and a `Verified` can only be made
//! by hashing the bytes and comparing with the manifest ([`verify`]); so the
//! writer cannot be handed an unchecked chunk by mistake.
//!
//! **Atomic** (default): a hidden partial file in the destination's
//! directory (`.NAME.vmsync-partial`), sized up front so untouched ranges stay
//! holes, written with all-zero 4 KiB blocks skipped, fsync'd, given the
//! source's mtime, renamed over the destination, and the directory fsync'd.
//! Until the rename the old destination is untouched. A run that fails or is
//! interrupted leaves the partial file for the next run to resume from
//! (removed instead with `--no-partial`); a resumed partial is written in
//! place, like `--inplace` but on the partial file.
//!
//! **In place**: writes into the existing file. Zero ranges are punched
//! (hole) rather than written. The receiver asks [`Output::is_dirty`] before
//! copying from the old contents, since a range already overwritten no longer
//! holds what the basis index says. An interrupted in-place run leaves a mix
//! of old and new data; the next run repairs it.
//!
//! **Block device** ([`Output::device`]): always in place, since there is
//! nothing to rename and no room beside it; nothing is created, truncated or
//! sized. It is opened with `O_EXCL`, which the kernel refuses (EBUSY) for a
//! device that is mounted or held by LVM, RAID or another exclusive user, so
//! a live filesystem is never written under. A device smaller than the
//! source is refused before anything is written; of a larger one only the
//! source's size is written. A hole cannot be left in a device, so zero
//! ranges are made to read as zeros, but only where the device does not
//! already hold zeros (read and compared first: reading is cheaper than
//! writing on most devices and keeps thin-provisioned volumes thin), by
//! `fallocate(PUNCH_HOLE)` where the device supports it, else by writing
//! zeros. The mtime of a device node is left alone.
//!
//! **Early writeback** (every mode): every 32 MiB written (`WRITEBACK_EVERY`),
//! the range written since the last time is handed to the disk with
//! `sync_file_range(SYNC_FILE_RANGE_WRITE)`, which starts writeback and does
//! not wait for it. Otherwise nothing reaches the disk until the kernel's
//! dirty thresholds are hit, and the whole file is written by the fsync in
//! [`Output::commit`], after everything else is done. It is only a head
//! start: durability still comes from that fsync, which is unchanged.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::content::chunk::is_zero;
use crate::content::hash::ChunkHash;
use crate::content::ranges::RangeSet;
use crate::error::{fail, Exit, WithExit};
use crate::signals::TempGuard;

use crate::wire::FileInfo;

/// Granularity of holes left in written data.
const BLOCK: usize = 4096;

/// Bytes written to the output between two starts of writeback
/// ([`Writeback`]). Large enough that the `sync_file_range` call is
/// negligible beside the writes it follows and the disk gets big batches
/// to merge; small enough that little is left for the final fsync (tens of
/// milliseconds' worth on an SSD) and far below the kernel's
/// own background threshold (10% of memory by default), which is what
/// otherwise decides when the first byte goes to disk.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Bytes whose BLAKE3 matched the manifest.
pub struct Verified<'a>(&'a [u8]);

impl<'a> Verified<'a> {
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }
}

/// Hash-checks `data`; the only way to get a [`Verified`].
pub fn verify<'a>(data: &'a [u8], expected: &ChunkHash) -> Option<Verified<'a>> {
    (ChunkHash::of(data) == *expected).then_some(Verified(data))
}

enum Mode {
    /// The partial file beside the destination, renamed over it at the end.
    Partial {
        path: PathBuf,
        /// Created empty by this run (all holes), not resumed.
        fresh: bool,
        /// Keep it for the next run if this one fails (not `--no-partial`).
        keep: bool,
        _guard: Option<TempGuard>,
    },
    /// The destination itself (`--inplace`).
    InPlace,
    /// A block device, written in place from offset 0.
    Device {
        /// The whole device, at least the source's size.
        size: u64,
    },
}

/// The file being written.
pub struct Output {
    mode: Mode,
    file: File,
    dest: PathBuf,
    size: u64,
    /// Ranges written this run: old data there is gone.
    dirty: RangeSet,
    /// Bytes written since writeback was last started. Behind a lock
    /// because [`Output::write`] runs on several threads at once.
    writeback: Mutex<Writeback>,
    committed: bool,
}

/// The hidden partial file for `dest`: `.NAME.vmsync-partial` beside it, or
/// `.vmsync-partial-HASH` when NAME is too long for that to be a file name.
pub fn partial_path(dest: &Path) -> PathBuf {
    const SUFFIX: &str = ".vmsync-partial";
    let name = dest.file_name().unwrap_or(OsStr::new("vmsync"));
    let mut p = std::ffi::OsString::from(".");
    if name.len() + 1 + SUFFIX.len() <= 255 {
        p.push(name);
        p.push(SUFFIX);
    } else {
        let h = blake3::hash(name.as_encoded_bytes());
        p.push(format!("vmsync-partial-{}", &h.to_hex()[..32]));
    }
    dest.with_file_name(p)
}

fn open_rw_nofollow(path: &Path, create: bool, mode: u32) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl Output {
    /// The partial file for `dest`, already opened and locked by
    /// [`crate::dest::lock::Lock`]: emptied (`resume` false: `size` bytes of
    /// holes) or as an interrupted run left it (`resume` true).
    ///
    /// It takes over the permissions (and, as root, the owner) of the file it
    /// replaces, or the source's mode less the umask for a new file. A
    /// partial kept for the next run is not removed on failure or signal.
    #[allow(clippy::too_many_arguments)]
    pub fn partial(
        dest: &Path,
        locked: &File,
        size: u64,
        resume: bool,
        keep: bool,
        existing: Option<&std::fs::Metadata>,
        mode: u32,
        umask: u32,
    ) -> Result<Output> {
        let path = partial_path(dest);
        let file = locked.try_clone().context("duplicate a file handle")?;
        if !resume {
            file.set_len(0)
                .with_context(|| format!("cannot empty {}", path.display()))
                .exit_with(Exit::Io)?;
        }
        let guard = (!keep).then(|| TempGuard::new(&path));
        let perm = match existing {
            Some(m) => m.mode() & 0o7777,
            None => mode & 0o777 & !umask,
        };
        file.set_permissions(std::fs::Permissions::from_mode(perm))
            .with_context(|| format!("set permissions on {}", path.display()))
            .exit_with(Exit::Io)?;
        if let Some(m) = existing {
            // Only root can give a file away; for others this is a no-op
            // when the owner is already us, and a harmless EPERM otherwise.
            let _ = std::os::unix::fs::fchown(&file, Some(m.uid()), Some(m.gid()));
        }
        if !resume {
            file.set_len(size)
                .with_context(|| format!("cannot size {} to {size} bytes", path.display()))
                .exit_with(Exit::Io)?;
        }
        Ok(Output {
            mode: Mode::Partial {
                path,
                fresh: !resume,
                keep,
                _guard: guard,
            },
            file,
            dest: dest.to_path_buf(),
            size,
            dirty: RangeSet::default(),
            writeback: Mutex::default(),
            committed: false,
        })
    }

    /// The existing destination, opened for writing in place. A symlink is
    /// refused: writing through it would change a file elsewhere.
    pub fn in_place(dest: &Path, size: u64, mode: u32, umask: u32) -> Result<Output> {
        let file = open_rw_nofollow(dest, true, mode & 0o777 & !umask)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    fail(
                        Exit::Io,
                        format!(
                            "{} is a symlink; --inplace will not write through it",
                            dest.display()
                        ),
                    )
                } else {
                    anyhow::Error::new(e)
                        .context(format!("cannot open {} for writing", dest.display()))
                }
            })
            .exit_with(Exit::Io)?;
        Ok(Output {
            mode: Mode::InPlace,
            file,
            dest: dest.to_path_buf(),
            size,
            dirty: RangeSet::default(),
            writeback: Mutex::default(),
            committed: false,
        })
    }

    /// The block device `dest`, locked by [`crate::dest::lock::Lock::device`] as
    /// `locked`, opened for writing `size` bytes at its start. Refused (exit
    /// 3, before anything is written) when it is in use (EBUSY: mounted, or
    /// held by another driver), not writable, or smaller than `size`.
    pub fn device(dest: &Path, locked: &File, size: u64) -> Result<Output> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_EXCL)
            .open(dest)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    fail(
                        Exit::Io,
                        format!(
                            "destination device {} is in use (mounted, or held by LVM, RAID, \
                             device mapper or another program that opened it exclusively); \
                             vmsync writes only to a device nobody else holds",
                            dest.display()
                        ),
                    )
                } else {
                    anyhow::Error::new(e).context(format!(
                        "cannot open destination device {} for writing",
                        dest.display()
                    ))
                }
            })
            .exit_with(Exit::Io)?;
        // The path may have been replaced since it was locked.
        let same = match (file.metadata(), locked.metadata()) {
            (Ok(a), Ok(b)) => crate::content::scan::is_block_device(&a) && a.rdev() == b.rdev(),
            _ => false,
        };
        if !same {
            return Err(fail(
                Exit::Io,
                format!(
                    "destination {} changed while it was being opened",
                    dest.display()
                ),
            ));
        }
        let dev_size = crate::content::scan::device_size(&file)
            .with_context(|| format!("cannot get the size of device {}", dest.display()))
            .exit_with(Exit::Io)?;
        if dev_size < size {
            return Err(fail(
                Exit::Io,
                format!(
                    "destination device {} is too small: it holds {dev_size} bytes ({}), \
                     the source is {size} bytes ({}); nothing was written",
                    dest.display(),
                    crate::units::bytes(dev_size),
                    crate::units::bytes(size)
                ),
            ));
        }
        Ok(Output {
            mode: Mode::Device { size: dev_size },
            file,
            dest: dest.to_path_buf(),
            size,
            dirty: RangeSet::default(),
            writeback: Mutex::default(),
            committed: false,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The size of the block device being written, `None` for a file.
    pub fn device_size(&self) -> Option<u64> {
        match self.mode {
            Mode::Device { size } => Some(size),
            _ => None,
        }
    }

    /// Writes land in a file that still holds old data (`--inplace`, or a
    /// resumed partial): the order of reads and writes matters, see
    /// [`Output::is_dirty`].
    pub fn is_in_place(&self) -> bool {
        !matches!(self.mode, Mode::Partial { fresh: true, .. })
    }

    /// Whether `[start, end)` of the output was already overwritten this run.
    pub fn is_dirty(&self, start: u64, end: u64) -> bool {
        self.dirty.overlaps(start, end)
    }

    /// Writes a verified chunk at `offset`. Safe to call from several
    /// threads at once (positioned writes, no shared cursor); the caller
    /// marks the range dirty where that matters.
    pub fn write(&self, offset: u64, data: Verified<'_>) -> Result<()> {
        let data = data.bytes();
        let zeros = match self.mode {
            // A fresh partial file is all holes: skip zero blocks to keep them holes.
            Mode::Partial { fresh: true, .. } => ZeroBlocks::Skip,
            Mode::Device { .. } => ZeroBlocks::IfNonZero,
            // Elsewhere old data may lie under zero blocks: punch them.
            _ => ZeroBlocks::Punch,
        };
        write_sparse(&self.file, offset, data, zeros, &|at, n| self.wrote(at, n))
            .with_context(|| {
                format!(
                    "cannot write {} bytes at offset {offset} of {}",
                    data.len(),
                    self.dest.display()
                )
            })
            .exit_with(Exit::Io)
    }

    /// Marks `[start, end)` overwritten.
    pub fn mark_dirty(&mut self, start: u64, end: u64) {
        self.dirty.insert(start, end);
    }

    /// Makes `[offset, offset + len)` read as zeros: nothing to do in a fresh
    /// partial file (holes already), zeroed only where it is not zero yet on
    /// a device, punched (or written as zeros where punching is unsupported)
    /// elsewhere.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        if let Mode::Partial { fresh: true, .. } = self.mode {
            return Ok(());
        }
        self.dirty.insert(offset, offset + len);
        let wrote = |at, n| self.wrote(at, n);
        let r = match self.mode {
            Mode::Device { .. } => zero_where_nonzero(&self.file, offset, len, &wrote),
            _ => punch_or_write_zeros(&self.file, offset, len, &wrote),
        };
        r.with_context(|| {
            format!(
                "cannot zero {len} bytes at offset {offset} of {}",
                self.dest.display()
            )
        })
        .exit_with(Exit::Io)
    }

    /// Notes `len` bytes written at `offset`, and starts writeback of what
    /// was written since the last start once that is [`WRITEBACK_EVERY`].
    fn wrote(&self, offset: u64, len: u64) {
        // The note is plain arithmetic that cannot panic halfway, so a lock
        // poisoned by a panic elsewhere still guards consistent numbers.
        let kick = self
            .writeback
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .note(offset, len);
        // Outside the lock: the call may block while the device's queue is
        // full, and other writers need not wait for that.
        if let Some((lo, hi)) = kick {
            start_writeback(&self.file, lo, hi);
        }
    }

    /// Makes the written file the destination: size, fsync, mtime, then
    /// `check` (e.g. `--verify`) and, for a partial file, the rename over the
    /// destination and the directory fsync. Until the rename the destination
    /// keeps its old contents. A device is only fsync'd and checked. Returns
    /// the committed file, still open.
    pub fn commit(
        mut self,
        info: &FileInfo,
        check: impl FnOnce(&File) -> Result<()>,
    ) -> Result<File> {
        let dest = self.dest.clone();
        let file = &self.file;
        let device = matches!(self.mode, Mode::Device { .. });
        if !device {
            file.set_len(self.size)
                .with_context(|| format!("cannot set the size of {}", dest.display()))
                .exit_with(Exit::Io)?;
        }
        // Writeback started while writing (`start_writeback`) only means
        // less is left to do here; this fsync is what makes the data durable.
        file.sync_all()
            .with_context(|| {
                format!(
                    "fsync of {} failed; the data may not be on disk",
                    dest.display()
                )
            })
            .exit_with(Exit::Io)?;
        if device {
            check(file)?;
            self.committed = true;
            return file.try_clone().context("duplicate a file handle");
        }
        file.set_modified(mtime(info))
            .with_context(|| format!("cannot set the modification time of {}", dest.display()))
            .exit_with(Exit::Io)?;
        check(file)?;
        if let Mode::Partial { path, .. } = &self.mode {
            std::fs::rename(path, &dest)
                .with_context(|| {
                    format!("cannot rename {} onto {}", path.display(), dest.display())
                })
                .exit_with(Exit::Io)?;
            self.committed = true;
            sync_dir(&dest)?;
        } else {
            file.sync_all()
                .with_context(|| format!("fsync of {} failed", dest.display()))
                .exit_with(Exit::Io)?;
        }
        self.committed = true;
        file.try_clone().context("duplicate a file handle")
    }
}

impl Drop for Output {
    /// A failed run removes its partial file unless it is kept for resuming.
    fn drop(&mut self) {
        if let Mode::Partial {
            path, keep: false, ..
        } = &self.mode
        {
            if !self.committed {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Fsyncs the directory holding `dest`, so a rename into it is durable.
pub fn sync_dir(dest: &Path) -> Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of directory {} failed", dir.display()))
        .exit_with(Exit::Io)
}

/// Counts bytes written to the output and says when to start writeback
/// of them, and of which range. Writes are positioned and come from several
/// threads in no particular order, so the range is the lowest to the
/// highest byte written since the last start, which covers them all.
#[derive(Default, Debug, PartialEq, Eq)]
struct Writeback {
    /// Bytes written since the last start; 0 when nothing has been.
    since: u64,
    /// The lowest offset written since the last start.
    lo: u64,
    /// The end of the highest range written since the last start.
    hi: u64,
}

impl Writeback {
    /// Notes `len` bytes written at `offset`. Once [`WRITEBACK_EVERY`] bytes
    /// have been since the last start, returns the range `[lo, hi)` to start
    /// writeback of, and begins counting afresh.
    fn note(&mut self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 {
            return None;
        }
        let end = offset + len;
        if self.since == 0 {
            (self.lo, self.hi) = (offset, end);
        } else {
            (self.lo, self.hi) = (self.lo.min(offset), self.hi.max(end));
        }
        self.since += len;
        if self.since < WRITEBACK_EVERY {
            return None;
        }
        let range = (self.lo, self.hi);
        *self = Writeback::default();
        Some(range)
    }
}

/// Asks the kernel to start writing `[lo, hi)` of `file` to disk, and
/// returns without waiting for it (`SYNC_FILE_RANGE_WRITE` alone, no
/// `WAIT_*` flag), so the disk works while the rest of the sync arrives
/// instead of all at once at the end. This is not a durability guarantee: it
/// writes no metadata, flushes no device cache and waits for nothing; the
/// fsync in [`Output::commit`] does all that, as it did before.
fn start_writeback(file: &File, lo: u64, hi: u64) {
    // SAFETY: sync_file_range on a valid fd with plain integer arguments.
    let r = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            lo as libc::off64_t,
            (hi - lo) as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    // Ignored: it is advice, refused by some files and devices (EINVAL,
    // ESPIPE), and what it did not start the fsync in commit writes anyway.
    // A write error it runs into stays recorded on the file (only a wait
    // collects it), so that fsync still reports it.
    let _ = r;
}

/// The source's mtime as a `SystemTime` (negative seconds are before 1970).
pub fn mtime(info: &FileInfo) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(info.mtime_nsec.min(999_999_999)));
    if info.mtime_sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(info.mtime_sec as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(info.mtime_sec.unsigned_abs()) + nanos
    }
}

/// What [`write_sparse`] does with the all-zero blocks of what it writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ZeroBlocks {
    /// Nothing: the file holds holes there already.
    Skip,
    /// Punch a hole (or write zeros), so a region that became zero frees
    /// its blocks.
    Punch,
    /// Zero only the blocks that do not read as zeros already (a device).
    IfNonZero,
}

/// Tells [`Output`] that `(offset, len)` bytes were written (made dirty in
/// the page cache), for [`Writeback`]; holes punched are not writes.
type Wrote<'a> = &'a dyn Fn(u64, u64);

/// Writes `data` at `offset`, treating its all-zero 4 KiB blocks (at
/// absolute offsets, so holes align with the filesystem's) as `zeros` says.
fn write_sparse(
    file: &File,
    offset: u64,
    data: &[u8],
    zeros: ZeroBlocks,
    wrote: Wrote<'_>,
) -> std::io::Result<()> {
    let block_end = |p: usize| {
        let abs = offset + p as u64;
        let next = ((abs / BLOCK as u64 + 1) * BLOCK as u64 - abs) as usize;
        (p + next).min(data.len())
    };
    let mut pos = 0usize;
    while pos < data.len() {
        // Extend a run of blocks of one kind as far as it goes: one write
        // (or punch) per run.
        let zero = is_zero(&data[pos..block_end(pos)]);
        let mut run_end = block_end(pos);
        while run_end < data.len() && is_zero(&data[run_end..block_end(run_end)]) == zero {
            run_end = block_end(run_end);
        }
        let at = offset + pos as u64;
        let n = (run_end - pos) as u64;
        match (zero, zeros) {
            (false, _) => {
                file.write_all_at(&data[pos..run_end], at)?;
                wrote(at, n);
            }
            (true, ZeroBlocks::Skip) => {}
            (true, ZeroBlocks::Punch) => punch_or_write_zeros(file, at, n, wrote)?,
            (true, ZeroBlocks::IfNonZero) => zero_where_nonzero(file, at, n, wrote)?,
        }
        pos = run_end;
    }
    Ok(())
}

fn punch_or_write_zeros(
    file: &File,
    offset: u64,
    len: u64,
    wrote: Wrote<'_>,
) -> std::io::Result<()> {
    match punch_hole(file, offset, len) {
        Ok(()) => Ok(()),
        Err(e) if !cannot_punch(&e) => Err(e),
        Err(_) => write_zeros(file, offset, len, wrote),
    }
}

/// Deallocates `[offset, offset + len)`; the file's size stays.
fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::FallocateFlags;
    rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(std::io::Error::from)
}

/// The file system or device has no hole punching: write zeros instead.
fn cannot_punch(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

fn write_zeros(file: &File, offset: u64, len: u64, wrote: Wrote<'_>) -> std::io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + pos)?;
        wrote(offset + pos, n as u64);
        pos += n as u64;
    }
    Ok(())
}

/// Makes `[offset, offset + len)` of a device read as zeros, touching only
/// the 4 KiB blocks (at absolute offsets) that are not zero yet: on a thin
/// volume, writing zeros over zeros would allocate what it meant to free.
fn zero_where_nonzero(file: &File, offset: u64, len: u64, wrote: Wrote<'_>) -> std::io::Result<()> {
    const STEP: u64 = 1 << 20;
    let end = offset + len;
    let mut buf = vec![0u8; STEP as usize];
    let mut pos = offset;
    while pos < end {
        let n = (end - pos).min(STEP) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        // Runs of non-zero blocks in this buffer, zeroed one run at a time.
        let mut run: Option<u64> = None;
        let mut b = pos;
        while b < pos + n as u64 {
            let next = ((b / BLOCK as u64 + 1) * BLOCK as u64).min(pos + n as u64);
            let nonzero = !is_zero(&buf[(b - pos) as usize..(next - pos) as usize]);
            match (nonzero, run) {
                (true, None) => run = Some(b),
                (false, Some(s)) => {
                    zero_device_range(file, s, b - s, wrote)?;
                    run = None;
                }
                _ => {}
            }
            b = next;
        }
        if let Some(s) = run {
            zero_device_range(file, s, b - s, wrote)?;
        }
        pos += n as u64;
    }
    Ok(())
}

/// Zeros a device range: its 4 KiB-aligned middle with `fallocate`
/// (PUNCH_HOLE: the device discards or zeroes it without data crossing the
/// bus, and a thin volume may free it) where the device supports that, the
/// rest, or all of it elsewhere, by writing zeros.
fn zero_device_range(file: &File, offset: u64, len: u64, wrote: Wrote<'_>) -> std::io::Result<()> {
    let b = BLOCK as u64;
    let end = offset + len;
    let (mid_start, mid_end) = (offset.div_ceil(b) * b, end / b * b);
    if mid_end <= mid_start {
        return write_zeros(file, offset, len, wrote);
    }
    write_zeros(file, offset, mid_start - offset, wrote)?;
    match punch_hole(file, mid_start, mid_end - mid_start) {
        Ok(()) => {}
        Err(e) if !cannot_punch(&e) => return Err(e),
        Err(_) => write_zeros(file, mid_start, mid_end - mid_start, wrote)?,
    }
    write_zeros(file, mid_end, end - mid_end, wrote)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    const MIB: u64 = 1 << 20;

    #[test]
    fn writeback_starts_once_enough_is_written_and_counts_afresh() {
        let mut wb = Writeback::default();
        // In order: nothing until 32 MiB, then exactly what was written.
        for k in 0..7 {
            assert_eq!(wb.note(k * 4 * MIB, 4 * MIB), None);
        }
        assert_eq!(wb.since, 28 * MIB);
        assert_eq!(wb.note(28 * MIB, 4 * MIB), Some((0, 32 * MIB)));
        assert_eq!(wb, Writeback::default());

        // Nothing written is nothing to note.
        assert_eq!(wb.note(5 * MIB, 0), None);
        assert_eq!(wb, Writeback::default());

        // Out of order: the range runs from the lowest to the highest byte,
        // whichever came first.
        assert_eq!(wb.note(100 * MIB, 16 * MIB), None);
        assert_eq!(wb.note(10 * MIB, 8 * MIB), None);
        assert_eq!((wb.lo, wb.hi, wb.since), (10 * MIB, 116 * MIB, 24 * MIB));
        assert_eq!(wb.note(50 * MIB, 8 * MIB), Some((10 * MIB, 116 * MIB)));
        assert_eq!(wb, Writeback::default());

        // One write bigger than the threshold starts at once, taking along
        // what was noted before it; then the count begins afresh.
        assert_eq!(wb.note(7, 3), None);
        assert_eq!(wb.note(7 + 3, 40 * MIB), Some((7, 10 + 40 * MIB)));
        assert_eq!(wb.note(200 * MIB, MIB), None);
        assert_eq!((wb.lo, wb.hi, wb.since), (200 * MIB, 201 * MIB, MIB));
    }

    #[test]
    fn writeback_ranges_cover_every_byte_written() {
        // Scattered writes of varying sizes, as from several threads: each
        // range started covers exactly the writes since the last one, and
        // starts as soon as they add up to the threshold, not before.
        let mut wb = Writeback::default();
        let mut pending: Vec<(u64, u64)> = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut starts = 0;
        for _ in 0..5000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let offset = (x >> 20) % (64 << 30);
            let len = 4096 + (x >> 8) % (256 << 10);
            pending.push((offset, offset + len));
            let total: u64 = pending.iter().map(|(s, e)| e - s).sum();
            match wb.note(offset, len) {
                None => assert!(total < WRITEBACK_EVERY, "{total}"),
                Some((lo, hi)) => {
                    assert!(total >= WRITEBACK_EVERY);
                    assert!(total - len < WRITEBACK_EVERY);
                    assert_eq!(lo, pending.iter().map(|r| r.0).min().unwrap());
                    assert_eq!(hi, pending.iter().map(|r| r.1).max().unwrap());
                    pending.clear();
                    starts += 1;
                }
            }
        }
        assert!(starts > 10, "{starts}");
    }

    #[test]
    fn output_notes_what_it_writes() {
        // In place over old data: data written counts, punched zeros do not.
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("img");
        std::fs::write(&dest, b"old").unwrap();
        let mut out = Output::in_place(&dest, 48 * MIB, 0o644, 0o022).unwrap();
        let data = vec![0x5au8; 8 * MIB as usize];
        let hash = ChunkHash::of(&data);
        let counted = |out: &Output| {
            let wb = out.writeback.lock().unwrap();
            (wb.lo, wb.hi, wb.since)
        };
        // Descending offsets, as parallel writes may land.
        for k in [5, 4, 3] {
            out.write(k * 8 * MIB, verify(&data, &hash).unwrap())
                .unwrap();
        }
        assert_eq!(counted(&out), (24 * MIB, 48 * MIB, 24 * MIB));
        // The fourth makes 32 MiB: writeback started, the count is reset.
        out.write(16 * MIB, verify(&data, &hash).unwrap()).unwrap();
        assert_eq!(counted(&out), (0, 0, 0));
        out.write(8 * MIB, verify(&data, &hash).unwrap()).unwrap();
        out.zero(40 * MIB, 4 * MIB).unwrap();
        assert_eq!(counted(&out), (8 * MIB, 16 * MIB, 8 * MIB));
    }

    #[test]
    fn partial_names_fit_in_a_directory_entry() {
        let short = partial_path(Path::new("/srv/disk.img"));
        assert_eq!(short, Path::new("/srv/.disk.img.vmsync-partial"));
        let long_name = "x".repeat(250);
        let long = partial_path(&Path::new("/srv").join(&long_name));
        let n = long.file_name().unwrap().len();
        assert!(n <= 255, "{n}");
        assert!(long.to_string_lossy().contains(".vmsync-partial-"));
        assert_ne!(long, partial_path(&Path::new("/srv").join("y".repeat(250))));
    }

    #[test]
    fn only_matching_bytes_verify() {
        let h = ChunkHash::of(b"hello");
        assert!(verify(b"hello", &h).is_some());
        assert!(verify(b"hellp", &h).is_none());
    }

    #[test]
    fn zeroing_touches_only_blocks_that_are_not_zero() {
        // A regular file stands in for a device: what reads as zeros
        // already (here holes) must not be written, so it stays unallocated.
        let dir = tempfile::tempdir().unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("dev"))
            .unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[7u8; 10_000], (1 << 20) + 100).unwrap();
        f.write_all_at(&[5u8; 3], (3 << 20) - 1).unwrap();
        f.sync_all().unwrap();
        let noted = RefCell::new(RangeSet::default());
        let note = |at, n| noted.borrow_mut().insert(at, at + n);
        zero_where_nonzero(&f, 1, (4 << 20) - 2, &note).unwrap();
        // The aligned blocks were punched, not written: nothing for
        // writeback. The range starts at 1, so its 1 MiB steps split the
        // blocks at 1 MiB and 3 MiB; their unaligned parts were written.
        assert_eq!(
            noted.take().iter().collect::<Vec<_>>(),
            [(MIB + 1, MIB + 4096), (3 * MIB, 3 * MIB + 4096)]
        );
        f.sync_all().unwrap();
        let mut back = vec![1u8; 4 << 20];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(is_zero(&back));
        assert!(
            f.metadata().unwrap().blocks() * 512 <= 16 * 1024,
            "zeros written over zeros: {} bytes allocated",
            f.metadata().unwrap().blocks() * 512
        );

        // Unaligned ends are written, the aligned middle punched, and
        // nothing outside the range is touched.
        f.write_all_at(&[9u8; 20_000], 0).unwrap();
        zero_device_range(&f, 10, 19_980, &note).unwrap();
        // The unaligned ends were written.
        assert_eq!(
            noted.take().iter().collect::<Vec<_>>(),
            [(10, 4096), (16_384, 19_990)]
        );
        let mut back = vec![0u8; 20_000];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[..10], &[9u8; 10]);
        assert!(is_zero(&back[10..19_990]));
        assert_eq!(&back[19_990..], &[9u8; 10]);

        // Data with zero blocks, written as to a device: the zero blocks
        // over old data become zeros too.
        let mut data = vec![3u8; 64 * 1024];
        data[8192..40_960].fill(0);
        f.write_all_at(&vec![8u8; 128 * 1024], 0).unwrap();
        write_sparse(&f, 4096, &data, ZeroBlocks::IfNonZero, &note).unwrap();
        assert_eq!(
            noted.take().iter().collect::<Vec<_>>(),
            [(4096, 12_288), (45_056, 69_632)]
        );
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn zero_blocks_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let mut data = vec![0u8; 256 * 1024];
        data[0] = 1;
        data[200 * 1024] = 2;
        let noted = RefCell::new(RangeSet::default());
        let note = |at, n| noted.borrow_mut().insert(at, at + n);
        write_sparse(&f, 4096, &data, ZeroBlocks::Skip, &note).unwrap();
        // Only the two blocks of data were written.
        let two_blocks = [(4096, 8192), (208_896, 212_992)];
        assert_eq!(noted.take().iter().collect::<Vec<_>>(), two_blocks);
        f.sync_all().unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        // Two 4 KiB blocks of data, not 256 KiB.
        assert!(f.metadata().unwrap().blocks() * 512 <= 16 * 1024);

        // Over old data, zero blocks are punched: the file reads back
        // exactly and the old blocks are freed.
        let g = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("g"))
            .unwrap();
        g.write_all_at(&vec![9u8; 1 << 20], 0).unwrap();
        g.sync_all().unwrap();
        write_sparse(&g, 4096, &data, ZeroBlocks::Punch, &note).unwrap();
        assert_eq!(noted.take().iter().collect::<Vec<_>>(), two_blocks);
        g.sync_all().unwrap();
        let mut back = vec![0u8; data.len()];
        g.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        let alloc = g.metadata().unwrap().blocks() * 512;
        assert!(
            alloc <= (1 << 20) - 200 * 1024,
            "zero blocks not punched: {alloc}"
        );
    }
}
