//! The main thread of the sending end: it does all the writing,
//! interleaving the scanner's manifest batches (or references to the pieces
//! of it the receiver holds) with the chunks, block hashes and blocks the
//! receiver asks for.
//!
//! Every chunk is re-hashed when it is read for sending, so a source that
//! changed since the scan is caught here (exit 7) and never sent under a
//! stale hash; with `--allow-changing-source` it is sent as it is now,
//! marked changed, and the receiver hashes it itself.

use std::collections::HashMap;
use std::io::Write;
use std::sync::mpsc;

use anyhow::Result;
use rayon::prelude::*;

use crate::content::compress::StreamEncoder;
use crate::content::hash::ChunkHash;
use crate::content::manifest::{self, Entry, PieceDigest, Piecer};
use crate::content::refine;
use crate::error::{exit_code_of, fail, Exit};
use crate::progress::Progress;
use crate::roles::send::scan::{chunk_msg, Event};
use crate::roles::send::source::{changed, data_entry, load, read_entry, SendOptions, Source};
use crate::wire::{ChunkMsg, FrameWriter, Msg, Summary};

/// Chunks of a `BLOCK_REQUEST` read (then hashed in parallel) at a time, so
/// a request for a whole window is not all in memory.
const BLOCK_GROUP: usize = 64;

/// The sending end's state once the transfer has started.
pub(super) struct Server<'a, W: Write> {
    src: &'a Source,
    opts: &'a SendOptions,
    writer: &'a mut FrameWriter<W>,
    progress: &'a Progress,
    /// The pieces of its cached manifest the receiver holds: digest → the
    /// index it gave that piece.
    known: HashMap<PieceDigest, u32>,
    piecer: Piecer,
    /// The manifest so far, to answer requests by index.
    entries: Vec<Entry>,
    encoder: Option<StreamEncoder>,
    /// Scratch for an encoded manifest batch and for a chunk read.
    batch: Vec<u8>,
    raw: Vec<u8>,
    /// --allow-changing-source: whether we noticed, for the summary; the
    /// user hears of it once, from this end, which is the source's host.
    moved: bool,
}

impl<'a, W: Write> Server<'a, W> {
    pub fn new(
        src: &'a Source,
        opts: &'a SendOptions,
        writer: &'a mut FrameWriter<W>,
        progress: &'a Progress,
        known: HashMap<PieceDigest, u32>,
    ) -> Result<Self> {
        let encoder = match opts.compress_level {
            0 => None,
            l => Some(StreamEncoder::new(l)?),
        };
        Ok(Server {
            src,
            opts,
            writer,
            progress,
            known,
            piecer: Piecer::default(),
            entries: Vec::new(),
            encoder,
            batch: Vec::new(),
            raw: Vec::new(),
            moved: false,
        })
    }

    /// Handles the scanner's and the receiver's events until the
    /// receiver's `DONE`, whose summary it returns.
    pub fn serve(&mut self, rx: &mpsc::Receiver<Event>) -> Result<Summary> {
        match self.run(rx) {
            // A write that fails because the peer hung up: the peer usually
            // said why first (disk full, say), and that is the error to report.
            Err(e) if exit_code_of(&e) == Exit::Connection => Err(peer_reason(rx).unwrap_or(e)),
            r => r,
        }
    }

    fn run(&mut self, rx: &mpsc::Receiver<Event>) -> Result<Summary> {
        loop {
            let ev = rx
                .recv()
                .map_err(|_| fail(Exit::Connection, "the connection ended without a result"))?;
            match ev {
                Event::Batch(v, chunks, covered) => self.on_batch(v, chunks, covered)?,
                Event::ScanDone(count, digest) => self.on_scan_done(count, digest)?,
                Event::Peer(Msg::Request(idx)) => self.on_request(idx)?,
                Event::Peer(Msg::BlockRequest(idx)) => self.on_block_request(&idx)?,
                Event::Peer(Msg::BlockFetch {
                    index,
                    count,
                    bitmap,
                }) => self.on_block_fetch(index, count, &bitmap)?,
                Event::Peer(m) => return Err(m.unexpected("a request")),
                Event::PeerDone(mut s) => {
                    self.unchanged()?;
                    s.source_changed |= self.moved;
                    return Ok(s);
                }
                Event::Failed(e) => return Err(e),
            }
        }
    }

