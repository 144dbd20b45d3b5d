//! Low-level writes into the output: runs of 4 KiB blocks written, holes
//! punched or zeros written, and early writeback.
//!
//! [`crate::dest::writer::Output`] decides *what* reaches the disk; this
//! module holds *how*: data is written in runs of whole 4 KiB blocks (at
//! absolute offsets, so holes align with the filesystem's), all-zero blocks
//! are skipped, punched or zeroed as [`ZeroBlocks`] says, and every
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

/// What [`write_sparse`] does with the all-zero blocks of what it writes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ZeroBlocks {
    /// Nothing: the file holds holes there already.
    Skip,
    /// Punch a hole (or write zeros), so a region that became zero frees
    /// its blocks.
    Punch,
    /// Zero only the blocks that do not read as zeros already (a device).
    IfNonZero,
}

/// Tells [`Output`] that `(offset, len)` bytes were written (made dirty in
/// the page cache), for [`Writeback`]; holes punched are not writes.
pub type Wrote<'a> = &'a dyn Fn(u64, u64);

/// Writes `data` at `offset`, treating its all-zero 4 KiB blocks (at
/// absolute offsets, so holes align with the filesystem's) as `zeros` says.
pub fn write_sparse(
    file: &File,
    offset: u64,
    data: &[u8],
    zeros: ZeroBlocks,
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
        // (or punch) per run.
        let zero = is_zero(&data[pos..block_end(pos)]);
        let mut run_end = block_end(pos);
        while run_end < data.len() && is_zero(&data[run_end..block_end(run_end)]) == zero {
            run_end = block_end(run_end);
        }
        let at = offset + pos as u64;
        let n = (run_end - pos) as u64;
        match (zero, zeros) {
            (false, _) => {
                file.write_all_at(&data[pos..run_end], at)?;
                wrote(at, n);
            }
            (true, ZeroBlocks::Skip) => {}
            (true, ZeroBlocks::Punch) => punch_or_write_zeros(file, at, n, wrote)?,
            (true, ZeroBlocks::IfNonZero) => zero_where_nonzero(file, at, n, wrote)?,
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
        write_sparse(&f, 4096, &data, ZeroBlocks::IfNonZero, &note).unwrap();
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
        write_sparse(&f, 4096, &data, ZeroBlocks::Skip, &note).unwrap();
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
        write_sparse(&g, 4096, &data, ZeroBlocks::Punch, &note).unwrap();
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
}
