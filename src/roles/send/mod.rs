//! The sending end: scan the source, stream its manifest, answer requests
//! with compressed chunks.
//!
//! Three threads: the scanner cuts and hashes the file and hands manifest
//! batches over; the request reader drains the peer's `REQUEST`s (so the
//! peer never blocks writing them); the main thread does all the writing,
//! interleaving manifest batches with requested chunks. On a push the
//! scanner starts before the connection is up ([`Prescan`]). On a first
//! copy it also compresses every chunk, at a level that follows the link
//! ([`crate::content::compress::Adapt`]). Every chunk is
//! re-hashed when it is read for sending, so a source that changed since the
//! scan is caught here (exit 7) and never sent under a stale hash.
//!
//! The source is a regular file or a block device. A device's size comes
//! from the device (its node's `st_size` is 0), and that size is all that is
//! checked for change: a device node's times say nothing about its content.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::content::chunk::{ChunkParams, Cutter};
use crate::content::compress::{Adapt, StreamEncoder};
use crate::content::hash::ChunkHash;
use crate::content::manifest::{self, Builder, Entry, Kind};
use crate::content::refine;
use crate::content::scan::{self, read_full, ChunkRec, Content, Extents};
use crate::error::{exit_code_of, fail, Exit, WithExit};
use crate::progress::Progress;
use crate::wire::protocol::{
    ChunkMsg, FileInfo, FrameReader, FrameWriter, Msg, StartMode, Summary,
};

/// The file being sent, opened once.
pub struct Source {
    pub file: File,
    pub path: PathBuf,
    pub info: FileInfo,
    stamp: Stamp,
}

/// What must not change while we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    /// A regular file: size, mtime, ctime.
    File {
        size: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
    },
    /// A block device: only its size means anything. The times of a device
    /// node say nothing about writes to the device, and would raise false
    /// alarms when they move for other reasons (a chmod, udev). A write to
    /// the device while it is read is caught only where a chunk is read
    /// twice (re-hashed when sent on request): read from a snapshot.
    Device { size: u64 },
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp::File {
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

impl Source {
    pub fn open(path: &Path) -> Result<Source> {
        let file = File::open(path)
            .with_context(|| format!("cannot open source {}", path.display()))
            .exit_with(Exit::Io)?;
        Source::from_file(file, path)
    }

    /// A source already opened (by a confined server); `path` names it in
    /// messages. A regular file or a block device.
    pub fn from_file(file: File, path: &Path) -> Result<Source> {
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat source {}", path.display()))
            .exit_with(Exit::Io)?;
        if meta.is_dir() {
            return Err(fail(
                Exit::Io,
                format!(
                    "source {} is a directory; vmsync copies one file",
                    path.display()
                ),
            ));
        }
        if scan::is_block_device(&meta) {
            let size = scan::device_size(&file)
                .with_context(|| format!("cannot get the size of source device {}", path.display()))
                .exit_with(Exit::Io)?;
            // The node's mtime is not the content's: send the time the copy
            // is taken, so the destination file says when it was made and no
            // receiver's quick check (size + mtime) can match a stale copy.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            return Ok(Source {
                info: FileInfo {
                    size,
                    mtime_sec: now.as_secs() as i64,
                    mtime_nsec: now.subsec_nanos(),
                    // With its S_IFBLK type bits: the receiver skips the
                    // quick check for a device source.
                    mode: meta.mode(),
                },
                stamp: Stamp::Device { size },
                file,
                path: path.to_path_buf(),
            });
        }
        if !meta.is_file() {
            return Err(fail(
                Exit::Io,
                format!(
                    "source {} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        Ok(Source {
            info: FileInfo {
                size: meta.len(),
                mtime_sec: meta.mtime(),
                mtime_nsec: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
                mode: meta.mode(),
            },
            stamp: Stamp::of(&meta),
            file,
            path: path.to_path_buf(),
        })
    }

    /// What a scanning thread needs: its own handle, the size, the name.
    fn for_thread(&self) -> Result<(File, u64, PathBuf)> {
        let file = self
            .file
            .try_clone()
            .context("cannot duplicate the source file handle")?;
        Ok((file, self.info.size, self.path.clone()))
    }

    /// Fails with exit 7 if the stamp (see [`Stamp`]) moved since `open`.
    fn check_unchanged(&self) -> Result<()> {
        let now = match self.stamp {
            Stamp::Device { .. } => Stamp::Device {
                size: scan::device_size(&self.file)
                    .with_context(|| {
                        format!(
                            "cannot get the size of source device {}",
                            self.path.display()
                        )
                    })
                    .exit_with(Exit::Io)?,
            },
            Stamp::File { .. } => Stamp::of(
                &self
                    .file
                    .metadata()
                    .with_context(|| format!("cannot stat source {}", self.path.display()))
                    .exit_with(Exit::Io)?,
            ),
        };
        if now != self.stamp {
            return Err(changed(&self.path));
        }
        Ok(())
    }
}

fn changed(path: &Path) -> anyhow::Error {
    fail(
        Exit::SourceChanged,
        format!(
            "source {} changed while it was being read; sync from a snapshot (or stop the VM) and try again",
            path.display()
        ),
    )
}

#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    pub params: ChunkParams,
    /// zstd level; 0 sends chunks uncompressed.
    pub compress_level: u8,
    /// `--allow-changing-source`: send what the file holds now rather than
    /// fail with exit 7 when it changed since it was scanned.
    pub allow_changing: bool,
    /// `--check --sample K/N`: scan only slice K of N.
    pub sample: Option<(u32, u32)>,
}

