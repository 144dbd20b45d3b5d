//! The state file kept beside a `--snapshot` clone: which clone it is (the
//! id the destination's receiver recorded), and how many runs it has seen.
//!
//! A clone is only a file; what makes it a base is knowing that the
//! destination holds its bytes. The receiver records the clone's id with the
//! destination ([`crate::dest::cache`]); this file records it with the clone,
//! and names the clone by device, inode, size and ctime, so a clone that was
//! replaced, rewritten or touched since (each moves one of them) is no base.
//!
//! # Layout (integers little-endian), exactly [`STATE_LEN`] bytes
//!
//! | offset | size | field                                                  |
//! |--------|------|--------------------------------------------------------|
//! | 0      | 8    | magic `VMSYNCSS`                                       |
//! | 8      | 4    | version ([`STATE_VERSION`])                            |
//! | 12     | 32   | the clone's id                                         |
//! | 44     | 8 × 3 | the clone's dev, ino, size                            |
//! | 68     | 8 + 8 | the clone's ctime: seconds, nanoseconds (i64)         |
//! | 84     | 8    | runs this chain of clones has seen (rotates the verify slice) |
//! | 92     | 32   | BLAKE3 of bytes 0..92                                  |
//!
//! Anything else (another length, version, magic or checksum) is damaged:
//! the next run reads the whole source, never trusts it.

use std::fs::{File, Metadata};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};

use crate::error::{Exit, WithExit};
use crate::wire::messages::SnapshotId;

pub const STATE_VERSION: u32 = 1;
/// The only length a state file has.
pub const STATE_LEN: usize = 124;
const MAGIC: &[u8; 8] = b"VMSYNCSS";
const BODY: usize = STATE_LEN - 32;

/// What a state file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub id: SnapshotId,
    pub clone: Identity,
    pub runs: u64,
}

/// Which file a clone is, and that it was not written since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub ctime: (i64, i64),
}

impl Identity {
    pub fn of(m: &Metadata) -> Identity {
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

impl State {
    pub fn encode(&self) -> [u8; STATE_LEN] {
        let mut b = Vec::with_capacity(STATE_LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        b.extend_from_slice(&self.id);
        for v in [self.clone.dev, self.clone.ino, self.clone.size] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.clone.ctime.0.to_le_bytes());
        b.extend_from_slice(&self.clone.ctime.1.to_le_bytes());
        b.extend_from_slice(&self.runs.to_le_bytes());
        let sum = *blake3::hash(&b).as_bytes();
        b.extend_from_slice(&sum);
        b.try_into().expect("the layout's length")
    }

    /// `None` when `bytes` are not an intact state file.
    pub fn decode(bytes: &[u8]) -> Option<State> {
        if bytes.len() != STATE_LEN
            || &bytes[..8] != MAGIC
            || bytes[8..12] != STATE_VERSION.to_le_bytes()
            || blake3::hash(&bytes[..BODY]).as_bytes() != &bytes[BODY..]
        {
            return None;
        }
        let u = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        Some(State {
            id: bytes[12..44].try_into().unwrap(),
            clone: Identity {
                dev: u(44),
                ino: u(52),
                size: u(60),
                ctime: (u(68) as i64, u(76) as i64),
            },
            runs: u(84),
        })
    }
}

/// What a state file was found to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Missing,
    /// Unreadable, or not an intact state file.
    Damaged,
    Intact(State),
}

/// What the state file at `path` holds.
pub fn read(path: &Path) -> Found {
    match std::fs::read(path) {
        Ok(b) => State::decode(&b).map_or(Found::Damaged, Found::Intact),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Found::Missing,
        Err(_) => Found::Damaged,
    }
}

/// Writes `state` to `path` durably: a temp file beside it, fsynced, then
/// renamed over it (the caller fsyncs the directory).
pub fn write(path: &Path, state: &State) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".vmsync-state")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))
        .exit_with(Exit::Io)?;
    tmp.write_all(&state.encode())
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
        .exit_with(Exit::Io)?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))
        .exit_with(Exit::Io)?;
    Ok(())
}

/// The identity of the open clone `file`.
pub fn identity(file: &File) -> Result<Identity> {
    Ok(Identity::of(
        &file.metadata().context("cannot stat the snapshot")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            id: [5; 32],
            clone: Identity {
                dev: 1,
                ino: 2,
                size: 3,
                ctime: (-4, 999_999_999),
            },
            runs: 7,
        }
    }

    #[test]
    fn round_trips_and_refuses_any_damage() {
        let s = state();
        let b = s.encode();
        assert_eq!(State::decode(&b), Some(s));
        for i in 0..STATE_LEN {
            let mut d = b;
            d[i] ^= 0x10;
            assert_eq!(State::decode(&d), None, "byte {i}");
        }
        assert_eq!(State::decode(&b[..STATE_LEN - 1]), None);
        let mut long = b.to_vec();
        long.push(0);
        assert_eq!(State::decode(&long), None);
    }

    #[test]
    fn reads_missing_damaged_and_written_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        assert_eq!(read(&p), Found::Missing);
        std::fs::write(&p, b"junk").unwrap();
        assert_eq!(read(&p), Found::Damaged);
        write(&p, &state()).unwrap();
        assert_eq!(read(&p), Found::Intact(state()));
    }
}
