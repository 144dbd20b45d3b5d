//! What is sent: the source file, opened once, what must not change while
//! it is read ([`Stamp`]), and the options of the sending end.
//!
//! The source is a regular file or a block device. A device's size comes
//! from the device (its node's `st_size` is 0), and that size is all that is
//! checked for change: a device node's times say nothing about its content.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::content::chunk::ChunkParams;
use crate::content::hash::ChunkHash;
use crate::content::manifest::{Entry, Kind};
use crate::content::scan::{self, read_full};
use crate::error::{fail, Exit, WithExit};
use crate::wire::FileInfo;

/// The file being sent, opened once.
pub struct Source {
    pub file: File,
    pub path: PathBuf,
    pub info: FileInfo,
    stamp: Stamp,
}

/// What must not change while we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    /// A regular file: size, mtime, ctime.
    File {
        size: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
    },
    /// A block device: only its size means anything. The times of a device
    /// node say nothing about writes to the device, and would raise false
    /// alarms when they move for other reasons (a chmod, udev). A write to
    /// the device while it is read is caught only where a chunk is read
    /// twice (re-hashed when sent on request): read from a snapshot.
    Device { size: u64 },
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp::File {
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

impl Source {
    /// Opens the source `path`, after finishing any committed journal of
    /// it (a file that was the destination of an interrupted journaled
    /// write must not be read half applied), unless `read_only`: then such
    /// a file is refused ([`crate::dest::recover::before_reading`]).
    pub fn open(path: &Path, read_only: bool) -> Result<Source> {
        crate::dest::recover::before_reading(path, read_only)?;
        let file = File::open(path)
            .with_context(|| format!("cannot open source {}", path.display()))
            .exit_with(Exit::Io)?;
        Source::from_file(file, path)
    }

    /// A source already opened (by a confined server); `path` names it in
    /// messages. A regular file or a block device.
    pub fn from_file(file: File, path: &Path) -> Result<Source> {
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat source {}", path.display()))
            .exit_with(Exit::Io)?;
        if meta.is_dir() {
            return Err(fail(
                Exit::Io,
                format!(
                    "source {} is a directory; vmsync copies one file",
                    path.display()
                ),
            ));
        }
        if scan::is_block_device(&meta) {
            let size = scan::device_size(&file)
                .with_context(|| format!("cannot get the size of source device {}", path.display()))
                .exit_with(Exit::Io)?;
            // The node's mtime is not the content's: send the time the copy
            // is taken, so the destination file says when it was made and no
            // receiver's quick check (size + mtime) can match a stale copy.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            return Ok(Source {
                info: FileInfo {
                    size,
                    mtime_sec: now.as_secs() as i64,
                    mtime_nsec: now.subsec_nanos(),
                    // With its S_IFBLK type bits: the receiver skips the
                    // quick check for a device source.
                    mode: meta.mode(),
                },
                stamp: Stamp::Device { size },
                file,
                path: path.to_path_buf(),
            });
        }
        if !meta.is_file() {
            return Err(fail(
                Exit::Io,
                format!(
                    "source {} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        Ok(Source {
            info: FileInfo {
                size: meta.len(),
                mtime_sec: meta.mtime(),
                mtime_nsec: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
                mode: meta.mode(),
            },
            stamp: Stamp::of(&meta),
            file,
            path: path.to_path_buf(),
        })
    }

    /// A `--snapshot` clone, read in place of the source at `path`; `info`
    /// is the source's as of the clone. Nothing writes the clone, so its
    /// stamp holding is a formality.
    pub fn snapshot(file: File, path: &Path, info: FileInfo) -> Result<Source> {
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat the snapshot of {}", path.display()))
            .exit_with(Exit::Io)?;
        Ok(Source {
            info,
            stamp: Stamp::of(&meta),
            file,
            path: path.to_path_buf(),
        })
    }

    /// What a scanning thread needs: its own handle, the size, the name.
    pub(super) fn for_thread(&self) -> Result<(File, u64, PathBuf)> {
        let file = self
            .file
            .try_clone()
            .context("cannot duplicate the source file handle")?;
        Ok((file, self.info.size, self.path.clone()))
    }

    /// Fails with exit 7 if the stamp (see [`Stamp`]) moved since `open`.
    pub(super) fn check_unchanged(&self) -> Result<()> {
        let now = match self.stamp {
            Stamp::Device { .. } => Stamp::Device {
                size: scan::device_size(&self.file)
                    .with_context(|| {
                        format!(
                            "cannot get the size of source device {}",
                            self.path.display()
                        )
                    })
                    .exit_with(Exit::Io)?,
            },
            Stamp::File { .. } => Stamp::of(
                &self
                    .file
                    .metadata()
                    .with_context(|| format!("cannot stat source {}", self.path.display()))
                    .exit_with(Exit::Io)?,
            ),
        };
        if now != self.stamp {
            return Err(changed(&self.path));
        }
        Ok(())
    }
}

pub(super) fn changed(path: &Path) -> anyhow::Error {
    fail(
        Exit::SourceChanged,
        format!(
            "source {} changed while it was being read; sync from a snapshot (or stop the VM) and try again",
            path.display()
        ),
    )
}

#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    pub params: ChunkParams,
    /// zstd level; 0 sends chunks uncompressed.
    pub compress_level: u8,
    /// `--allow-changing-source`: send what the file holds now rather than
    /// fail with exit 7 when it changed since it was scanned.
    pub allow_changing: bool,
    /// `--check --sample K/N`: scan only slice K of N.
    pub sample: Option<(u32, u32)>,
}

