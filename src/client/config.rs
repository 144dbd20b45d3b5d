//! The settings of one run, validated (by `app::config` from the command
//! line, or by a library user): what the client needs to start the other end
//! and drive the roles.

use crate::client::spawn::Operand;
use crate::content::chunk::ChunkParams;

/// One sync or check, ready to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub src: Operand,
    pub dst: Operand,
    pub params: ChunkParams,
    /// zstd level, 0 = off.
    pub compress_level: u8,
    pub check: bool,
    pub verify: bool,
    /// How an existing destination is written (`--write-mode`, `--inplace`).
    pub write_mode: crate::wire::WriteMode,
    /// `--state-dir`, passed on to a remote receiver.
    pub state_dir: Option<std::path::PathBuf>,
    pub checksum: bool,
    pub no_partial: bool,
    /// The remote shell command, split into words.
    pub rsh: Vec<String>,
    pub remote_path: String,
    pub stats: bool,
    pub json: bool,
    pub quiet: bool,
    /// `--timeout` in seconds; 0 = none.
    pub timeout_secs: u32,
    /// `--bwlimit` in bytes/s; 0 = none.
    pub bwlimit: u64,
    pub dry_run: bool,
    /// `--seed` paths, on the receiving side's host.
    pub seeds: Vec<std::ffi::OsString>,
    /// `--sample K/N`.
    pub sample: Option<(u32, u32)>,
    pub allow_changing_source: bool,
    /// `--snapshot` and its options; applied by whichever end sends.
    pub snapshot: Option<crate::source::snapshot::SnapshotOptions>,
    /// `-r`: SRC is a tree.
    pub recursive: bool,
    /// `--delete` (with `-r`).
    pub delete: bool,
    /// `--include`/`--exclude` (and the patterns of `--include-from` and
    /// `--exclude-from`), in command-line order.
    pub filters: Vec<crate::wire::FilterRule>,
    /// `--files-from`: the only tree-relative paths a recursive run syncs.
    pub files_from: Option<Vec<Vec<u8>>>,
    /// What `-r` keeps beyond contents, modes, times, owners and symlinks.
    pub tree: TreeOptions,
    /// Draw progress bars (on a terminal): not with `-q`, `--json` or
    /// `--info=progress0`.
    pub progress: bool,
    /// `-i`: one line per changed entry, as rsync's `--itemize-changes`.
    pub itemize: bool,
}

/// What a recursive run keeps beyond regular files, directories and
/// symlinks with their contents, modes, times and (as root) owners, which
/// it always keeps. rsync's options of the same names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeOptions {
    /// `-H`: files that are one inode in the source are one at the destination.
    pub hard_links: bool,
    /// `-X`: extended attributes (`user.*`; every namespace but `system.*` as root).
    pub xattrs: bool,
    /// `-A`: POSIX ACLs (`system.posix_acl_access`, `system.posix_acl_default`).
    pub acls: bool,
    /// `--devices`: character and block device nodes.
    pub devices: bool,
    /// `--specials`: fifos and sockets.
    pub specials: bool,
    /// `-x`: directories on another filesystem than the tree's root are made, not entered.
    pub one_file_system: bool,
}
