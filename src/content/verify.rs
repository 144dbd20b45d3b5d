//! Comparing a file on disk with a manifest, position by position: the
//! engine of `--check` (destination against the source's manifest as it
//! streams in) and of `--verify` (the written file, re-read from disk).
//!
//! Each data entry's range is read and hashed; each zero entry's range must
//! read as zeros (holes are skipped without reading). Ranges that differ are
//! merged into a [`RangeSet`], so a user sees "bytes 4096..8192 differ", not
//! a list of chunk numbers.
//!
//! A block device has no holes and is read throughout. Its size is the
//! whole device, so the receiver hands it over as at most the source's size:
//! a device larger than the source compares equal when it starts with it.

use std::fs::File;

use anyhow::Result;
use rayon::prelude::*;

use crate::content::chunk::is_zero;
use crate::content::hash::ChunkHash;
use crate::content::manifest::{Entry, Kind};
use crate::content::ranges::RangeSet;
use crate::content::scan::{read_full, Extents};

/// Compares batches of entries against `file`, collecting differences.
pub struct Comparer<'a> {
    file: &'a File,
    file_size: u64,
    data: Vec<(u64, u64)>,
    diffs: RangeSet,
}

impl<'a> Comparer<'a> {
    /// Compares the first `file_size` bytes of `file`; anything it holds
    /// past that is not looked at.
    pub fn new(file: &'a File, file_size: u64) -> Comparer<'a> {
        let ext = Extents::of(file, file_size);
        Comparer {
            file,
            file_size,
            data: ext.into_ranges(),
            diffs: RangeSet::default(),
        }
    }

    /// Compares one batch of entries (in parallel); returns the bytes covered.
    pub fn compare(&mut self, entries: &[Entry]) -> Result<u64> {
        let results: Vec<Result<bool>> = entries.par_iter().map(|e| self.matches(e)).collect();
        for (e, r) in entries.iter().zip(results) {
            if !r? {
                self.diffs.insert(e.offset, e.end());
            }
        }
        Ok(entries.iter().map(Entry::len).sum())
    }

    fn matches(&self, e: &Entry) -> Result<bool> {
        if e.end() > self.file_size {
            return Ok(false);
        }
        match e.kind {
            Kind::Data { len, hash } => {
                let mut buf = vec![0u8; len as usize];
                read_full(self.file, &mut buf, e.offset)?;
                Ok(ChunkHash::of(&buf) == hash)
            }
            Kind::Zero { len } => self.reads_as_zero(e.offset, e.offset + len),
        }
    }

    fn reads_as_zero(&self, start: u64, end: u64) -> Result<bool> {
        let first = self.data.partition_point(|&(_, e)| e <= start);
        let mut buf = Vec::new();
        for &(ds, de) in &self.data[first..] {
            if ds >= end {
                break;
            }
            let (mut s, e) = (ds.max(start), de.min(end));
            while s < e {
                let n = (e - s).min(1 << 20) as usize;
                buf.resize(n, 0);
                read_full(self.file, &mut buf, s)?;
                if !is_zero(&buf) {
                    return Ok(false);
                }
                s += n as u64;
            }
        }
        Ok(true)
    }

    /// Adds what lies past the end of the shorter file and returns the
    /// differing ranges.
    pub fn finish(mut self, source_size: u64) -> RangeSet {
        if self.file_size > source_size {
            self.diffs.insert(source_size, self.file_size);
        } else if self.file_size < source_size {
            self.diffs.insert(self.file_size, source_size);
        }
        self.diffs
    }
}
