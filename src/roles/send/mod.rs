//! The sending end: scan the source, stream its manifest, answer requests
//! with compressed chunks.
//!
//! Three threads: the scanner (`scan.rs`) cuts and hashes the file and
//! hands manifest batches over; the request reader (here) drains the peer's
//! `REQUEST`s, so the peer never blocks writing them; the main thread
//! (`serve.rs`) does all the writing, interleaving manifest batches with
//! requested chunks. On a push the scanner starts before the connection is
//! up ([`Prescan`]). On a first copy it also compresses every chunk, at a
//! level that follows the link ([`crate::content::compress::Adapt`]). Every
//! chunk is re-hashed when it is read for sending, so a source that changed
//! since the scan is caught (exit 7) and never sent under a stale hash.
//!
//! `source.rs` holds the source file and what must not change while it is
//! read: a regular file's size and times, a block device's size only.

mod scan;
mod serve;
mod source;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::mpsc;

use anyhow::{Context, Result};

pub use self::scan::Prescan;
pub use self::source::{SendOptions, Source};
use crate::content::manifest::PieceDigest;
use crate::error::{exit_code_of, Exit};
use crate::progress::Progress;
use crate::roles::send::scan::{
    spawn_manifest_scanner, spawn_ranges_scanner, spawn_scanner, Event,
};
use crate::roles::send::serve::Server;
use crate::source::snapshot::Snapshot;
use crate::wire::messages::snapshot::MAX_RANGES_BATCH;
use crate::wire::messages::{DeltaRange, SnapshotMsg, SnapshotStats};
use crate::wire::{FrameReader, FrameWriter, Msg, StartMode, Summary};

/// Runs the sending end until the receiver's `DONE`. `prescan`, if any,
/// is this source's scan already under way with the same options.
pub fn send<R, W>(
    src: &Source,
    mut reader: FrameReader<R>,
    writer: &mut FrameWriter<W>,
    opts: &SendOptions,
    progress: &Progress,
    prescan: Option<Prescan>,
    snap: Option<&Snapshot>,
) -> Result<Summary>
where
    R: Read + Send + 'static,
    W: Write,
{
    let stats = |delta: Option<&[DeltaRange]>| {
        snap.map(|s| SnapshotStats::of(&s.msg, src.info.size, delta))
    };
    let (inline, known, delta) = match greet(src, &mut reader, writer, snap.map(|s| &s.msg))? {
        Greeting::UpToDate(mut s) => {
            s.snapshot = snap.map(|m| Box::new(SnapshotStats::up_to_date(&m.msg, src.info.size)));
            return Ok(s);
        }
        Greeting::Start {
            inline,
            known,
            delta,
        } => (inline, known, delta),
    };
    let ranges = match (delta, snap) {
        (true, Some(s)) => {
            let ranges = s.ranges();
            send_ranges(writer, &ranges)?;
            Some(ranges)
        }
        (true, None) => {
            return Err(crate::error::fail(
                Exit::Protocol,
                "protocol error: peer asked for a delta without a snapshot",
            ))
        }
        _ => None,
    };
    let stats = stats(ranges.as_deref());
    progress.set_total(stats.map_or(src.info.size, |s| s.read_bytes));
    crate::vlog!(
        1,
        "sender: scanning {} ({} bytes){}",
        src.path.display(),
        src.info.size,
        if inline { ", all chunks inline" } else { "" }
    );

    let (tx, rx) = match prescan {
        Some(p) if !inline && ranges.is_none() => (p.tx, p.rx),
        p => {
            if let Some(p) = p {
                p.stop();
            }
            // A batch carries up to a segment (16 MiB) of compressed data
            // inline: keep the queue short so memory stays flat when the
            // link is slow.
            let (tx, rx) = mpsc::sync_channel::<Event>(2);
            if let Some(r) = &ranges {
                let spans = r.iter().map(|r| (r.offset, r.end())).collect();
                spawn_ranges_scanner(src, opts.params, spans, tx.clone())?;
            } else if inline {
                spawn_scanner(src, opts, true, tx.clone())?;
            } else {
                spawn_manifest_scanner(src, opts, tx.clone())?;
            }
            (tx, rx)
        }
    };
    spawn_request_reader(reader, tx)?;
    let mut summary = Server::new(src, opts, writer, progress, known)?.serve(&rx)?;
    summary.snapshot = stats.map(|s| {
        Box::new(SnapshotStats {
            verify_mismatch_bytes: summary.verify_mismatch_bytes,
            ..s
        })
    });
    Ok(summary)
}

