//! The state of one sync, which the planning ([`super::plan`]), writing
//! ([`super::write`]) and message ([`super::exchange`]) phases share: every
//! manifest entry's [`State`], the request window, and the output.
//!
//! `Run`'s methods are spread over those files by phase; this one holds
//! the struct, how the output is chosen, and the little bookkeeping every
//! phase does.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::content::compress::StreamDecoder;
use crate::content::hash::ChunkHash;
use crate::content::manifest::{Entry, Validator};
use crate::content::ranges::RangeSet;
use crate::content::refine::{BlockIndex, BlockSource};
use crate::dest::writer::Output;
use crate::error::{fail, Exit};
use crate::progress::Progress;
use crate::roles::receive::basis::{Bases, Basis, JournalBasis, Target};
use crate::roles::receive::options::RecvOptions;
use crate::wire::messages::DeltaRange;
use crate::wire::{FileInfo, Msg, Summary, WriteMode};

/// Most bytes of requested chunks in flight at once.
pub const WINDOW: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Pending,
    /// Not in the basis; refined once the whole manifest is known.
    Deferred,
    /// Block hashes asked for.
    Refining,
    /// Some pieces asked for; the plan says where the rest come from.
    Blocks,
    /// The whole chunk asked for.
    Requested,
    Done,
}

/// What the atomic output will be, for when it is made.
pub(super) struct OutSpec {
    /// The partial file, locked for this run.
    pub locked: File,
    pub dest: PathBuf,
    pub size: u64,
    pub existing: Option<std::fs::Metadata>,
    pub mode: u32,
    pub umask: u32,
    pub keep: bool,
    /// How to write the destination once it turns out to differ.
    pub write_mode: WriteMode,
    /// What the sender announced: the journal's header names it.
    pub info: FileInfo,
}

impl OutSpec {
    /// The destination, opened in place and journaled: the journal beside
    /// it, the destination untouched until the commit.
    pub fn journal(&self) -> Result<Output> {
        let path = crate::dest::paths::journal_path(&self.dest, false);
        Output::in_place(&self.dest, self.size, self.mode, self.umask)?.journaled(
            path,
            &self.info,
            version(&self.info),
            self.keep,
        )
    }

    pub fn partial(&self, resume: bool) -> Result<Output> {
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

pub(super) struct Run<'a> {
    pub validator: Validator,
    pub entries: Vec<Entry>,
    pub state: Vec<State>,
    /// First entry not yet handled.
    pub next: usize,
    /// Bytes requested and not yet received.
    pub outstanding: u64,
    pub requests: Vec<u64>,
    /// Entries waiting for refinement, in file order.
    pub deferred: Vec<usize>,
    /// How far `deferred` has been handed to the sender (after the manifest end).
    pub refined: usize,
    pub refine_requests: Vec<u64>,
    pub block_fetches: Vec<Msg>,
    /// Entries identical to the old file at the same offset, not written yet
    /// because no output exists yet (see `OutSpec`).
    pub lazy_copies: Vec<(usize, Option<usize>, u64)>,
    pub spec: OutSpec,
    /// The sender sends every data chunk unasked (`StartMode::Inline`).
    pub inline: bool,
    /// `--allow-changing-source`: chunks may arrive with new content, so
    /// none is refined (pieces are checked against the manifest's hash,
    /// which a changed chunk no longer has): a lacking chunk is fetched whole.
    pub allow_changing: bool,
    /// Plans of chunks in state `Blocks`.
    pub plans: HashMap<usize, Vec<BlockSource>>,
    pub blocks: Option<BlockIndex>,
    pub out: Option<Output>,
    /// The destination's old contents.
    pub basis: Option<Basis>,
    /// `--seed` files: read-only, consulted after the basis.
    pub seeds: Vec<Basis>,
    /// What an interrupted run left in the partial file, which is the output.
    pub partial: Option<Basis>,
    /// What an interrupted journaled run left in its journal.
    pub journal: Option<JournalBasis>,
    pub decoder: Option<StreamDecoder>,
    pub summary: Summary,
    pub progress: &'a Progress,
    /// Scratch for in-place copies, reused from chunk to chunk.
    pub buf: Vec<u8>,
    /// A delta run's verify ranges: what the sender's extent maps call
    /// unchanged, which the destination must already hold.
    pub verify: Option<RangeSet>,
}

/// What a journal's header records as the version it writes: a digest of
/// the sender's announcement of it (size, mtime, mode).
fn version(info: &FileInfo) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("vmsync journal version v1");
    h.update(&info.size.to_le_bytes());
    h.update(&info.mtime_sec.to_le_bytes());
    h.update(&info.mtime_nsec.to_le_bytes());
    h.update(&info.mode.to_le_bytes());
    *h.finalize().as_bytes()
}