    /// Manifest entries from the scanner: as pieces (references to those
    /// the receiver holds) when it offered some, else as `MANIFEST`
    /// batches, followed by their chunks in inline mode.
    fn on_batch(&mut self, v: Vec<Entry>, chunks: Vec<ChunkMsg>, covered: u64) -> Result<()> {
        self.progress.advance(covered);
        if !self.known.is_empty() {
            debug_assert!(chunks.is_empty(), "no pieces with inline chunks");
            for e in &v {
                if let Some(piece) = self.piecer.push(*e) {
                    send_piece(self.writer, &self.known, &piece)?;
                }
            }
        } else {
            for part in v.chunks(manifest::MAX_BATCH) {
                self.batch.clear();
                manifest::encode_batch(part, &mut self.batch);
                self.writer
                    .send(&Msg::Manifest(std::mem::take(&mut self.batch)))?;
            }
            for c in chunks {
                self.writer.send(&Msg::Chunk(c))?;
            }
        }
        self.entries.extend(v);
        self.writer.flush()
    }

    fn on_scan_done(&mut self, count: u64, digest: ChunkHash) -> Result<()> {
        crate::vlog!(1, "sender: scan done: {count} entries");
        self.unchanged()?;
        if let Some(piece) = std::mem::take(&mut self.piecer).finish() {
            send_piece(self.writer, &self.known, &piece)?;
        }
        self.writer.send_now(&Msg::ManifestEnd {
            count,
            digest,
            source_changed: self.moved,
        })
    }

    /// `REQUEST`: the chunks, re-hashed as they are read.
    fn on_request(&mut self, idx: Vec<u64>) -> Result<()> {
        for i in idx {
            let same = load(self.src, &self.entries, i, &mut self.raw)?;
            if !same && !self.opts.allow_changing {
                return Err(changed(&self.src.path));
            }
            let mut c = chunk_msg(&mut self.encoder, i, &self.raw, false)?;
            // Its new content, which the receiver hashes itself.
            c.changed = !same;
            if !same {
                self.note_moved();
            }
            self.writer.send(&Msg::Chunk(c))?;
        }
        self.writer.flush()
    }

    /// `BLOCK_REQUEST`: the block hashes of each chunk, which must still
    /// have its hash (exit 7 otherwise).
    fn on_block_request(&mut self, idx: &[u64]) -> Result<()> {
        // Read serially, hash in parallel: the chunk check and the block
        // hashes are most of the cost.
        for group in idx.chunks(BLOCK_GROUP) {
            let mut loaded = Vec::with_capacity(group.len());
            for &i in group {
                let (offset, len, hash) = data_entry(&self.entries, i)?;
                let mut data = Vec::new();
                read_entry(self.src, offset, len, &mut data)?;
                loaded.push((i, offset, hash, data));
            }
            let answers: Vec<Option<Vec<refine::BlockHash>>> = loaded
                .par_iter()
                .map(|(_, offset, hash, data)| {
                    (ChunkHash::of(data) == *hash).then(|| refine::block_hashes(*offset, data))
                })
                .collect();
            for ((i, _, _, _), hashes) in loaded.into_iter().zip(answers) {
                let hashes = hashes.ok_or_else(|| changed(&self.src.path))?;
                self.writer.send(&Msg::BlockHashes { index: i, hashes })?;
            }
        }
        self.writer.flush()
    }

    /// `BLOCK_FETCH`: the pieces of chunk `index` that `bitmap` marks, in
    /// one `CHUNK`.
    fn on_block_fetch(&mut self, index: u64, count: u32, bitmap: &[u8]) -> Result<()> {
        // Not re-hashed: the receiver verifies the chunk it assembles, and
        // if the source changed since the scan, fetches it whole, which
        // `load` checks (exit 7).
        let (offset, len, _) = data_entry(&self.entries, index)?;
        read_entry(self.src, offset, len, &mut self.raw)?;
        if refine::block_count(offset, self.raw.len() as u32) != count as usize {
            return Err(fail(
                Exit::Protocol,
                format!("protocol error: peer asked for {count} pieces of chunk {index}"),
            ));
        }
        let wanted = refine::gather(offset, &self.raw, bitmap);
        let c = chunk_msg(&mut self.encoder, index, &wanted, true)?;
        self.writer.send(&Msg::Chunk(c))?;
        self.writer.flush()
    }

    fn note_moved(&mut self) {
        if !self.moved {
            crate::log::warn(&format!(
                "source {} changed while it was being read; committing it anyway \
                 (--allow-changing-source): the copy is as consistent as a crash would leave it",
                self.src.path.display()
            ));
        }
        self.moved = true;
    }

    /// Fails with exit 7 if the source changed since it was opened, unless
    /// `--allow-changing-source` (then it is noted).
    fn unchanged(&mut self) -> Result<()> {
        match self.src.check_unchanged() {
            Err(e) if self.opts.allow_changing && exit_code_of(&e) == Exit::SourceChanged => {
                self.note_moved();
                Ok(())
            }
            r => r,
        }
    }
}

