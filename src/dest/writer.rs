//! Writing the destination: a new copy, a reflink clone, a journal, or in
//! place; each renamed over the destination or applied to it at the commit.
//!
//! Only [`Verified`] data reaches the disk, and a `Verified` can only be made
//! by hashing the bytes and comparing with the manifest ([`verify`]); so the
//! writer cannot be handed an unchecked chunk by mistake. Over old contents
//! (every mode but a fresh copy) only the 4 KiB blocks of a chunk that differ
//! from what the output holds at its offset are written
//! ([`crate::dest::sparse::changes`]): a rewritten page costs a page, not
//! the chunk around it.
//!
//! **Copy** ([`Output::partial`]): a hidden partial file in the destination's
//! directory (`.NAME.vmsync-partial`), sized up front so untouched ranges stay
//! holes, written with all-zero 4 KiB blocks skipped, fsync'd, given the
//! source's mtime, renamed over the destination, and the directory fsync'd.
//! Until the rename the old destination is untouched. A run that fails or is
//! interrupted leaves the partial file for the next run to resume from
//! (removed instead with `--no-partial`); a resumed partial is written in
//! place, on the partial file.
//!
//! **Clone** ([`Output::cloned`]): the same partial file, but made a reflink
//! clone of the destination first (`FICLONE`: it shares every block until
//! one is written), so only the changed blocks are written and take space;
//! then fsync, rename, directory fsync as for a copy. Readers, and a crash,
//! see the old or the new file. Where the filesystem refuses to clone
//! (EOPNOTSUPP, EXDEV, EINVAL, ...) the caller falls back to a journal.
//!
//! **Journal** ([`Output::journaled`]): every change goes to a redo journal
//! ([`crate::dest::journal`]) and the destination is only read; the commit
//! makes the journal durable, commits it, applies it in place (inside
//! [`crate::signals::critical`]), and removes it. A crash before the commit
//! record leaves the old file; one after it is finished by the next run
//! ([`crate::dest::recover`]). A journal that outgrows half the file is
//! turned into a copy ([`Output::into_copy`]).
//!
//! **In place, unjournaled** (`--write-mode unsafe-inplace`,
//! [`Output::in_place`]): writes into the existing file as they come. Zero
//! ranges are punched (hole) rather than written. The receiver asks
//! [`Output::is_dirty`] before copying from the old contents, since a range
//! already overwritten no longer holds what the basis index says. An
//! interrupted run leaves a mix of old and new data; the next run repairs it.
//!
//! **Block device** ([`Output::device`]): always in place (journaled unless
//! `unsafe-inplace`), since there is nothing to rename and no room beside
//! it; nothing is created, truncated or sized. It is opened with `O_EXCL`, which the kernel refuses (EBUSY) for a
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
//! **Early writeback** (every mode, see [`crate::dest::sparse`]): every 32 MiB written,
//! the range written since the last time is handed to the disk with
//! `sync_file_range(SYNC_FILE_RANGE_WRITE)`, which starts writeback and does
//! not wait for it. Otherwise nothing reaches the disk until the kernel's
//! dirty thresholds are hit, and the whole file is written by the fsync in
//! [`Output::commit`], after everything else is done. It is only a head
//! start: durability still comes from that fsync, which is unchanged.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::content::hash::ChunkHash;
use crate::content::ranges::RangeSet;
use crate::dest::journal::{self, Header, Identity};
use crate::dest::paths::{partial_path, sync_dir};
use crate::dest::sparse::{
    changes, copy_data, punch_or_write_zeros, start_writeback, write_pieces, write_sparse,
    zero_where_nonzero, Writeback, BLOCK,
};
use crate::error::{fail, Exit, WithExit};
use crate::signals::TempGuard;
use crate::sys::crash;

use crate::wire::{FileInfo, WriteMode};

/// Bytes whose BLAKE3 matched the manifest, with that hash.
pub struct Verified<'a> {
    bytes: &'a [u8],
    #[allow(dead_code)] // TEMP: used by dest::journal, which lands next.
    hash: ChunkHash,
}

impl<'a> Verified<'a> {
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    #[allow(dead_code)] // TEMP: used by dest::journal, which lands next.
    pub fn hash(&self) -> &ChunkHash {
        &self.hash
    }
}

/// Hash-checks `data`; the only way to get a [`Verified`].
pub fn verify<'a>(data: &'a [u8], expected: &ChunkHash) -> Option<Verified<'a>> {
    (ChunkHash::of(data) == *expected).then_some(Verified {
        bytes: data,
        hash: *expected,
    })
}

