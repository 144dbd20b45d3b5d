//! The receiving end: index what the destination already holds, request the
//! rest, write only verified chunks, commit atomically.
//!
//! The basis (the current destination) is cut with the same parameters as
//! the source, so unchanged content yields the same chunk hashes wherever it
//! now sits. A chunk found in the basis is copied from it and re-hashed on
//! the way, so a basis that changed under us is caught and the chunk is
//! fetched instead. Requests are windowed ([`WINDOW`] bytes outstanding),
//! which bounds the memory that chunks in flight can take.
//!
//! A reader thread drains the connection into a channel, so the sender is
//! never blocked writing while we write requests: the two ends cannot
//! deadlock on full pipes. What it queues is bounded in bytes (`Queue`).
//!
//! Other sources of old data: the partial file an interrupted run left
//! (resumed, written in place), and, for a chunk found nowhere whole, its
//! 4 KiB pieces ([`crate::content::refine`]). A file whose content did not change is
//! not rewritten: the partial file is only filled once the new file
//! differs from the old one at the same offsets. The run holds the
//! destination's lock ([`crate::dest::lock`]) throughout.
//!
//! A block device at the destination path (not behind a symlink: a link to
//! a device is refused, never followed nor replaced) is written in place
//! whatever the options ([`Output::device`]): it is its own basis, scanned
//! up to the source's size, and a chunk moved within it is copied only from
//! a range not yet overwritten. It has no partial file and no manifest-cache
//! entry, its lock is on the device node, and it is always compared by
//! content: there is no quick check against a device, nor for a device
//! source, whose mtime is only the time of the copy. `--check` compares a
//! device up to the source's size, so a larger device that starts with the
//! source is identical.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::content::chunk::{ChunkParams, Cutter};
use crate::content::compress::StreamDecoder;
use crate::content::hash::{ChunkHash, ChunkHashMap};
use crate::content::manifest::{self, piece_digest, Entry, Kind, Piecer, Validator};
use crate::content::refine::{self, BlockIndex, PieceSource};
use crate::content::scan::{self, read_full, Content, Extents};
use crate::content::verify::Comparer;
use crate::dest::cache;
use crate::dest::lock::Lock;
use crate::dest::writer::{self, Output};
use crate::error::{exit_code_of, fail, Exit, WithExit};
use crate::progress::Progress;
use crate::wire::{
    FileInfo, FrameReader, FrameWriter, Msg, StartMode, Summary, MAX_RANGES, MAX_REQUEST,
};

/// Most bytes of requested chunks in flight at once.
pub const WINDOW: u64 = 64 << 20;
/// Most decompressed bytes of received chunks completed together.
const BATCH_RAW: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, Default)]
pub struct RecvOptions {
    pub params: ChunkParams,
    /// Compare only; write nothing.
    pub check: bool,
    pub inplace: bool,
    /// Skip the quick check (size + mtime).
    pub checksum: bool,
    /// Re-read the written file before committing it.
    pub verify: bool,
    /// Neither resume from nor leave a partial file.
    pub no_partial: bool,
    /// The process umask, for the mode of a new file.
    pub umask: u32,
    /// `-n`: compare and count what would be sent; write nothing.
    pub dry_run: bool,
    /// Accept chunks whose content changed since the manifest (`CHUNK`
    /// with the changed bit), hashing them here.
    pub allow_changing: bool,
    /// `--check --sample K/N`.
    pub sample: Option<(u32, u32)>,
}

/// A `--seed` file: more chunks to take from, only ever read.
pub struct Seed {
    pub file: File,
    pub path: PathBuf,
}

impl Seed {
    pub fn open(path: &Path) -> Result<Seed> {
        let file = File::open(path)
            .with_context(|| format!("cannot open seed {}", path.display()))
            .exit_with(Exit::Io)?;
        Ok(Seed::from_file(file, path))
    }

    /// A seed opened already (by a confined server).
    pub fn from_file(file: File, path: &Path) -> Seed {
        Seed {
            file,
            path: path.to_path_buf(),
        }
    }
}

