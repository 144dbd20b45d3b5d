//! The scanner thread: cuts and hashes the source and hands manifest
//! batches to the main thread ([`Event`]), on a first copy with every data
//! chunk compressed at a level that follows the link
//! ([`crate::content::compress::Adapt`]). On a push it starts before the
//! connection is up ([`Prescan`]). `--check --sample` scans only its slice.

use std::path::Path;
use std::sync::mpsc;

use anyhow::{Context, Result};

use crate::content::chunk::{ChunkParams, Cutter};
use crate::content::compress::{Adapt, StreamEncoder};
use crate::content::hash::ChunkHash;
use crate::content::manifest::{Builder, Entry, Kind};
use crate::content::scan::{self, Extents};
use crate::roles::send::source::{SendOptions, Source};
use crate::wire::{ChunkMsg, Msg, Summary};

/// What the main thread hears from the scanner and the request reader.
pub(super) enum Event {
    /// Manifest entries, and in inline mode the `CHUNK`s of their data
    /// chunks, compressed on the scanning thread; then the bytes of the
    /// source they cover, for the progress bar, which only the main thread
    /// drives (a scan started before the connection must not draw over an
    /// ssh password prompt).
    Batch(Vec<Entry>, Vec<ChunkMsg>, u64),
    ScanDone(u64, ChunkHash),
    /// `REQUEST`, `BLOCK_REQUEST` or `BLOCK_FETCH`.
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
    pub(super) tx: mpsc::SyncSender<Event>,
    pub(super) rx: mpsc::Receiver<Event>,
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
    pub(super) fn stop(self) {
        drop((self.tx, self.rx));
        let _ = self.thread.join();
    }
}

/// Starts the scan that streams the manifest (no chunk data): slice K/N
/// of it for `--sample`, else all of it.
pub(super) fn spawn_manifest_scanner(
    src: &Source,
    opts: &SendOptions,
    tx: mpsc::SyncSender<Event>,
) -> Result<std::thread::JoinHandle<()>> {
    match opts.sample {
        Some((k, n)) => spawn_ranges_scanner(
            src,
            opts.params,
            crate::content::sample::ranges(src.info.size, k, n),
            tx,
        ),
        None => spawn_scanner(src, opts, false, tx),
    }
}

/// `data` (a whole chunk, or the pieces asked for) as a `CHUNK` message.
pub(super) fn chunk_msg(
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

/// A manifest of only `ranges` (sorted, disjoint, non-empty): `--check
/// --sample` (slice K of N, see [`crate::content::sample`]) or a delta run's
/// ranges, in fixed pieces of the chunking's average length
/// ([`crate::content::sample::scan_pieces`]); zero runs never span a gap
/// between ranges.
pub(super) fn spawn_ranges_scanner(
    src: &Source,
    params: ChunkParams,
    ranges: Vec<(u64, u64)>,
    tx: mpsc::SyncSender<Event>,
) -> Result<std::thread::JoinHandle<()>> {
    let (file, _, path) = src.for_thread()?;
    let piece = u64::from(params.avg());
    std::thread::Builder::new()
        .name("scan".into())
        .spawn(move || {
            let mut builder = Builder::default();
            let mut covered = 0;
            let r = crate::content::sample::scan_pieces(&file, &ranges, piece, |recs, ends| {
                let mut out = Vec::with_capacity(recs.len());
                for r in &recs {
                    builder.push(r, &mut out);
                    covered += u64::from(r.len);
                }
                if ends {
                    builder.break_run(&mut out);
                }
                if !out.is_empty() {
                    let covered = std::mem::take(&mut covered);
                    tx.send(Event::Batch(out, Vec::new(), covered))
                        .map_err(|_| anyhow::anyhow!("sender stopped"))?;
                }
                Ok(())
            });
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

pub(super) fn spawn_scanner(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::compress::StreamDecoder;

    #[test]
    fn chunk_msg_compresses_only_with_an_encoder() {
        let data: Vec<u8> = b"abcd".iter().cycle().take(10_000).copied().collect();
        let plain = chunk_msg(&mut None, 3, &data, true).unwrap();
        assert_eq!((plain.index, plain.raw_len), (3, 10_000));
        assert!(plain.pieces && !plain.compressed && !plain.changed);
        assert_eq!(plain.payload, data);

        let mut enc = Some(StreamEncoder::new(3).unwrap());
        let mut dec = StreamDecoder::new().unwrap();
        // Two messages of one stream decode in order.
        for index in [0, 1] {
            let c = chunk_msg(&mut enc, index, &data, false).unwrap();
            assert!(c.compressed && c.payload.len() < data.len() / 10);
            let mut out = vec![0u8; c.raw_len as usize];
            dec.decode(&c.payload, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }
}
