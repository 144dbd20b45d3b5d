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
//! Cutting runs in parallel too, though a chunk's end depends on where it
//! starts: a stretch of data is split into parts, each cut as if a chunk
//! started at its beginning, and the parts are stitched in order. The chain
//! of cuts from the stretch's start, continued into a part, soon lands on
//! one of the part's own cut points (usually within a chunk or two) and
//! from there on is the part's chain; until it does, it is cut serially.
//! So the cut points are exactly those of a serial pass ([`cut_run`]), and a
//! part that never lines up (long runs of one byte value written out) only
//! costs its speculative work. Hashing and zero checks of a segment's chunks
//! run in parallel on rayon's pool, overlapping the next segment's read and
//! cut.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::content::chunk::{is_zero, Cutter};
use crate::content::hash::ChunkHash;

/// Bytes read and cut per segment before its chunks are hashed in parallel.
const SEGMENT: usize = 16 << 20;
/// Most records in one segment (bounds memory over terabytes of holes).
const MAX_PENDING: usize = 65536;
/// Fewest bytes of a part cut on its own thread: smaller stretches are cut
/// serially, where spreading them would cost more than it saves.
const MIN_PIECE: usize = 2 << 20;

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
        use rustix::fs::{seek, SeekFrom};
        let mut data = Vec::new();
        let mut pos: u64 = 0;
        while pos < size {
            let start = match seek(file, SeekFrom::Data(pos)) {
                Ok(start) => start,
                Err(rustix::io::Errno::NXIO) => break, // no data after pos
                Err(_) => return all,
            };
            if start >= size {
                break;
            }
            let Ok(end) = seek(file, SeekFrom::Hole(start)) else {
                return all;
            };
            let end = end.min(size);
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

    /// Right after `is_hole(pos, _)` said false: a position `r > pos` such
    /// that `is_hole(q, q + max)` (with the end clamped to the file size) is
    /// false for every `q` in `[pos, r)`, namely the end of the data that
    /// windows of `max` bytes bridge to without a gap; the search stops once
    /// it has reached `limit`.
    ///
    /// The extent at the cursor ends after `pos` and starts before
    /// `pos + max`, so it meets the window of every `q` in `[pos, e)`; the
    /// next extent meets the window of every `q` in `[e, e')` when it starts
    /// before `e + max`, and so on.
    fn data_run_end(&self, max: u64, limit: u64) -> u64 {
        let mut k = self.cursor;
        let mut end = self.data[k].1;
        while end < limit && k + 1 < self.data.len() && self.data[k + 1].0 < end + max {
            k += 1;
            end = self.data[k].1;
        }
        end
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
/// Reading and cutting a segment (cut in parallel parts, see
/// [`cut_run`]) overlaps with hashing the previous one on rayon's pool.
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
            // Here the loop above would go on cutting chunk after chunk from
            // the buffer for as long as each chunk's start passes both tests
            // (not a hole, window inside the buffer): that is every start
            // before `until`, where `data_run_end` bounds the first test and
            // `fits` the second (a window of `max` bytes inside the buffer,
            // or any window when the buffer reaches the end of the file).
            // Cutting `buf[..len]` with windows of `max` bytes clamped to
            // `len` is then the same cut as from `buf[off..end]`: the two
            // windows differ only past `max`, which no cut reads. So
            // `cut_run` gives the chunks the loop would, and the loop carries
            // on from where they end, with the same hole test as before.
            let off = (pos - start) as usize;
            let fits = if start + len as u64 == self.size {
                len
            } else {
                len - max as usize + 1
            };
            let run_end = self.extents.data_run_end(max, start + len as u64);
            let until = fits.min((run_end - start) as usize);
            debug_assert!(off < until);
            let run = cut_run(self.cutter, &buf[..len], off, until);
            for c in run {
                cuts.push(c);
                pending.push(Pending::Cut(cuts.len() - 1));
            }
            let &(last, n) = cuts.last().expect("a run has a chunk");
            self.pos = start + (last + n) as u64;
        }
        Ok(Some(Segment {
            buf,
            start,
            cuts,
            pending,
        }))
    }
}

