//! Low-level writes into the output: runs of 4 KiB blocks written, holes
//! punched or zeros written, and early writeback.
//!
//! [`crate::dest::writer::Output`] decides *what* reaches the disk; this
//! module holds *how*: data is written in runs of whole 4 KiB blocks (at
//! absolute offsets, so holes align with the filesystem's); into a file of
//! holes all-zero blocks are skipped ([`write_sparse`]); over old contents
//! only the blocks that differ are written, zeros by punching a hole or, on
//! a device, by zeroing ([`changes`], [`write_pieces`]); and every
//! [`WRITEBACK_EVERY`] bytes the range written since the last time is handed
//! to the disk with `sync_file_range(SYNC_FILE_RANGE_WRITE)`, which starts
//! writeback and does not wait for it. Otherwise nothing reaches the disk
//! until the kernel's dirty thresholds are hit, and the whole file is written
//! by the final fsync, after everything else is done. It is only a head
//! start: durability still comes from that fsync.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use crate::content::chunk::is_zero;

/// Granularity of holes left in written data.
pub const BLOCK: usize = 4096;

/// Bytes written to the output between two starts of writeback
/// ([`Writeback`]). Large enough that the `sync_file_range` call is
/// negligible beside the writes it follows and the disk gets big batches
/// to merge; small enough that little is left for the final fsync (tens of
/// milliseconds' worth on an SSD) and far below the kernel's
/// own background threshold (10% of memory by default), which is what
/// otherwise decides when the first byte goes to disk.
pub const WRITEBACK_EVERY: u64 = 32 << 20;
/// Counts bytes written to the output and says when to start writeback
/// of them, and of which range. Writes are positioned and come from several
/// threads in no particular order, so the range is the lowest to the
/// highest byte written since the last start, which covers them all.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Writeback {
    /// Bytes written since the last start; 0 when nothing has been.
    pub(crate) since: u64,
    /// The lowest offset written since the last start.
    pub(crate) lo: u64,
    /// The end of the highest range written since the last start.
    pub(crate) hi: u64,
}

impl Writeback {
    /// Notes `len` bytes written at `offset`. Once [`WRITEBACK_EVERY`] bytes
    /// have been since the last start, returns the range `[lo, hi)` to start
    /// writeback of, and begins counting afresh.
    pub fn note(&mut self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 {
            return None;
        }
        let end = offset + len;
        if self.since == 0 {
            (self.lo, self.hi) = (offset, end);
        } else {
            (self.lo, self.hi) = (self.lo.min(offset), self.hi.max(end));
        }
        self.since += len;
        if self.since < WRITEBACK_EVERY {
            return None;
        }
        let range = (self.lo, self.hi);
        *self = Writeback::default();
        Some(range)
    }
}

/// Asks the kernel to start writing `[lo, hi)` of `file` to disk, and
/// returns without waiting for it (`SYNC_FILE_RANGE_WRITE` alone, no
/// `WAIT_*` flag), so the disk works while the rest of the sync arrives
/// instead of all at once at the end. This is not a durability guarantee: it
/// writes no metadata, flushes no device cache and waits for nothing; the
/// fsync in [`Output::commit`] does all that, as it did before.
pub fn start_writeback(file: &File, lo: u64, hi: u64) {
    // SAFETY: sync_file_range on a valid fd with plain integer arguments.
    let r = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            lo as libc::off64_t,
            (hi - lo) as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    // Ignored: it is advice, refused by some files and devices (EINVAL,
    // ESPIPE), and what it did not start the fsync in commit writes anyway.
    // A write error it runs into stays recorded on the file (only a wait
    // collects it), so that fsync still reports it.
    let _ = r;
}

/// Tells [`crate::dest::writer::Output`] that `(offset, len)` bytes were written (made dirty in
/// the page cache), for [`Writeback`]; holes punched are not writes.
pub type Wrote<'a> = &'a dyn Fn(u64, u64);