enum Mode {
    /// The partial file beside the destination, renamed over it at the end.
    Partial {
        path: PathBuf,
        /// Created empty by this run (all holes), not resumed.
        fresh: bool,
        /// Made by this run as a reflink clone of the destination.
        cloned: bool,
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
    /// Every change goes to a redo journal; the destination (`Output::file`)
    /// is only read until the commit applies the journal to it.
    Journal {
        /// `None` once committed.
        writer: Mutex<Option<journal::Writer>>,
        path: PathBuf,
        /// The device's size, for a device.
        device: Option<u64>,
        /// Keep an uncommitted journal for the next run (not `--no-partial`).
        keep: bool,
        /// Bytes the journal may grow to: the room its filesystem had when
        /// it was made ([`crate::dest::paths::journal_room`]).
        room: u64,
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
    /// Every byte written to storage for this output (`dest_written_bytes`).
    written: AtomicU64,
    /// The journal ran out of room: removed at the end, never kept.
    full: AtomicBool,
    committed: bool,
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
    fn new(mode: Mode, file: File, dest: &Path, size: u64) -> Output {
        Output {
            mode,
            file,
            dest: dest.to_path_buf(),
            size,
            dirty: RangeSet::default(),
            writeback: Mutex::default(),
            written: AtomicU64::new(0),
            full: AtomicBool::new(false),
            committed: false,
        }
    }

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
        take_over_mode(&file, &path, existing, mode, umask)?;
        if !resume {
            file.set_len(size)
                .with_context(|| format!("cannot size {} to {size} bytes", path.display()))
                .exit_with(Exit::Io)?;
        }
        Ok(Output::new(
            Mode::Partial {
                path,
                fresh: !resume,
                cloned: false,
                keep,
                _guard: guard,
            },
            file,
            dest,
            size,
        ))
    }

    /// The partial file for `dest` (locked as `locked`) made a reflink
    /// clone of `dest`, so it starts as the old file at no cost in space or
    /// writes, and only what differs is written into it ([`changes`]).
    /// `Ok(None)` when the filesystem cannot clone (EOPNOTSUPP, EXDEV,
    /// EINVAL, ENOTTY, ETXTBSY): the partial file is then left empty.
    /// Permissions and owner as for [`Output::partial`].
    pub fn cloned(
        dest: &Path,
        locked: &File,
        keep: bool,
        existing: &std::fs::Metadata,
        size: u64,
    ) -> Result<Option<Output>> {
        let path = partial_path(dest);
        let file = locked.try_clone().context("duplicate a file handle")?;
        file.set_len(0)
            .with_context(|| format!("cannot empty {}", path.display()))
            .exit_with(Exit::Io)?;
        let src = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dest)
            .with_context(|| format!("cannot open {}", dest.display()))
            .exit_with(Exit::Io)?;
        // Copy-on-write in block-sized extents, so the clone takes exactly
        // the blocks rewritten (see `sys::fsxattr`). A hint: ignored where
        // the filesystem has none.
        let _ = crate::sys::fsxattr::set_cow_extent_size(&file, BLOCK as u32);
        if let Err(e) = rustix::fs::ioctl_ficlone(&file, &src) {
            let e = std::io::Error::from(e);
            if cannot_clone(&e) {
                crate::vlog!(2, "receiver: no reflink clone of {} ({e})", dest.display());
                return Ok(None);
            }
            return Err(e)
                .with_context(|| format!("cannot clone {} to {}", dest.display(), path.display()))
                .exit_with(Exit::Io);
        }
        let guard = (!keep).then(|| TempGuard::new(&path));
        take_over_mode(&file, &path, Some(existing), 0, 0)?;
        Ok(Some(Output::new(
            Mode::Partial {
                path,
                fresh: false,
                cloned: true,
                keep,
                _guard: guard,
            },
            file,
            dest,
            size,
        )))
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
        Ok(Output::new(Mode::InPlace, file, dest, size))
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
        Ok(Output::new(
            Mode::Device { size: dev_size },
            file,
            dest,
            size,
        ))
    }