/// Sends one piece of the manifest: a reference when the receiver holds
/// it, else its entries.
fn send_piece<W: Write>(
    writer: &mut FrameWriter<W>,
    known: &HashMap<PieceDigest, u32>,
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

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write as _;

    use super::*;
    use crate::content::chunk::ChunkParams;
    use crate::content::manifest::Kind;
    use crate::wire::FrameReader;

    /// A source file holding `data`, with the one data entry covering it.
    fn source(dir: &std::path::Path, data: &[u8]) -> (Source, Vec<Entry>) {
        let path = dir.join("src");
        File::create(&path).unwrap().write_all(data).unwrap();
        let src = Source::open(&path, false).unwrap();
        let e = Entry {
            offset: 0,
            kind: Kind::Data {
                len: data.len() as u32,
                hash: ChunkHash::of(data),
            },
        };
        (src, vec![e])
    }

    fn opts(allow_changing: bool) -> SendOptions {
        SendOptions {
            params: ChunkParams::default(),
            compress_level: 0,
            allow_changing,
            sample: None,
        }
    }

    fn sent(w: &mut FrameWriter<Vec<u8>>) -> Vec<Msg> {
        let bytes = w.with_inner(std::mem::take).unwrap();
        let mut r = FrameReader::new(&bytes[..], "test");
        std::iter::from_fn(|| r.read_msg().ok()).collect()
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect()
    }

    #[test]
    fn a_request_is_answered_with_the_chunk_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(3000);
        let (src, entries) = source(dir.path(), &bytes);
        let (o, progress) = (opts(false), Progress::hidden());
        let mut w = FrameWriter::new(Vec::new(), "test");
        let mut s = Server::new(&src, &o, &mut w, &progress, HashMap::new()).unwrap();
        s.entries = entries.clone();
        s.on_request(vec![0]).unwrap();
        // Out of the manifest, or a zero run: refused.
        let e = s.on_request(vec![1]).unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Protocol);
        drop(s);
        let got = sent(&mut w);
        let [Msg::Chunk(c)] = &got[..] else {
            panic!("one chunk: {got:?}")
        };
        assert_eq!((c.index, c.raw_len, c.compressed), (0, 3000, false));
        assert!(!c.changed && !c.pieces);
        assert_eq!(c.payload, bytes);

        // The file changed since the scan: exit 7, or sent marked changed.
        std::fs::write(
            dir.path().join("src"),
            data(3000).iter().map(|b| !b).collect::<Vec<_>>(),
        )
        .unwrap();
        let mut s = Server::new(&src, &o, &mut w, &progress, HashMap::new()).unwrap();
        s.entries = entries.clone();
        let e = s.on_request(vec![0]).unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::SourceChanged);
        let o = opts(true);
        let mut s = Server::new(&src, &o, &mut w, &progress, HashMap::new()).unwrap();
        s.entries = entries;
        s.on_request(vec![0]).unwrap();
        assert!(s.moved);
        drop(s);
        assert!(matches!(&sent(&mut w)[..], [Msg::Chunk(c)] if c.changed));
    }

    #[test]
    fn piece_and_block_requests_get_pieces_and_their_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let bs = refine::BLOCK as usize;
        let bytes = data(2 * bs + 100);
        let (src, entries) = source(dir.path(), &bytes);
        let (o, progress) = (opts(false), Progress::hidden());
        let mut w = FrameWriter::new(Vec::new(), "test");
        let mut s = Server::new(&src, &o, &mut w, &progress, HashMap::new()).unwrap();
        s.entries = entries;
        s.on_block_request(&[0]).unwrap();
        // Pieces 1 and 2 of 3.
        s.on_block_fetch(0, 3, &[0b110]).unwrap();
        let e = s.on_block_fetch(0, 4, &[0b110]).unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Protocol);
        drop(s);
        let got = sent(&mut w);
        let [Msg::BlockHashes { index: 0, hashes }, Msg::Chunk(c)] = &got[..] else {
            panic!("hashes then pieces: {got:?}")
        };
        assert_eq!(hashes, &refine::block_hashes(0, &bytes));
        assert_eq!(hashes.len(), 3);
        assert!(c.pieces);
        assert_eq!(c.payload, &bytes[bs..]);
        assert_eq!(c.raw_len as usize, bs + 100);
    }

    #[test]
    fn a_piece_the_receiver_holds_is_sent_as_a_reference() {
        let piece = vec![Entry {
            offset: 0,
            kind: Kind::Zero { len: 1 << 20 },
        }];
        let mut known = HashMap::new();
        let mut w = FrameWriter::new(Vec::new(), "test");
        send_piece(&mut w, &known, &piece).unwrap();
        known.insert(manifest::piece_digest(&piece), 5);
        send_piece(&mut w, &known, &piece).unwrap();
        let mut expected = Vec::new();
        manifest::encode_batch(&piece, &mut expected);
        assert_eq!(sent(&mut w), [Msg::Manifest(expected), Msg::ManifestRef(5)]);
    }
}
