//! Writing what the sender sent and what old data holds: chunks received
//! (checked against what was asked for, decoded, verified, written),
//! chunks copied from the basis or a seed, and in place, chunks left where
//! they already are. Nothing is written that does not match its hash; a
//! copy from old data that no longer does is fetched instead.
//!
//! Building, verifying and writing run in parallel over a batch of chunks;
//! the output is written at each chunk's offset, in any order.

use anyhow::Result;
use rayon::prelude::*;

use crate::content::compress::StreamDecoder;
use crate::content::hash::ChunkHash;
use crate::content::manifest::{Entry, Kind};
use crate::content::refine::{self, BlockSource};
use crate::content::scan::read_full;
use crate::dest::writer;
use crate::dest::writer::Output;
use crate::error::{fail, Exit};
use crate::roles::receive::basis::Basis;
use crate::roles::receive::run::{Run, State};
use crate::wire::{ChunkMsg, WriteMode};

impl Run<'_> {
    /// Makes the output once the new file turns out to differ from the old
    /// one, as the write mode says: a reflink clone of the destination (with
    /// `auto`, a journal where the filesystem cannot clone), or a journal,
    /// both of which already hold what was found unchanged so far; or a new
    /// copy, into which that is written now.
    pub fn materialize(&mut self) -> Result<()> {
        let copies = std::mem::take(&mut self.lazy_copies);
        let spec = &self.spec;
        let mode = spec.write_mode;
        if matches!(mode, WriteMode::Auto | WriteMode::Clone) {
            let existing = spec.existing.as_ref().expect("a basis is an existing file");
            match Output::cloned(&spec.dest, &spec.locked, spec.keep, existing, spec.size)? {
                Some(out) => {
                    crate::vlog!(1, "receiver: writing into a reflink clone of {}", spec.dest.display());
                    self.out = Some(out);
                    return Ok(());
                }
                None if mode == WriteMode::Clone => {
                    return Err(fail(
                        Exit::Io,
                        format!(
                            "--write-mode clone: the filesystem of {} cannot make reflink clones \
                             (XFS with reflink=1, btrfs, bcachefs and OCFS2 can); nothing was written",
                            spec.dest.display()
                        ),
                    ))
                }
                None => {}
            }
        }
        if mode == WriteMode::Copy {
            self.out = Some(self.spec.partial(false)?);
            return self.copy_parallel(copies, true);
        }
        crate::vlog!(
            1,
            "receiver: journaling the changes to {}",
            spec.dest.display()
        );
        self.out = Some(spec.journal()?);
        Ok(())
    }

    /// Atomic mode: copies from the basis in parallel (read, hash, write).
    /// `counted`: the entries were already marked done and counted as reused.
    /// Copies chunks from the basis (seed `None`) or a seed: (entry,
    /// seed, offset there). One that no longer reads back with its hash is
    /// fetched instead.
    pub fn copy_parallel(
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
                    self.reused(i, len);
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

    /// Entry `i` (`len` bytes) is done, taken from old data.
    fn reused(&mut self, i: usize, len: u64) {
        self.state[i] = State::Done;
        self.summary.reused_bytes += len;
        self.progress.advance(len);
    }

    /// In place (`--inplace`, or a resumed partial file): leaves a chunk that
    /// is already at its offset in the output where it is, or copies it from
    /// old data not yet overwritten. False when it must be fetched.
    pub fn copy_in_place(
        &mut self,
        i: usize,
        offset: u64,
        len: u32,
        hash: &ChunkHash,
    ) -> Result<bool> {
        // (from the partial basis?, source offset), best first: already in
        // place in the output; then read-only old data; then other places
        // in the output's old contents.
        let mut cands: Vec<(bool, u64)> = Vec::with_capacity(3);
        let bases = [(false, &self.basis), (true, &self.partial)];
        for (is_partial, b) in bases {
            if let Some(b) = b {
                if b.placed && b.at.get(&offset) == Some(hash) {
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
                        if !(b.placed && src == offset) {
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
            if b.placed && src == offset {
                // Already where it belongs and not copied anywhere: nothing
                // to read or write. Its hash is this run's scan of the file,
                // or a cache entry checked against the file's ctime.
                self.reused(i, u64::from(len));
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
            self.reused(i, u64::from(len));
            return Ok(true);
        }
        Ok(false)
    }

    /// Turns a journaled run into a copy once the change is seen to be most
    /// of the file (a journal written twice is then worse than one copy):
    /// when more than half of what was handled so far went to the journal,
    /// or the journal outgrows half the new file ([`Output::into_copy`]).
    /// A device has nowhere to put a copy and goes on journaling.
    pub fn keep_journal_small(&mut self) -> Result<()> {
        let Some((_, bytes)) = self.out.as_ref().and_then(|o| o.journal()) else {
            return Ok(());
        };
        let device = self.out.as_ref().is_some_and(|o| o.device_size().is_some());
        // Entries are handled in file order: once an eighth of the file is
        // behind us and more than half of it went to the journal, most of
        // the file is changing. Switching then costs little (the journal so
        // far, twice); switching late, at half the file, costs more than
        // journaling to the end would have.
        let reached = self
            .next
            .checked_sub(1)
            .map_or(0, |i| self.entries[i].end());
        let early = reached >= self.spec.size / 8 && bytes > reached / 2;
        if device || !(early || bytes > self.spec.size / 2) {
            return Ok(());
        }
        crate::vlog!(
            1,
            "receiver: the change is most of {}: writing a copy instead of a journal",
            self.spec.dest.display()
        );
        let journaled = self.out.take().expect("checked above");
        let partial = self.spec.partial(false)?;
        self.out = Some(journaled.into_copy(partial)?);
        Ok(())
    }

    /// A chunk that an interrupted journaled run had received: rebuilt
    /// from its record of the uncommitted journal and the destination's
    /// old bytes, checked against its hash, written. False when there is
    /// none (or it no longer rebuilds: the destination changed since).
    pub fn copy_from_journal(
        &mut self,
        i: usize,
        offset: u64,
        len: u32,
        hash: &ChunkHash,
    ) -> Result<bool> {
        let Some(j) = &self.journal else {
            return Ok(false);
        };
        let Some(&at) = j.index.get(hash) else {
            return Ok(false);
        };
        let Some(bytes) = j.journal.rebuild(at, &j.old)? else {
            return Ok(false);
        };
        let Some(v) = writer::verify(&bytes, hash) else {
            return Ok(false);
        };
        let out = self.out.as_mut().expect("in place has an output");
        out.write(offset, v)?;
        out.mark_dirty(offset, offset + u64::from(len));
        self.reused(i, u64::from(len));
        Ok(true)
    }

    /// Chunks from the sender: checked against what was asked for and
    /// decoded into bounded buffers in arrival order (one zstd stream), then
    /// completed together.
    pub fn accept(&mut self, msgs: Vec<ChunkMsg>) -> Result<()> {
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
                (true, State::Blocks) => refine::blocks(e.offset, len)
                    .zip(&self.plans[&i])
                    .filter(|(_, p)| **p == BlockSource::Wire)
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
    fn decode(&mut self, c: &ChunkMsg) -> Result<Vec<u8>> {
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

    /// Finishes chunks whose data is here: a whole chunk from the wire, or
    /// the wire pieces of a planned one (assembled with old data). Building,
    /// verifying and writing run in parallel; a whole chunk that fails its
    /// hash is a protocol error, an assembled one is fetched whole instead
    /// (a block matched by its short hash but differed, or old data changed).
    pub fn complete(
        &mut self,
        items: Vec<(usize, Vec<u8>, Option<Vec<BlockSource>>)>,
    ) -> Result<()> {
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
}

/// Chunk `e` assembled from its plan: old data (read once for the pieces at
/// their own offset) and the `wire` pieces in order. `None` when old data it
/// needs was overwritten this run or cannot be read. Also returns the bytes
/// that came from the wire.
pub(super) fn build(
    e: &Entry,
    plan: &[BlockSource],
    wire: &[u8],
    basis: &Basis,
    dirty: &(impl Fn(u64, u64) -> bool + Sync),
) -> (Option<Vec<u8>>, u64) {
    let mut chunk = vec![0u8; e.len() as usize];
    let mut ok = true;
    let same = plan
        .iter()
        .filter(|p| matches!(p, BlockSource::Basis(_)))
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
    for ((start, plen), src) in refine::blocks(e.offset, e.len() as u32).zip(plan) {
        let a = (start - e.offset) as usize;
        let dst = &mut chunk[a..a + plen as usize];
        match *src {
            BlockSource::Wire => {
                dst.copy_from_slice(&wire[wire_pos..wire_pos + plen as usize]);
                wire_pos += plen as usize;
                from_wire += u64::from(plen);
            }
            BlockSource::Basis(at) if same && at == start => {} // read above
            BlockSource::Basis(at) => {
                if dirty(at, at + u64::from(plen)) || read_full(&basis.file, dst, at).is_err() {
                    ok = false;
                }
            }
        }
    }
    (ok.then_some(chunk), from_wire)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code_of;
    use crate::progress::Progress;
    use crate::roles::receive::run::testing::{basis_of, data, filled};

    fn chunk(index: u64, payload: &[u8]) -> ChunkMsg {
        ChunkMsg {
            changed: false,
            index,
            raw_len: payload.len() as u32,
            compressed: false,
            pieces: false,
            payload: payload.to_vec(),
        }
    }

    fn protocol_error(r: Result<()>) -> String {
        let e = r.expect_err("a protocol error");
        assert_eq!(exit_code_of(&e), Exit::Protocol, "{e:#}");
        format!("{e:#}")
    }

    #[test]
    fn accept_writes_a_requested_chunk_and_refuses_the_unasked() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (filled(100, 1), filled(50, 2));
        let progress = Progress::hidden();
        let entries = vec![data(0, &a), data(100, &b)];
        let mut run = Run::for_test(dir.path(), entries, None, true, false, &progress);
        run.request(0, 100);

        // Entry 1 was not asked for; entry 7 does not exist.
        assert!(protocol_error(run.accept(vec![chunk(1, &b)])).contains("unexpected chunk 1"));
        assert!(protocol_error(run.accept(vec![chunk(7, &b)])).contains("not in the manifest"));
        // The right chunk with the wrong length, or corrupted.
        assert!(protocol_error(run.accept(vec![chunk(0, &a[..99])])).contains("expected 100"));
        let mut bad = a.clone();
        bad[3] ^= 1;
        assert!(protocol_error(run.accept(vec![chunk(0, &bad)])).contains("BLAKE3"));

        let dir = tempfile::tempdir().unwrap();
        let entries = vec![data(0, &a), data(100, &b)];
        let mut run = Run::for_test(dir.path(), entries, None, true, false, &progress);
        run.request(0, 100);
        run.accept(vec![chunk(0, &a)]).unwrap();
        assert_eq!(run.state[0], State::Done);
        assert_eq!(run.outstanding, 0);
        assert_eq!(run.summary.literal_bytes, 100);
        let mut got = vec![0u8; 100];
        read_full(run.out.as_ref().unwrap().file(), &mut got, 0).unwrap();
        assert_eq!(got, a);
        // A duplicate of a chunk already written is refused.
        assert!(protocol_error(run.accept(vec![chunk(0, &a)])).contains("unexpected chunk 0"));
    }

    #[test]
    fn a_changed_chunk_is_taken_only_with_allow_changing() {
        let (a, now) = (filled(100, 1), filled(100, 5));
        let progress = Progress::hidden();
        let mut c = chunk(0, &now);
        c.changed = true;
        for allow in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut run =
                Run::for_test(dir.path(), vec![data(0, &a)], None, true, allow, &progress);
            run.request(0, 100);
            let r = run.accept(vec![c.clone()]);
            if !allow {
                assert!(protocol_error(r).contains("--allow-changing-source"));
                continue;
            }
            r.unwrap();
            assert!(run.summary.source_changed);
            assert_eq!(
                run.entries[0],
                data(0, &now),
                "the hash committed is the new one"
            );
        }
    }

    #[test]
    fn build_assembles_old_pieces_and_wire_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let bs = refine::BLOCK as usize;
        let old = filled(3 * bs, 7);
        let basis = basis_of(dir.path(), &old, &[(0, 3 * bs)]);
        let wire = filled(bs, 9);
        let want = [&old[..bs], &wire[..], &old[2 * bs..]].concat();
        let e = data(0, &want);
        let plan = [
            BlockSource::Basis(0),
            BlockSource::Wire,
            BlockSource::Basis(2 * bs as u64),
        ];
        let (chunk, from_wire) = build(&e, &plan, &wire, &basis, &|_, _| false);
        assert_eq!(chunk.as_deref(), Some(&want[..]));
        assert_eq!(from_wire, bs as u64);

        // A block taken from elsewhere in the old file.
        let moved = [&old[bs..2 * bs], &wire[..]].concat();
        let e = data(0, &moved);
        let plan = [BlockSource::Basis(bs as u64), BlockSource::Wire];
        let (chunk, _) = build(&e, &plan, &wire, &basis, &|_, _| false);
        assert_eq!(chunk.as_deref(), Some(&moved[..]));

        // Old data overwritten since it was planned: nothing to build.
        let (chunk, _) = build(&e, &plan, &wire, &basis, &|_, _| true);
        assert!(chunk.is_none());
    }

    #[test]
    fn decode_refuses_a_payload_of_the_wrong_length() {
        let dir = tempfile::tempdir().unwrap();
        let progress = Progress::hidden();
        let mut run = Run::for_test(dir.path(), Vec::new(), None, true, false, &progress);
        let mut c = chunk(0, &[1, 2, 3]);
        assert_eq!(run.decode(&c).unwrap(), [1, 2, 3]);
        c.raw_len = 4;
        assert!(protocol_error(run.decode(&c).map(drop)).contains("carries 3 bytes, expected 4"));
    }
}