/// The device output, opened (and refused when in use or too small) before
/// anything is said to the sender or written; `None` unless the destination
/// is a block device.
pub(super) fn device_output(
    target: &Target,
    info: &FileInfo,
    opts: &RecvOptions,
) -> Result<Option<Output>> {
    if !target.device {
        return Ok(None);
    }
    let dest = &target.dest;
    if matches!(opts.write_mode, WriteMode::Clone | WriteMode::Copy) {
        return Err(fail(
            Exit::Usage,
            format!(
                "--write-mode {} cannot write {}: a block device is written in place \
                 (use journal, the default, or unsafe-inplace)",
                opts.write_mode.name(),
                dest.display()
            ),
        ));
    }
    let out = Output::device(dest, target.sync_lock().file(), info.size)?;
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
    Ok(Some(out))
}

impl<'a> Run<'a> {
    /// A run writing into `device_out`, else the destination in place, else
    /// the partial file: at once when resuming or when there is no basis.
    /// With a basis, the partial file is made only once the new file turns
    /// out to differ from the old one at the same offsets: an unchanged file
    /// (a newer mtime, say) is then not rewritten at all.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        target: &Target,
        device_out: Option<Output>,
        bases: Bases,
        inline: bool,
        delta: Option<&[DeltaRange]>,
        info: &FileInfo,
        opts: &RecvOptions,
        progress: &'a Progress,
    ) -> Result<Run<'a>> {
        let dest = &target.dest;
        let spec = OutSpec {
            locked: target
                .sync_lock()
                .file()
                .try_clone()
                .context("duplicate a file handle")?,
            dest: dest.clone(),
            size: info.size,
            existing: target.regular().cloned(),
            mode: info.mode,
            umask: opts.umask,
            keep: !opts.no_partial,
            write_mode: opts.write_mode,
            info: *info,
        };
        let Bases {
            mut basis,
            seeds,
            partial,
            journal,
        } = bases;
        let journaled = matches!(opts.write_mode, WriteMode::Auto | WriteMode::Journal);
        let out = if let Some(dev) = device_out {
            if journaled {
                // A device has no room beside it: its journal goes to the
                // state directory.
                let path = crate::dest::paths::journal_path(dest, true);
                crate::dest::paths::make_journal_dir(&path)?;
                crate::vlog!(
                    1,
                    "receiver: journaling the changes to {} in {}",
                    dest.display(),
                    path.display()
                );
                Some(dev.journaled(path, info, version(info), !opts.no_partial)?)
            } else {
                Some(dev)
            }
        } else if opts.write_mode == WriteMode::UnsafeInplace {
            Some(Output::in_place(dest, info.size, info.mode, opts.umask)?)
        } else if partial.is_some() {
            Some(spec.partial(true)?)
        } else if basis.is_none() {
            Some(spec.partial(false)?)
        } else {
            None
        };
        // Written in place without a journal, the output is the basis:
        // what is written overwrites what the index says is there.
        if let Some(b) = &mut basis {
            b.alias = b.placed && out.as_ref().is_some_and(Output::overwrites_old);
        }
        let mut validator = Validator::new(info.size, opts.params);
        let mut verify = None;
        if let Some(ranges) = delta {
            validator = validator.restrict(ranges.iter().map(|r| (r.offset, r.end())).collect());
            let mut v = RangeSet::default();
            for r in ranges.iter().filter(|r| r.verify) {
                v.insert(r.offset, r.end());
            }
            verify = Some(v);
        }
        Ok(Run {
            validator,
            entries: Vec::new(),
            state: Vec::new(),
            next: 0,
            outstanding: 0,
            requests: Vec::new(),
            deferred: Vec::new(),
            refined: 0,
            refine_requests: Vec::new(),
            block_fetches: Vec::new(),
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
            journal,
            decoder: None,
            summary: Summary::default(),
            progress,
            buf: Vec::new(),
            verify,
        })
    }

    /// The output; it exists once anything is to be written.
    pub fn output(&mut self) -> &mut Output {
        self.out.as_mut().expect("output made before writing")
    }

    /// The output is a block device.
    pub fn is_device(&self) -> bool {
        self.out.as_ref().is_some_and(|o| o.device_size().is_some())
    }

    /// Index of entry `index` if it is in state `want`, else a protocol error.
    pub fn expect_state(&self, index: u64, want: State) -> Result<usize> {
        let i = usize::try_from(index).unwrap_or(usize::MAX);
        match self.state.get(i) {
            Some(s) if *s == want => Ok(i),
            _ => Err(fail(
                Exit::Protocol,
                format!("protocol error: peer sent data for chunk {index}, which was not asked for that way"),
            )),
        }
    }

    /// Asks for entry `i` whole (inline, it is on its way unasked), counting
    /// its `len` bytes in the window.
    pub fn request(&mut self, i: usize, len: u32) {
        self.state[i] = State::Requested;
        self.outstanding += u64::from(len);
        if !self.inline {
            self.requests.push(i as u64);
        }
    }

    /// The first seed holding a chunk with `hash`: (seed, offset there).
    pub fn in_seeds(&self, hash: &ChunkHash) -> Option<(usize, u64)> {
        self.seeds
            .iter()
            .enumerate()
            .find_map(|(k, b)| b.index.get(hash).map(|&(src, _)| (k, src)))
    }

    /// Everything written: the manifest is complete and nothing is pending.
    pub fn finished(&self) -> bool {
        self.next == self.entries.len()
            && self.outstanding == 0
            && self.refined == self.deferred.len()
            && self.requests.is_empty()
    }
}