/// The chunks from `from` on whose starts are before `until`, cut from
/// `data` with windows of `max` bytes clamped to its end: exactly the
/// chunks of the serial loop
///
/// ```text
/// q = from; while q < until { n = cutter.cut(&data[q..(q + max).min(len)]); q += n }
/// ```
///
/// The caller must make those windows right: `data` holds at least `max`
/// bytes after every start before `until`, or ends where the file does.
/// Long stretches are cut in parallel parts (one per thread of rayon's pool)
/// and stitched, see [`cut_run_in`].
fn cut_run(cutter: &Cutter, data: &[u8], from: usize, until: usize) -> Vec<(usize, usize)> {
    let len = until - from;
    let parts = rayon::current_num_threads().min(len / MIN_PIECE).max(1);
    cut_run_in(cutter, data, from, until, len.div_ceil(parts))
}

/// [`cut_run`] with parts of `part` bytes (the tests pick small ones).
///
/// Each part is cut on its own, as if a chunk started at its first byte,
/// until a chunk ends at or past the part's end. Stitching in order keeps
/// the serial chain, which is always at `q`, the end of the chunks so far:
/// the first part's cuts are that chain outright. In a later part, when `q`
/// is one of the part's chunk starts, the rest of the part's cuts are the
/// serial chain from `q` on (a cut depends only on its start and the data),
/// and they are taken whole. Otherwise one chunk is cut at `q` serially and
/// the test repeats, until `q` matches or passes the part's end (the whole
/// part was then recut serially: correct, just not faster). Every chunk
/// taken starts before its part's end, so before `until`, and the last
/// one ends at or past `until`: the chain is the serial loop's, no more.
///
/// Part starts are rounded down to multiples of `min` from `from`, so fixed
/// blocks (a chain of steps of exactly `min`) line up at once.
fn cut_run_in(
    cutter: &Cutter,
    data: &[u8],
    from: usize,
    until: usize,
    part: usize,
) -> Vec<(usize, usize)> {
    let max = cutter.params().max() as usize;
    let align = cutter.params().min() as usize;
    let cut_at = |q: usize| cutter.cut(&data[q..(q + max).min(data.len())]);
    let chain = |mut q: usize, end: usize| {
        let mut out = Vec::with_capacity((end - q) / align + 1);
        while q < end {
            let n = cut_at(q);
            out.push((q, n));
            q += n;
        }
        out
    };
    let mut bounds: Vec<usize> = (0..until - from)
        .step_by(part.max(1))
        .map(|d| from + d - d % align)
        .collect();
    bounds.dedup();
    if bounds.len() <= 1 {
        return chain(from, until);
    }
    bounds.push(until);
    let parts: Vec<Vec<(usize, usize)>> =
        bounds.par_windows(2).map(|w| chain(w[0], w[1])).collect();
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum::<usize>() + 16);
    let mut q = from;
    for (cuts, &end) in parts.iter().zip(&bounds[1..]) {
        let mut j = 0;
        while q < end {
            while j < cuts.len() && cuts[j].0 < q {
                j += 1;
            }
            if j < cuts.len() && cuts[j].0 == q {
                out.extend_from_slice(&cuts[j..]);
                let &(last, n) = cuts.last().expect("a part has a chunk");
                q = last + n;
                break;
            }
            let n = cut_at(q);
            out.push((q, n));
            q += n;
        }
    }
    out
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
    Ok(rustix::fs::seek(file, rustix::fs::SeekFrom::End(0))?)
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
    use crate::content::chunk::ChunkParams;
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

    /// The loop `cut_run` stands for.
    fn serial(cutter: &Cutter, data: &[u8], from: usize, until: usize) -> Vec<(usize, usize)> {
        let max = cutter.params().max() as usize;
        let mut out = Vec::new();
        let mut q = from;
        while q < until {
            let n = cutter.cut(&data[q..(q + max).min(data.len())]);
            out.push((q, n));
            q += n;
        }
        out
    }

    fn cutters() -> Vec<Cutter> {
        [
            ChunkParams::new(4096),
            ChunkParams::new(65536),
            ChunkParams::new(1 << 20),
            ChunkParams::fixed(4096),
            ChunkParams::fixed(65536),
        ]
        .into_iter()
        .map(|p| Cutter::new(p.unwrap()))
        .collect()
    }

    /// Noise, runs of one byte (0 and 0xAB), a short block repeated, and
    /// noise again. A part that starts inside a run of one value (or of a
    /// short period) may not line up with the serial chain before the run
    /// ends, and is recut serially that far.
    fn mixed(len: usize, seed: u64) -> Vec<u8> {
        let mut v = noise(len, seed);
        let q = len / 8;
        v[q..3 * q].fill(0);
        v[3 * q..4 * q].fill(0xAB);
        let block = noise(1000, seed + 1);
        for (i, b) in v[5 * q..7 * q].iter_mut().enumerate() {
            *b = block[i % block.len()];
        }
        v
    }

    /// Of the part starts after the first, as `cut_run_in` splits
    /// `[from, until)`: how many the serial chain `cuts` misses (the stitch
    /// recuts at least one chunk serially) and how many it hits.
    fn sync_counts(
        cuts: &[(usize, usize)],
        from: usize,
        until: usize,
        part: usize,
        align: usize,
    ) -> (usize, usize) {
        let (mut miss, mut hit) = (0, 0);
        for d in (part..until - from).step_by(part) {
            let start = from + d - d % align;
            if cuts.binary_search_by_key(&start, |c| c.0).is_ok() {
                hit += 1;
            } else {
                miss += 1;
            }
        }
        (miss, hit)
    }

    #[test]
    fn parallel_cut_is_the_serial_cut() {
        let inputs: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![7],
            noise(100, 1),
            noise(5000, 2),
            vec![0; 300_000],
            vec![0xAB; 3 << 20],
            noise(3 << 20, 3),
            mixed(3 << 20, 4),
            mixed(20 << 20, 5),
        ];
        let parts = [1, 777, 4096, 10_000, 100_000, 1 << 20, 4 << 20];
        let (mut missed, mut hit) = (0, 0);
        for cutter in cutters() {
            let max = cutter.params().max() as usize;
            let align = cutter.params().min() as usize;
            for data in &inputs {
                // The 20 MiB input only in coarser parts, to keep the test quick.
                let parts = if data.len() > 4 << 20 {
                    &parts[3..]
                } else {
                    &parts[..]
                };
                // The whole file; a run that starts later; a run in a buffer
                // that does not reach the end of the file (windows of `max`).
                let mut runs = vec![(0, data.len())];
                if data.len() > 2 * max {
                    runs.push((data.len() / 3 + 5, data.len()));
                    runs.push((12_345 % data.len(), data.len() - max + 1));
                }
                for (from, until) in runs {
                    let want = serial(&cutter, data, from, until);
                    assert_eq!(cut_run(&cutter, data, from, until), want);
                    for &part in parts {
                        let got = cut_run_in(&cutter, data, from, until, part);
                        assert!(
                            got == want,
                            "{:?}, {} bytes [{from}, {until}), parts of {part}",
                            cutter.params(),
                            data.len()
                        );
                        let (m, h) = sync_counts(&want, from, until, part, align);
                        missed += m;
                        hit += h;
                    }
                }
            }
        }
        // Both ways of stitching a part were taken.
        assert!(missed > 100 && hit > 100, "missed {missed}, hit {hit}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        #[test]
        fn parallel_cut_is_the_serial_cut_prop(
            parts in proptest::collection::vec((0u8..4, 1usize..200_000, proptest::prelude::any::<u64>()), 1..12),
            which in 0usize..5,
            part in 1usize..300_000,
            from_frac in 0.0f64..1.0,
            to_eof in proptest::prelude::any::<bool>(),
        ) {
            let mut data = Vec::new();
            for (kind, len, seed) in parts {
                match kind {
                    0 => data.extend(noise(len, seed)),
                    1 => data.extend(std::iter::repeat_n(0u8, len)),
                    2 => data.extend(std::iter::repeat_n(0xABu8, len)),
                    _ => {
                        let block = noise(1 + (seed % 5000) as usize, seed);
                        data.extend(block.iter().cycle().take(len));
                    }
                }
            }
            let cutter = &cutters()[which];
            let max = cutter.params().max() as usize;
            let until = if to_eof || data.len() < max { data.len() } else { data.len() - max + 1 };
            let from = ((until as f64 * from_frac) as usize).min(until - 1);
            let want = serial(cutter, &data, from, until);
            proptest::prop_assert_eq!(cut_run_in(cutter, &data, from, until, part), want);
        }
    }

    #[test]
    fn data_run_end_bounds_the_non_holes() {
        // Extents with gaps shorter than `max`, as long and longer.
        let max = 1000u64;
        let size = 20_000u64;
        let data = vec![
            (100, 300),
            (900, 1000),
            (2100, 2500),
            (3000, 3001),
            (3999, 4100),
            (9000, 9500),
            // Gaps of exactly `max` (a hole at 9500) and one less (none).
            (10_500, 10_600),
            (11_599, 11_700),
            (19_990, 20_000),
        ];
        let brute = |q: u64| {
            let end = (q + max).min(size);
            !data.iter().any(|&(s, e)| s < end && e > q)
        };
        let mut ext = Extents {
            data: data.clone(),
            cursor: 0,
        };
        let mut pos = 0;
        while pos < size {
            if ext.is_hole(pos, (pos + max).min(size)) {
                assert!(brute(pos));
                pos += 1;
                continue;
            }
            let r = ext.data_run_end(max, size);
            assert!(r > pos);
            for q in pos..r {
                assert!(!brute(q), "{q} in [{pos}, {r})");
            }
            // Exact, not just a bound (the search had no limit to stop at).
            assert!(r == size || brute(r), "{r}");
            pos += 37;
        }
        // With a limit it stops once past it, still a bound.
        let mut ext = Extents { data, cursor: 0 };
        assert!(!ext.is_hole(0, max));
        assert_eq!(ext.data_run_end(max, 500), 1000);
    }

    #[test]
    fn runs_between_holes_cut_as_written_zeros() {
        // Data runs long enough to be cut in parallel parts, ending at holes
        // that windows bridge (8 KiB < max) and that they do not, one run
        // across the segment boundary, a little data at the very end.
        let dir = tempfile::tempdir().unwrap();
        let size = (SEGMENT + (9 << 20)) as u64;
        let extents = [
            (0usize, 5usize << 20),
            ((5 << 20) + 8192, 12 << 20),
            (13 << 20, SEGMENT + (3 << 20)),
            (size as usize - 5000, size as usize),
        ];
        let mut dense = vec![0u8; size as usize];
        let sparse = dir.path().join("sparse");
        let f = File::create(&sparse).unwrap();
        f.set_len(size).unwrap();
        for (i, &(s, e)) in extents.iter().enumerate() {
            let d = mixed(e - s, 10 + i as u64);
            dense[s..e].copy_from_slice(&d);
            f.write_all_at(&d, s as u64).unwrap();
        }
        drop(f);
        let dense_path = dir.path().join("dense");
        File::create(&dense_path)
            .unwrap()
            .write_all(&dense)
            .unwrap();

        let a = records(&File::open(&sparse).unwrap(), size, true);
        let b = records(&File::open(&dense_path).unwrap(), size, false);
        assert_eq!(a, b);
        let cutter = Cutter::new(ChunkParams::new(4096).unwrap());
        let want = serial(&cutter, &dense, 0, dense.len());
        let got: Vec<(usize, usize)> = a
            .iter()
            .map(|r| (r.offset as usize, r.len as usize))
            .collect();
        assert_eq!(got, want);
    }
}