    /// Turns an in-place output (a file opened by [`Output::in_place`], or
    /// a device by [`Output::device`]) into a journaled one: from here on
    /// every change goes to a new journal at `path` (the caller made sure
    /// no journal is there to keep), and the destination is untouched
    /// until [`Output::commit`]. `version` identifies the new version for
    /// the journal's header (the sender's announcement of it).
    pub fn journaled(
        self,
        path: PathBuf,
        info: &FileInfo,
        version: [u8; 32],
        keep: bool,
    ) -> Result<Output> {
        let device = match self.mode {
            Mode::InPlace => None,
            Mode::Device { size } => Some(size),
            _ => unreachable!("only an in-place output is journaled"),
        };
        let identity = Identity::of(&self.file)
            .with_context(|| format!("cannot identify {}", self.dest.display()))
            .exit_with(Exit::Io)?;
        let old_size = match device {
            Some(size) => size,
            None => self
                .file
                .metadata()
                .with_context(|| format!("cannot stat {}", self.dest.display()))
                .exit_with(Exit::Io)?
                .len(),
        };
        let header = Header {
            identity,
            old_size,
            new_size: self.size,
            mtime_sec: info.mtime_sec,
            mtime_nsec: info.mtime_nsec,
            digest: version,
            run_id: run_id(&path),
        };
        let room = crate::dest::paths::journal_room(&path);
        let writer = journal::Writer::create(&path, &header)?;
        let mut out = self;
        out.written.fetch_add(writer.bytes(), Ordering::Relaxed);
        out.mode = Mode::Journal {
            writer: Mutex::new(Some(writer)),
            path,
            device,
            keep,
            room,
        };
        Ok(out)
    }

    /// Turns this journaled output of a regular file into `partial`, the
    /// fresh partial file beside it, once the change turns out to be most
    /// of the file: the journal would need about as much room as a copy,
    /// and be written twice. The destination's data is copied into the
    /// partial file (`copy_file_range`, holes kept), the journal's records
    /// so far are replayed onto it, and the journal is removed; the
    /// destination is untouched. From then on the partial file holds the
    /// old file's bytes at their offsets, like a clone.
    pub fn into_copy(mut self, mut partial: Output) -> Result<Output> {
        let Mode::Journal { writer, path, .. } = &self.mode else {
            unreachable!("a journaled output")
        };
        let path = path.clone();
        let mut w = lock(writer).take().expect("not committed");
        w.flush()?;
        drop(w);
        let old_size = self
            .file
            .metadata()
            .with_context(|| format!("cannot stat {}", self.dest.display()))
            .exit_with(Exit::Io)?
            .len();
        let copied = copy_data(&self.file, &partial.file, old_size.min(partial.size))
            .with_context(|| format!("cannot copy {} to its partial file", self.dest.display()))
            .exit_with(Exit::Io)?;
        let replayed = match journal::Journal::open(&path)? {
            Some(j) => j.replay_onto_copy(&partial.file)?,
            None => 0,
        };
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove journal {}", path.display()))
            .exit_with(Exit::Io)?;
        self.committed = true;
        if let Mode::Partial { fresh, .. } = &mut partial.mode {
            *fresh = false;
        }
        partial
            .written
            .fetch_add(self.written() + copied + replayed, Ordering::Relaxed);
        Ok(partial)
    }