enum Event {
    /// Manifest entries, and in inline mode the `CHUNK`s of their data
    /// chunks, compressed on the scanning thread; then the bytes of the
    /// source they cover, for the progress bar, which only the main thread
    /// drives (a scan started before the connection must not draw over an
    /// ssh password prompt).
    Batch(Vec<Entry>, Vec<ChunkMsg>, u64),
    ScanDone(u64, ChunkHash),
    /// `REQUEST`, `BLOCK_REQUEST` or `PIECE_REQUEST`.
    Peer(Msg),
    PeerDone(Summary),
    Failed(anyhow::Error),
}

/// Batches a scan started before the connection may run ahead (64
/// segments: at most 1 GiB of data, a few hundred KiB of entries). Enough
/// to cover an ssh connection's setup (about 0.3 s here, some 600 MiB of
/// scanning). A receiver that turns out to be up to date stops the scan at
/// its next batch, so the bound matters only when the connection is slow to
/// come up (a password prompt): then it caps the reading done for nothing.
const PRESCAN_BATCHES: usize = 64;

/// A manifest scan started before the other end answered, so that the
/// connection's setup (ssh's handshake, starting the remote binary, the
/// receiver's quick check) overlaps with reading the source instead of
/// preceding it. Used only if the receiver asks for a manifest: a receiver
/// that is up to date or wants every chunk inline makes it a wasted head
/// start, dropped (its thread stops at its next batch).
///
/// Measured on a 700 MiB image over loopback ssh (medians of 5): a lead of
/// 16 segments took a touched image from 0.71 s to 0.49 s, 64 segments to
/// 0.43 s; an up-to-date one went from 0.29 s to 0.30 s and 0.34 s. The
/// cost is the scanning done during the handshake, whether on one core or
/// all (one core: 0.34 s and 0.50 s), so the scan uses all from the start.
pub struct Prescan {
    tx: mpsc::SyncSender<Event>,
    rx: mpsc::Receiver<Event>,
    thread: std::thread::JoinHandle<()>,
}

impl Prescan {
    /// Starts the scan; `None` for `--sample`, whose slices are small.
    pub fn start(src: &Source, opts: &SendOptions) -> Result<Option<Prescan>> {
        if opts.sample.is_some() {
            return Ok(None);
        }
        let (tx, rx) = mpsc::sync_channel::<Event>(PRESCAN_BATCHES);
        let thread = spawn_scanner(src, opts, false, tx.clone())?;
        Ok(Some(Prescan { tx, rx, thread }))
    }

    /// Stops the scan and waits for its thread (at most the segment it is
    /// on), so that a scan started next never runs beside it, doubling the
    /// buffers held and competing for the cores. Merely dropping a
    /// `Prescan` also stops it, at its next batch, without waiting.
    fn stop(self) {
        drop((self.tx, self.rx));
        let _ = self.thread.join();
    }
}

