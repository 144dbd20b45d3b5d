//! Reading a file into chunk records: cut, zero-check and hash.
//!
//! Holes are found with `SEEK_DATA`/`SEEK_HOLE` and are neither read nor
//! hashed: a chunk that starts at least `max` bytes before the end of a hole
//! is known to be a zero chunk of the length [`Cutter::cut_zeros`] gives, the
//! same length a byte-by-byte pass would find. So a file with holes and a
//! file with the same bytes written out as zeros give the same records.
//!
//! A block device has no holes to ask about (and its `st_size` is 0; see
//! [`device_size`]): all of it is read, and its runs of zeros become zero
//! chunks through the zero check like zeros written out in a file, so an
//! empty device still sends no data.
//!
//! Cutting is serial (a gear hash cannot be split); hashing and zero checks
//! of a segment's chunks run in parallel on rayon's pool.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::chunk::{is_zero, Cutter};
use crate::hash::ChunkHash;

/// Bytes read and cut per segment before its chunks are hashed in parallel.
const SEGMENT: usize = 16 << 20;
/// Most records in one segment (bounds memory over terabytes of holes).
const MAX_PENDING: usize = 65536;

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Data(ChunkHash),
    Zero,
}

/// One chunk of a scanned file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRec {
    pub offset: u64,
    pub len: u32,
    pub content: Content,
}

/// The data extents of a file, from `SEEK_DATA`/`SEEK_HOLE`; everything
/// outside them reads as zeros.
pub struct Extents {
    data: Vec<(u64, u64)>,
    /// Index of the first extent that may still matter to a forward scan.
    cursor: usize,
}

impl Extents {
    /// Asks the kernel where the data is. Filesystems without hole support
    /// (or files the call fails on) are reported as one data extent, and so
    /// is anything but a regular file: on a block device the answer would
    /// only ever be "all data", and a device mapper or driver that gets it
    /// wrong must not turn data into zeros.
    pub fn of(file: &File, size: u64) -> Extents {
        let all = Extents {
            data: vec![(0, size)],
            cursor: 0,
        };
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return all;
        }
        let fd = file.as_raw_fd();
        let mut data = Vec::new();
        let mut pos: u64 = 0;
        while pos < size {
            // SAFETY: lseek on a valid fd has no memory-safety preconditions.
            let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if start < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after pos
                }
                return all;
            }
            let start = start as u64;
            if start >= size {
                break;
            }
            // SAFETY: as above.
            let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
            if end < 0 {
                return all;
            }
            let end = (end as u64).min(size);
            if end <= start {
                return all;
            }
            data.push((start, end));
            pos = end;
        }
        Extents { data, cursor: 0 }
    }

    /// The whole range as data (for devices and pipes, or tests).
    pub fn all_data(size: u64) -> Extents {
        Extents {
            data: vec![(0, size)],
            cursor: 0,
        }
    }

    /// True when no data extent intersects `[start, end)`. Calls must come
    /// with non-decreasing `start`.
    fn is_hole(&mut self, start: u64, end: u64) -> bool {
        while self.cursor < self.data.len() && self.data[self.cursor].1 <= start {
            self.cursor += 1;
        }
        match self.data.get(self.cursor) {
            None => true,
            Some(&(s, _)) => s >= end,
        }
    }

    /// The data extents as `(start, end)` pairs, sorted.
    pub fn into_ranges(self) -> Vec<(u64, u64)> {
        self.data
    }

    /// Bytes in data extents.
    pub fn data_bytes(&self) -> u64 {
        self.data.iter().map(|(s, e)| e - s).sum()
    }
}

/// Scans `size` bytes of `file` and hands the chunk records to `sink` in
/// file order, one batch per segment.
pub fn scan(
    file: &File,
    size: u64,
    extents: &mut Extents,
    cutter: &Cutter,
    mut sink: impl FnMut(Vec<ChunkRec>) -> Result<()>,
) -> Result<()> {
    scan_with_data(file, size, extents, cutter, |recs, _, _| sink(recs))
}

