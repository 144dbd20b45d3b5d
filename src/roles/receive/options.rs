//! What the receiver is told to do: its options and the `--seed` files.
//!
//! Its own file (re-exported by the folder's `mod.rs`) so that every phase
//! can take them without importing the folder's top.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::content::chunk::ChunkParams;
use crate::error::{Exit, WithExit};
use crate::wire::{Options, WriteMode};

#[derive(Debug, Clone, Copy, Default)]
pub struct RecvOptions {
    pub params: ChunkParams,
    /// Compare only; write nothing.
    pub check: bool,
    /// How an existing destination is written.
    pub write_mode: WriteMode,
    /// Skip the quick check (size + mtime).
    pub checksum: bool,
    /// Re-read the written file before committing it.
    pub verify: bool,
    /// Neither resume from nor leave a partial file.
    pub no_partial: bool,
    /// The process umask, for the mode of a new file.
    pub umask: u32,
    /// `-n`: compare and count what would be sent; write nothing.
    pub dry_run: bool,
    /// Accept chunks whose content changed since the manifest (`CHUNK`
    /// with the changed bit), hashing them here.
    pub allow_changing: bool,
    /// `--check --sample K/N`.
    pub sample: Option<(u32, u32)>,
}

impl RecvOptions {
    /// The receiver's options from what travels in `OPEN` (the server) or
    /// the same [`Options`] built locally (a pull).
    pub fn new(o: &Options, params: ChunkParams, umask: u32, sample: Option<(u32, u32)>) -> Self {
        RecvOptions {
            params,
            check: o.check,
            write_mode: o.write_mode,
            checksum: o.checksum,
            verify: o.verify,
            no_partial: o.no_partial,
            umask,
            dry_run: o.dry_run,
            allow_changing: o.allow_changing,
            sample,
        }
    }
}

/// A `--seed` file: more chunks to take from, only ever read.
pub struct Seed {
    pub file: File,
    pub path: PathBuf,
}

impl Seed {
    pub fn open(path: &Path) -> Result<Seed> {
        let file = File::open(path)
            .with_context(|| format!("cannot open seed {}", path.display()))
            .exit_with(Exit::Io)?;
        Ok(Seed::from_file(file, path))
    }

    /// A seed opened already (by a confined server).
    pub fn from_file(file: File, path: &Path) -> Seed {
        Seed {
            file,
            path: path.to_path_buf(),
        }
    }
}
