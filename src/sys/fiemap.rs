//! Which disk blocks hold a file: the `FS_IOC_FIEMAP` ioctl, which neither
//! rustix nor libc wraps.
//!
//! `--snapshot` tells what changed between two reflink clones of a source
//! by where their bytes live: a range both clones map to the same physical
//! blocks holds the same bytes (the older clone keeps those blocks from
//! being freed), a rewritten range was copied on write elsewhere. This
//! module only fetches the map; `source::extents` compares two of them.
//!
//! The map is fetched with `FIEMAP_FLAG_SYNC` (dirty data is written first,
//! so delayed allocations have their real blocks), [`BATCH`] extents per
//! call, until the kernel marks the last extent or has no more; a file with
//! more than [`MAX_EXTENTS`] extents is an error rather than gigabytes of
//! map. Errors, as `std::io::Error` by kind:
//! * [`ErrorKind::Unsupported`]: the filesystem (or file type) cannot map
//!   extents: the kernel said ENOTTY, EOPNOTSUPP, EINVAL or EBADR (a flag
//!   it does not know). The message keeps the kernel's error.
//! * [`ErrorKind::FileTooLarge`]: more than [`MAX_EXTENTS`] extents.
//! * [`ErrorKind::InvalidData`]: the kernel's answers did not advance.
//! * anything else as the kernel said it (EIO, EBADF, …).

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::io::AsRawFd;

/// `_IOWR('f', 11, struct fiemap)`; 0x20 is the header's size.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Flush dirty data before mapping.
const FIEMAP_FLAG_SYNC: u32 = 0x1;

/// The last extent of the file.
pub const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Where the data is, is not known yet.
pub const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
/// Delayed allocation: no blocks yet (also sets UNKNOWN).
pub const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
/// The data is stored transformed (btrfs compression): the physical range
/// is not the file's bytes one to one.
pub const FIEMAP_EXTENT_ENCODED: u32 = 0x8;
/// The data is encrypted (also sets ENCODED).
pub const FIEMAP_EXTENT_DATA_ENCRYPTED: u32 = 0x80;
/// The extent's offsets are not block-aligned.
pub const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
/// The data lives in the metadata (also sets NOT_ALIGNED).
pub const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;
/// Several files' tails packed in one block (also sets NOT_ALIGNED).
pub const FIEMAP_EXTENT_DATA_TAIL: u32 = 0x400;
/// Allocated but never written: reads as zeros.
pub const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
/// The filesystem has no extents; this is a run of blocks merged for the
/// report. The addresses are real.
pub const FIEMAP_EXTENT_MERGED: u32 = 0x1000;
/// The blocks are shared with another file (a clone, a snapshot).
pub const FIEMAP_EXTENT_SHARED: u32 = 0x2000;

/// Extents asked for per ioctl: 256 × 56 bytes of buffer.
pub const BATCH: usize = 256;
/// The most extents [`extents`] returns: 16 Mi is 512 MiB of [`Extent`]s
/// (some times that while two maps are compared), a 64 GiB
/// file cut into 4 KiB pieces. A file more broken up than that is read
/// whole instead.
pub const MAX_EXTENTS: usize = 16 << 20;

/// One extent: bytes `logical..logical + len` of the file are at disk (for
/// btrfs: filesystem) address `physical`; `flags` are FIEMAP_EXTENT_*.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    pub flags: u32,
}

/// `struct fiemap` of `<linux/fiemap.h>` with room for [`BATCH`] extents.
#[repr(C)]
struct Request {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    extents: [RawExtent; BATCH],
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

const ZERO: RawExtent = RawExtent {
    fe_logical: 0,
    fe_physical: 0,
    fe_length: 0,
    fe_reserved64: [0; 2],
    fe_flags: 0,
    fe_reserved: [0; 3],
};

/// Every extent of `file`, in the kernel's order (by logical offset).
pub fn extents(file: &File) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    each_batch(file, |batch| {
        out.extend_from_slice(batch);
        Ok(())
    })?;
    Ok(out)
}