#[cfg(test)]
impl<'a> Run<'a> {
    /// A run over `entries` (all pending) writing beside `dir/img`: no
    /// seeds nor partial file; the atomic output made at once when
    /// `make_out`, else when the first difference from `basis` shows.
    pub fn for_test(
        dir: &std::path::Path,
        entries: Vec<Entry>,
        basis: Option<Basis>,
        make_out: bool,
        allow_changing: bool,
        progress: &'a Progress,
    ) -> Run<'a> {
        let dest = dir.join("img");
        let size = entries.last().map_or(0, Entry::end);
        let locked = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(crate::dest::paths::partial_path(&dest))
            .unwrap();
        let spec = OutSpec {
            locked,
            dest,
            size,
            existing: None,
            mode: 0o644,
            umask: 0o022,
            keep: false,
            write_mode: WriteMode::Copy,
            info: FileInfo {
                size,
                mtime_sec: 0,
                mtime_nsec: 0,
                mode: 0o644,
            },
        };
        let out = make_out.then(|| spec.partial(false).unwrap());
        let opts = RecvOptions {
            allow_changing,
            ..RecvOptions::default()
        };
        Run {
            validator: Validator::new(size, opts.params),
            state: vec![State::Pending; entries.len()],
            entries,
            next: 0,
            outstanding: 0,
            requests: Vec::new(),
            deferred: Vec::new(),
            refined: 0,
            refine_requests: Vec::new(),
            block_fetches: Vec::new(),
            plans: HashMap::new(),
            blocks: None,
            out,
            spec,
            lazy_copies: Vec::new(),
            inline: false,
            allow_changing,
            basis,
            seeds: Vec::new(),
            partial: None,
            journal: None,
            decoder: None,
            summary: Summary::default(),
            progress,
            buf: Vec::new(),
            verify: None,
        }
    }
}

/// Old files, manifest entries and contents for the phases' tests.
#[cfg(test)]
pub(super) mod testing {
    use std::fs::File;
    use std::io::Write as _;

    use crate::content::hash::ChunkHash;
    use crate::content::manifest::{Entry, Kind};
    use crate::roles::receive::basis::Basis;
    use crate::roles::receive::options::RecvOptions;

    pub fn data(offset: u64, bytes: &[u8]) -> Entry {
        Entry {
            offset,
            kind: Kind::Data {
                len: bytes.len() as u32,
                hash: ChunkHash::of(bytes),
            },
        }
    }

    /// A basis over a file holding `bytes`, indexed as the chunks `cuts`
    /// (offset, length).
    pub fn basis_of(dir: &std::path::Path, bytes: &[u8], cuts: &[(u64, usize)]) -> Basis {
        let path = dir.join("old");
        File::create(&path).unwrap().write_all(bytes).unwrap();
        let entries = cuts
            .iter()
            .map(|&(o, l)| data(o, &bytes[o as usize..o as usize + l]))
            .collect();
        let opts = RecvOptions::default();
        Basis::scan(
            File::open(&path).unwrap(),
            bytes.len() as u64,
            Some(entries),
            &path,
            &opts,
        )
        .unwrap()
    }

    /// `n` bytes that repeat nowhere within them (no two blocks alike).
    pub fn filled(n: usize, seed: u8) -> Vec<u8> {
        let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect()
    }
}