/// Starts the scan that streams the manifest (no chunk data): slice K/N
/// of it for `--sample`, else all of it.
fn spawn_manifest_scanner(
    src: &Source,
    opts: &SendOptions,
    tx: mpsc::SyncSender<Event>,
) -> Result<std::thread::JoinHandle<()>> {
    match opts.sample {
        Some((k, n)) => spawn_sample_scanner(src, opts.params, k, n, tx),
        None => spawn_scanner(src, opts, false, tx),
    }
}

/// Runs the sending end until the receiver's `DONE`. `prescan`, if any,
/// is this source's scan already under way with the same options.
pub fn send<R, W>(
    src: &Source,
    mut reader: FrameReader<R>,
    writer: &mut FrameWriter<W>,
    opts: &SendOptions,
    progress: &Progress,
    prescan: Option<Prescan>,
) -> Result<Summary>
where
    R: Read + Send + 'static,
    W: Write,
{
    if let Err(e) = writer.send_now(&Msg::FileInfo(src.info)) {
        // A peer that refused our OPEN (a path outside its --root, say)
        // said why and hung up: its reason beats our broken pipe.
        return Err(match reader.read_msg() {
            Err(why) if exit_code_of(&why) != Exit::Connection => why,
            _ => e,
        });
    }
    // A receiver with its destination's manifest cached says which pieces
    // of it it holds (see `manifest`'s module doc).
    let mut first = reader.read_msg()?;
    let mut known: HashMap<manifest::PieceDigest, u32> = HashMap::new();
    if let Msg::Pieces(digests) = first {
        for (i, d) in digests.into_iter().enumerate() {
            known.entry(d).or_insert(i as u32);
        }
        first = reader.read_msg()?;
    }
    let inline = match first {
        Msg::Start(StartMode::UpToDate) => {
            return match reader.read_msg()? {
                Msg::Done(s) => Ok(s),
                m => Err(m.unexpected("DONE")),
            }
        }
        Msg::Start(StartMode::Manifest) => false,
        Msg::Start(StartMode::Inline) => true,
        m => return Err(m.unexpected("START")),
    };
    progress.set_total(src.info.size);
    crate::vlog!(
        1,
        "sender: scanning {} ({} bytes){}",
        src.path.display(),
        src.info.size,
        if inline { ", all chunks inline" } else { "" }
    );

    let (tx, rx) = match prescan {
        Some(p) if !inline => (p.tx, p.rx),
        p => {
            if let Some(p) = p {
                p.stop();
            }
            // A batch carries up to a segment (16 MiB) of compressed data
            // inline: keep the queue short so memory stays flat when the
            // link is slow.
            let (tx, rx) = mpsc::sync_channel::<Event>(2);
            if inline {
                spawn_scanner(src, opts, true, tx.clone())?;
            } else {
                spawn_manifest_scanner(src, opts, tx.clone())?;
            }
            (tx, rx)
        }
    };
    let peer_tx = tx;
    std::thread::Builder::new()
        .name("requests".into())
        .spawn(move || loop {
            let ev = match reader.read_msg() {
                Ok(m @ (Msg::Request(_) | Msg::BlockRequest(_) | Msg::PieceRequest { .. })) => {
                    Event::Peer(m)
                }
                Ok(Msg::Done(s)) => Event::PeerDone(s),
                Ok(m) => Event::Failed(m.unexpected("a request or DONE")),
                Err(e) => Event::Failed(e),
            };
            let last = !matches!(ev, Event::Peer(_));
            if peer_tx.send(ev).is_err() || last {
                return;
            }
        })
        .context("cannot start a thread")?;

    let mut entries: Vec<Entry> = Vec::new();
    let mut encoder = match opts.compress_level {
        0 => None,
        l => Some(StreamEncoder::new(l)?),
    };
    let mut batch = Vec::new();
    let mut raw = Vec::new();
    let mut piecer = manifest::Piecer::default();
    // --allow-changing-source: whether we noticed, for the summary; the
    // user hears of it once, from this end, which is the source's host.
    let mut moved = false;
    let note_moved = |moved: &mut bool| {
        if !*moved {
            crate::log::warn(&format!(
                "source {} changed while it was being read; committing it anyway \
                 (--allow-changing-source): the copy is as consistent as a crash would leave it",
                src.path.display()
            ));
        }
        *moved = true;
    };
    let unchanged = |moved: &mut bool| -> Result<()> {
        match src.check_unchanged() {
            Err(e) if opts.allow_changing && exit_code_of(&e) == Exit::SourceChanged => {
                note_moved(moved);
                Ok(())
            }
            r => r,
        }
    };
    let mut run = || -> Result<Summary> {
        loop {
            let ev = rx
                .recv()
                .map_err(|_| fail(Exit::Connection, "the connection ended without a result"))?;
            match ev {
                Event::Batch(v, chunks, covered) if !known.is_empty() => {
                    debug_assert!(chunks.is_empty(), "no pieces with inline chunks");
                    progress.advance(covered);
                    for e in &v {
                        if let Some(piece) = piecer.push(*e) {
                            send_piece(writer, &known, &piece)?;
                        }
                    }
                    entries.extend(v);
                    writer.flush()?;
                }
                Event::Batch(v, chunks, covered) => {
                    progress.advance(covered);
                    for part in v.chunks(manifest::MAX_BATCH) {
                        batch.clear();
                        manifest::encode_batch(part, &mut batch);
                        writer.send(&Msg::Manifest(std::mem::take(&mut batch)))?;
                    }
                    for c in chunks {
                        writer.send(&Msg::Chunk(c))?;
                    }
                    entries.extend(v);
                    writer.flush()?;
                }
                Event::ScanDone(count, digest) => {
                    crate::vlog!(1, "sender: scan done: {count} entries");
                    unchanged(&mut moved)?;
                    if let Some(piece) = std::mem::take(&mut piecer).finish() {
                        send_piece(writer, &known, &piece)?;
                    }
                    writer.send_now(&Msg::ManifestEnd {
                        count,
                        digest,
                        source_changed: moved,
                    })?;
                }
                Event::Peer(Msg::Request(idx)) => {
                    for i in idx {
                        let same = load(src, &entries, i, &mut raw)?;
                        if !same && !opts.allow_changing {
                            return Err(changed(&src.path));
                        }
                        let mut c = chunk_msg(&mut encoder, i, &raw, false)?;
                        // Its new content, which the receiver hashes itself.
                        c.changed = !same;
                        if !same {
                            note_moved(&mut moved);
                        }
                        writer.send(&Msg::Chunk(c))?;
                    }
                    writer.flush()?;
                }
                Event::Peer(Msg::BlockRequest(idx)) => {
                    // Read serially, hash in parallel: the chunk check and
                    // the piece hashes are most of the cost. In groups, so
                    // a request for a whole window is not all in memory.
                    for group in idx.chunks(64) {
                        let mut loaded = Vec::with_capacity(group.len());
                        for &i in group {
                            let (offset, len, hash) = data_entry(&entries, i)?;
                            let mut data = Vec::new();
                            read_entry(src, offset, len, &mut data)?;
                            loaded.push((i, offset, hash, data));
                        }
                        let answers: Vec<Option<Vec<refine::PieceHash>>> = loaded
                            .par_iter()
                            .map(|(_, offset, hash, data)| {
                                (ChunkHash::of(data) == *hash)
                                    .then(|| refine::piece_hashes(*offset, data))
                            })
                            .collect();
                        for ((i, _, _, _), hashes) in loaded.into_iter().zip(answers) {
                            let hashes = hashes.ok_or_else(|| changed(&src.path))?;
                            writer.send(&Msg::BlockHashes { index: i, hashes })?;
                        }
                    }
                    writer.flush()?;
                }
                Event::Peer(Msg::PieceRequest {
                    index,
                    count,
                    bitmap,
                }) => {
                    // Not re-hashed: the receiver verifies the chunk it
                    // assembles, and if the source changed since the
                    // scan, fetches it whole, which `load` checks (exit 7).
                    let (offset, len, _) = data_entry(&entries, index)?;
                    read_entry(src, offset, len, &mut raw)?;
                    if refine::piece_count(offset, raw.len() as u32) != count as usize {
                        return Err(fail(
                            Exit::Protocol,
                            format!(
                                "protocol error: peer asked for {count} pieces of chunk {index}"
                            ),
                        ));
                    }
                    let wanted = refine::gather(offset, &raw, &bitmap);
                    writer.send(&Msg::Chunk(chunk_msg(&mut encoder, index, &wanted, true)?))?;
                    writer.flush()?;
                }
                Event::Peer(m) => return Err(m.unexpected("a request")),
                Event::PeerDone(mut s) => {
                    unchanged(&mut moved)?;
                    s.source_changed |= moved;
                    return Ok(s);
                }
                Event::Failed(e) => return Err(e),
            }
        }
    };
    match run() {
        // A write that fails because the peer hung up: the peer usually said
        // why first (disk full, say), and that is the error to report.
        Err(e) if exit_code_of(&e) == Exit::Connection => Err(peer_reason(&rx).unwrap_or(e)),
        r => r,
    }
}