/// Writes `data` at `offset` into a file that holds holes there, skipping
/// its all-zero 4 KiB blocks (at absolute offsets, so holes align with the
/// filesystem's), which stay holes.
pub fn write_sparse(
    file: &File,
    offset: u64,
    data: &[u8],
    wrote: Wrote<'_>,
) -> std::io::Result<()> {
    let block_end = |p: usize| {
        let abs = offset + p as u64;
        let next = ((abs / BLOCK as u64 + 1) * BLOCK as u64 - abs) as usize;
        (p + next).min(data.len())
    };
    let mut pos = 0usize;
    while pos < data.len() {
        // Extend a run of blocks of one kind as far as it goes: one write
        // per run of data.
        let zero = is_zero(&data[pos..block_end(pos)]);
        let mut run_end = block_end(pos);
        while run_end < data.len() && is_zero(&data[run_end..block_end(run_end)]) == zero {
            run_end = block_end(run_end);
        }
        if !zero {
            let at = offset + pos as u64;
            file.write_all_at(&data[pos..run_end], at)?;
            wrote(at, (run_end - pos) as u64);
        }
        pos = run_end;
    }
    Ok(())
}

pub fn punch_or_write_zeros(
    file: &File,
    offset: u64,
    len: u64,
    wrote: Wrote<'_>,
) -> std::io::Result<()> {
    match punch_hole(file, offset, len) {
        Ok(()) => Ok(()),
        Err(e) if !cannot_punch(&e) => Err(e),
        Err(_) => write_zeros(file, offset, len, wrote),
    }
}

/// Deallocates `[offset, offset + len)`; the file's size stays.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::FallocateFlags;
    rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(std::io::Error::from)
}

/// The file system or device has no hole punching: write zeros instead.
pub fn cannot_punch(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

pub fn write_zeros(file: &File, offset: u64, len: u64, wrote: Wrote<'_>) -> std::io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + pos)?;
        wrote(offset + pos, n as u64);
        pos += n as u64;
    }
    Ok(())
}

/// Makes `[offset, offset + len)` of a device read as zeros, touching only
/// the 4 KiB blocks (at absolute offsets) that are not zero yet: on a thin
/// volume, writing zeros over zeros would allocate what it meant to free.
pub fn zero_where_nonzero(
    file: &File,
    offset: u64,
    len: u64,
    wrote: Wrote<'_>,
) -> std::io::Result<()> {
    const STEP: u64 = 1 << 20;
    let end = offset + len;
    let mut buf = vec![0u8; STEP as usize];
    let mut pos = offset;
    while pos < end {
        let n = (end - pos).min(STEP) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        // Runs of non-zero blocks in this buffer, zeroed one run at a time.
        let mut run: Option<u64> = None;
        let mut b = pos;
        while b < pos + n as u64 {
            let next = ((b / BLOCK as u64 + 1) * BLOCK as u64).min(pos + n as u64);
            let nonzero = !is_zero(&buf[(b - pos) as usize..(next - pos) as usize]);
            match (nonzero, run) {
                (true, None) => run = Some(b),
                (false, Some(s)) => {
                    zero_device_range(file, s, b - s, wrote)?;
                    run = None;
                }
                _ => {}
            }
            b = next;
        }
        if let Some(s) = run {
            zero_device_range(file, s, b - s, wrote)?;
        }
        pos += n as u64;
    }
    Ok(())
}

/// Zeros a device range: its 4 KiB-aligned middle with `fallocate`
/// (PUNCH_HOLE: the device discards or zeroes it without data crossing the
/// bus, and a thin volume may free it) where the device supports that, the
/// rest, or all of it elsewhere, by writing zeros.
pub fn zero_device_range(
    file: &File,
    offset: u64,
    len: u64,
    wrote: Wrote<'_>,
) -> std::io::Result<()> {
    let b = BLOCK as u64;
    let end = offset + len;
    let (mid_start, mid_end) = (offset.div_ceil(b) * b, end / b * b);
    if mid_end <= mid_start {
        return write_zeros(file, offset, len, wrote);
    }
    write_zeros(file, offset, mid_start - offset, wrote)?;
    match punch_hole(file, mid_start, mid_end - mid_start) {
        Ok(()) => {}
        Err(e) if !cannot_punch(&e) => return Err(e),
        Err(_) => write_zeros(file, mid_start, mid_end - mid_start, wrote)?,
    }
    write_zeros(file, mid_end, end - mid_end, wrote)
}

/// A run of 4 KiB blocks (or the part of one at a chunk's edge) that must
/// change: new data, or bytes that must read as zeros. Offsets are absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Data { at: u64, bytes: &'a [u8] },
    Zero { at: u64, len: u64 },
}

