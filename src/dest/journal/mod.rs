//! The redo journal: writing an existing destination in place, crash-safely.
//!
//! A regular file without reflinks, or a block device, cannot be replaced by
//! a rename, and writing it in place directly leaves a mix of old and new
//! bytes when the run dies. So during the long transfer every change goes to
//! a journal file instead and the destination is untouched; only once the
//! journal is complete and durable is the destination changed, from the
//! journal, which is then removed.
//!
//! # The order, and why
//!
//! 1. [`Writer::data`] / [`Writer::zero`] append records (buffered; nothing
//!    is durable yet). The destination is untouched.
//! 2. [`Writer::commit`]: fsync the journal, and its directory (a journal
//!    whose name is lost in a crash cannot finish an apply that began).
//! 3. Append the COMMIT record, fsync again. From here on the journal *is*
//!    the new version: a crash before this point leaves the old version
//!    (an **uncommitted** journal is never applied), a crash after it is
//!    finished by replaying the journal. The commit record comes after an
//!    fsync of the records so that it can never be on disk without them.
//! 4. [`Journal::apply`]: write the records into the destination, set its
//!    size and mtime (a file), fsync it (the apply does that fsync too).
//! 5. The caller removes the journal and fsyncs its directory.
//!
//! Replay after a crash in step 4 or 5 is step 4 run again, so applying must
//! be **idempotent**: a record holds absolute offsets and the whole new
//! contents of what it changes (or "reads as zeros"), never "copy from old
//! offset X", since X may already have been overwritten. Writing the same
//! bytes twice gives the same bytes.
//!
//! # Records
//!
//! The receiver writes whole verified chunks. For a chunk of `len` bytes at
//! destination `offset` whose BLAKE3 is `hash`, it compares with the
//! destination's current bytes (4 KiB blocks at absolute offsets) and
//! journals only the blocks that differ, as *pieces*: [`Piece::Data`] (these
//! bytes at `at`) or [`Piece::Zero`] (make `[at, at+len)` read as zeros). A
//! DATA record means: "the destination's old bytes at `[offset, offset+len)`
//! overlaid with these pieces are the chunk `hash`" (old bytes past the old
//! end read as zeros). A ZERO record means: "`[offset, offset+len)` reads as
//! zeros" (a zero run of the manifest). The hash lets a later run reuse the
//! records of an uncommitted journal ([`Journal::chunks`],
//! [`Journal::rebuild`]) instead of sending the chunks again.
//!
//! # States
//!
//! - **Committed**: the last 81 bytes are a valid COMMIT record and every
//!   record before it is valid, counted and chained as it says. Applied.
//! - **Uncommitted**: no valid COMMIT record at the end. A torn tail is
//!   normal (a crash while appending): the valid prefix of records counts,
//!   the rest is ignored. Never applied.
//! - **Damaged** (an error, [`Exit::Journal`]): a bad header, or a valid
//!   COMMIT at the end with any bad record, wrong count or wrong chain hash
//!   before it, or anything after a COMMIT record. Never applied, not even
//!   partly: [`Journal::open`] verifies the whole journal before
//!   [`Journal::apply`] may write anything, and the apply re-checks each
//!   record before writing it.
//!
//! A file shorter than its header (a crash right after it was created) holds
//! nothing and reads as no journal at all.
//!
//! The byte layout is in `format.rs` (header, DATA, ZERO and COMMIT
//! records, each with its checksum), the target's identity in
//! `identity.rs`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::content::hash::ChunkHash;
use crate::dest::sparse;
use crate::error::{fail, Exit, WithExit};
use crate::sys::crash;

mod format;
mod identity;

use format::COMMIT_SIZE;
use format::{chain_next, parse, pieces, read_header, Bad, Rec, Window, READAHEAD};
pub use format::{Header, Piece};
pub use identity::Identity;

/// Appends records to a new journal. Buffered: nothing is durable before
/// [`Writer::commit`]. After a failed write it refuses to go on, since the
/// file may end inside a record.
pub struct Writer {
    out: BufWriter<File>,
    path: PathBuf,
    run_id: [u8; 16],
    new_size: u64,
    chain: [u8; 32],
    records: u64,
    bytes: u64,
    payload: u64,
    failed: bool,
    scratch: Vec<u8>,
}