/// Offset, length and hash of data entry `i`, or a protocol error for a
/// peer that asked for something that is not a data chunk of the manifest.
pub(super) fn data_entry(entries: &[Entry], i: u64) -> Result<(u64, u32, ChunkHash)> {
    match entries.get(i as usize) {
        Some(Entry {
            offset,
            kind: Kind::Data { len, hash },
        }) => Ok((*offset, *len, *hash)),
        _ => Err(fail(
            Exit::Protocol,
            format!(
                "protocol error: peer requested chunk {i}, which is not a data chunk of the manifest"
            ),
        )),
    }
}

/// Reads `len` bytes at `offset` of the source into `buf`.
pub(super) fn read_entry(src: &Source, offset: u64, len: u32, buf: &mut Vec<u8>) -> Result<()> {
    buf.resize(len as usize, 0);
    read_full(&src.file, buf, offset)
        .with_context(|| format!("reading source {}", src.path.display()))
}

/// Reads data entry `i` of the manifest into `buf` and re-checks its hash:
/// false when the source changed there since the scan.
pub(super) fn load(src: &Source, entries: &[Entry], i: u64, buf: &mut Vec<u8>) -> Result<bool> {
    let (offset, len, hash) = data_entry(entries, i)?;
    read_entry(src, offset, len, buf)?;
    Ok(ChunkHash::of(buf) == hash)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::error::exit_code_of;

    #[test]
    fn a_source_that_changes_while_read_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src");
        std::fs::write(&path, b"hello world").unwrap();
        let src = Source::open(&path, false).unwrap();
        assert_eq!(src.info.size, 11);
        src.check_unchanged().unwrap();
        let entries = [
            Entry {
                offset: 0,
                kind: Kind::Data {
                    len: 5,
                    hash: ChunkHash::of(b"hello"),
                },
            },
            Entry {
                offset: 5,
                kind: Kind::Zero { len: 6 },
            },
        ];
        let mut buf = Vec::new();
        assert!(load(&src, &entries, 0, &mut buf).unwrap());
        assert_eq!(buf, b"hello");
        assert_eq!(
            data_entry(&entries, 0).unwrap(),
            (0, 5, ChunkHash::of(b"hello"))
        );
        for bad in [1, 2] {
            let e = data_entry(&entries, bad).unwrap_err();
            assert_eq!(exit_code_of(&e), Exit::Protocol);
        }

        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"!").unwrap();
        let e = src.check_unchanged().unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::SourceChanged);
        std::fs::write(&path, b"jello world!").unwrap();
        assert!(
            !load(&src, &entries, 0, &mut buf).unwrap(),
            "the hash no longer matches"
        );
    }

    #[test]
    fn a_directory_is_not_a_source() {
        let dir = tempfile::tempdir().unwrap();
        let e = Source::open(dir.path(), false).err().expect("refused");
        assert_eq!(exit_code_of(&e), Exit::Io);
        assert!(format!("{e:#}").contains("is a directory"));
    }
}