/// Calls `each` with the extents of `file`, one batch (at most [`BATCH`])
/// at a time, for a caller that checks a map without keeping it.
pub fn each_batch(
    file: &File,
    mut each: impl FnMut(&[Extent]) -> io::Result<()>,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let mut req = Box::new(Request {
        fm_start: 0,
        fm_length: 0,
        fm_flags: 0,
        fm_mapped_extents: 0,
        fm_extent_count: BATCH as u32,
        fm_reserved: 0,
        extents: [ZERO; BATCH],
    });
    let mut batch = Vec::with_capacity(BATCH);
    let mut total = 0usize;
    let mut start = 0u64;
    loop {
        // The kernel writes the count and, on EBADR, the flags back.
        req.fm_start = start;
        req.fm_length = u64::MAX - start;
        req.fm_flags = FIEMAP_FLAG_SYNC;
        req.fm_mapped_extents = 0;
        req.fm_extent_count = BATCH as u32;
        // SAFETY: `req` is a `struct fiemap` (repr(C), the kernel's layout)
        // followed by the `fm_extent_count` extents the kernel may write,
        // and it outlives the call; `fd` is open for the call.
        let rc = unsafe { libc::ioctl(fd, FS_IOC_FIEMAP, &mut *req as *mut Request) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Asked from past the largest offset the filesystem has:
                // the previous batch ended there without saying "last".
                Some(libc::EFBIG) if start > 0 => Ok(()),
                Some(libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL | libc::EBADR) => Err(
                    io::Error::new(ErrorKind::Unsupported, format!("FIEMAP: {e}")),
                ),
                _ => Err(e),
            };
        }
        let got = &req.extents[..(req.fm_mapped_extents as usize).min(BATCH)];
        if got.is_empty() {
            return Ok(());
        }
        total += got.len();
        if total > MAX_EXTENTS {
            return Err(io::Error::new(
                ErrorKind::FileTooLarge,
                format!("more than {MAX_EXTENTS} extents"),
            ));
        }
        batch.clear();
        batch.extend(got.iter().map(|e| Extent {
            logical: e.fe_logical,
            physical: e.fe_physical,
            len: e.fe_length,
            flags: e.fe_flags,
        }));
        each(&batch)?;
        if got.iter().any(|e| e.fe_flags & FIEMAP_EXTENT_LAST != 0) {
            return Ok(());
        }
        let end = batch
            .iter()
            .map(|e| e.logical.saturating_add(e.len))
            .max()
            .unwrap_or(start);
        if end <= start {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("FIEMAP from offset {start} returned nothing past it"),
            ));
        }
        if end == u64::MAX {
            return Ok(());
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_structs_are_the_kernels_size() {
        // The header's size is encoded in the request number.
        let header = std::mem::size_of::<Request>() - BATCH * std::mem::size_of::<RawExtent>();
        assert_eq!(header, 32);
        assert_eq!((FS_IOC_FIEMAP >> 16) & 0x3fff, 32);
        assert_eq!(std::mem::size_of::<RawExtent>(), 56);
    }

    #[test]
    fn a_device_file_cannot_be_mapped() {
        let null = File::open("/dev/null").unwrap();
        let e = extents(&null).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    }

    #[test]
    fn a_file_maps_or_says_it_cannot() {
        // Wherever the temp dir is: tmpfs cannot map, a disk filesystem
        // maps the written bytes. The loop-mounted tests pin each case.
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 3 * 4096]).unwrap();
        match extents(&f) {
            Ok(map) => {
                let mapped: u64 = map.iter().map(|e| e.len).sum();
                assert!(mapped >= 3 * 4096, "{map:?}");
                assert!(
                    map.last().unwrap().flags & FIEMAP_EXTENT_LAST != 0,
                    "{map:?}"
                );
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}"),
        }
    }
}
