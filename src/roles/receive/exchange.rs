//! The conversation with the sender once the transfer has started: a
//! reader thread drains the connection into a channel, so the sender is
//! never blocked writing while we write requests (the two ends cannot
//! deadlock on full pipes), holding what it queues to a bound in bytes
//! ([`Queue`]); the main thread hands each message to its phase and sends
//! the requests that planned, until everything is written.

use std::io::{Read, Write};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use anyhow::{Context, Result};

use crate::content::chunk::ChunkParams;
use crate::content::manifest::{self, Entry};
use crate::error::{exit_code_of, fail, Exit};
use crate::roles::receive::options::RecvOptions;
use crate::roles::receive::run::{Run, WINDOW};
use crate::wire::{ChunkMsg, FrameReader, FrameWriter, Msg};

/// Most decompressed bytes of received chunks completed together.
const BATCH_RAW: u64 = 16 << 20;
/// Most block-hash answers planned together.
const BATCH_HASHES: usize = 4096;

/// The main thread's end of the reader thread.
pub(super) struct Inbox {
    rx: mpsc::Receiver<Result<Msg>>,
    queue: Arc<Queue>,
    /// A message taken off the queue early, while batching others.
    stashed: Option<Result<Msg>>,
}

impl Inbox {
    /// Starts draining `reader` (see the module doc), holding what arrives
    /// to a bounded number of bytes (see [`Queue`]).
    pub fn spawn<R: Read + Send + 'static>(
        mut reader: FrameReader<R>,
        inline: bool,
        size: u64,
        params: ChunkParams,
    ) -> Result<Inbox> {
        let (tx, rx) = mpsc::channel::<Result<Msg>>();
        let queue = Arc::new(Queue::new(inline, size, params));
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
        Ok(Inbox {
            rx,
            queue,
            stashed: None,
        })
    }

    /// The next message, waiting for it.
    fn next(&mut self) -> Result<Msg> {
        let msg = match self.stashed.take() {
            Some(m) => m?,
            None => self
                .rx
                .recv()
                .map_err(|_| fail(Exit::Connection, "the connection ended unexpectedly"))??,
        };
        self.queue.taken(&msg);
        Ok(msg)
    }

    /// The next message if it is already here and `take` accepts it (its
    /// value); any other message is kept for [`Inbox::next`].
    fn more<T>(&mut self, take: impl FnOnce(Msg) -> Result<T, Msg>) -> Option<T> {
        if self.stashed.is_some() {
            return None;
        }
        match self.rx.try_recv() {
            Ok(Ok(m)) => {
                let cost = Queue::cost(&m);
                match take(m) {
                    Ok(v) => {
                        self.queue.release(cost);
                        Some(v)
                    }
                    Err(m) => {
                        self.stashed = Some(Ok(m));
                        None
                    }
                }
            }
            Ok(Err(e)) => {
                self.stashed = Some(Err(e));
                None
            }
            Err(_) => None,
        }
    }

    /// The error `e` to report: the peer usually says why it hung up before
    /// it does, and its reason beats our broken connection.
    fn reason(&mut self, e: anyhow::Error) -> anyhow::Error {
        if exit_code_of(&e) == Exit::Connection {
            while let Ok(m) = self.rx.recv() {
                if let Err(pe) = m {
                    if exit_code_of(&pe) != Exit::Connection {
                        return pe;
                    }
                    break;
                }
            }
        }
        e
    }
}

/// Feeds the sender's messages to `run` and sends the requests they lead
/// to, until the manifest is complete and everything is written. `pieces`
/// are the cached manifest pieces offered to the sender.
pub(super) fn exchange<W: Write>(
    run: &mut Run<'_>,
    inbox: &mut Inbox,
    pieces: &[Vec<Entry>],
    writer: &mut FrameWriter<W>,
    opts: &RecvOptions,
) -> Result<()> {
    let result = (|| -> Result<()> {
        let mut manifest_done = false;
        loop {
            run.keep_journal_small()?;
            match inbox.next()? {
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
                    run.accept(chunk_batch(inbox, c))?;
                    run.advance()?;
                }
                Msg::BlockHashes { index, hashes } => {
                    // Take every piece-hash answer already here, to plan them together.
                    let mut batch = vec![(index, hashes)];
                    while batch.len() < BATCH_HASHES {
                        match inbox.more(|m| match m {
                            Msg::BlockHashes { index, hashes } => Ok((index, hashes)),
                            m => Err(m),
                        }) {
                            Some(h) => batch.push(h),
                            None => break,
                        }
                    }
                    run.plan(batch)?;
                    run.advance()?;
                }
                m => return Err(m.unexpected("MANIFEST, MANIFEST_END or CHUNK")),
            }
            run.send_requests(writer)?;
            if manifest_done && run.finished() {
                return Ok(());
            }
        }
    })();
    result.map_err(|e| inbox.reason(e))
}