impl Piece<'_> {
    pub fn at(&self) -> u64 {
        match self {
            Piece::Data { at, .. } | Piece::Zero { at, .. } => *at,
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            Piece::Data { bytes, .. } => bytes.len() as u64,
            Piece::Zero { len, .. } => *len,
        }
    }
}

/// What must be written so that `[offset, offset + data.len())` of `old`
/// holds `data`: the runs of 4 KiB blocks (absolute alignment) that differ
/// from what `old` holds there now, as data, or as zeros where the new
/// bytes are all zero. Past the end of `old` it counts as zeros, which is
/// what a file extended to its new size reads there.
///
/// This is what makes a write cost the change and not the chunk: a chunk
/// found nowhere whole is fetched or assembled whole, but usually differs
/// from the old one at its offset in a few blocks only (a rewritten page),
/// and only those reach the disk. The price is one read of the old bytes,
/// which is cheaper than writing them again on every kind of storage.
pub fn changes<'a>(old: &File, offset: u64, data: &'a [u8]) -> std::io::Result<Vec<Piece<'a>>> {
    let mut cur = vec![0u8; data.len()];
    let mut got = 0;
    while got < cur.len() {
        match old.read_at(&mut cur[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let block_end = |p: usize| {
        let abs = offset + p as u64;
        let next = ((abs / BLOCK as u64 + 1) * BLOCK as u64 - abs) as usize;
        (p + next).min(data.len())
    };
    #[derive(PartialEq, Clone, Copy)]
    enum Kind {
        Same,
        Zero,
        Data,
    }
    let kind = |p: usize, e: usize| {
        if data[p..e] == cur[p..e] {
            Kind::Same
        } else if is_zero(&data[p..e]) {
            Kind::Zero
        } else {
            Kind::Data
        }
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let k = kind(pos, block_end(pos));
        let mut end = block_end(pos);
        while end < data.len() && kind(end, block_end(end)) == k {
            end = block_end(end);
        }
        let at = offset + pos as u64;
        match k {
            Kind::Same => {}
            Kind::Zero => out.push(Piece::Zero {
                at,
                len: (end - pos) as u64,
            }),
            Kind::Data => out.push(Piece::Data {
                at,
                bytes: &data[pos..end],
            }),
        }
        pos = end;
    }
    Ok(out)
}

/// Writes `pieces` into `file`: data as it is, zeros by punching a hole (a
/// regular file) or by [`zero_device_range`] (`device`: the pieces came
/// from [`changes`], so those bytes are known not to be zero yet).
pub fn write_pieces(
    file: &File,
    pieces: &[Piece<'_>],
    device: bool,
    wrote: Wrote<'_>,
) -> std::io::Result<()> {
    for p in pieces {
        match *p {
            Piece::Data { at, bytes } => {
                file.write_all_at(bytes, at)?;
                wrote(at, bytes.len() as u64);
            }
            Piece::Zero { at, len } if device => zero_device_range(file, at, len, wrote)?,
            Piece::Zero { at, len } => punch_or_write_zeros(file, at, len, wrote)?,
        }
    }
    Ok(())
}

/// Copies the data of `[0, len)` of `from` into `to` at the same offsets,
/// leaving holes as holes; returns the bytes copied.
pub fn copy_data(from: &File, to: &File, len: u64) -> std::io::Result<u64> {
    use rustix::fs::{copy_file_range, seek, SeekFrom};
    let mut copied = 0;
    let mut pos = 0u64;
    while pos < len {
        let start = match seek(from, SeekFrom::Data(pos)) {
            Ok(s) => s.min(len),
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = seek(from, SeekFrom::Hole(start))
            .map_err(std::io::Error::from)?
            .min(len);
        let (mut at_in, mut at_out) = (start, start);
        while at_in < end {
            let want = (end - at_in) as usize;
            let n = copy_file_range(from, Some(&mut at_in), to, Some(&mut at_out), want)
                .map_err(std::io::Error::from)?;
            if n == 0 {
                break;
            }
            copied += n as u64;
        }
        pos = end;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::fs::OpenOptions;
    use std::os::unix::fs::MetadataExt;

    use crate::content::ranges::RangeSet;

    const MIB: u64 = 1 << 20;

    #[test]
    fn writeback_starts_once_enough_is_written_and_counts_afresh() {
        let mut wb = Writeback::default();
        // In order: nothing until 32 MiB, then exactly what was written.
        for k in 0..7 {
            assert_eq!(wb.note(k * 4 * MIB, 4 * MIB), None);
        }
        assert_eq!(wb.since, 28 * MIB);
        assert_eq!(wb.note(28 * MIB, 4 * MIB), Some((0, 32 * MIB)));
        assert_eq!(wb, Writeback::default());

        // Nothing written is nothing to note.
        assert_eq!(wb.note(5 * MIB, 0), None);
        assert_eq!(wb, Writeback::default());

        // Out of order: the range runs from the lowest to the highest byte,
        // whichever came first.
        assert_eq!(wb.note(100 * MIB, 16 * MIB), None);
        assert_eq!(wb.note(10 * MIB, 8 * MIB), None);
        assert_eq!((wb.lo, wb.hi, wb.since), (10 * MIB, 116 * MIB, 24 * MIB));
        assert_eq!(wb.note(50 * MIB, 8 * MIB), Some((10 * MIB, 116 * MIB)));
        assert_eq!(wb, Writeback::default());

        // One write bigger than the threshold starts at once, taking along
        // what was noted before it; then the count begins afresh.
        assert_eq!(wb.note(7, 3), None);
        assert_eq!(wb.note(7 + 3, 40 * MIB), Some((7, 10 + 40 * MIB)));
        assert_eq!(wb.note(200 * MIB, MIB), None);
        assert_eq!((wb.lo, wb.hi, wb.since), (200 * MIB, 201 * MIB, MIB));
    }

    #[test]
    fn writeback_ranges_cover_every_byte_written() {
        // Scattered writes of varying sizes, as from several threads: each
        // range started covers exactly the writes since the last one, and
        // starts as soon as they add up to the threshold, not before.
        let mut wb = Writeback::default();
        let mut pending: Vec<(u64, u64)> = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut starts = 0;
        for _ in 0..5000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let offset = (x >> 20) % (64 << 30);
            let len = 4096 + (x >> 8) % (256 << 10);
            pending.push((offset, offset + len));
            let total: u64 = pending.iter().map(|(s, e)| e - s).sum();
            match wb.note(offset, len) {
                None => assert!(total < WRITEBACK_EVERY, "{total}"),
                Some((lo, hi)) => {
                    assert!(total >= WRITEBACK_EVERY);
                    assert!(total - len < WRITEBACK_EVERY);
                    assert_eq!(lo, pending.iter().map(|r| r.0).min().unwrap());
                    assert_eq!(hi, pending.iter().map(|r| r.1).max().unwrap());
                    pending.clear();
                    starts += 1;
                }
            }
        }
        assert!(starts > 10, "{starts}");
    }

    #[test]
    fn zeroing_touches_only_blocks_that_are_not_zero() {
        // A regular file stands in for a device: what reads as zeros
        // already (here holes) must not be written, so it stays unallocated.
        let dir = tempfile::tempdir().unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("dev"))
            .unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[7u8; 10_000], (1 << 20) + 100).unwrap();
        f.write_all_at(&[5u8; 3], (3 << 20) - 1).unwrap();
        f.sync_all().unwrap();
        let noted = RefCell::new(RangeSet::default());
        let note = |at, n| noted.borrow_mut().insert(at, at + n);
        zero_where_nonzero(&f, 1, (4 << 20) - 2, &note).unwrap();
        // The aligned blocks were punched, not written: nothing for
        // writeback. The range starts at 1, so its 1 MiB steps split the
        // blocks at 1 MiB and 3 MiB; their unaligned parts were written.
        assert_eq!(
            noted.take().iter().collect::<Vec<_>>(),
            [(MIB + 1, MIB + 4096), (3 * MIB, 3 * MIB + 4096)]
        );
        f.sync_all().unwrap();
        let mut back = vec![1u8; 4 << 20];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(is_zero(&back));
        assert!(
            f.metadata().unwrap().blocks() * 512 <= 16 * 1024,
            "zeros written over zeros: {} bytes allocated",
            f.metadata().unwrap().blocks() * 512
        );

        // Unaligned ends are written, the aligned middle punched, and
        // nothing outside the range is touched.
        f.write_all_at(&[9u8; 20_000], 0).unwrap();
        zero_device_range(&f, 10, 19_980, &note).unwrap();
        // The unaligned ends were written.
        assert_eq!(
            noted.take().iter().collect::<Vec<_>>(),
            [(10, 4096), (16_384, 19_990)]
        );
        let mut back = vec![0u8; 20_000];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[..10], &[9u8; 10]);
        assert!(is_zero(&back[10..19_990]));
        assert_eq!(&back[19_990..], &[9u8; 10]);

        // Data with zero blocks, written as to a device: the zero blocks
        // over old data become zeros too.
        let mut data = vec![3u8; 64 * 1024];
        data[8192..40_960].fill(0);
        f.write_all_at(&vec![8u8; 128 * 1024], 0).unwrap();
        let pieces = changes(&f, 4096, &data).unwrap();
        write_pieces(&f, &pieces, true, &note).unwrap();
        assert_eq!(
            noted.take().iter().collect::<Vec<_>>(),
            [(4096, 12_288), (45_056, 69_632)]
        );
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn zero_blocks_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let mut data = vec![0u8; 256 * 1024];
        data[0] = 1;
        data[200 * 1024] = 2;
        let noted = RefCell::new(RangeSet::default());
        let note = |at, n| noted.borrow_mut().insert(at, at + n);
        write_sparse(&f, 4096, &data, &note).unwrap();
        // Only the two blocks of data were written.
        let two_blocks = [(4096, 8192), (208_896, 212_992)];
        assert_eq!(noted.take().iter().collect::<Vec<_>>(), two_blocks);
        f.sync_all().unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        // Two 4 KiB blocks of data, not 256 KiB.
        assert!(f.metadata().unwrap().blocks() * 512 <= 16 * 1024);

        // Over old data, zero blocks are punched: the file reads back
        // exactly and the old blocks are freed.
        let g = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("g"))
            .unwrap();
        g.write_all_at(&vec![9u8; 1 << 20], 0).unwrap();
        g.sync_all().unwrap();
        let pieces = changes(&g, 4096, &data).unwrap();
        write_pieces(&g, &pieces, false, &note).unwrap();
        assert_eq!(noted.take().iter().collect::<Vec<_>>(), two_blocks);
        g.sync_all().unwrap();
        let mut back = vec![0u8; data.len()];
        g.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        let alloc = g.metadata().unwrap().blocks() * 512;
        assert!(
            alloc <= (1 << 20) - 200 * 1024,
            "zero blocks not punched: {alloc}"
        );
    }

    #[test]
    fn changes_are_the_differing_blocks_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old");
        let mut old = vec![7u8; 64 * 1024];
        old[24_000] = 1;
        std::fs::write(&p, &old).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        // A chunk at 1000 (not block aligned) of 40 000 bytes: new bytes in
        // the block holding 9000 and in the one holding 30 000, zeros in the
        // block at 16 KiB, and the byte at 24 000 changed back to 7.
        let mut new = old[1000..41_000].to_vec();
        new[8000] = 9;
        new[29_000] = 9;
        for b in &mut new[16384 - 1000..20480 - 1000] {
            *b = 0;
        }
        new[24_000 - 1000] = 7;
        let got = changes(&f, 1000, &new).unwrap();
        let spans: Vec<(bool, u64, u64)> = got
            .iter()
            .map(|p| (matches!(p, Piece::Data { .. }), p.at(), p.len()))
            .collect();
        assert_eq!(
            spans,
            vec![
                (true, 8192, 4096),
                (false, 16384, 4096),
                (true, 20480, 4096),
                (true, 28672, 4096),
            ]
        );
        // Written back, the file holds exactly the new bytes there.
        let w = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        write_pieces(&w, &got, false, &|_, _| {}).unwrap();
        let now = std::fs::read(&p).unwrap();
        assert_eq!(&now[1000..41_000], &new[..]);
        assert_eq!(&now[..1000], &old[..1000]);
        assert_eq!(&now[41_000..], &old[41_000..]);
        // Nothing differs: nothing to write.
        assert!(changes(&w, 1000, &new).unwrap().is_empty());
    }

    #[test]
    fn past_the_end_counts_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old");
        std::fs::write(&p, [1u8; 4096]).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let mut new = vec![0u8; 3 * 4096];
        new[..4096].fill(1);
        new[2 * 4096] = 5;
        let got = changes(&f, 0, &new).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].at(), got[0].len()), (8192, 4096));
    }
}