impl Writer {
    /// Creates (or truncates) the journal at `path`, mode 0600, never
    /// through a symlink, and writes its header.
    pub fn create(path: &Path, header: &Header) -> anyhow::Result<Writer> {
        use rustix::fs::{Mode, OFlags};
        if let Some(why) = header.invalid() {
            bail!("journal {}: {why}", path.display());
        }
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW;
        let fd = rustix::fs::open(path, flags | OFlags::CLOEXEC, Mode::from_raw_mode(0o600))
            .map_err(std::io::Error::from)
            .and_then(|fd| {
                // A file left by an older run keeps its mode through O_TRUNC;
                // the journal holds the image's data, readable by no one else.
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600))?;
                Ok(fd)
            })
            .with_context(|| format!("create journal {}", path.display()))
            .exit_with(Exit::Io)?;
        let h = header.encode();
        let chain = format::sum_of(&h);
        let mut w = Writer {
            out: BufWriter::with_capacity(READAHEAD, File::from(fd)),
            path: path.to_path_buf(),
            run_id: header.run_id,
            new_size: header.new_size,
            chain,
            records: 0,
            bytes: 0,
            payload: 0,
            failed: false,
            scratch: Vec::new(),
        };
        w.write(&[&h])?;
        Ok(w)
    }

    fn write(&mut self, parts: &[&[u8]]) -> anyhow::Result<()> {
        if self.failed {
            bail!(
                "journal {}: an earlier write failed; no more records",
                self.path.display()
            );
        }
        for p in parts {
            if let Err(e) = self.out.write_all(p) {
                self.failed = true;
                return Err(e)
                    .with_context(|| format!("write journal {}", self.path.display()))
                    .exit_with(Exit::Io);
            }
            self.bytes += p.len() as u64;
        }
        Ok(())
    }

    /// Ends a record: its checksum goes into the chain.
    fn appended(&mut self, sum: &[u8; 32]) {
        self.chain = chain_next(&self.chain, sum);
        self.records += 1;
        crash::point(crash::JOURNAL_RECORD);
    }

    /// Appends a DATA record: the chunk `hash` of `len` bytes at `offset`
    /// is the destination's old bytes there overlaid with `pieces` (in
    /// increasing order, not overlapping, inside the chunk).
    pub fn data(
        &mut self,
        offset: u64,
        len: u32,
        hash: &ChunkHash,
        pieces: &[Piece<'_>],
    ) -> anyhow::Result<()> {
        let mut head = std::mem::take(&mut self.scratch);
        let r = self.put_data(&mut head, (offset, len, hash), pieces);
        self.scratch = head;
        r
    }

    fn put_data(
        &mut self,
        head: &mut Vec<u8>,
        chunk: (u64, u32, &ChunkHash),
        pieces: &[Piece<'_>],
    ) -> anyhow::Result<()> {
        let sum = format::encode_data(head, &self.run_id, self.new_size, chunk, pieces)
            .map_err(|why| anyhow::anyhow!("journal {}: {why}", self.path.display()))?;
        let mut parts: Vec<&[u8]> = vec![head];
        parts.extend(pieces.iter().filter_map(|p| match p {
            Piece::Data { bytes, .. } => Some(*bytes),
            Piece::Zero { .. } => None,
        }));
        let payload: u64 = parts[1..].iter().map(|d| d.len() as u64).sum();
        parts.push(&sum);
        self.write(&parts)?;
        self.payload += payload;
        self.appended(&sum);
        Ok(())
    }

    /// Appends a ZERO record: `[offset, offset + len)` reads as zeros.
    pub fn zero(&mut self, offset: u64, len: u64) -> anyhow::Result<()> {
        let r = format::encode_zero(&self.run_id, self.new_size, offset, len)
            .map_err(|why| anyhow::anyhow!("journal {}: {why}", self.path.display()))?;
        self.write(&[&r])?;
        self.appended(&format::sum_of(&r));
        Ok(())
    }

    /// Writes out what is buffered (not durable: no fsync), so that the
    /// journal can be read back while it is still being written.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        let what = || format!("write journal {}", self.path.display());
        self.out.flush().with_context(what).exit_with(Exit::Io)
    }

    /// The journal file's size so far (header and records, buffered or not).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes the journal durable and committed: flush and fsync the
    /// records and the directory entry, then append the COMMIT record and
    /// fsync again. After it returns, the journal is the new version.
    pub fn commit(mut self) -> anyhow::Result<()> {
        let path = self.path.clone();
        let what = || format!("sync journal {}", path.display());
        self.out.flush().with_context(what).exit_with(Exit::Io)?;
        self.out
            .get_ref()
            .sync_all()
            .with_context(what)
            .exit_with(Exit::Io)?;
        sync_dir_of(&self.path)?;
        crash::point(crash::JOURNAL_SYNCED);
        let c = format::encode_commit(&self.run_id, self.records, self.payload, &self.chain);
        self.write(&[&c])?;
        self.out.flush().with_context(what).exit_with(Exit::Io)?;
        self.out
            .get_ref()
            .sync_all()
            .with_context(what)
            .exit_with(Exit::Io)?;
        crash::point(crash::JOURNAL_COMMITTED);
        Ok(())
    }
}

/// fsyncs the directory holding `path`, so that the name survives a crash.
fn sync_dir_of(path: &Path) -> anyhow::Result<()> {
    use crate::sys::dirfd::{open_path, OFlags};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    open_path(dir, OFlags::RDONLY | OFlags::DIRECTORY)
        .and_then(|fd| Ok(rustix::fs::fsync(fd)?))
        .with_context(|| format!("sync directory {}", dir.display()))
        .exit_with(Exit::Io)
}

/// Whether a journal will be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No commit record: never applied; its records may be reused.
    Uncommitted,
    /// Complete and durable: to be applied.
    Committed,
}

/// A journal read and verified by [`Journal::open`].
#[derive(Debug)]
pub struct Journal {
    pub header: Header,
    pub state: State,
    /// Valid records (DATA and ZERO): all of them if committed, else the
    /// valid prefix.
    pub records: u64,
    /// Data piece bytes of those records.
    pub payload: u64,
    path: PathBuf,
    file: File,
    len: u64,
    /// Where the records start (the header's length).
    start: u64,
    /// The header's checksum: where the chain starts.
    chain0: [u8; 32],
    /// (chunk offset, record position) of each valid DATA record, by
    /// offset (a later record for the same offset after an earlier one).
    index: Vec<(u64, u64)>,
}