/// Sends one piece of the manifest: a reference when the receiver holds
/// it, else its entries.
fn send_piece<W: Write>(
    writer: &mut FrameWriter<W>,
    known: &HashMap<manifest::PieceDigest, u32>,
    piece: &[Entry],
) -> Result<()> {
    if let Some(&i) = known.get(&manifest::piece_digest(piece)) {
        return writer.send(&Msg::ManifestRef(i));
    }
    let mut buf = Vec::new();
    manifest::encode_batch(piece, &mut buf);
    writer.send(&Msg::Manifest(buf))
}

/// The peer's own error, if it sent one before the connection ended.
fn peer_reason(rx: &mpsc::Receiver<Event>) -> Option<anyhow::Error> {
    while let Ok(ev) = rx.recv() {
        match ev {
            Event::Failed(e) if exit_code_of(&e) != Exit::Connection => return Some(e),
            Event::Failed(_) | Event::PeerDone(_) => return None,
            _ => {}
        }
    }
    None
}

/// Offset, length and hash of data entry `i`, or a protocol error for a
/// peer that asked for something that is not a data chunk of the manifest.
fn data_entry(entries: &[Entry], i: u64) -> Result<(u64, u32, ChunkHash)> {
    match entries.get(i as usize) {
        Some(Entry {
            offset,
            kind: Kind::Data { len, hash },
        }) => Ok((*offset, *len, *hash)),
        _ => Err(fail(
            Exit::Protocol,
            format!(
                "protocol error: peer requested chunk {i}, which is not a data chunk of the manifest"
            ),
        )),
    }
}

