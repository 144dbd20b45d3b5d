//! Planning what to fetch: how the transfer starts (every chunk inline, or
//! a manifest to compare), then, entry by entry as the manifest streams in,
//! whether a chunk is copied from old data, deferred for refinement, or
//! requested, within the request window ([`WINDOW`]); and for a refined
//! chunk, where each of its 4 KiB pieces comes from ([`make_plan`]).
//!
//! A chunk not found whole anywhere is deferred until the manifest is
//! complete: only then is it known which old data no chunk matched, which is
//! where its pieces can be ([`crate::content::refine`]).

use std::io::Write;

use anyhow::Result;
use rayon::prelude::*;

use crate::content::hash::ChunkHash;
use crate::content::manifest::{piece_digest, Entry, Kind, Piecer};
use crate::content::refine::{self, BlockIndex, PieceSource};
use crate::content::scan::read_full;
use crate::dest::cache;
use crate::error::{fail, Exit};
use crate::roles::receive::basis::{Basis, Target};
use crate::roles::receive::options::RecvOptions;
use crate::roles::receive::run::{Run, State, WINDOW};
use crate::wire::protocol::{FrameWriter, Msg, StartMode, MAX_REQUEST};

/// How the transfer was started.
pub(super) struct Start {
    /// Every chunk comes unasked (`StartMode::Inline`).
    pub inline: bool,
    /// The partial file an interrupted run left is resumed.
    pub resume: bool,
    /// The pieces of the destination's cached manifest offered to the sender.
    pub pieces: Vec<Vec<Entry>>,
}

/// (inline, resume) for a destination of `old_len` bytes (`None`: no regular
/// file) with a partial file of `partial_len` bytes. Nothing to reuse: have
/// every chunk sent unasked, saving the sender a second read and us the
/// request round trips. A device always has old contents to compare with.
fn start_mode(
    device: bool,
    old_len: Option<u64>,
    partial_len: u64,
    have_seeds: bool,
    opts: &RecvOptions,
) -> (bool, bool) {
    let resume = !opts.no_partial && !opts.inplace && partial_len > 0;
    let inline = !device && old_len.is_none_or(|l| l == 0) && !resume && !have_seeds;
    (inline, resume)
}

/// Decides how the transfer starts and tells the sender: the pieces of the
/// destination's cached manifest that it need not send, then `START`.
pub(super) fn negotiate<W: Write>(
    target: &Target,
    have_seeds: bool,
    opts: &RecvOptions,
    writer: &mut FrameWriter<W>,
) -> Result<Start> {
    let device = target.device;
    let regular = target.regular();
    let partial_len = if device {
        0
    } else {
        target.sync_lock().file().metadata().map_or(0, |m| m.len())
    };
    let (inline, resume) = start_mode(
        device,
        regular.map(|m| m.len()),
        partial_len,
        have_seeds,
        opts,
    );
    let pieces = match regular {
        Some(m) if !inline && !device => cache::load(&target.dest, m, opts.params)
            .map(|cached| Piecer::cut(&cached))
            .filter(|p| p.len() <= crate::wire::protocol::MAX_PIECE_REFS)
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
    Ok(Start {
        inline,
        resume,
        pieces,
    })
}

impl Run<'_> {
    /// Takes one batch of the manifest (received, or a piece we held).
    pub fn take_batch(&mut self, payload: &[u8]) -> Result<()> {
        let before = self.entries.len();
        self.validator.decode_batch(payload, &mut self.entries)?;
        self.state.resize(self.entries.len(), State::Pending);
        debug_assert!(self.entries.len() > before);
        self.advance()
    }

    /// Handles entries in order while the request window has room.
    pub fn advance(&mut self) -> Result<()> {
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
                Kind::Data { len, hash } => self.plan_data(i, &e, len, &hash, &mut copies)?,
            }
        }
        self.copy_parallel(copies, false)?;
        self.advance_refinement();
        Ok(())
    }

    /// Where data entry `i` comes from: on its way (inline), left or copied
    /// in place, copied from the basis or a seed (added to `copies`), refined
    /// later (deferred), or requested.
    fn plan_data(
        &mut self,
        i: usize,
        e: &Entry,
        len: u32,
        hash: &ChunkHash,
        copies: &mut Vec<(usize, Option<usize>, u64)>,
    ) -> Result<()> {
        if self.inline {
            // On its way unasked.
            self.request(i, len);
            return Ok(());
        }
        if self.output().is_in_place() {
            if self.copy_in_place(i, e.offset, len, hash)? {
                return Ok(());
            }
            if let Some((k, src)) = self.in_seeds(hash) {
                copies.push((i, Some(k), src));
                return Ok(());
            }
            if self.basis.as_ref().is_some_and(|b| b.size > 0) && !self.allow_changing {
                self.state[i] = State::Deferred;
                self.deferred.push(i);
            } else {
                self.request(i, len);
            }
            return Ok(());
        }
        match self.basis.as_ref().map(|b| b.index.get(hash)) {
            Some(Some(&(src, _))) => copies.push((i, None, src)),
            found => match self.in_seeds(hash) {
                Some((k, src)) => copies.push((i, Some(k), src)),
                None if found.is_some() && !self.allow_changing => {
                    self.state[i] = State::Deferred;
                    self.deferred.push(i);
                }
                None => self.request(i, len),
            },
        }
        Ok(())
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
        self.basis
            .as_ref()
            .is_some_and(|b| b.data_overlaps(e.offset, e.end()))
    }

    /// Once the manifest is complete: index the old data no chunk matched
    /// (that is where changed chunks' pieces can be), then ask for piece
    /// hashes of deferred chunks while the window has room.
    pub fn start_refinement(&mut self) -> Result<()> {
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
    pub fn plan(&mut self, batch: Vec<(u64, Vec<refine::PieceHash>)>) -> Result<()> {
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

    /// Sends the requests planned since the last call, flushing if any.
    pub fn send_requests<W: Write>(&mut self, writer: &mut FrameWriter<W>) -> Result<()> {
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
}

/// Where each piece of chunk `e` can come from: the old file at the same
/// offset (read once for the whole chunk), else a block of unmatched old
/// data with the same piece hash, else the wire. `dirty` says which old
/// ranges were overwritten this run (in place).
pub(super) fn make_plan(
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