    /// The journal being written, if this output is journaled: its path
    /// and size so far.
    pub fn journal(&self) -> Option<(&Path, u64)> {
        match &self.mode {
            Mode::Journal { writer, path, .. } => Some((
                path,
                lock(writer).as_ref().map_or(0, journal::Writer::bytes),
            )),
            _ => None,
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The size of the block device being written, `None` for a file.
    pub fn device_size(&self) -> Option<u64> {
        match self.mode {
            Mode::Device { size } => Some(size),
            Mode::Journal { device, .. } => device,
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
    /// marks the range dirty where that matters. Into a fresh partial file
    /// (all holes) the chunk is written whole but for its zero blocks;
    /// anywhere else only the blocks that differ from what the output holds
    /// there now are written ([`changes`]).
    pub fn write(&self, offset: u64, data: Verified<'_>) -> Result<()> {
        let bytes = data.bytes();
        let wrote = |at, n| self.wrote(at, n);
        let r = match self.mode {
            Mode::Partial { fresh: true, .. } => write_sparse(&self.file, offset, bytes, &wrote),
            Mode::Journal { ref writer, .. } => {
                let pieces = changes(&self.file, offset, bytes).with_context(|| {
                    format!("cannot read offset {offset} of {}", self.dest.display())
                });
                return pieces.and_then(|pieces| {
                    self.journal_append(writer, |w| {
                        w.data(offset, bytes.len() as u32, data.hash(), &pieces)
                    })
                });
            }
            _ => changes(&self.file, offset, bytes).and_then(|pieces| {
                write_pieces(
                    &self.file,
                    &pieces,
                    matches!(self.mode, Mode::Device { .. }),
                    &wrote,
                )
            }),
        };
        r.with_context(|| {
            format!(
                "cannot write {} bytes at offset {offset} of {}",
                bytes.len(),
                self.dest.display()
            )
        })
        .exit_with(Exit::Io)
    }

    /// Bytes written to storage for this output so far: data written into
    /// the destination, its partial file or journal, and a journal's
    /// replay; not holes punched nor metadata. Counted here rather than
    /// read from `/proc/self/io`, whose `write_bytes` charges a whole large
    /// page-cache folio (up to megabytes after a read) for a 4 KiB write
    /// into it, which is not what reaches the disk.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Writes land in the destination itself as they come (no journal,
    /// no partial file): the old contents are overwritten as the run goes.
    pub fn overwrites_old(&self) -> bool {
        matches!(self.mode, Mode::InPlace | Mode::Device { .. })
    }

    /// The write mode this output is, as reported (`write_mode`): a fresh
    /// or resumed partial file is `copy` unless this run cloned it.
    pub fn write_mode(&self) -> WriteMode {
        match self.mode {
            Mode::Partial { cloned: true, .. } => WriteMode::Clone,
            Mode::Partial { .. } => WriteMode::Copy,
            Mode::Journal { .. } => WriteMode::Journal,
            Mode::InPlace | Mode::Device { .. } => WriteMode::UnsafeInplace,
        }
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
        if let Mode::Journal { writer, .. } = &self.mode {
            return self.journal_append(writer, |w| w.zero(offset, len));
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

    /// Appends to the journal with `f`, counting what it wrote. A journal
    /// that outgrows the room its filesystem had (or meets a full disk)
    /// ends the run with the disk-full exit code, before the destination
    /// is touched, and is removed when the run ends: it could never be
    /// finished there, and must not go on taking the room it ran out of.
    fn journal_append(
        &self,
        writer: &Mutex<Option<journal::Writer>>,
        f: impl FnOnce(&mut journal::Writer) -> Result<()>,
    ) -> Result<()> {
        let Mode::Journal { path, room, .. } = &self.mode else {
            unreachable!("a journaled output")
        };
        let mut w = lock(writer);
        let w = w.as_mut().expect("no writes after the commit");
        let before = w.bytes();
        let r = f(w);
        self.written
            .fetch_add(w.bytes() - before, Ordering::Relaxed);
        let full = match &r {
            Err(e) => e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.raw_os_error() == Some(libc::ENOSPC))
            }),
            Ok(()) => w.bytes() > *room,
        };
        if full {
            self.full.store(true, Ordering::Relaxed);
            return Err(fail(
                Exit::Io,
                format!(
                    "disk full: no room for the journal {} ({} written, {} was free for it); \
                     {} was not changed and holds the old version",
                    path.display(),
                    crate::units::bytes(w.bytes()),
                    crate::units::bytes(*room),
                    self.dest.display()
                ),
            ));
        }
        r.exit_with(Exit::Io)
    }

    /// Notes `len` bytes written at `offset`, and starts writeback of what
    /// was written since the last start once that is [`WRITEBACK_EVERY`].
    fn wrote(&self, offset: u64, len: u64) {
        self.written.fetch_add(len, Ordering::Relaxed);
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
    /// the committed file, still open, and the bytes written in all
    /// ([`Output::written`]).
    pub fn commit(
        mut self,
        info: &FileInfo,
        check: impl FnOnce(&File) -> Result<()>,
    ) -> Result<(File, u64)> {
        if let Mode::Journal { .. } = self.mode {
            return self.commit_journal(check);
        }
        let dest = self.dest.clone();
        let file = &self.file;
        let device = matches!(self.mode, Mode::Device { .. });
        if !device {
            file.set_len(self.size)
                .with_context(|| format!("cannot set the size of {}", dest.display()))
                .exit_with(Exit::Io)?;
        }
        if !device {
            // The partial file becomes the destination: it must not carry
            // the lock's holder name into the copy (nor into `-X` or a
            // later backup of it).
            crate::dest::lock::clear_holder(file);
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
            return self.committed_file();
        }
        file.set_modified(mtime(info))
            .with_context(|| format!("cannot set the modification time of {}", dest.display()))
            .exit_with(Exit::Io)?;
        check(file)?;
        if let Mode::Partial { path, .. } = &self.mode {
            crash::point(crash::BEFORE_RENAME);
            std::fs::rename(path, &dest)
                .with_context(|| {
                    format!("cannot rename {} onto {}", path.display(), dest.display())
                })
                .exit_with(Exit::Io)?;
            self.committed = true;
            crash::point(crash::AFTER_RENAME);
            sync_dir(&dest)?;
        } else {
            file.sync_all()
                .with_context(|| format!("fsync of {} failed", dest.display()))
                .exit_with(Exit::Io)?;
        }
        self.committed = true;
        self.committed_file()
    }

    fn committed_file(&self) -> Result<(File, u64)> {
        let file = self.file.try_clone().context("duplicate a file handle")?;
        Ok((file, self.written()))
    }
}

impl Output {
    /// The journal's commit: make it durable and committed (from here on it
    /// *is* the new version), apply it to the destination (fsync'd, with
    /// its size and mtime), remove it, then `check`. A signal during the
    /// apply waits for its end ([`crate::signals::critical`]); a crash
    /// during it is finished by the next run ([`crate::dest::recover`]).
    fn commit_journal(mut self, check: impl FnOnce(&File) -> Result<()>) -> Result<(File, u64)> {
        let Mode::Journal { writer, path, .. } = &self.mode else {
            unreachable!("a journaled output")
        };
        let w = lock(writer).take().expect("committed once");
        w.commit()?;
        self.committed = true;
        let _critical = crate::signals::critical();
        let j = match journal::Journal::open(path)? {
            Some(j) if j.state == journal::State::Committed => j,
            _ => {
                return Err(fail(
                    Exit::Journal,
                    format!(
                        "journal {} is not committed after its commit",
                        path.display()
                    ),
                ))
            }
        };
        crate::vlog!(
            1,
            "receiver: journal committed ({} records, {} bytes); applying it to {}",
            j.records,
            j.payload,
            self.dest.display()
        );
        j.apply(&self.file)?;
        self.written.fetch_add(j.payload, Ordering::Relaxed);
        crash::point(crash::APPLIED);
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove journal {}", path.display()))
            .exit_with(Exit::Io)?;
        sync_dir(path)?;
        check(&self.file)?;
        self.committed_file()
    }
}

impl Drop for Output {
    /// A failed run removes its partial file, or its journal, unless it is
    /// kept for resuming. (A committed journal is never removed here: it is
    /// the new version until applied.)
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if *self.full.get_mut() {
            if let Mode::Journal { path, .. } = &self.mode {
                let _ = std::fs::remove_file(path);
            }
            return;
        }
        match &self.mode {
            Mode::Partial {
                path, keep: false, ..
            }
            | Mode::Journal {
                path, keep: false, ..
            } => {
                let _ = std::fs::remove_file(path);
            }
            _ => {}
        }
    }
}

/// A journal writer's lock: a panic elsewhere cannot leave it inconsistent
/// (a failed write makes the writer refuse further ones by itself).
fn lock(w: &Mutex<Option<journal::Writer>>) -> std::sync::MutexGuard<'_, Option<journal::Writer>> {
    w.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A run id for a journal's header: unique per run, so a record of another
/// journal never validates in this one.
fn run_id(path: &Path) -> [u8; 16] {
    let mut h = blake3::Hasher::new_derive_key("vmsync journal run id");
    h.update(path.as_os_str().as_encoded_bytes());
    h.update(&std::process::id().to_le_bytes());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.update(&now.to_le_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    id
}

/// Gives the partial file `path` the permissions (and, as root, the owner)
/// of the file it replaces, or the source's `mode` less `umask` for a new
/// file.
fn take_over_mode(
    file: &File,
    path: &Path,
    existing: Option<&std::fs::Metadata>,
    mode: u32,
    umask: u32,
) -> Result<()> {
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
        let _ = std::os::unix::fs::fchown(file, Some(m.uid()), Some(m.gid()));
    }
    Ok(())
}

/// The filesystem (or the pair of files) cannot share blocks: the signal to
/// write another way, not a failure. EXDEV: different filesystems;
/// EOPNOTSUPP/ENOTTY: no reflinks (ext4, tmpfs); EINVAL: a filesystem that
/// has them but not for these files (block sizes, flags); ETXTBSY: the
/// source is a swap file; EPERM: an immutable or append-only file.
fn cannot_clone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP)
            | Some(libc::EXDEV)
            | Some(libc::EINVAL)
            | Some(libc::ENOTTY)
            | Some(libc::ETXTBSY)
            | Some(libc::EPERM)
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

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
}