/// How a walk over the records ended.
struct Walked {
    records: u64,
    payload: u64,
    chain: [u8; 32],
    /// Where it stopped: the COMMIT record's position, or the first byte
    /// not part of a valid record.
    at: u64,
    /// The COMMIT record (records, payload, chain), or why it stopped.
    end: Result<(u64, u64, [u8; 32]), Bad>,
}

impl Journal {
    /// Reads and verifies the whole journal at `path` (streaming: memory
    /// does not grow with its size beyond the index of DATA records). Ok(None)
    /// when there is no file, or it ends inside its header. A bad header, or
    /// a committed journal with any bad record, wrong count or wrong chain
    /// hash: an error with [`Exit::Journal`] naming the path and what is
    /// wrong.
    pub fn open(path: &Path) -> anyhow::Result<Option<Journal>> {
        use crate::sys::dirfd::{open_path, OFlags};
        let file = match open_path(path, OFlags::RDONLY | OFlags::NOFOLLOW) {
            Ok(fd) => File::from(fd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("open journal {}", path.display()))
                    .exit_with(Exit::Io)
            }
        };
        let damaged =
            |why: String| fail(Exit::Journal, format!("journal {}: {why}", path.display()));
        let io =
            |e: std::io::Error| fail(Exit::Io, format!("read journal {}: {e}", path.display()));
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(damaged("not a regular file".into()));
        }
        let len = meta.len();
        let (header, chain0) = match read_header(&file, len) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(Bad::Io(e)) => return Err(io(e)),
            Err(Bad::Damaged(why)) => return Err(damaged(why)),
            Err(Bad::End | Bad::Torn) => return Ok(None),
        };
        let mut j = Journal {
            start: header.encode().len() as u64,
            header,
            state: State::Uncommitted,
            records: 0,
            payload: 0,
            path: path.to_path_buf(),
            file,
            len,
            chain0,
            index: Vec::new(),
        };
        // A valid COMMIT record at the very end says the journal was
        // committed: then nothing before it may be bad.
        let committed = len >= j.start + COMMIT_SIZE as u64 && {
            let mut w = Window::new(&j.file, len, COMMIT_SIZE);
            let at = len - COMMIT_SIZE as u64;
            matches!(
                parse(&mut w, at, &j.header.run_id, j.header.new_size),
                Ok((Rec::Commit { .. }, _))
            )
        };
        let mut index = Vec::new();
        let walked = j.walk(u64::MAX, |pos, rec| {
            if let Rec::Data { offset, .. } = rec {
                index.push((*offset, pos));
            }
            Ok(())
        })?;
        let at = walked.at;
        match walked.end {
            Ok((records, payload, chain)) => {
                if at + COMMIT_SIZE as u64 != len {
                    return Err(damaged(format!(
                        "{} bytes after the commit record at {at}",
                        len - at - COMMIT_SIZE as u64
                    )));
                }
                if (records, payload) != (walked.records, walked.payload) {
                    return Err(damaged(format!(
                        "the commit record counts {records} records of {payload} bytes, the journal holds {} of {}",
                        walked.records, walked.payload
                    )));
                }
                if chain != walked.chain {
                    return Err(damaged(
                        "the records are not the ones committed (chain hash)".into(),
                    ));
                }
                j.state = State::Committed;
            }
            Err(Bad::Io(e)) => return Err(io(e)),
            Err(why) if committed => {
                let why = match why {
                    Bad::Damaged(why) => why,
                    _ => "it ends inside a record".into(),
                };
                return Err(damaged(format!(
                    "committed, but the record at {at} is bad: {why}"
                )));
            }
            Err(_) => {}
        }
        index.sort_by_key(|&(offset, _)| offset);
        j.index = index;
        j.records = walked.records;
        j.payload = walked.payload;
        Ok(Some(j))
    }

    fn damaged(&self, why: impl std::fmt::Display) -> anyhow::Error {
        fail(
            Exit::Journal,
            format!("journal {}: {why}", self.path.display()),
        )
    }

    /// Walks the valid records from the first, at most `limit` of them,
    /// handing each (verified) to `f` with its position, until the COMMIT
    /// record or the first that is not valid.
    fn walk(
        &self,
        limit: u64,
        mut f: impl FnMut(u64, &Rec<'_>) -> anyhow::Result<()>,
    ) -> anyhow::Result<Walked> {
        let mut w = Window::new(&self.file, self.len, READAHEAD);
        let mut walked = Walked {
            records: 0,
            payload: 0,
            chain: self.chain0,
            at: self.start,
            end: Err(Bad::End),
        };
        while walked.records < limit {
            let (rec, size) =
                match parse(&mut w, walked.at, &self.header.run_id, self.header.new_size) {
                    Ok(r) => r,
                    Err(bad) => {
                        walked.end = Err(bad);
                        return Ok(walked);
                    }
                };
            match &rec {
                Rec::Data { data, sum, .. } => {
                    walked.payload += data.len() as u64;
                    walked.chain = chain_next(&walked.chain, sum);
                }
                Rec::Zero { sum, .. } => walked.chain = chain_next(&walked.chain, sum),
                Rec::Commit {
                    records,
                    payload,
                    chain,
                } => {
                    walked.end = Ok((*records, *payload, *chain));
                    return Ok(walked);
                }
            }
            f(walked.at, &rec)?;
            walked.records += 1;
            walked.at += size;
        }
        Ok(walked)
    }

    /// Applies a committed journal to `target`, which must be the file or
    /// device it was written for (else [`Exit::Journal`], nothing written):
    /// each record is re-read and re-checked before any of it is written;
    /// then a file gets its new size and mtime; then `target` is fsync'd.
    /// Idempotent: applying again, whole or after a partial apply, yields
    /// the same bytes.
    pub fn apply(&self, target: &File) -> anyhow::Result<()> {
        self.apply_records(target, u64::MAX)?;
        let what = || format!("finish applying journal {}", self.path.display());
        if let Identity::File { .. } = self.header.identity {
            target
                .set_len(self.header.new_size)
                .with_context(what)
                .exit_with(Exit::Io)?;
            let times = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: self.header.mtime_sec,
                    tv_nsec: i64::from(self.header.mtime_nsec),
                },
            };
            rustix::fs::futimens(target, &times)
                .map_err(std::io::Error::from)
                .with_context(what)
                .exit_with(Exit::Io)?;
        }
        target.sync_all().with_context(what).exit_with(Exit::Io)
    }

    /// Writes the valid records of an *uncommitted* journal into `copy`, a
    /// new file that holds the destination's bytes: for a run that turns
    /// from journaling its changes to writing a whole copy (the change is
    /// most of the file). The destination itself is never written this
    /// way. Returns the data bytes written.
    pub fn replay_onto_copy(&self, copy: &File) -> anyhow::Result<u64> {
        if self.state != State::Uncommitted {
            return Err(self.damaged("committed: it must be applied, not copied"));
        }
        self.write_records(copy, self.records, false)?;
        Ok(self.payload)
    }

    /// Writes the first `limit` records into `target` (all of them with
    /// `u64::MAX`, which also checks they end at the COMMIT record).
    fn apply_records(&self, target: &File, limit: u64) -> anyhow::Result<()> {
        if self.state != State::Committed {
            return Err(self.damaged("not committed; an uncommitted journal is never applied"));
        }
        let now = Identity::of(target)
            .with_context(|| format!("identify the target of journal {}", self.path.display()))
            .exit_with(Exit::Io)?;
        if let Some(why) = self.header.identity.mismatch(&now) {
            return Err(self.damaged(format!("not for this destination: {why}")));
        }
        self.write_records(target, limit, true)
    }

    /// Writes the first `limit` valid records into `target`; `committed`:
    /// the journal ends in a COMMIT record, checked again at the end.
    fn write_records(&self, target: &File, limit: u64, committed: bool) -> anyhow::Result<()> {
        match read_header(&self.file, self.len) {
            Ok(Some((h, _))) if h == self.header => {}
            _ => return Err(self.damaged("its header changed since it was verified")),
        }
        let device = matches!(self.header.identity, Identity::Device { .. });
        let zero = |at: u64, len: u64| {
            if device {
                sparse::zero_where_nonzero(target, at, len, &|_, _| {})
            } else {
                sparse::punch_or_write_zeros(target, at, len, &|_, _| {})
            }
        };
        // All of them: walk on to the COMMIT record, to check it again.
        let all = committed && limit >= self.records;
        let walked = self.walk(if all { u64::MAX } else { limit }, |_, rec| {
            let wrote = match rec {
                Rec::Data { table, data, .. } => pieces(table, data).try_for_each(|p| match p {
                    Piece::Data { at, bytes } => target.write_all_at(bytes, at),
                    Piece::Zero { at, len } => zero(at, len),
                }),
                Rec::Zero { offset, len, .. } => zero(*offset, *len),
                Rec::Commit { .. } => Ok(()),
            };
            wrote
                .with_context(|| format!("apply journal {}", self.path.display()))
                .exit_with(Exit::Io)?;
            if committed {
                crash::point(crash::APPLY_RECORD);
            }
            Ok(())
        })?;
        if walked.records != limit.min(self.records)
            || (all
                && !matches!(walked.end, Ok(c) if c == (self.records, self.payload, walked.chain)))
        {
            return Err(self.damaged(format!(
                "changed since it was verified: {} of {} records applied",
                walked.records, self.records
            )));
        }
        Ok(())
    }

    /// Each valid DATA record's (offset, len, hash), in journal order: for
    /// a run resuming after an uncommitted journal.
    pub fn chunks(&self) -> anyhow::Result<Vec<(u64, u32, ChunkHash)>> {
        let mut out = Vec::new();
        let walked = self.walk(self.records, |_, rec| {
            if let Rec::Data {
                offset, len, hash, ..
            } = rec
            {
                out.push((*offset, *len, *hash));
            }
            Ok(())
        })?;
        if walked.records != self.records {
            return Err(self.damaged("changed since it was verified"));
        }
        Ok(out)
    }

    /// The chunk of the DATA record at `offset`, rebuilt from `old` (the
    /// untouched destination; past its end it reads as zeros) overlaid with
    /// the record's pieces; only if it hashes to the record's hash (else
    /// None, as when there is no record at `offset`).
    pub fn rebuild(&self, offset: u64, old: &File) -> anyhow::Result<Option<Vec<u8>>> {
        let k = self.index.partition_point(|&(o, _)| o <= offset);
        let Some(&(o, pos)) = k.checked_sub(1).and_then(|k| self.index.get(k)) else {
            return Ok(None);
        };
        if o != offset {
            return Ok(None);
        }
        let mut w = Window::new(&self.file, self.len, 0);
        let (table, data, len, hash) =
            match parse(&mut w, pos, &self.header.run_id, self.header.new_size) {
                Ok((
                    Rec::Data {
                        offset: o,
                        len,
                        hash,
                        table,
                        data,
                        ..
                    },
                    _,
                )) if o == offset => (table, data, len, hash),
                Err(Bad::Io(e)) => {
                    return Err(e)
                        .with_context(|| format!("read journal {}", self.path.display()))
                        .exit_with(Exit::Io)
                }
                _ => return Err(self.damaged("changed since it was verified")),
            };
        let mut buf = vec![0u8; len as usize];
        let mut got = 0;
        while got < buf.len() {
            match old.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e)
                        .context("read the destination to rebuild a journaled chunk")
                        .exit_with(Exit::Io)
                }
            }
        }
        for p in pieces(table, data) {
            let (at, n) = p.range();
            let s = (at - offset) as usize;
            let span = &mut buf[s..s + n as usize];
            match p {
                Piece::Data { bytes, .. } => span.copy_from_slice(bytes),
                Piece::Zero { .. } => span.fill(0),
            }
        }
        Ok((ChunkHash::of(&buf) == hash).then_some(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::format::{DATA_FIXED, ENTRY, SUM};
    use super::*;
    use crate::content::chunk::MAX_CHUNK;
    use crate::dest::sparse::BLOCK;
    use crate::error::exit_code_of;
    use proptest::prelude::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;

    fn random(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn rw(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap()
    }

    /// Puts `bytes` into the file at `path` in place (same inode).
    fn reset(path: &Path, bytes: &[u8]) -> File {
        let f = rw(path);
        f.set_len(0).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f
    }

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    fn header_for(target: &File, old: &[u8], new: &[u8], seed: u64) -> Header {
        let id: Vec<u8> = random(seed ^ 0x5555, 48);
        Header {
            identity: Identity::of(target).unwrap(),
            old_size: old.len() as u64,
            new_size: new.len() as u64,
            mtime_sec: 1_700_000_000 + seed as i64 % 1000,
            mtime_nsec: 123_456_789,
            digest: id[..32].try_into().unwrap(),
            run_id: id[32..].try_into().unwrap(),
        }
    }

    /// What a receiver journals for `new` over `old`: chunks cut every
    /// `cut` bytes (not block-aligned), only the 4 KiB blocks that differ,
    /// all-zero chunks as ZERO records when `zero_runs`. Returns the
    /// journal's size after the header and after each record, and the
    /// DATA chunks.
    struct Made {
        ends: Vec<u64>,
        chunks: Vec<(u64, u32, ChunkHash)>,
    }

    fn make(
        path: &Path,
        header: &Header,
        old: &[u8],
        new: &[u8],
        cut: usize,
        zero_runs: bool,
        commit: bool,
    ) -> Made {
        let mut w = Writer::create(path, header).unwrap();
        let mut made = Made {
            ends: vec![w.bytes()],
            chunks: Vec::new(),
        };
        let old_at = |i: usize| old.get(i).copied().unwrap_or(0);
        let mut s = 0;
        while s < new.len() {
            let e = (s + cut).min(new.len());
            let chunk = &new[s..e];
            if zero_runs && chunk.iter().all(|&b| b == 0) {
                w.zero(s as u64, chunk.len() as u64).unwrap();
            } else {
                let mut pieces = Vec::new();
                let mut b = s;
                while b < e {
                    let next = ((b / BLOCK + 1) * BLOCK).min(e);
                    if (b..next).any(|i| old_at(i) != new[i]) {
                        let bytes = &new[b..next];
                        pieces.push(if bytes.iter().all(|&x| x == 0) {
                            Piece::Zero {
                                at: b as u64,
                                len: bytes.len() as u64,
                            }
                        } else {
                            Piece::Data {
                                at: b as u64,
                                bytes,
                            }
                        });
                    }
                    b = next;
                }
                let hash = ChunkHash::of(chunk);
                w.data(s as u64, chunk.len() as u32, &hash, &pieces)
                    .unwrap();
                made.chunks.push((s as u64, chunk.len() as u32, hash));
            }
            made.ends.push(w.bytes());
            s = e;
        }
        let before = w.bytes();
        if commit {
            w.commit().unwrap();
            assert_eq!(
                std::fs::metadata(path).unwrap().len(),
                before + COMMIT_SIZE as u64
            );
        } else {
            drop(w); // BufWriter flushes on drop: a crash after a flush
            assert_eq!(std::fs::metadata(path).unwrap().len(), before);
        }
        made
    }

    /// An old image and a new one: some blocks rewritten, some zeroed, a
    /// zero run, a few bytes changed, and longer.
    fn old_and_new() -> (Vec<u8>, Vec<u8>) {
        let old = random(1, 100_000);
        let mut new = old.clone();
        new[5000..5010].copy_from_slice(b"0123456789");
        new[20_000..40_000].fill(0);
        new[60_000..61_000].copy_from_slice(&random(2, 1000));
        new.extend_from_slice(&random(3, 30_000));
        new.extend_from_slice(&[0u8; 20_000]);
        (old, new)
    }

    fn is_journal_error(e: &anyhow::Error) -> bool {
        exit_code_of(e) == Exit::Journal
    }

    #[test]
    fn round_trip_applies_bytes_size_and_mtime_and_again_is_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = old_and_new();
        let t = dir.path().join("disk.img");
        let target = reset(&t, &old);
        let h = header_for(&target, &old, &new, 7);
        let j = dir.path().join("j");
        let made = make(&j, &h, &old, &new, 9999, true, true);
        let journal = Journal::open(&j).unwrap().unwrap();
        assert_eq!(journal.state, State::Committed);
        assert_eq!(journal.header, h);
        assert_eq!(journal.records, made.ends.len() as u64 - 1);
        assert!(journal.payload > 0 && journal.payload < new.len() as u64);
        assert_eq!(journal.chunks().unwrap(), made.chunks);
        assert_eq!(read(&t), old, "opening writes nothing");

        journal.apply(&target).unwrap();
        assert_eq!(read(&t), new);
        let meta = std::fs::metadata(&t).unwrap();
        assert_eq!(meta.len(), new.len() as u64);
        assert_eq!(
            (meta.mtime(), meta.mtime_nsec()),
            (h.mtime_sec, 123_456_789)
        );
        // The zero run and zero blocks are holes, not written zeros.
        assert!(meta.blocks() * 512 < new.len() as u64 - 20_000);

        journal.apply(&target).unwrap();
        assert_eq!(read(&t), new);

        // Shrinking works too.
        let short = new[..50_000].to_vec();
        let target = reset(&t, &old);
        let h = header_for(&target, &old, &short, 8);
        make(&j, &h, &old, &short, 7000, false, true);
        Journal::open(&j).unwrap().unwrap().apply(&target).unwrap();
        assert_eq!(read(&t), short);
    }

    #[test]
    fn apply_after_a_partial_apply_gives_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = old_and_new();
        let t = dir.path().join("disk.img");
        let target = reset(&t, &old);
        let h = header_for(&target, &old, &new, 9);
        let j = dir.path().join("j");
        make(&j, &h, &old, &new, 6000, true, true);
        let journal = Journal::open(&j).unwrap().unwrap();
        for k in 0..=journal.records {
            let target = reset(&t, &old);
            journal.apply_records(&target, k).unwrap();
            if k > 0 && k < journal.records {
                assert_ne!(read(&t), old, "{k} records applied nothing");
            }
            journal.apply(&target).unwrap();
            assert_eq!(read(&t), new, "after {k} records");
            // A crash after the size was set: the replay still holds.
            journal.apply_records(&target, k).unwrap();
            journal.apply(&target).unwrap();
            assert_eq!(read(&t), new, "again after {k} records");
        }
    }

    #[test]
    fn an_uncommitted_journal_is_never_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = old_and_new();
        let t = dir.path().join("disk.img");
        let target = reset(&t, &old);
        let h = header_for(&target, &old, &new, 10);
        let j = dir.path().join("j");
        let made = make(&j, &h, &old, &new, 9999, true, false);
        let journal = Journal::open(&j).unwrap().unwrap();
        assert_eq!(journal.state, State::Uncommitted);
        assert_eq!(journal.records, made.ends.len() as u64 - 1);
        assert_eq!(journal.chunks().unwrap(), made.chunks);
        let e = journal.apply(&target).unwrap_err();
        assert!(is_journal_error(&e), "{e:#}");
        assert!(format!("{e:#}").contains("not committed"), "{e:#}");
        assert_eq!(read(&t), old);
        assert_eq!(std::fs::metadata(&t).unwrap().len(), old.len() as u64);

        // No file: no journal. A file cut inside its header: none either.
        assert!(Journal::open(&dir.path().join("none")).unwrap().is_none());
    }

    #[test]
    fn a_torn_tail_keeps_the_valid_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(4, 20_000);
        let mut new = old.clone();
        new[3000..3100].fill(7);
        new[9000..12_000].fill(0);
        new.truncate(18_000);
        let t = dir.path().join("disk.img");
        let target = reset(&t, &old);
        for commit in [false, true] {
            let h = header_for(&target, &old, &new, 11);
            let j = dir.path().join("j");
            let made = make(&j, &h, &old, &new, 3000, true, commit);
            let full = read(&j);
            let f = rw(&j);
            for len in (0..=full.len()).rev() {
                f.set_len(len as u64).unwrap();
                let got = Journal::open(&j).unwrap_or_else(|e| panic!("cut at {len}: {e:#}"));
                let Some(got) = got else {
                    assert!(len < made.ends[0] as usize, "cut at {len}: no journal");
                    continue;
                };
                assert!(len >= made.ends[0] as usize);
                if commit && len == full.len() {
                    assert_eq!(got.state, State::Committed);
                    continue;
                }
                assert_eq!(got.state, State::Uncommitted, "cut at {len}");
                let whole = made.ends[1..].iter().filter(|&&e| e <= len as u64).count();
                assert_eq!(got.records, whole as u64, "cut at {len}");
                let chunks = got.chunks().unwrap();
                assert_eq!(chunks, made.chunks[..chunks.len()], "cut at {len}");
                for (offset, len, _) in chunks {
                    let want = &new[offset as usize..offset as usize + len as usize];
                    assert_eq!(got.rebuild(offset, &target).unwrap().unwrap(), want);
                }
            }
        }
        assert_eq!(read(&t), old);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused_or_uncommitted_never_applied() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(5, 12_000);
        let mut new = old.clone();
        new[100..200].fill(1);
        new[5000..9000].fill(0);
        new[11_000..11_005].fill(3);
        let t = dir.path().join("disk.img");
        let target = reset(&t, &old);
        let h = header_for(&target, &old, &new, 12);
        let j = dir.path().join("j");
        let made = make(&j, &h, &old, &new, 2500, true, true);
        let full = read(&j);
        let commit_at = full.len() - COMMIT_SIZE;
        let f = rw(&j);
        for i in 0..full.len() {
            let bit = 1u8 << (i % 8);
            f.write_all_at(&[full[i] ^ bit], i as u64).unwrap();
            match Journal::open(&j) {
                Err(e) => {
                    assert!(is_journal_error(&e), "byte {i}: {e:#}");
                    assert!(i < commit_at, "byte {i} of the commit record: {e:#}");
                    assert!(format!("{e:#}").contains(&j.display().to_string()));
                }
                Ok(Some(got)) => {
                    assert!(i >= commit_at, "byte {i}: accepted");
                    assert_eq!(got.state, State::Uncommitted, "byte {i}");
                    assert_eq!(got.records, made.ends.len() as u64 - 1);
                    assert!(is_journal_error(&got.apply(&target).unwrap_err()));
                }
                Ok(None) => panic!("byte {i}: read as no journal"),
            }
            f.write_all_at(&full[i..=i], i as u64).unwrap();
        }
        assert_eq!(read(&t), old);
        Journal::open(&j).unwrap().unwrap().apply(&target).unwrap();
        assert_eq!(read(&t), new);
    }

    #[test]
    fn records_of_another_journal_or_after_the_commit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = old_and_new();
        let t = dir.path().join("disk.img");
        let target = reset(&t, &old);
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let ha = header_for(&target, &old, &new, 13);
        let hb = Header {
            run_id: [9; 16],
            ..ha.clone()
        };
        let made = make(&a, &ha, &old, &new, 9999, true, true);
        make(&b, &hb, &old, &new, 9999, true, true);
        // Same header length, same record sizes: only the run id differs.
        let (ja, mut jb) = (read(&a), read(&b));
        let (s, e) = (made.ends[1] as usize, made.ends[2] as usize);
        jb[s..e].copy_from_slice(&ja[s..e]);
        std::fs::write(&b, &jb).unwrap();
        let err = Journal::open(&b).unwrap_err();
        assert!(is_journal_error(&err), "{err:#}");

        let mut ja = ja;
        ja.extend_from_slice(&[0u8; 5]);
        std::fs::write(&a, &ja).unwrap();
        let err = Journal::open(&a).unwrap_err();
        assert!(format!("{err:#}").contains("after the commit"), "{err:#}");

        // Not a journal at all, or a future version.
        std::fs::write(&a, b"hello world, this is not a journal").unwrap();
        assert!(is_journal_error(&Journal::open(&a).unwrap_err()));
        let mut v2 = read(&b);
        v2[8] = 2;
        std::fs::write(&a, &v2).unwrap();
        let err = Journal::open(&a).unwrap_err();
        assert!(format!("{err:#}").contains("version 2"), "{err:#}");
        assert_eq!(read(&t), old);
    }

    #[test]
    fn a_journal_for_another_file_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = old_and_new();
        let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
        let a = reset(&pa, &old);
        let b = reset(&pb, &old);
        let h = header_for(&a, &old, &new, 14);
        let j = dir.path().join("j");
        make(&j, &h, &old, &new, 9999, true, true);
        let journal = Journal::open(&j).unwrap().unwrap();
        let e = journal.apply(&b).unwrap_err();
        assert!(is_journal_error(&e), "{e:#}");
        assert!(format!("{e:#}").contains("inode"), "{e:#}");
        assert_eq!(read(&pb), old);
        assert_eq!(std::fs::metadata(&pb).unwrap().len(), old.len() as u64);
        journal.apply(&a).unwrap();
        assert_eq!(read(&pa), new);
    }

    #[test]
    fn rebuild_returns_the_chunk_only_while_the_old_bytes_hold() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(6, 30_000);
        let mut new = old.clone();
        new[5000..5100].fill(9); // the chunk at 0 changes in its second block only
        new[12_000..12_001].fill(0);
        let t = dir.path().join("disk.img");
        let target = reset(&t, &old);
        let h = header_for(&target, &old, &new, 15);
        let j = dir.path().join("j");
        let made = make(&j, &h, &old, &new, 10_000, true, false);
        let journal = Journal::open(&j).unwrap().unwrap();
        for &(offset, len, _) in &made.chunks {
            let got = journal.rebuild(offset, &target).unwrap().unwrap();
            assert_eq!(
                got,
                new[offset as usize..(offset + u64::from(len)) as usize]
            );
        }
        assert_eq!(journal.rebuild(1, &target).unwrap(), None);
        assert_eq!(journal.rebuild(99_999, &target).unwrap(), None);
        target.write_all_at(&[old[10] ^ 1], 10).unwrap();
        assert_eq!(journal.rebuild(0, &target).unwrap(), None);
        assert!(journal.rebuild(10_000, &target).unwrap().is_some());
    }

    #[test]
    fn the_writer_makes_a_private_file_and_refuses_bad_records() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = old_and_new();
        let t = dir.path().join("disk.img");
        let target = reset(&t, &old);
        let h = header_for(&target, &old, &new, 16);
        let j = dir.path().join("j");
        std::fs::write(&j, b"old").unwrap();
        std::fs::set_permissions(&j, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut w = Writer::create(&j, &h).unwrap();
        assert_eq!(std::fs::metadata(&j).unwrap().mode() & 0o777, 0o600);
        let hash = ChunkHash::of(b"x");
        let bytes = [1u8; 10];
        let outside = [Piece::Data {
            at: 95,
            bytes: &bytes,
        }];
        assert!(w.data(100, 50, &hash, &outside).is_err());
        let overlap = [
            Piece::Zero { at: 100, len: 20 },
            Piece::Data {
                at: 110,
                bytes: &bytes,
            },
        ];
        assert!(w.data(100, 50, &hash, &overlap).is_err());
        assert!(w.data(0, 0, &hash, &[]).is_err());
        assert!(w.data(0, MAX_CHUNK + 1, &hash, &[]).is_err());
        assert!(w.data(new.len() as u64 - 10, 11, &hash, &[]).is_err());
        assert!(w.zero(new.len() as u64, 1).is_err());
        w.data(100, 50, &hash, &outside[..0]).unwrap();
        w.zero(0, 100).unwrap();
        assert_eq!((w.records, w.payload), (2, 0));
        let at = w.bytes();
        w.data(
            200,
            50,
            &hash,
            &[Piece::Data {
                at: 210,
                bytes: &bytes,
            }],
        )
        .unwrap();
        assert_eq!(w.bytes(), at + (DATA_FIXED + ENTRY + 10 + SUM) as u64);
        assert_eq!(w.payload, 10);
        w.commit().unwrap();
        assert_eq!(
            std::fs::metadata(&j).unwrap().len(),
            at + 104 + COMMIT_SIZE as u64
        );
        let got = Journal::open(&j).unwrap().unwrap();
        assert_eq!(
            (got.state, got.records, got.payload),
            (State::Committed, 3, 10)
        );

        // Never through a symlink.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&t, &link).unwrap();
        assert!(Writer::create(&link, &h).is_err());
        assert!(Journal::open(&link).is_err());
        assert_eq!(read(&t), old);
    }

    /// A loop device stands in for a block device: the journal finds it
    /// again by its stable id and zeros it where a file would get holes.
    #[test]
    fn applies_to_a_block_device() {
        struct Loop(String);
        impl Drop for Loop {
            fn drop(&mut self) {
                let _ = std::process::Command::new("losetup")
                    .args(["-d", &self.0])
                    .status();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let (old, mut new) = old_and_new();
        let size = 256 * 1024;
        let mut old = old;
        old.resize(size, 0xAB);
        new.resize(size, 0);
        let backing = dir.path().join("backing");
        std::fs::write(&backing, &old).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
            _ => {
                eprintln!("no loop device; skipped");
                return;
            }
        };
        let _guard = Loop(dev.clone());
        let target = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .unwrap();
        let h = header_for(&target, &old, &new, 17);
        match &h.identity {
            Identity::Device {
                size: s, stable_id, ..
            } => {
                assert_eq!(*s, size as u64);
                assert!(stable_id.starts_with("loop/backing_file="), "{stable_id}");
            }
            other => panic!("{other:?}"),
        }
        let j = dir.path().join("j");
        make(&j, &h, &old, &new, 9999, true, true);
        let journal = Journal::open(&j).unwrap().unwrap();
        journal.apply(&target).unwrap();
        journal.apply(&target).unwrap();
        let mut back = vec![0u8; size];
        target.read_exact_at(&mut back, 0).unwrap();
        assert!(back == new, "device contents differ");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Random old contents, random changes (bytes and zeros), random
        /// chunking and a random cut: a cut journal is its valid prefix, a
        /// whole one applies to exactly the new contents.
        #[test]
        fn random_journals_round_trip_and_cut(
            seed in any::<u64>(),
            old_len in 0usize..40_000,
            new_len in 1usize..40_000,
            edits in proptest::collection::vec((0usize..40_000, 1usize..6000, any::<bool>()), 0..6),
            cut in 1usize..9000,
            zero_runs in any::<bool>(),
            cut_at in 0.0f64..1.0,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let old = random(seed, old_len);
            let mut new = random(seed, new_len.max(old_len));
            new.truncate(new_len);
            for (k, &(at, n, zero)) in edits.iter().enumerate() {
                let (s, e) = (at.min(new_len), (at + n).min(new_len));
                let fill = if zero { vec![0u8; e - s] } else { random(seed ^ k as u64, e - s) };
                new[s..e].copy_from_slice(&fill);
            }
            let t = dir.path().join("disk.img");
            let target = reset(&t, &old);
            let h = header_for(&target, &old, &new, seed);
            let j = dir.path().join("j");
            let made = make(&j, &h, &old, &new, cut, zero_runs, true);
            let full = read(&j);
            let len = full.len() as u64;
            let at = ((len as f64) * cut_at) as u64;
            rw(&j).set_len(at).unwrap();
            match Journal::open(&j).unwrap() {
                None => prop_assert!(at < made.ends[0]),
                Some(got) => {
                    prop_assert_eq!(got.state, State::Uncommitted);
                    let whole = made.ends[1..].iter().filter(|&&e| e <= at).count() as u64;
                    prop_assert_eq!(got.records, whole);
                    let chunks = got.chunks().unwrap();
                    prop_assert_eq!(&chunks[..], &made.chunks[..chunks.len()]);
                    for (offset, n, _) in chunks {
                        let want = &new[offset as usize..offset as usize + n as usize];
                        prop_assert_eq!(got.rebuild(offset, &target).unwrap().unwrap(), want);
                    }
                }
            }
            prop_assert_eq!(read(&t), old.clone());
            std::fs::write(&j, &full).unwrap();
            let got = Journal::open(&j).unwrap().unwrap();
            prop_assert_eq!(got.state, State::Committed);
            got.apply(&target).unwrap();
            prop_assert_eq!(read(&t), new);
        }
    }
}
