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
use crate::content::refine::{self, BlockIndex, BlockSource};
use crate::content::scan::read_full;
use crate::dest::cache;
use crate::error::{fail, Exit};
use crate::roles::receive::basis::{Basis, Target};
use crate::roles::receive::options::RecvOptions;
use crate::roles::receive::run::{Run, State, WINDOW};
use crate::wire::messages::SnapshotMsg;
use crate::wire::{FrameWriter, Msg, StartMode, WriteMode, MAX_REQUEST};

/// How the transfer was started.
pub(super) struct Start {
    /// Every chunk comes unasked (`StartMode::Inline`).
    pub inline: bool,
    /// The partial file an interrupted run left is resumed.
    pub resume: bool,
    /// The pieces of the destination's cached manifest offered to the sender.
    pub pieces: Vec<Vec<Entry>>,
    /// The destination holds the sender's `SNAPSHOT` base: only ranges
    /// come (`StartMode::Delta`).
    pub delta: bool,
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
    let resume = !opts.no_partial && opts.write_mode != WriteMode::UnsafeInplace && partial_len > 0;
    let inline = !device && old_len.is_none_or(|l| l == 0) && !resume && !have_seeds;
    (inline, resume)
}

/// Decides how the transfer starts and tells the sender: the pieces of the
/// destination's cached manifest that it need not send, then `START`.
pub(super) fn negotiate<W: Write>(
    target: &Target,
    have_seeds: bool,
    snap: Option<&SnapshotMsg>,
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
    // A delta leaves everything outside its ranges as the destination
    // holds it: only into an output that starts as the destination (never a
    // fresh copy, nor a partial file or journal an earlier run left), and
    // only when the cache says the destination is the base clone's bytes.
    let delta = match (snap.and_then(|s| s.base), regular) {
        (Some(base), Some(m)) => {
            !inline
                && !device
                && !resume
                && partial_len == 0
                && target.uncommitted.is_none()
                && opts.write_mode != WriteMode::Copy
                && cache::origin(&target.dest, m, opts.params) == Some(base)
        }
        _ => false,
    };
    if delta {
        writer.send_now(&Msg::Start(StartMode::Delta))?;
        return Ok(Start {
            inline,
            resume,
            pieces: Vec::new(),
            delta,
        });
    }
    let pieces = match regular {
        Some(m) if !inline && !device => cache::load(&target.dest, m, opts.params)
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
    Ok(Start {
        inline,
        resume,
        pieces,
        delta,
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
            if self
                .verify
                .as_ref()
                .is_some_and(|v| v.overlaps(e.offset, e.end()))
                && !self.unchanged_in_place(&e)
            {
                // The sender's extent maps said the destination holds this.
                self.summary.verify_mismatch_bytes += e.len();
            }
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
            if self.copy_in_place(i, e.offset, len, hash)?
                || self.copy_from_journal(i, e.offset, len, hash)?
            {
                return Ok(());
            }
            if let Some((k, src)) = self.in_seeds(hash) {
                copies.push((i, Some(k), src));
                return Ok(());
            }
            if self.basis.as_ref().is_some_and(|b| b.size > 0) && self.worth_refining(len) {
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
                None if found.is_some() && self.worth_refining(len) => {
                    self.state[i] = State::Deferred;
                    self.deferred.push(i);
                }
                None => self.request(i, len),
            },
        }
        Ok(())
    }

    /// Whether a chunk of `len` bytes found nowhere whole may be rebuilt
    /// from old 4 KiB blocks. Not when chunks may have changed since the
    /// manifest (`--allow-changing-source`), nor for a delta run's piece of
    /// one block: its old data is only the ranges' own, already compared.
    fn worth_refining(&self, len: u32) -> bool {
        let one_block = self.verify.is_some() && u64::from(len) <= refine::BLOCK;
        !(self.allow_changing || one_block)
    }

    /// Zero entry `e` lies where the output's own old contents (an aliased
    /// basis) were scanned as zeros, and nothing has been written there.
    fn zero_in_place(&self, e: &Entry) -> bool {
        self.basis
            .as_ref()
            .is_some_and(|b| b.placed && e.end() <= b.size)
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
                // No block of it can be found here: skip the round trip.
                self.request(i, e.len() as u32);
                continue;
            }
            self.state[i] = State::Refining;
            self.outstanding += e.len();
            self.refine_requests.push(i as u64);
        }
    }

    /// Block hashes of chunks we lack: find what we can locally (planned in
    /// parallel: each plan reads and hashes old data), ask for the rest.
    pub fn plan(&mut self, batch: Vec<(u64, Vec<refine::BlockHash>)>) -> Result<()> {
        let mut todo = Vec::with_capacity(batch.len());
        for (index, hashes) in batch {
            let i = self.expect_state(index, State::Refining)?;
            let e = self.entries[i];
            if hashes.len() != refine::block_count(e.offset, e.len() as u32) {
                return Err(fail(
                    Exit::Protocol,
                    format!(
                        "protocol error: {} block hashes for chunk {i}",
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
        let plans: Vec<Vec<BlockSource>> = todo
            .par_iter()
            .map(|(i, hashes)| make_plan(&self.entries[*i], hashes, basis, blocks, &dirty))
            .collect();
        for ((i, _), plan) in todo.into_iter().zip(plans) {
            let wire = plan.iter().filter(|p| **p == BlockSource::Wire).count();
            if wire == plan.len() {
                // Nothing of it here: the whole chunk is the same bytes, one message.
                self.state[i] = State::Requested;
                self.requests.push(i as u64);
                continue;
            }
            self.state[i] = State::Blocks;
            if wire == 0 {
                self.complete(vec![(i, Vec::new(), Some(plan))])?;
                continue;
            }
            self.block_fetches.push(Msg::BlockFetch {
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
            || !self.block_fetches.is_empty();
        for part in self.requests.chunks(MAX_REQUEST) {
            writer.send(&Msg::Request(part.to_vec()))?;
        }
        for part in self.refine_requests.chunks(MAX_REQUEST) {
            writer.send(&Msg::BlockRequest(part.to_vec()))?;
        }
        for m in self.block_fetches.drain(..) {
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

/// Where each 4 KiB block of chunk `e` can come from: the old file at the same
/// offset (read once for the whole chunk), else a block of unmatched old
/// data with the same block hash, else the wire. `dirty` says which old
/// ranges were overwritten this run (in place).
pub(super) fn make_plan(
    e: &Entry,
    hashes: &[refine::BlockHash],
    basis: &Basis,
    blocks: &BlockIndex,
    dirty: &(impl Fn(u64, u64) -> bool + Sync),
) -> Vec<BlockSource> {
    let len = e.len() as u32;
    let same_end = e.end().min(basis.size);
    let mut same = Vec::new();
    if same_end > e.offset {
        same.resize((same_end - e.offset) as usize, 0);
        if read_full(&basis.file, &mut same, e.offset).is_err() {
            same.clear();
        }
    }
    refine::blocks(e.offset, len)
        .zip(hashes)
        .map(|((start, plen), want)| {
            let end = start + u64::from(plen);
            let a = (start - e.offset) as usize;
            // Same offset first: in-place rewrites leave the neighbours there.
            if let Some(old) = same.get(a..a + plen as usize) {
                if !dirty(start, end) && &refine::block_hash(old) == want {
                    return BlockSource::Basis(start);
                }
            }
            if u64::from(plen) == refine::BLOCK {
                if let Some(at) = blocks.get(want) {
                    if !dirty(at, at + refine::BLOCK) {
                        return BlockSource::Basis(at);
                    }
                }
            }
            BlockSource::Wire
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Progress;
    use crate::roles::receive::run::testing::{basis_of, data, filled};

    #[test]
    fn start_mode_sends_inline_only_when_nothing_can_be_reused() {
        let o = RecvOptions::default();
        // No file, no partial, no seed: everything inline.
        assert_eq!(start_mode(false, None, 0, false, &o), (true, false));
        assert_eq!(start_mode(false, Some(0), 0, false, &o), (true, false));
        // An old file, a seed, a device: compare a manifest.
        assert_eq!(start_mode(false, Some(10), 0, false, &o), (false, false));
        assert_eq!(start_mode(false, None, 0, true, &o), (false, false));
        assert_eq!(start_mode(true, None, 0, false, &o), (false, false));
        // A partial file is resumed, so not inline...
        assert_eq!(start_mode(false, None, 5, false, &o), (false, true));
        // ...unless --no-partial or --write-mode unsafe-inplace say to ignore it.
        let np = RecvOptions {
            no_partial: true,
            ..o
        };
        assert_eq!(start_mode(false, None, 5, false, &np), (true, false));
        let ip = RecvOptions {
            write_mode: WriteMode::UnsafeInplace,
            ..o
        };
        assert_eq!(start_mode(false, None, 5, false, &ip), (true, false));
    }

    #[test]
    fn advance_copies_found_chunks_and_defers_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (filled(100, 1), filled(100, 2), filled(100, 3));
        let old = [a.clone(), b.clone()].concat();
        let basis = basis_of(dir.path(), &old, &[(0, 100), (100, 100)]);
        // A stays, C is new where B was, B moved after it, then zeros.
        let entries = vec![
            data(0, &a),
            data(100, &c),
            data(200, &b),
            Entry {
                offset: 300,
                kind: Kind::Zero { len: 50 },
            },
        ];
        let progress = Progress::hidden();
        let mut run = Run::for_test(dir.path(), entries, Some(basis), false, false, &progress);
        run.advance().unwrap();
        assert_eq!(
            run.state,
            [State::Done, State::Deferred, State::Done, State::Done]
        );
        assert_eq!(run.deferred, [1]);
        assert!(run.requests.is_empty());
        assert_eq!(run.outstanding, 0);
        assert_eq!(run.summary.reused_bytes, 200);
        assert_eq!(run.summary.zero_bytes, 50);
        // The output was made at the first difference, with what stayed.
        let mut got = vec![0u8; 300];
        read_full(run.out.as_ref().unwrap().file(), &mut got, 0).unwrap();
        assert_eq!(&got[..100], &a[..]);
        assert_eq!(&got[100..200], &[0u8; 100][..]);
        assert_eq!(&got[200..], &b[..]);
    }

    #[test]
    fn advance_requests_instead_of_refining_a_changing_source() {
        let dir = tempfile::tempdir().unwrap();
        let (a, c) = (filled(100, 1), filled(100, 3));
        let basis = basis_of(dir.path(), &a, &[(0, 100)]);
        let entries = vec![data(0, &c)];
        let progress = Progress::hidden();
        let mut run = Run::for_test(dir.path(), entries, Some(basis), false, true, &progress);
        run.advance().unwrap();
        assert_eq!(run.state, [State::Requested]);
        assert_eq!(run.requests, [0]);
        assert_eq!(run.outstanding, 100);
        assert!(run.deferred.is_empty());
    }

    #[test]
    fn advance_stops_at_the_window_and_resumes_when_bytes_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let len = 40u32 << 20;
        let entries: Vec<Entry> = (0..3u64)
            .map(|k| Entry {
                offset: k * u64::from(len),
                kind: Kind::Data {
                    len,
                    hash: ChunkHash::of(&k.to_le_bytes()),
                },
            })
            .collect();
        let progress = Progress::hidden();
        let mut run = Run::for_test(dir.path(), entries, None, true, false, &progress);
        run.advance().unwrap();
        // 40 MiB in flight leaves room under the 64 MiB window; 80 does not.
        assert_eq!(run.requests, [0, 1]);
        assert_eq!(run.next, 2);
        assert_eq!(run.outstanding, 2 * u64::from(len));
        assert!(!run.finished());
        run.requests.clear();
        run.outstanding -= u64::from(len);
        run.advance().unwrap();
        assert_eq!(run.requests, [2]);
        assert_eq!(run.state[2], State::Requested);
    }

    #[test]
    fn make_plan_finds_pieces_in_place_and_moved() {
        let dir = tempfile::tempdir().unwrap();
        let bs = refine::BLOCK as usize;
        let old = filled(3 * bs, 7);
        let basis = basis_of(dir.path(), &old, &[(0, 3 * bs)]);
        let blocks = BlockIndex::build(&basis.file, basis.size, &[(0, basis.size)]).unwrap();
        let clean = |_: u64, _: u64| false;

        // Same offset: first and last blocks kept, the middle one changed.
        let mut new = old.clone();
        new[bs + 10] ^= 0xff;
        let e = data(0, &new);
        let hashes = refine::block_hashes(0, &new);
        let plan = make_plan(&e, &hashes, &basis, &blocks, &clean);
        assert_eq!(
            plan,
            [
                BlockSource::Basis(0),
                BlockSource::Wire,
                BlockSource::Basis(2 * bs as u64)
            ]
        );

        // Past the old file's end: a block found elsewhere by its hash.
        let at = 3 * bs as u64;
        let moved = [old[bs..2 * bs].to_vec(), filled(bs, 9)].concat();
        let e = data(at, &moved);
        let hashes = refine::block_hashes(at, &moved);
        let plan = make_plan(&e, &hashes, &basis, &blocks, &clean);
        assert_eq!(plan, [BlockSource::Basis(bs as u64), BlockSource::Wire]);

        // Old data overwritten this run is not used.
        let all_dirty = |_: u64, _: u64| true;
        let plan = make_plan(&e, &hashes, &basis, &blocks, &all_dirty);
        assert_eq!(plan, [BlockSource::Wire, BlockSource::Wire]);
    }
}