/// [`scan`], also handing over the segment the records were cut from and
/// its file offset, so a data chunk's bytes are
/// `&data[(rec.offset - at) as usize..][..rec.len]` without reading them again.
///
/// Reading and cutting a segment (serial: a gear hash cannot be split)
/// overlaps with hashing the previous one on rayon's pool.
pub fn scan_with_data(
    file: &File,
    size: u64,
    extents: &mut Extents,
    cutter: &Cutter,
    mut sink: impl FnMut(Vec<ChunkRec>, &[u8], u64) -> Result<()>,
) -> Result<()> {
    let buf_len = SEGMENT + cutter.params().max() as usize;
    let mut cutting = Cutting {
        file,
        size,
        extents,
        cutter,
        pos: 0,
    };
    let mut spare = vec![0u8; buf_len];
    let mut cur = cutting.next(vec![0u8; buf_len])?;
    while let Some(seg) = cur {
        let next_buf = std::mem::take(&mut spare);
        let ((recs, buf, start), next) = rayon::join(move || seg.hash(), || cutting.next(next_buf));
        sink(recs, &buf, start)?;
        spare = buf;
        cur = next?;
    }
    Ok(())
}

/// Where the cutting of a file has got to.
struct Cutting<'a> {
    file: &'a File,
    size: u64,
    extents: &'a mut Extents,
    cutter: &'a Cutter,
    pos: u64,
}

/// One buffer's worth of cut chunks, and the holes around them, in order.
struct Segment {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: u64,
    /// Chunks in `buf`: (offset in buf, length).
    cuts: Vec<(usize, usize)>,
    /// Records in file order: zero chunks from holes between the cuts.
    pending: Vec<Pending>,
}

enum Pending {
    Hole(u64, u32),
    Cut(usize),
}

impl Cutting<'_> {
    /// Reads and cuts the next segment into `buf`; `None` at the end.
    fn next(&mut self, mut buf: Vec<u8>) -> Result<Option<Segment>> {
        if self.pos >= self.size {
            return Ok(None);
        }
        let max = u64::from(self.cutter.params().max());
        let mut start = self.pos;
        let mut len = 0usize;
        let mut loaded = false;
        let mut cuts = Vec::new();
        let mut pending = Vec::new();
        while self.pos < self.size {
            let pos = self.pos;
            let window_end = (pos + max).min(self.size);
            if self.extents.is_hole(pos, window_end) {
                let n = self.cutter.cut_zeros(self.size - pos) as u64;
                pending.push(Pending::Hole(pos, n as u32));
                self.pos += n;
                if pending.len() >= MAX_PENDING {
                    break; // a vast hole: hand over what we have
                }
                continue;
            }
            if !loaded {
                start = pos;
                len = (SEGMENT as u64).min(self.size - pos) as usize;
                read_full(self.file, &mut buf[..len], pos)?;
                loaded = true;
            } else if window_end > start + len as u64 {
                break; // the next window is past this buffer
            }
            let off = (pos - start) as usize;
            let end = off + (window_end - pos) as usize;
            let n = self.cutter.cut(&buf[off..end]);
            cuts.push((off, n));
            pending.push(Pending::Cut(cuts.len() - 1));
            self.pos += n as u64;
        }
        Ok(Some(Segment {
            buf,
            start,
            cuts,
            pending,
        }))
    }
}

impl Segment {
    /// Zero-checks and hashes the chunks (in parallel); returns the records,
    /// the buffer (for reuse) and its file offset.
    fn hash(self) -> (Vec<ChunkRec>, Vec<u8>, u64) {
        let buf = &self.buf;
        let contents: Vec<Content> = self
            .cuts
            .par_iter()
            .map(|&(off, len)| {
                let d = &buf[off..off + len];
                if is_zero(d) {
                    Content::Zero
                } else {
                    Content::Data(ChunkHash::of(d))
                }
            })
            .collect();
        let recs = self
            .pending
            .iter()
            .map(|p| match *p {
                Pending::Hole(offset, len) => ChunkRec {
                    offset,
                    len,
                    content: Content::Zero,
                },
                Pending::Cut(i) => ChunkRec {
                    offset: self.start + self.cuts[i].0 as u64,
                    len: self.cuts[i].1 as u32,
                    content: contents[i],
                },
            })
            .collect();
        (recs, self.buf, self.start)
    }
}