/// Reads `len` bytes at `offset` of the source into `buf`.
fn read_entry(src: &Source, offset: u64, len: u32, buf: &mut Vec<u8>) -> Result<()> {
    buf.resize(len as usize, 0);
    read_full(&src.file, buf, offset)
        .with_context(|| format!("reading source {}", src.path.display()))
}

/// Reads data entry `i` of the manifest into `buf` and re-checks its hash:
/// false when the source changed there since the scan.
fn load(src: &Source, entries: &[Entry], i: u64, buf: &mut Vec<u8>) -> Result<bool> {
    let (offset, len, hash) = data_entry(entries, i)?;
    read_entry(src, offset, len, buf)?;
    Ok(ChunkHash::of(buf) == hash)
}

/// `data` (a whole chunk, or the pieces asked for) as a `CHUNK` message.
fn chunk_msg(
    encoder: &mut Option<StreamEncoder>,
    index: u64,
    data: &[u8],
    pieces: bool,
) -> Result<ChunkMsg> {
    let (compressed, payload) = match encoder {
        Some(enc) => {
            let mut out = Vec::new();
            enc.encode(data, &mut out)?;
            (true, out)
        }
        None => (false, data.to_vec()),
    };
    Ok(ChunkMsg {
        changed: false,
        index,
        raw_len: data.len() as u32,
        compressed,
        pieces,
        payload,
    })
}