/// A delta run's ranges, in `RANGES` messages (at least one, the last
/// flagged).
fn send_ranges<W: Write>(writer: &mut FrameWriter<W>, ranges: &[DeltaRange]) -> Result<()> {
    let mut parts = ranges.chunks(MAX_RANGES_BATCH).peekable();
    if parts.peek().is_none() {
        return writer.send(&Msg::Ranges {
            last: true,
            ranges: Vec::new(),
        });
    }
    while let Some(part) = parts.next() {
        writer.send(&Msg::Ranges {
            last: parts.peek().is_none(),
            ranges: part.to_vec(),
        })?;
    }
    Ok(())
}

/// How the receiver answered our `FILE_INFO`.
enum Greeting {
    /// Up to date: its summary, nothing to send.
    UpToDate(Summary),
    /// Send: every chunk unasked (`inline`), or a manifest, with references
    /// for the pieces of it the receiver holds (`known`), or (`delta`) the
    /// ranges of our snapshot and their manifest.
    Start {
        inline: bool,
        known: HashMap<PieceDigest, u32>,
        delta: bool,
    },
}

/// Sends `SNAPSHOT` (with `--snapshot`) and `FILE_INFO`, and reads the
/// receiver's `PIECES` (if any) and `START`.
fn greet<R: Read, W: Write>(
    src: &Source,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    snap: Option<&SnapshotMsg>,
) -> Result<Greeting> {
    let sent = match snap {
        Some(s) => writer.send(&Msg::Snapshot(Box::new(*s))),
        None => Ok(()),
    };
    if let Err(e) = sent.and_then(|()| writer.send_now(&Msg::FileInfo(src.info))) {
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
    let mut known: HashMap<PieceDigest, u32> = HashMap::new();
    if let Msg::Pieces(digests) = first {
        for (i, d) in digests.into_iter().enumerate() {
            known.entry(d).or_insert(i as u32);
        }
        first = reader.read_msg()?;
    }
    let (inline, delta) = match first {
        Msg::Start(StartMode::UpToDate) => {
            return match reader.read_msg()? {
                Msg::Done(s) => Ok(Greeting::UpToDate(s)),
                m => Err(m.unexpected("DONE")),
            }
        }
        Msg::Start(StartMode::Manifest) => (false, false),
        Msg::Start(StartMode::Inline) => (true, false),
        Msg::Start(StartMode::Delta)
            if known.is_empty() && snap.is_some_and(|s| s.base.is_some()) =>
        {
            (false, true)
        }
        m => return Err(m.unexpected("START")),
    };
    Ok(Greeting::Start {
        inline,
        known,
        delta,
    })
}

/// Drains the receiver's requests into the main thread's channel until its
/// `DONE` or an error.
fn spawn_request_reader<R: Read + Send + 'static>(
    mut reader: FrameReader<R>,
    tx: mpsc::SyncSender<Event>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("requests".into())
        .spawn(move || loop {
            let ev = match reader.read_msg() {
                Ok(m @ (Msg::Request(_) | Msg::BlockRequest(_) | Msg::BlockFetch { .. })) => {
                    Event::Peer(m)
                }
                Ok(Msg::Done(s)) => Event::PeerDone(s),
                Ok(m) => Event::Failed(m.unexpected("a request or DONE")),
                Err(e) => Event::Failed(e),
            };
            let last = !matches!(ev, Event::Peer(_));
            if tx.send(ev).is_err() || last {
                return;
            }
        })
        .context("cannot start a thread")?;
    Ok(())
}