/// Runs the receiving end into `dest` until done; returns the summary that
/// was also sent to the peer.
pub fn receive<R, W>(
    dest: &Path,
    source_name: &[u8],
    seeds: Vec<Seed>,
    mut reader: FrameReader<R>,
    writer: &mut FrameWriter<W>,
    opts: &RecvOptions,
    progress: &Progress,
) -> Result<Summary>
where
    R: Read + Send + 'static,
    W: Write,
{
    if opts.sample.is_some() && !opts.check {
        return Err(fail(
            Exit::Protocol,
            "protocol error: a sample was asked for without --check",
        ));
    }
    let info = match reader.read_msg()? {
        Msg::FileInfo(i) => i,
        m => return Err(m.unexpected("FILE_INFO")),
    };
    if info.size > i64::MAX as u64 || info.mtime_nsec > 999_999_999 {
        return Err(fail(
            Exit::Protocol,
            format!("protocol error: implausible file info from peer: {info:?}"),
        ));
    }
    let dest = resolve_dest(dest, source_name)?;
    let existing = match std::fs::symlink_metadata(&dest) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot stat destination {}", dest.display()))
                .exit_with(Exit::Io)
        }
    };
    if let Some(m) = &existing {
        let t = m.file_type();
        if t.is_symlink() && std::fs::metadata(&dest).is_ok_and(|m| scan::is_block_device(&m)) {
            // Not followed, and not replaced either: a link to a device
            // (`/dev/vg/disk`) replaced by an image file would put the image
            // in /dev and leave the device unwritten.
            return Err(fail(
                Exit::Io,
                format!(
                    "destination {} is a symlink to a block device; vmsync does not write \
                     through symlinks: give the device's own path (the link's target)",
                    dest.display()
                ),
            ));
        }
        if !(t.is_file() || t.is_symlink() || t.is_block_device()) {
            return Err(fail(
                Exit::Io,
                format!(
                    "destination {} is neither a regular file nor a block device",
                    dest.display()
                ),
            ));
        }
    }
    // A symlink is never followed: its target is not the basis, and the
    // atomic rename replaces the link itself.
    let regular = existing.as_ref().filter(|m| m.file_type().is_file());
    // A block device is written in place (see `writer`), never replaced.
    let device = existing.as_ref().is_some_and(scan::is_block_device);

    check_parent(&dest)?;
    // A check or a dry run only reads: a shared lock, and no partial file
    // is made for it.
    let read_only = opts.check || opts.dry_run;
    let lock = if device {
        Some(Lock::device(&dest, !read_only)?)
    } else if read_only {
        Lock::shared(&dest)?
    } else {
        Some(Lock::exclusive(&dest)?)
    };
    if opts.check {
        let target = match (&lock, regular) {
            (Some(l), _) if device => {
                let file = l.file().try_clone().context("duplicate a file handle")?;
                let size = scan::device_size(&file)
                    .with_context(|| format!("cannot get the size of device {}", dest.display()))
                    .exit_with(Exit::Io)?;
                // Only the source's size is compared: a larger device is
                // identical when it starts with the source.
                Some((file, size.min(info.size)))
            }
            (_, Some(m)) => Some((
                open_nofollow(&dest)
                    .with_context(|| format!("cannot open destination {}", dest.display()))
                    .exit_with(Exit::Io)?,
                m.len(),
            )),
            _ => None,
        };
        writer.send_now(&Msg::Start(StartMode::Manifest))?;
        let summary = check(target, &info, &mut reader, opts, progress)?;
        writer.send_now(&Msg::Done(summary.clone()))?;
        return Ok(summary);
    }
    if opts.dry_run {
        let summary = dry_run(&dest, regular, device, seeds, &info, reader, writer, opts)?;
        return Ok(summary);
    }
    let lock = lock.expect("a sync holds the exclusive lock");
    // Opened (and refused when in use or too small) before anything is
    // said to the sender or written.
    let device_out = if device {
        let out = Output::device(&dest, lock.file(), info.size)?;
        let dev_size = out.device_size().unwrap_or(info.size);
        if dev_size > info.size {
            crate::vlog!(
                1,
                "receiver: {} is a block device of {dev_size} bytes: writing the source's {} bytes at its start, leaving the last {} bytes as they are",
                dest.display(),
                info.size,
                dev_size - info.size
            );
        }
        Some(out)
    } else {
        None
    };

    if quick_check(regular, &info, opts) {
        return up_to_date(&info, writer, false);
    }
    if opts.inplace
        && existing
            .as_ref()
            .is_some_and(|m| m.file_type().is_symlink())
    {
        return Err(fail(
            Exit::Io,
            format!(
                "{} is a symlink; --inplace will not write through it",
                dest.display()
            ),
        ));
    }
    let partial_len = if device {
        0
    } else {
        lock.file().metadata().map_or(0, |m| m.len())
    };
    let resume = !opts.no_partial && !opts.inplace && partial_len > 0;
    // Nothing here to reuse: have every chunk sent unasked, saving the
    // sender a second read and us the request round trips. A device always
    // has old contents to compare with.
    let inline = !device && regular.is_none_or(|m| m.len() == 0) && !resume && seeds.is_empty();
    // The pieces of the destination's cached manifest, offered so that the
    // sender need not send the parts of its manifest we already hold.
    let pieces = match regular {
        Some(m) if !inline && !device => cache::load(&dest, m, opts.params)
            .map(|cached| Piecer::cut(&cached))
            .filter(|p| p.len() <= crate::wire::MAX_PIECE_REFS)
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    if !pieces.is_empty() {
        writer.send(&Msg::Pieces(
            pieces.iter().map(|p| piece_digest(p)).collect(),
        ))?;
    }
    writer.send_now(&Msg::Start(if inline {
        StartMode::Inline
    } else {
        StartMode::Manifest
    }))?;
    progress.set_total(info.size);

    // Drain the connection from here on (see the module doc), holding
    // what arrives to a bounded number of bytes (see `Queue`).
    let (tx, rx) = mpsc::channel::<Result<Msg>>();
    let queue = Arc::new(Queue::new(inline, info.size, opts.params));
    let q = queue.clone();
    std::thread::Builder::new()
        .name("receive".into())
        .spawn(move || loop {
            let m = reader.read_msg().and_then(|m| q.admit(m));
            let stop = m.is_err();
            if tx.send(m).is_err() || stop {
                return;
            }
        })
        .context("cannot start a thread")?;

    crate::vlog!(
        1,
        "receiver: {} ({} bytes), mode {:?}",
        dest.display(),
        info.size,
        if inline { "inline" } else { "manifest" }
    );
    let mut basis = match (&device_out, regular) {
        // Only the part that will be overwritten: a device larger than the
        // source is not read past the source's size.
        (Some(out), _) if info.size > 0 => Some(Basis::scan(
            out.file().try_clone().context("duplicate a file handle")?,
            info.size,
            None,
            &dest,
            opts,
        )?),
        (None, Some(_)) if !inline => Basis::index(&dest, opts, true)?,
        _ => None,
    };
    if let Some(b) = &basis {
        crate::vlog!(
            1,
            "receiver: old file indexed: {} chunks{}",
            b.chunks.len(),
            if b.from_cache {
                " (from the manifest cache)"
            } else {
                ""
            }
        );
    }
    let seeds = index_seeds(seeds, opts)?;
    // What an interrupted run left: resumed from (written in place), unless
    // --no-partial says to start over.
    let mut partial = None;
    if resume {
        partial = Basis::index(lock.path(), opts, false)?;
        if let Some(p) = &mut partial {
            p.alias = true;
        }
    }
    let spec = OutSpec {
        locked: lock.file().try_clone().context("duplicate a file handle")?,
        dest: dest.clone(),
        size: info.size,
        existing: regular.cloned(),
        mode: info.mode,
        umask: opts.umask,
        keep: !opts.no_partial,
    };
    // With a basis, the partial file is made only once the new file turns out
    // to differ from the old one at the same offsets: an unchanged file (a
    // newer mtime, say) is then not rewritten at all.
    let out = if device_out.is_some() {
        if let Some(b) = &mut basis {
            b.alias = true;
        }
        device_out
    } else if opts.inplace {
        if let Some(b) = &mut basis {
            b.alias = true;
        }
        Some(Output::in_place(&dest, info.size, info.mode, opts.umask)?)
    } else if partial.is_some() {
        Some(spec.partial(true)?)
    } else if basis.is_none() {
        Some(spec.partial(false)?)
    } else {
        None
    };
    let mut run = Run {
        validator: Validator::new(info.size, opts.params),
        entries: Vec::new(),
        state: Vec::new(),
        next: 0,
        outstanding: 0,
        requests: Vec::new(),
        deferred: Vec::new(),
        refined: 0,
        refine_requests: Vec::new(),
        piece_requests: Vec::new(),
        plans: HashMap::new(),
        blocks: None,
        out,
        spec,
        lazy_copies: Vec::new(),
        inline,
        allow_changing: opts.allow_changing,
        basis,
        seeds,
        partial,
        decoder: None,
        summary: Summary::default(),
        progress,
        buf: Vec::new(),
    };
    let mut manifest_done = false;
    let result = (|| -> Result<()> {
        // A message taken off the queue early (see BLOCK_HASHES below).
        let mut stashed: Option<Result<Msg>> = None;
        loop {
            let msg = match stashed.take() {
                Some(m) => m?,
                None => rx
                    .recv()
                    .map_err(|_| fail(Exit::Connection, "the connection ended unexpectedly"))??,
            };
            queue.taken(&msg);
            match msg {
                Msg::Manifest(_) | Msg::ManifestRef(_) if manifest_done => {
                    return Err(fail(
                        Exit::Protocol,
                        "protocol error: manifest data after its end",
                    ));
                }
                Msg::Manifest(payload) => run.take_batch(&payload)?,
                Msg::ManifestRef(i) => {
                    let piece = pieces.get(i as usize).ok_or_else(|| {
                        fail(
                            Exit::Protocol,
                            format!(
                                "protocol error: peer referred to piece {i} of {} offered",
                                pieces.len()
                            ),
                        )
                    })?;
                    let mut payload = Vec::with_capacity(piece.len() * 37 + 4);
                    manifest::encode_batch(piece, &mut payload);
                    run.take_batch(&payload)?;
                }
                Msg::ManifestEnd {
                    count,
                    digest,
                    source_changed,
                } => {
                    run.validator.finish(count, &digest)?;
                    if source_changed && !opts.allow_changing {
                        return Err(fail(
                            Exit::Protocol,
                            "protocol error: peer sent a source that changed, which only \
                             --allow-changing-source accepts",
                        ));
                    }
                    run.summary.source_changed |= source_changed;
                    manifest_done = true;
                    crate::vlog!(
                        1,
                        "receiver: manifest complete: {count} entries, {} chunks to refine",
                        run.deferred.len()
                    );
                    run.start_refinement()?;
                    run.advance()?;
                }
                Msg::Chunk(c) => {
                    // Take the chunks already here, to complete them
                    // together, up to a bound on their decompressed size.
                    let mut raw = u64::from(c.raw_len);
                    let mut batch = vec![c];
                    while raw < BATCH_RAW {
                        match rx.try_recv() {
                            Ok(Ok(m @ Msg::Chunk(_))) => {
                                queue.taken(&m);
                                if let Msg::Chunk(c) = m {
                                    raw += u64::from(c.raw_len);
                                    batch.push(c);
                                }
                            }
                            Ok(other) => {
                                stashed = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    run.accept(batch)?;
                    run.advance()?;
                }
                Msg::BlockHashes { index, hashes } => {
                    // Take every piece-hash answer already here, to plan them together.
                    let mut batch = vec![(index, hashes)];
                    while batch.len() < 4096 {
                        match rx.try_recv() {
                            Ok(Ok(m @ Msg::BlockHashes { .. })) => {
                                queue.taken(&m);
                                if let Msg::BlockHashes { index, hashes } = m {
                                    batch.push((index, hashes));
                                }
                            }
                            Ok(other) => {
                                stashed = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    run.plan(batch)?;
                    run.advance()?;
                }
                m => return Err(m.unexpected("MANIFEST, MANIFEST_END or CHUNK")),
            }
            run.send_requests(writer)?;
            if manifest_done && run.finished() {
                break;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        // The peer usually says why it hung up before it does.
        if exit_code_of(&e) == Exit::Connection {
            while let Ok(m) = rx.recv() {
                if let Err(pe) = m {
                    if exit_code_of(&pe) != Exit::Connection {
                        return Err(pe);
                    }
                    break;
                }
            }
        }
        return Err(e);
    }

    if run.out.is_none() && run.basis.as_ref().is_some_and(|b| b.size != info.size) {
        run.materialize()?;
    }
    let Run {
        out,
        entries,
        mut summary,
        basis,
        ..
    } = run;
    summary.basis_cached = basis.as_ref().is_some_and(|b| b.from_cache);
    let size = info.size;
    let verify = |file: &File| -> Result<()> {
        if !opts.verify {
            return Ok(());
        }
        drop_cache(file);
        let mut cmp = Comparer::new(file, size);
        for part in entries.chunks(4096) {
            cmp.compare(part)?;
        }
        let diffs = cmp.finish(size);
        if let Some((s, e)) = diffs.iter().next() {
            let outcome = if device || opts.inplace {
                "it was written in place, so it holds neither version: run again to repair it"
            } else {
                "the destination was not replaced"
            };
            return Err(fail(
                Exit::Verify,
                format!(
                    "verification failed: {} differs from the source in {} bytes (first at offset {s}..{e}); {outcome}",
                    dest.display(),
                    diffs.total()
                ),
            ));
        }
        Ok(())
    };
    crate::vlog!(1, "receiver: all data written; committing");
    let written = match out {
        Some(out) => out.commit(&info, verify)?,
        None => {
            // The old file already holds exactly the new contents.
            let file = basis.expect("no output only with a basis").file;
            verify(&file)?;
            file.set_modified(writer::mtime(&info))
                .with_context(|| format!("cannot set the modification time of {}", dest.display()))
                .exit_with(Exit::Io)?;
            file
        }
    };
    // Best effort: without a cache entry the next run reads the file instead.
    // Never for a device (see `Basis::scan`).
    if !device {
        let _ = cache::store(&dest, &written, opts.params, &entries);
    }
    crate::vlog!(1, "receiver: committed {}", dest.display());
    summary.verified = opts.verify;
    summary.source_bytes = info.size;
    progress.finish();
    writer.send_now(&Msg::Done(summary.clone()))?;
    Ok(summary)
}

/// Bounds what the reader thread may hold for the main thread, so a peer
/// cannot fill our memory by sending faster than we write, or by sending
/// what nobody asked for.
///
/// Chunk data (and piece hashes) count against a byte budget. Inline, the
/// sender pushes everything unasked and we send nothing back until the end,
/// so the reader simply waits for room. Otherwise the sender only sends what
/// was requested, at most [`WINDOW`] bytes in flight, so twice that is a
/// peer breaking the protocol, and waiting could deadlock against our own
/// requests: it is an error. The manifest cannot be longer than the file's
/// size allows ([`Validator`] checks the entries; this bounds the bytes
/// queued before it looks).
struct Queue {
    inline: bool,
    queued: Mutex<u64>,
    room: Condvar,
    manifest: Mutex<u64>,
    manifest_limit: u64,
}

/// Chunk bytes the reader may queue ahead in inline mode.
const INLINE_QUEUE: u64 = 32 << 20;
/// Chunk bytes a well-behaved sender can have queued: the request window
/// and a frame of slack, with room for compression overhead.
const REQUEST_QUEUE: u64 = 2 * WINDOW + crate::wire::MAX_FRAME as u64;

impl Queue {
    fn new(inline: bool, size: u64, params: ChunkParams) -> Queue {
        // The most entries a manifest of `size` bytes can have, at most 37
        // bytes each encoded, with generous room for batch headers.
        let entries = size / u64::from(params.min()) + 2;
        Queue {
            inline,
            queued: Mutex::new(0),
            room: Condvar::new(),
            manifest: Mutex::new(0),
            manifest_limit: entries.saturating_mul(41).saturating_add(1 << 20),
        }
    }

    /// Bytes of `m` that count against the chunk budget.
    fn cost(m: &Msg) -> u64 {
        match m {
            Msg::Chunk(c) => c.payload.len() as u64 + 64,
            Msg::BlockHashes { hashes, .. } => hashes.len() as u64 * 8 + 64,
            _ => 0,
        }
    }

    /// Admits `m` into the queue (reader side), waiting or failing as above.
    fn admit(&self, m: Msg) -> Result<Msg> {
        if let Msg::Manifest(p) = &m {
            let mut total = self.manifest.lock().expect("queue lock");
            *total += p.len() as u64;
            if *total > self.manifest_limit {
                return Err(fail(
                    Exit::Protocol,
                    format!(
                        "protocol error: peer sent {} bytes of manifest, more than a file of this size can have",
                        *total
                    ),
                ));
            }
        }
        let n = Queue::cost(&m);
        if n == 0 {
            return Ok(m);
        }
        let mut q = self.queued.lock().expect("queue lock");
        if self.inline {
            while *q > 0 && *q + n > INLINE_QUEUE {
                q = self.room.wait(q).expect("queue lock");
            }
        } else if *q + n > REQUEST_QUEUE {
            return Err(fail(
                Exit::Protocol,
                format!(
                    "protocol error: peer sent {} bytes of chunk data nobody asked for",
                    *q + n
                ),
            ));
        }
        *q += n;
        Ok(m)
    }

    /// The main thread took `m` off the queue.
    fn taken(&self, m: &Msg) {
        let n = Queue::cost(m);
        if n > 0 {
            let mut q = self.queued.lock().expect("queue lock");
            *q = q.saturating_sub(n);
            self.room.notify_all();
        }
    }
}

/// A destination that is a directory (or ends in `/`) gets the source's name.
fn resolve_dest(dest: &Path, source_name: &[u8]) -> Result<PathBuf> {
    let is_dir = dest.as_os_str().as_bytes().ends_with(b"/") || dest.is_dir();
    if !is_dir {
        return Ok(dest.to_path_buf());
    }
    Ok(dest.join(crate::dest::confine::entry_name(
        source_name,
        &dest.display().to_string(),
    )?))
}

fn check_parent(dest: &Path) -> Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => return Ok(()),
    };
    if !dir.is_dir() {
        return Err(fail(
            Exit::Io,
            format!("destination directory {} does not exist", dir.display()),
        ));
    }
    Ok(())
}

/// Asks the kernel to forget cached pages, so `--verify` reads the disk.
fn drop_cache(file: &File) {
    // SAFETY: advisory call on a valid fd.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// `--check`: compare the destination (`target`: the open file and the size
/// to compare, `None` when there is none) with the manifest as it streams in.
fn check<R: Read>(
    target: Option<(File, u64)>,
    info: &FileInfo,
    reader: &mut FrameReader<R>,
    opts: &RecvOptions,
    progress: &Progress,
) -> Result<Summary> {
    progress.set_total(info.size);
    let exists = target.is_some();
    let mut cmp = target.as_ref().map(|(f, size)| Comparer::new(f, *size));
    let (validator, checked) = match opts.sample {
        Some((k, n)) => (
            Validator::new(info.size, opts.params)
                .restrict(crate::content::sample::ranges(info.size, k, n)),
            crate::content::sample::covered(info.size, k, n),
        ),
        None => (Validator::new(info.size, opts.params), info.size),
    };
    progress.set_total(checked);
    for_each_batch(reader, validator, |batch| {
        let n = match &mut cmp {
            Some(c) => c.compare(batch)?,
            None => batch.iter().map(Entry::len).sum(),
        };
        progress.advance(n);
        Ok(())
    })?;
    progress.finish();
    let diffs = match cmp {
        Some(c) => c.finish(info.size),
        None => {
            // No destination: everything checked differs.
            let mut r = writer::RangeSet::default();
            match opts.sample {
                Some((k, n)) => {
                    for (a, b) in crate::content::sample::ranges(info.size, k, n) {
                        r.insert(a, b);
                    }
                }
                None => r.insert(0, info.size),
            }
            r
        }
    };
    let mut s = Summary {
        source_bytes: info.size,
        identical: exists && diffs.is_empty(),
        checked_bytes: checked,
        ..Summary::default()
    };
    set_ranges(&mut s, &diffs);
    Ok(s)
}

/// Reads the rest of the manifest through `validator`, handing each
/// decoded batch to `each`.
fn for_each_batch<R: Read>(
    reader: &mut FrameReader<R>,
    mut validator: Validator,
    mut each: impl FnMut(&[Entry]) -> Result<()>,
) -> Result<()> {
    let mut batch = Vec::new();
    loop {
        match reader.read_msg()? {
            Msg::Manifest(p) => {
                batch.clear();
                validator.decode_batch(&p, &mut batch)?;
                each(&batch)?;
            }
            Msg::ManifestEnd { count, digest, .. } => {
                return validator.finish(count, &digest).map(drop)
            }
            m => return Err(m.unexpected("MANIFEST or MANIFEST_END")),
        }
    }
}

/// The byte ranges a summary reports (differences, or what a dry run
/// would fetch): their total, their count, and the first [`MAX_RANGES`].
fn set_ranges(s: &mut Summary, ranges: &writer::RangeSet) {
    s.differing_bytes = ranges.total();
    s.range_count = ranges.len() as u64;
    s.ranges = ranges
        .iter()
        .take(MAX_RANGES)
        .map(|(a, b)| (a, b - a))
        .collect();
}

fn open_nofollow(p: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
}

/// The existing destination and where each of its chunks sits.
struct Basis {
    file: File,
    size: u64,
    /// Every data chunk of the old file: (offset, length, hash).
    chunks: Vec<(u64, u32, ChunkHash)>,
    /// Chunk hash → (offset, length) of its first occurrence.
    index: ChunkHashMap<(u64, u32)>,
    /// Offset → hash, to recognise chunks that have not moved.
    at: HashMap<u64, ChunkHash>,
    /// The chunk list came from the manifest cache, not from reading the file.
    from_cache: bool,
    /// This file is also the output: ranges written this run no longer
    /// hold what the index says.
    alias: bool,
}

impl Basis {
    /// Indexes the file at `dest` (from the manifest cache when `use_cache`
    /// and the cache knows this very file).
    fn index(dest: &Path, opts: &RecvOptions, use_cache: bool) -> Result<Option<Basis>> {
        let file = match open_nofollow(dest) {
            Ok(f) => f,
            // Unreadable old contents only cost bandwidth.
            Err(_) => return Ok(None),
        };
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", dest.display()))
            .exit_with(Exit::Io)?;
        let cached = use_cache
            .then(|| cache::load(dest, &meta, opts.params))
            .flatten();
        Basis::scan(file, meta.len(), cached, dest, opts).map(Some)
    }

    /// Indexes the first `size` bytes of `file`: from `cached` entries, or
    /// by reading it. (Never a device from the cache: a device's content
    /// changes without its node's times moving, so no cache key holds.)
    fn scan(
        file: File,
        size: u64,
        cached: Option<Vec<Entry>>,
        dest: &Path,
        opts: &RecvOptions,
    ) -> Result<Basis> {
        let mut index = ChunkHashMap::default();
        let mut at = HashMap::new();
        let mut chunks = Vec::new();
        let mut add = |offset: u64, len: u32, h: ChunkHash| {
            chunks.push((offset, len, h));
            index.entry(h).or_insert((offset, len));
            at.insert(offset, h);
        };
        let from_cache = cached.is_some();
        match cached {
            Some(entries) => {
                for e in entries {
                    if let Kind::Data { len, hash } = e.kind {
                        add(e.offset, len, hash);
                    }
                }
            }
            None => {
                let cutter = Cutter::new(opts.params);
                let mut extents = Extents::of(&file, size);
                scan::scan(&file, size, &mut extents, &cutter, |recs| {
                    for r in recs {
                        if let Content::Data(h) = r.content {
                            add(r.offset, r.len, h);
                        }
                    }
                    Ok(())
                })
                .with_context(|| format!("reading destination {}", dest.display()))?;
            }
        }
        Ok(Basis {
            file,
            size,
            chunks,
            index,
            at,
            from_cache,
            alias: false,
        })
    }
}

/// Whether the destination counts as up to date without reading it: same
/// size and mtime (to the nanosecond), unless `-c`. A device source's
/// mtime is the time of the copy (see `sender`), and a device destination
/// has none worth comparing: both are compared by content.
fn quick_check(regular: Option<&std::fs::Metadata>, info: &FileInfo, opts: &RecvOptions) -> bool {
    let source_is_device = info.mode & libc::S_IFMT == libc::S_IFBLK;
    !opts.checksum
        && !source_is_device
        && regular.is_some_and(|m| {
            m.len() == info.size
                && m.mtime() == info.mtime_sec
                && m.mtime_nsec() == i64::from(info.mtime_nsec)
        })
}

/// Ends a run that the quick check found up to date.
fn up_to_date<W: Write>(
    info: &FileInfo,
    writer: &mut FrameWriter<W>,
    dry_run: bool,
) -> Result<Summary> {
    let s = Summary {
        up_to_date: true,
        identical: true,
        dry_run,
        source_bytes: info.size,
        ..Summary::default()
    };
    writer.send_now(&Msg::Start(StartMode::UpToDate))?;
    writer.send_now(&Msg::Done(s.clone()))?;
    Ok(s)
}

/// `-n/--dry-run`: what a sync would do, from the manifest and the indexes
/// of the old file and the seeds; nothing is created or written. Chunks the
/// sync would fetch are counted whole (sub-chunk refinement may then send
/// less), and listed as ranges, as `--check` lists differences.
#[allow(clippy::too_many_arguments)]
fn dry_run<R: Read, W: Write>(
    dest: &Path,
    regular: Option<&std::fs::Metadata>,
    device: bool,
    seeds: Vec<Seed>,
    info: &FileInfo,
    mut reader: FrameReader<R>,
    writer: &mut FrameWriter<W>,
    opts: &RecvOptions,
) -> Result<Summary> {
    if quick_check(regular, info, opts) {
        return up_to_date(info, writer, true);
    }
    writer.send_now(&Msg::Start(StartMode::Manifest))?;
    let basis = if device {
        let file = open_nofollow(dest)
            .with_context(|| format!("cannot open destination device {}", dest.display()))
            .exit_with(Exit::Io)?;
        let size = scan::device_size(&file)
            .with_context(|| format!("cannot get the size of device {}", dest.display()))
            .exit_with(Exit::Io)?;
        if size < info.size {
            return Err(fail(
                Exit::Io,
                format!(
                    "destination device {} holds {size} bytes, less than the source's {}",
                    dest.display(),
                    info.size
                ),
            ));
        }
        Some(Basis::scan(file, info.size, None, dest, opts)?)
    } else if regular.is_some() {
        Basis::index(dest, opts, true)?
    } else {
        None
    };
    let seeds = index_seeds(seeds, opts)?;
    let mut s = Summary {
        dry_run: true,
        source_bytes: info.size,
        basis_cached: basis.as_ref().is_some_and(|b| b.from_cache),
        ..Summary::default()
    };
    let mut fetch = writer::RangeSet::default();
    let validator = Validator::new(info.size, opts.params);
    for_each_batch(&mut reader, validator, |batch| {
        for e in batch {
            match e.kind {
                Kind::Zero { len } => s.zero_bytes += len,
                Kind::Data { len, hash } => {
                    if basis
                        .iter()
                        .chain(&seeds)
                        .any(|b| b.index.contains_key(&hash))
                    {
                        s.reused_bytes += u64::from(len);
                    } else {
                        s.literal_bytes += u64::from(len);
                        fetch.insert(e.offset, e.end());
                    }
                }
            }
        }
        Ok(())
    })?;
    set_ranges(&mut s, &fetch);
    crate::vlog!(
        1,
        "receiver: dry run: would fetch {} bytes in {} ranges, reuse {}",
        s.literal_bytes,
        s.range_count,
        s.reused_bytes
    );
    writer.send_now(&Msg::Done(s.clone()))?;
    Ok(s)
}

/// Indexes the `--seed` files (from the manifest cache when it knows
/// them; a seed indexed by reading is recorded there for the next run,
/// which is what makes a golden base image cheap night after night).
fn index_seeds(seeds: Vec<Seed>, opts: &RecvOptions) -> Result<Vec<Basis>> {
    let mut out = Vec::with_capacity(seeds.len());
    for seed in seeds {
        let meta = seed
            .file
            .metadata()
            .with_context(|| format!("cannot stat seed {}", seed.path.display()))
            .exit_with(Exit::Io)?;
        if !meta.is_file() {
            return Err(fail(
                Exit::Io,
                format!("seed {} is not a regular file", seed.path.display()),
            ));
        }
        let cached = cache::load(&seed.path, &meta, opts.params);
        let hit = cached.is_some();
        let entries = match cached {
            Some(e) => e,
            None => {
                let entries = manifest_of(&seed.file, meta.len(), opts.params)
                    .with_context(|| format!("reading seed {}", seed.path.display()))?;
                // Best effort: a seed we cannot record costs a re-read.
                let _ = cache::store(&seed.path, &seed.file, opts.params, &entries);
                entries
            }
        };
        let mut b = Basis::scan(seed.file, meta.len(), Some(entries), &seed.path, opts)?;
        b.from_cache = hit;
        crate::vlog!(
            1,
            "receiver: seed {} indexed: {} chunks{}",
            seed.path.display(),
            b.chunks.len(),
            if b.from_cache {
                " (from the manifest cache)"
            } else {
                ""
            }
        );
        out.push(b);
    }
    Ok(out)
}

/// The manifest entries of the first `size` bytes of `file`.
fn manifest_of(file: &File, size: u64, params: ChunkParams) -> Result<Vec<Entry>> {
    let cutter = Cutter::new(params);
    let mut extents = Extents::of(file, size);
    let mut builder = crate::content::manifest::Builder::default();
    let mut entries = Vec::new();
    scan::scan(file, size, &mut extents, &cutter, |recs| {
        for r in &recs {
            builder.push(r, &mut entries);
        }
        Ok(())
    })?;
    builder.finish(&mut entries);
    Ok(entries)
}

/// What the atomic output will be, for when it is made.
struct OutSpec {
    /// The partial file, locked for this run.
    locked: File,
    dest: PathBuf,
    size: u64,
    existing: Option<std::fs::Metadata>,
    mode: u32,
    umask: u32,
    keep: bool,
}

impl OutSpec {
    fn partial(&self, resume: bool) -> Result<Output> {
        Output::partial(
            &self.dest,
            &self.locked,
            self.size,
            resume,
            self.keep,
            self.existing.as_ref(),
            self.mode,
            self.umask,
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    /// Not in the basis; refined once the whole manifest is known.
    Deferred,
    /// Piece hashes asked for.
    Refining,
    /// Some pieces asked for; the plan says where the rest come from.
    Pieces,
    /// The whole chunk asked for.
    Requested,
    Done,
}

struct Run<'a> {
    validator: Validator,
    entries: Vec<Entry>,
    state: Vec<State>,
    /// First entry not yet handled.
    next: usize,
    /// Bytes requested and not yet received.
    outstanding: u64,
    requests: Vec<u64>,
    /// Entries waiting for refinement, in file order.
    deferred: Vec<usize>,
    /// How far `deferred` has been handed to the sender (after the manifest end).
    refined: usize,
    refine_requests: Vec<u64>,
    piece_requests: Vec<Msg>,
    /// Entries identical to the old file at the same offset, not written yet
    /// because no output exists yet (see `OutSpec`).
    lazy_copies: Vec<(usize, Option<usize>, u64)>,
    spec: OutSpec,
    /// The sender sends every data chunk unasked (`StartMode::Inline`).
    inline: bool,
    /// `--allow-changing-source`: chunks may arrive with new content, so
    /// none is refined (pieces are checked against the manifest's hash,
    /// which a changed chunk no longer has): a lacking chunk is fetched whole.
    allow_changing: bool,
    /// Plans of chunks in state `Pieces`.
    plans: HashMap<usize, Vec<PieceSource>>,
    blocks: Option<BlockIndex>,
    out: Option<Output>,
    /// The destination's old contents.
    basis: Option<Basis>,
    /// `--seed` files: read-only, consulted after the basis.
    seeds: Vec<Basis>,
    /// What an interrupted run left in the partial file, which is the output.
    partial: Option<Basis>,
    decoder: Option<StreamDecoder>,
    summary: Summary,
    progress: &'a Progress,
    buf: Vec<u8>,
}

impl Run<'_> {
    /// Takes one batch of the manifest (received, or a piece we held).
    fn take_batch(&mut self, payload: &[u8]) -> Result<()> {
        let before = self.entries.len();
        self.validator.decode_batch(payload, &mut self.entries)?;
        self.state.resize(self.entries.len(), State::Pending);
        debug_assert!(self.entries.len() > before);
        self.advance()
    }

    /// Handles entries in order while the request window has room.
    fn advance(&mut self) -> Result<()> {
        let mut copies: Vec<(usize, Option<usize>, u64)> = Vec::new();
        while self.next < self.entries.len() && (self.inline || self.outstanding < WINDOW) {
            let i = self.next;
            self.next += 1;
            let e = self.entries[i];
            if self.out.is_none() {
                if self.unchanged_in_place(&e) {
                    if let Kind::Data { .. } = e.kind {
                        self.lazy_copies.push((i, None, e.offset));
                        self.summary.reused_bytes += e.len();
                    } else {
                        self.summary.zero_bytes += e.len();
                    }
                    self.state[i] = State::Done;
                    self.progress.advance(e.len());
                    continue;
                }
                self.materialize()?;
            }
            match e.kind {
                Kind::Zero { len } => {
                    // A device cannot keep holes; where its scan found
                    // zeros (and nothing was written since), it already
                    // reads as zeros: touch nothing.
                    if !(self.is_device() && self.zero_in_place(&e)) {
                        self.output().zero(e.offset, len)?;
                    }
                    self.summary.zero_bytes += len;
                    self.state[i] = State::Done;
                    self.progress.advance(len);
                }
                Kind::Data { len, hash } => {
                    if self.inline {
                        // On its way unasked.
                        self.request(i, len);
                        continue;
                    }
                    if self.output().is_in_place() {
                        if self.copy_in_place(i, e.offset, len, &hash)? {
                            continue;
                        }
                        if let Some((k, src)) = self.in_seeds(&hash) {
                            copies.push((i, Some(k), src));
                            continue;
                        }
                        if self.basis.as_ref().is_some_and(|b| b.size > 0) && !self.allow_changing {
                            self.state[i] = State::Deferred;
                            self.deferred.push(i);
                        } else {
                            self.request(i, len);
                        }
                        continue;
                    }
                    match self.basis.as_ref().map(|b| b.index.get(&hash)) {
                        Some(Some(&(src, _))) => copies.push((i, None, src)),
                        found => match self.in_seeds(&hash) {
                            Some((k, src)) => copies.push((i, Some(k), src)),
                            None if found.is_some() && !self.allow_changing => {
                                self.state[i] = State::Deferred;
                                self.deferred.push(i);
                            }
                            None => self.request(i, len),
                        },
                    }
                }
            }
        }
        self.copy_parallel(copies, false)?;
        self.advance_refinement();
        Ok(())
    }

    /// The output; it exists once anything is to be written.
    fn output(&mut self) -> &mut Output {
        self.out.as_mut().expect("output made before writing")
    }

    /// The output is a block device.
    fn is_device(&self) -> bool {
        self.out.as_ref().is_some_and(|o| o.device_size().is_some())
    }

    /// Zero entry `e` lies where the output's own old contents (an aliased
    /// basis) were scanned as zeros, and nothing has been written there.
    fn zero_in_place(&self, e: &Entry) -> bool {
        self.basis
            .as_ref()
            .is_some_and(|b| b.alias && e.end() <= b.size)
            && !self.old_data_overlaps(e)
            && !self
                .out
                .as_ref()
                .is_some_and(|o| o.is_dirty(e.offset, e.end()))
    }

    /// Entry `e` is already in the old file at its own offset.
    fn unchanged_in_place(&self, e: &Entry) -> bool {
        let Some(b) = &self.basis else {
            return false;
        };
        if e.end() > b.size {
            return false;
        }
        match e.kind {
            Kind::Data { hash, .. } => b.at.get(&e.offset) == Some(&hash),
            // Zero in the old file too: no old data chunk overlaps it.
            Kind::Zero { .. } => !self.old_data_overlaps(e),
        }
    }

    /// Some data chunk of the old file overlaps `e`'s range.
    fn old_data_overlaps(&self, e: &Entry) -> bool {
        let Some(b) = &self.basis else {
            return false;
        };
        let k = b
            .chunks
            .partition_point(|c| c.0 + u64::from(c.1) <= e.offset);
        b.chunks.get(k).is_some_and(|c| c.0 < e.end())
    }

    /// Makes the atomic temp file and writes into it what was found unchanged
    /// so far.
    fn materialize(&mut self) -> Result<()> {
        self.out = Some(self.spec.partial(false)?);
        let copies = std::mem::take(&mut self.lazy_copies);
        self.copy_parallel(copies, true)
    }

    /// Once the manifest is complete: index the old data no chunk matched
    /// (that is where changed chunks' pieces can be), then ask for piece
    /// hashes of deferred chunks while the window has room.
    fn start_refinement(&mut self) -> Result<()> {
        let Some(basis) = &self.basis else {
            return Ok(());
        };
        if self.deferred.is_empty() {
            return Ok(());
        }
        let wanted: std::collections::HashSet<ChunkHash> = self
            .entries
            .iter()
            .filter_map(|e| match e.kind {
                Kind::Data { hash, .. } => Some(hash),
                Kind::Zero { .. } => None,
            })
            .collect();
        let unmatched: Vec<(u64, u64)> = basis
            .chunks
            .iter()
            .filter(|(_, _, h)| !wanted.contains(h))
            .map(|&(o, l, _)| (o, o + u64::from(l)))
            .collect();
        self.blocks = Some(BlockIndex::build(&basis.file, basis.size, &unmatched)?);
        crate::vlog!(
            1,
            "receiver: block index of unmatched old data: {} blocks",
            self.blocks.as_ref().map_or(0, BlockIndex::len)
        );
        Ok(())
    }

    fn advance_refinement(&mut self) {
        if self.blocks.is_none() {
            return;
        }
        let no_blocks = self.blocks.as_ref().is_some_and(|b| b.is_empty());
        while self.refined < self.deferred.len() && self.outstanding < WINDOW {
            let i = self.deferred[self.refined];
            self.refined += 1;
            let e = self.entries[i];
            if no_blocks && !self.old_data_overlaps(&e) {
                // No piece of it can be found here: skip the round trip.
                self.request(i, e.len() as u32);
                continue;
            }
            self.state[i] = State::Refining;
            self.outstanding += e.len();
            self.refine_requests.push(i as u64);
        }
    }

    /// Piece hashes of chunks we lack: find what we can locally (planned in
    /// parallel: each plan reads and hashes old data), ask for the rest.
    fn plan(&mut self, batch: Vec<(u64, Vec<refine::PieceHash>)>) -> Result<()> {
        let mut todo = Vec::with_capacity(batch.len());
        for (index, hashes) in batch {
            let i = self.expect_state(index, State::Refining)?;
            let e = self.entries[i];
            if hashes.len() != refine::piece_count(e.offset, e.len() as u32) {
                return Err(fail(
                    Exit::Protocol,
                    format!(
                        "protocol error: {} piece hashes for chunk {i}",
                        hashes.len()
                    ),
                ));
            }
            todo.push((i, hashes));
        }
        let basis = self.basis.as_ref().expect("refinement needs a basis");
        let blocks = self.blocks.as_ref().expect("refinement has a block index");
        let dirty =
            |s: u64, e: u64| basis.alias && self.out.as_ref().is_some_and(|o| o.is_dirty(s, e));
        let plans: Vec<Vec<PieceSource>> = todo
            .par_iter()
            .map(|(i, hashes)| make_plan(&self.entries[*i], hashes, basis, blocks, &dirty))
            .collect();
        for ((i, _), plan) in todo.into_iter().zip(plans) {
            let wire = plan.iter().filter(|p| **p == PieceSource::Wire).count();
            if wire == plan.len() {
                // Nothing of it here: the whole chunk is the same bytes, one message.
                self.state[i] = State::Requested;
                self.requests.push(i as u64);
                continue;
            }
            self.state[i] = State::Pieces;
            if wire == 0 {
                self.complete(vec![(i, Vec::new(), Some(plan))])?;
                continue;
            }
            self.piece_requests.push(Msg::PieceRequest {
                index: i as u64,
                count: plan.len() as u32,
                bitmap: refine::bitmap(&plan),
            });
            self.plans.insert(i, plan);
        }
        Ok(())
    }

    /// Finishes chunks whose data is here: a whole chunk from the wire, or
    /// the wire pieces of a planned one (assembled with old data). Building,
    /// verifying and writing run in parallel; a whole chunk that fails its
    /// hash is a protocol error, an assembled one is fetched whole instead
    /// (a piece matched by its short hash but differed, or old data changed).
    fn complete(&mut self, items: Vec<(usize, Vec<u8>, Option<Vec<PieceSource>>)>) -> Result<()> {
        let basis = self.basis.as_ref();
        let out = self.out.as_ref().expect("output made before writing");
        let alias = basis.is_some_and(|b| b.alias);
        let dirty = |s: u64, e: u64| alias && out.is_dirty(s, e);
        let entries = &self.entries;
        // (written, bytes from the wire) per item.
        let done: Vec<Result<(bool, u64)>> = items
            .par_iter()
            .map(|(i, data, plan)| {
                let e = entries[*i];
                let Kind::Data { hash, .. } = e.kind else {
                    unreachable!("only data entries are completed")
                };
                let (chunk, from_wire) = match plan {
                    None => (None, e.len()),
                    Some(plan) => {
                        let b = basis.expect("pieces need a basis");
                        let (c, w) = build(&e, plan, data, b, &dirty);
                        (c, w)
                    }
                };
                let bytes = chunk.as_deref().unwrap_or(data);
                if plan.is_some() && chunk.is_none() {
                    return Ok((false, from_wire));
                }
                match writer::verify(bytes, &hash) {
                    Some(v) => out.write(e.offset, v).map(|_| (true, from_wire)),
                    None => Ok((false, from_wire)),
                }
            })
            .collect();
        for ((i, _, plan), r) in items.into_iter().zip(done) {
            let (written, from_wire) = r?;
            let e = self.entries[i];
            self.summary.literal_bytes += from_wire;
            if !written {
                if plan.is_none() {
                    return Err(fail(
                        Exit::Protocol,
                        format!(
                            "chunk {i} at offset {} failed its BLAKE3 check (corrupted in transit?); nothing of it was written",
                            e.offset
                        ),
                    ));
                }
                // Fetch it whole; its bytes stay counted in the window.
                self.state[i] = State::Requested;
                self.requests.push(i as u64);
                continue;
            }
            self.out
                .as_mut()
                .expect("output made before writing")
                .mark_dirty(e.offset, e.end());
            self.state[i] = State::Done;
            self.outstanding -= e.len();
            if plan.is_some() {
                self.summary.reused_bytes += e.len() - from_wire;
            }
            self.progress.advance(e.len());
        }
        Ok(())
    }

    /// Index of entry `index` if it is in state `want`, else a protocol error.
    fn expect_state(&self, index: u64, want: State) -> Result<usize> {
        let i = usize::try_from(index).unwrap_or(usize::MAX);
        match self.state.get(i) {
            Some(s) if *s == want => Ok(i),
            _ => Err(fail(
                Exit::Protocol,
                format!("protocol error: peer sent data for chunk {index}, which was not asked for that way"),
            )),
        }
    }

    fn request(&mut self, i: usize, len: u32) {
        self.state[i] = State::Requested;
        self.outstanding += u64::from(len);
        if !self.inline {
            self.requests.push(i as u64);
        }
    }

    /// Atomic mode: copies from the basis in parallel (read, hash, write).
    /// `counted`: the entries were already marked done and counted as reused.
    /// Copies chunks from the basis (seed `None`) or a seed: (entry,
    /// seed, offset there). One that no longer reads back with its hash is
    /// fetched instead.
    fn copy_parallel(
        &mut self,
        copies: Vec<(usize, Option<usize>, u64)>,
        counted: bool,
    ) -> Result<()> {
        if copies.is_empty() {
            return Ok(());
        }
        let (basis, seeds) = (self.basis.as_ref(), &self.seeds);
        let entries = &self.entries;
        let out = self.out.as_ref().expect("copies need an output");
        let results: Vec<Result<bool>> = copies
            .par_iter()
            .map(|&(i, seed, src)| {
                let e = entries[i];
                let Kind::Data { len, hash } = e.kind else {
                    unreachable!("only data entries are copied")
                };
                let from = match seed {
                    Some(k) => &seeds[k],
                    None => basis.expect("copies come from a basis"),
                };
                let mut buf = vec![0u8; len as usize];
                if read_full(&from.file, &mut buf, src).is_err() {
                    return Ok(false);
                }
                match writer::verify(&buf, &hash) {
                    Some(v) => out.write(e.offset, v).map(|_| true),
                    None => Ok(false),
                }
            })
            .collect();
        for ((i, _, _), r) in copies.into_iter().zip(results) {
            let len = self.entries[i].len();
            match (r?, counted) {
                (true, true) => {}
                (true, false) => {
                    self.state[i] = State::Done;
                    self.summary.reused_bytes += len;
                    self.progress.advance(len);
                }
                (false, _) => {
                    // The basis changed since it was indexed: fetch instead.
                    if counted {
                        self.summary.reused_bytes -= len;
                    }
                    self.request(i, len as u32);
                }
            }
        }
        Ok(())
    }

    /// The first seed holding a chunk with `hash`: (seed, offset there).
    fn in_seeds(&self, hash: &ChunkHash) -> Option<(usize, u64)> {
        self.seeds
            .iter()
            .enumerate()
            .find_map(|(k, b)| b.index.get(hash).map(|&(src, _)| (k, src)))
    }

    /// In place (`--inplace`, or a resumed partial file): leaves a chunk that
    /// is already at its offset in the output where it is, or copies it from
    /// old data not yet overwritten. False when it must be fetched.
    fn copy_in_place(&mut self, i: usize, offset: u64, len: u32, hash: &ChunkHash) -> Result<bool> {
        // (from the partial basis?, source offset), best first: already in
        // place in the output; then read-only old data; then other places
        // in the output's old contents.
        let mut cands: Vec<(bool, u64)> = Vec::with_capacity(3);
        let bases = [(false, &self.basis), (true, &self.partial)];
        for (is_partial, b) in bases {
            if let Some(b) = b {
                if b.alias && b.at.get(&offset) == Some(hash) {
                    cands.push((is_partial, offset));
                }
            }
        }
        for alias_pass in [false, true] {
            for (is_partial, b) in bases {
                if let Some(b) = b {
                    if b.alias != alias_pass {
                        continue;
                    }
                    if let Some(&(src, _)) = b.index.get(hash) {
                        if !(b.alias && src == offset) {
                            cands.push((is_partial, src));
                        }
                    }
                }
            }
        }
        let end = offset + u64::from(len);
        for (is_partial, src) in cands {
            let b = if is_partial {
                &self.partial
            } else {
                &self.basis
            };
            let b = b.as_ref().expect("candidates come from bases");
            let out = self.out.as_ref().expect("in place has an output");
            if b.alias && out.is_dirty(src, src + u64::from(len)) {
                continue;
            }
            if b.alias && src == offset {
                // Already where it belongs and not copied anywhere: nothing
                // to read or write. Its hash is this run's scan of the file,
                // or a cache entry checked against the file's ctime.
                self.state[i] = State::Done;
                self.summary.reused_bytes += u64::from(len);
                self.progress.advance(u64::from(len));
                return Ok(true);
            }
            self.buf.resize(len as usize, 0);
            if read_full(&b.file, &mut self.buf, src).is_err() {
                continue;
            }
            let Some(v) = writer::verify(&self.buf, hash) else {
                continue;
            };
            out.write(offset, v)?;
            self.out
                .as_mut()
                .expect("in place has an output")
                .mark_dirty(offset, end);
            self.state[i] = State::Done;
            self.summary.reused_bytes += u64::from(len);
            self.progress.advance(u64::from(len));
            return Ok(true);
        }
        Ok(false)
    }

    /// Chunks from the sender: checked against what was asked for and
    /// decoded into bounded buffers in arrival order (one zstd stream), then
    /// completed together.
    fn accept(&mut self, msgs: Vec<crate::wire::ChunkMsg>) -> Result<()> {
        let mut items = Vec::with_capacity(msgs.len());
        for c in msgs {
            let i = usize::try_from(c.index).unwrap_or(usize::MAX);
            let (e, state) = match (self.entries.get(i), self.state.get(i)) {
                (Some(e), Some(s)) => (*e, *s),
                _ => {
                    return Err(fail(
                        Exit::Protocol,
                        format!(
                            "protocol error: peer sent chunk {} that is not in the manifest",
                            c.index
                        ),
                    ))
                }
            };
            let Kind::Data { len, .. } = e.kind else {
                return Err(fail(
                    Exit::Protocol,
                    format!("protocol error: peer sent data for zero run {i}"),
                ));
            };
            let want = match (c.pieces, state) {
                (true, State::Pieces) => refine::pieces(e.offset, len)
                    .zip(&self.plans[&i])
                    .filter(|(_, p)| **p == PieceSource::Wire)
                    .map(|((_, l), _)| u64::from(l))
                    .sum(),
                (false, State::Requested) => u64::from(len),
                _ => {
                    return Err(fail(
                        Exit::Protocol,
                        format!(
                        "protocol error: unexpected chunk {i} (not asked for, or not in that form)"
                    ),
                    ))
                }
            };
            if u64::from(c.raw_len) != want {
                return Err(fail(
                    Exit::Protocol,
                    format!(
                        "protocol error: chunk {i} carries {} bytes, expected {want}",
                        c.raw_len
                    ),
                ));
            }
            let data = self.decode(&c)?;
            if c.changed {
                if !self.allow_changing || c.pieces {
                    return Err(fail(
                        Exit::Protocol,
                        format!(
                            "protocol error: peer sent chunk {i} as changed since the manifest, \
                             which only --allow-changing-source accepts"
                        ),
                    ));
                }
                // The source moved under this chunk: its new content is
                // what we commit, so it is what the hash must now say.
                self.entries[i].kind = Kind::Data {
                    len,
                    hash: ChunkHash::of(&data),
                };
                self.summary.source_changed = true;
            }
            // Mark it taken, so a duplicate in this batch is refused.
            let plan = if c.pieces {
                self.plans.remove(&i)
            } else {
                None
            };
            self.state[i] = State::Pending;
            items.push((i, data, plan));
        }
        self.complete(items)
    }

    /// The raw bytes of a `CHUNK` payload, decompressed into a buffer of
    /// exactly `raw_len` (already checked against what was asked for).
    fn decode(&mut self, c: &crate::wire::ChunkMsg) -> Result<Vec<u8>> {
        if !c.compressed {
            if c.payload.len() != c.raw_len as usize {
                return Err(fail(
                    Exit::Protocol,
                    format!(
                        "protocol error: chunk {} carries {} bytes, expected {}",
                        c.index,
                        c.payload.len(),
                        c.raw_len
                    ),
                ));
            }
            return Ok(c.payload.clone());
        }
        if self.decoder.is_none() {
            self.decoder = Some(StreamDecoder::new()?);
        }
        let mut out = vec![0u8; c.raw_len as usize];
        self.decoder
            .as_mut()
            .expect("just set")
            .decode(&c.payload, &mut out)?;
        Ok(out)
    }

    fn send_requests<W: Write>(&mut self, writer: &mut FrameWriter<W>) -> Result<()> {
        let any = !self.requests.is_empty()
            || !self.refine_requests.is_empty()
            || !self.piece_requests.is_empty();
        for part in self.requests.chunks(MAX_REQUEST) {
            writer.send(&Msg::Request(part.to_vec()))?;
        }
        for part in self.refine_requests.chunks(MAX_REQUEST) {
            writer.send(&Msg::BlockRequest(part.to_vec()))?;
        }
        for m in self.piece_requests.drain(..) {
            writer.send(&m)?;
        }
        self.requests.clear();
        self.refine_requests.clear();
        if any {
            writer.flush()?;
        }
        Ok(())
    }

    /// Everything written: the manifest is complete and nothing is pending.
    fn finished(&self) -> bool {
        self.next == self.entries.len()
            && self.outstanding == 0
            && self.refined == self.deferred.len()
            && self.requests.is_empty()
    }
}

/// Where each piece of chunk `e` can come from: the old file at the same
/// offset (read once for the whole chunk), else a block of unmatched old
/// data with the same piece hash, else the wire. `dirty` says which old
/// ranges were overwritten this run (in place).
fn make_plan(
    e: &Entry,
    hashes: &[refine::PieceHash],
    basis: &Basis,
    blocks: &BlockIndex,
    dirty: &(impl Fn(u64, u64) -> bool + Sync),
) -> Vec<PieceSource> {
    let len = e.len() as u32;
    let same_end = e.end().min(basis.size);
    let mut same = Vec::new();
    if same_end > e.offset {
        same.resize((same_end - e.offset) as usize, 0);
        if read_full(&basis.file, &mut same, e.offset).is_err() {
            same.clear();
        }
    }
    refine::pieces(e.offset, len)
        .zip(hashes)
        .map(|((start, plen), want)| {
            let end = start + u64::from(plen);
            let a = (start - e.offset) as usize;
            // Same offset first: in-place rewrites leave the neighbours there.
            if let Some(old) = same.get(a..a + plen as usize) {
                if !dirty(start, end) && &refine::piece_hash(old) == want {
                    return PieceSource::Basis(start);
                }
            }
            if u64::from(plen) == refine::BLOCK {
                if let Some(at) = blocks.get(want) {
                    if !dirty(at, at + refine::BLOCK) {
                        return PieceSource::Basis(at);
                    }
                }
            }
            PieceSource::Wire
        })
        .collect()
}

/// Chunk `e` assembled from its plan: old data (read once for the pieces at
/// their own offset) and the `wire` pieces in order. `None` when old data it
/// needs was overwritten this run or cannot be read. Also returns the bytes
/// that came from the wire.
fn build(
    e: &Entry,
    plan: &[PieceSource],
    wire: &[u8],
    basis: &Basis,
    dirty: &(impl Fn(u64, u64) -> bool + Sync),
) -> (Option<Vec<u8>>, u64) {
    let mut chunk = vec![0u8; e.len() as usize];
    let mut ok = true;
    let same = plan
        .iter()
        .filter(|p| matches!(p, PieceSource::Basis(_)))
        .count()
        > 1;
    let same_end = e.end().min(basis.size);
    if same && same_end > e.offset {
        let n = (same_end - e.offset) as usize;
        ok =
            !dirty(e.offset, same_end) && read_full(&basis.file, &mut chunk[..n], e.offset).is_ok();
    }
    let mut wire_pos = 0usize;
    let mut from_wire = 0u64;
    for ((start, plen), src) in refine::pieces(e.offset, e.len() as u32).zip(plan) {
        let a = (start - e.offset) as usize;
        let dst = &mut chunk[a..a + plen as usize];
        match *src {
            PieceSource::Wire => {
                dst.copy_from_slice(&wire[wire_pos..wire_pos + plen as usize]);
                wire_pos += plen as usize;
                from_wire += u64::from(plen);
            }
            PieceSource::Basis(at) if same && at == start => {} // read above
            PieceSource::Basis(at) => {
                if dirty(at, at + u64::from(plen)) || read_full(&basis.file, dst, at).is_err() {
                    ok = false;
                }
            }
        }
    }
    (ok.then_some(chunk), from_wire)
}