/// `--check --sample K/N`: the manifest of slice K only (see
/// [`crate::content::sample`]), in fixed pieces of the chunking's average length,
/// hashed in parallel; zero runs never span a gap between ranges.
fn spawn_sample_scanner(
    src: &Source,
    params: ChunkParams,
    k: u32,
    n: u32,
    tx: mpsc::SyncSender<Event>,
) -> Result<std::thread::JoinHandle<()>> {
    let (file, size, path) = src.for_thread()?;
    let piece = u64::from(params.avg());
    std::thread::Builder::new()
        .name("scan".into())
        .spawn(move || {
            let mut builder = Builder::default();
            let mut buf = Vec::new();
            let mut covered = 0;
            let mut scan = || -> Result<()> {
                for (start, end) in crate::content::sample::ranges(size, k, n) {
                    let mut at = start;
                    while at < end {
                        // Up to 8 MiB at a time, a whole number of pieces.
                        let len = (end - at).min(((8 << 20) / piece).max(1) * piece);
                        buf.resize(len as usize, 0);
                        read_full(&file, &mut buf, at)?;
                        let recs: Vec<ChunkRec> = buf
                            .par_chunks(piece as usize)
                            .enumerate()
                            .map(|(j, d)| ChunkRec {
                                offset: at + j as u64 * piece,
                                len: d.len() as u32,
                                content: if crate::content::chunk::is_zero(d) {
                                    Content::Zero
                                } else {
                                    Content::Data(ChunkHash::of(d))
                                },
                            })
                            .collect();
                        let mut out = Vec::with_capacity(recs.len());
                        for r in &recs {
                            builder.push(r, &mut out);
                        }
                        if at + len == end {
                            builder.break_run(&mut out);
                        }
                        covered += len;
                        if !out.is_empty() {
                            let covered = std::mem::take(&mut covered);
                            tx.send(Event::Batch(out, Vec::new(), covered))
                                .map_err(|_| anyhow::anyhow!("sender stopped"))?;
                        }
                        at += len;
                    }
                }
                Ok(())
            };
            let r = scan();
            end_scan(r, builder, covered, &path, &tx);
        })
        .context("cannot start a thread")
}

/// Sends the manifest's last entries (and the bytes scanned since the last
/// batch) and its end, or the scan's error.
fn end_scan(
    r: Result<()>,
    builder: Builder,
    covered: u64,
    path: &Path,
    tx: &mpsc::SyncSender<Event>,
) {
    let ev = match r {
        Ok(()) => {
            let mut tail = Vec::new();
            let (count, digest) = builder.finish(&mut tail);
            if tx.send(Event::Batch(tail, Vec::new(), covered)).is_err() {
                return;
            }
            Event::ScanDone(count, digest)
        }
        Err(e) => Event::Failed(e.context(format!("reading source {}", path.display()))),
    };
    let _ = tx.send(ev);
}

fn spawn_scanner(
    src: &Source,
    opts: &SendOptions,
    inline: bool,
    tx: mpsc::SyncSender<Event>,
) -> Result<std::thread::JoinHandle<()>> {
    let (file, size, path) = src.for_thread()?;
    let params = opts.params;
    // Inline, this thread compresses too: the stream's order is the scan's.
    // The level adapts to the link (see `compress::Adapt`).
    let mut encoder = match (inline, opts.compress_level) {
        (true, l) if l > 0 => Some(StreamEncoder::new(l)?),
        _ => None,
    };
    let mut adapt = Adapt::new(opts.compress_level);
    std::thread::Builder::new()
        .name("scan".into())
        .spawn(move || {
            let cutter = Cutter::new(params);
            let mut extents = Extents::of(&file, size);
            let mut builder = Builder::default();
            let mut emitted: u64 = 0;
            let mut covered = 0;
            let mut last = std::time::Instant::now();
            let r = scan::scan_with_data(&file, size, &mut extents, &cutter, |recs, data, at| {
                let mut out = Vec::with_capacity(recs.len());
                let mut chunks = Vec::new();
                for r in &recs {
                    let before = out.len();
                    builder.push(r, &mut out);
                    covered += u64::from(r.len);
                    if !inline {
                        continue;
                    }
                    for (k, e) in out[before..].iter().enumerate() {
                        if let Kind::Data { len, .. } = e.kind {
                            let bytes = &data[(e.offset - at) as usize..][..len as usize];
                            let index = emitted + (before + k) as u64;
                            chunks.push(chunk_msg(&mut encoder, index, bytes, false)?);
                        }
                    }
                }
                emitted += out.len() as u64;
                if out.is_empty() {
                    return Ok(());
                }
                let covered = std::mem::take(&mut covered);
                let sending = std::time::Instant::now();
                tx.send(Event::Batch(out, chunks, covered))
                    .map_err(|_| anyhow::anyhow!("sender stopped"))?;
                let sent = std::time::Instant::now();
                if let Some(enc) = encoder.as_mut() {
                    if let Some(level) = adapt.record(sending - last, sent - sending) {
                        crate::vlog!(2, "sender: zstd level {} -> {level}", enc.level());
                        enc.set_level(level)?;
                    }
                }
                last = sent;
                Ok(())
            });
            end_scan(r, builder, covered, &path, &tx);
        })
        .context("cannot start a thread")
}