/// `first` and the chunks already here after it, to complete them
/// together, up to a bound on their decompressed size.
fn chunk_batch(inbox: &mut Inbox, first: ChunkMsg) -> Vec<ChunkMsg> {
    let mut raw = u64::from(first.raw_len);
    let mut batch = vec![first];
    while raw < BATCH_RAW {
        match inbox.more(|m| match m {
            Msg::Chunk(c) => Ok(c),
            m => Err(m),
        }) {
            Some(c) => {
                raw += u64::from(c.raw_len);
                batch.push(c);
            }
            None => break,
        }
    }
    batch
}

/// Bounds what the reader thread may hold for the main thread, so a peer
/// cannot fill our memory by sending faster than we write, or by sending
/// what nobody asked for.
///
/// Chunk data (and block hashes) count against a byte budget. Inline, the
/// sender pushes everything unasked and we send nothing back until the end,
/// so the reader simply waits for room. Otherwise the sender only sends what
/// was requested, at most [`WINDOW`] bytes in flight, so twice that is a
/// peer breaking the protocol, and waiting could deadlock against our own
/// requests: it is an error. The manifest cannot be longer than the file's
/// size allows ([`crate::content::manifest::Validator`] checks the entries; this bounds the bytes
/// queued before it looks).
pub(super) struct Queue {
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
        self.release(Queue::cost(m));
    }

    /// Frees `n` bytes of the budget (the cost of a message taken).
    fn release(&self, n: u64) {
        if n > 0 {
            let mut q = self.queued.lock().expect("queue lock");
            *q = q.saturating_sub(n);
            self.room.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk message of `n` payload bytes (zeroed lazily: not touched).
    fn chunk(index: u64, n: usize) -> Msg {
        Msg::Chunk(ChunkMsg {
            changed: false,
            index,
            raw_len: n as u32,
            compressed: false,
            pieces: false,
            payload: vec![0; n],
        })
    }

    fn queued(q: &Queue) -> u64 {
        *q.queued.lock().unwrap()
    }

    #[test]
    fn queue_refuses_more_chunk_data_than_the_window_allows() {
        let q = Queue::new(false, 1 << 30, ChunkParams::default());
        let big = (WINDOW + WINDOW / 2) as usize;
        let first = q.admit(chunk(0, big)).unwrap();
        assert_eq!(queued(&q), big as u64 + 64);
        // Two of them are more than 2 windows and a frame: a peer sending unasked.
        let e = q.admit(chunk(1, big)).unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Protocol);
        // Taking the first off makes room again.
        q.taken(&first);
        assert_eq!(queued(&q), 0);
        q.admit(chunk(1, big)).unwrap();
        // Messages without chunk data cost nothing.
        q.admit(Msg::ManifestRef(0)).unwrap();
        assert_eq!(queued(&q), big as u64 + 64);
    }

    #[test]
    fn inline_queue_admits_a_large_chunk_when_empty() {
        // Inline, the reader waits for room rather than fail; an empty
        // queue always has room, whatever the chunk's size.
        let q = Queue::new(true, 1 << 30, ChunkParams::default());
        q.admit(chunk(0, 2 * INLINE_QUEUE as usize)).unwrap();
        assert_eq!(queued(&q), 2 * INLINE_QUEUE + 64);
    }

    #[test]
    fn queue_bounds_the_manifest_by_the_file_size() {
        // An empty file's manifest is tiny: the limit is the 1 MiB of slack.
        let q = Queue::new(false, 0, ChunkParams::default());
        q.admit(Msg::Manifest(vec![0; 1 << 20])).unwrap();
        let e = q.admit(Msg::Manifest(vec![0; 1 << 10])).unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Protocol);
        assert!(format!("{e:#}").contains("bytes of manifest"));
    }

    #[test]
    fn inbox_batches_chunks_and_keeps_the_next_message() {
        let (tx, rx) = mpsc::channel();
        let queue = Arc::new(Queue::new(false, 1 << 30, ChunkParams::default()));
        for m in [
            chunk(0, 10),
            chunk(1, 20),
            chunk(2, 30),
            Msg::ManifestRef(3),
        ] {
            tx.send(queue.admit(m)).unwrap();
        }
        tx.send(queue.admit(chunk(4, 40))).unwrap();
        let mut inbox = Inbox {
            rx,
            queue: queue.clone(),
            stashed: None,
        };
        let Msg::Chunk(first) = inbox.next().unwrap() else {
            panic!("a chunk first")
        };
        let batch = chunk_batch(&mut inbox, first);
        assert_eq!(batch.iter().map(|c| c.index).collect::<Vec<_>>(), [0, 1, 2]);
        // The reference that ended the batch comes next, then the last chunk.
        assert_eq!(inbox.next().unwrap(), Msg::ManifestRef(3));
        assert_eq!(queued(&queue), 40 + 64);
        assert!(matches!(inbox.next().unwrap(), Msg::Chunk(c) if c.index == 4));
        assert_eq!(queued(&queue), 0);
        // The reader gone: the connection ended.
        drop(tx);
        let e = inbox.next().unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Connection);
    }
}