/// Whether `meta` is a block device (`/dev/sdb`, an LVM volume, a loop device).
pub fn is_block_device(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_block_device()
}

/// The size of the block device open as `file`, from the device itself:
/// the `st_size` of a device node is 0. `lseek(SEEK_END)` works for every
/// block driver and needs no per-architecture ioctl number; it moves the
/// descriptor's offset, which nothing here uses (all I/O is positioned).
pub fn device_size(file: &File) -> std::io::Result<u64> {
    // SAFETY: lseek on a valid fd has no memory-safety preconditions.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// `read_exact_at` that names the problem: a file that shrank under us
/// reads short, which is not the same as a failing disk.
pub fn read_full(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(crate::error::fail(
            crate::error::Exit::SourceChanged,
            format!(
                "file ended early: expected {} bytes at offset {offset}; it shrank while being read",
                buf.len()
            ),
        )),
        Err(e) => Err(e).with_context(|| format!("read {} bytes at offset {offset}", buf.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkParams;
    use std::io::Write;

    fn records(file: &File, size: u64, holes: bool) -> Vec<ChunkRec> {
        let cutter = Cutter::new(ChunkParams::new(4096).unwrap());
        let mut ext = if holes {
            Extents::of(file, size)
        } else {
            Extents::all_data(size)
        };
        let mut out = Vec::new();
        scan(file, size, &mut ext, &cutter, |b| {
            out.extend(b);
            Ok(())
        })
        .unwrap();
        out
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn holes_give_same_records_as_written_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let size = 3 << 20;
        let data = noise(100_000, 7);
        // Sparse: data at 0 and 2 MiB, holes elsewhere.
        let sparse = dir.path().join("sparse");
        let f = File::create(&sparse).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.write_all_at(&data, 2 << 20).unwrap();
        // Dense: the same bytes, zeros written out.
        let mut dense_bytes = vec![0u8; size as usize];
        dense_bytes[..data.len()].copy_from_slice(&data);
        dense_bytes[2 << 20..(2 << 20) + data.len()].copy_from_slice(&data);
        let dense = dir.path().join("dense");
        File::create(&dense)
            .unwrap()
            .write_all(&dense_bytes)
            .unwrap();

        let a = records(&File::open(&sparse).unwrap(), size, true);
        let b = records(&File::open(&dense).unwrap(), size, false);
        assert_eq!(a, b);
        assert_eq!(a.iter().map(|r| r.len as u64).sum::<u64>(), size);
        assert!(a.iter().any(|r| r.content == Content::Zero));
    }

    #[test]
    fn segment_boundaries_do_not_change_cuts() {
        // Longer than one segment, so the scan refills its buffer mid-file.
        let dir = tempfile::tempdir().unwrap();
        let data = noise(SEGMENT * 2 + 12345, 3);
        let p = dir.path().join("f");
        File::create(&p).unwrap().write_all(&data).unwrap();
        let recs = records(&File::open(&p).unwrap(), data.len() as u64, true);
        let cutter = Cutter::new(ChunkParams::new(4096).unwrap());
        let mut pos = 0usize;
        for r in &recs {
            assert_eq!(r.offset as usize, pos);
            let n = cutter.cut(&data[pos..]);
            assert_eq!(r.len as usize, n);
            assert_eq!(r.content, Content::Data(ChunkHash::of(&data[pos..pos + n])));
            pos += n;
        }
        assert_eq!(pos, data.len());
    }
}
