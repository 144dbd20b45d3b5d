//! The wire protocol between the two ends: handshake, frames and messages.
//!
//! Both ends speak it over any byte pipe: `ssh host vmsync --server` in
//! production, a local child's pipes for local-to-local syncs. Nothing on
//! this channel is trusted: every length is checked against a hard limit
//! before anything is allocated for it, and every message must be consumed
//! exactly, with no trailing bytes.
//!
//! # Handshake
//!
//! Each end writes its hello at once, then reads the peer's. The versions
//! must be equal; a mismatch names both.
//!
//! | offset | size | field                                        |
//! |--------|------|----------------------------------------------|
//! | 0      | 8    | magic `VMSYNC\r\n` (catches line-ending mangling and shell noise) |
//! | 8      | 4    | protocol version, u32 LE ([`PROTOCOL_VERSION`]) |
//! | 12     | 4    | feature flags, u32 LE (none defined; must be ignored if unknown) |
//!
//! # Frames
//!
//! | offset | size  | field                                             |
//! |--------|-------|---------------------------------------------------|
//! | 0      | 4     | length L of type + payload, u32 LE, 1 ≤ L ≤ [`MAX_FRAME`] |
//! | 4      | 1     | message type                                      |
//! | 5      | L − 1 | payload                                           |
//!
//! # Messages (integers little-endian; `bytes` = u32 length + that many bytes)
//!
//! | type | name           | direction     | payload |
//! |------|----------------|---------------|---------|
//! | 1    | `OPEN`         | client→server | role u8 (0 server sends, 1 server receives, 2 server lists its tree, 3 server applies operations to its tree), flags u32, compress level u8, chunking u32 (see `ChunkParams::code`), path bytes, source name bytes, timeout seconds u32 (0 = none; ≤ [`MAX_TIMEOUT`]), bandwidth limit bytes/s u64 (0 = none), sample k u32 and n u32 (0, 0 = whole file; else 1 ≤ k ≤ n ≤ [`MAX_SAMPLE`]), seed count u32 (≤ [`MAX_SEEDS`]) × seed path bytes |
//! | 2    | `ERROR`        | either        | exit code u8, message bytes (UTF-8, ≤ 64 KiB) |
//! | 3    | `FILE_INFO`    | sender→recv   | size u64, mtime seconds i64, mtime nanoseconds u32, mode u32 (full `st_mode`: `S_IFBLK` marks a block device source, never quick-checked, whose mtime is the time of the copy) |
//! | 4    | `START`        | recv→sender   | u8: 0 = send the manifest, 1 = up to date (quick check), 2 = send the manifest with every data chunk inline (nothing to reuse) |
//! | 5    | `MANIFEST`     | sender→recv   | a manifest batch, see [`crate::content::manifest`] |
//! | 6    | `MANIFEST_END` | sender→recv   | entry count u64, file digest (32 bytes), flags u8 (1: the source changed while it was scanned and `ALLOW_CHANGING` lets it be committed) |
//! | 7    | `REQUEST`      | recv→sender   | count u32 (1 ≤ n ≤ [`MAX_REQUEST`]), n entry indices u64 |
//! | 8    | `CHUNK`        | sender→recv   | entry index u64, raw length u32, encoding u8 (bit 0: the connection's zstd stream, one or more frames in sequence, flushed at the end of each payload; bit 1: only the pieces asked for, concatenated; bit 2: the source changed since the manifest, this is the chunk's new content, to be hashed by the receiver: only with `ALLOW_CHANGING`), payload |
//! | 9    | `DONE`         | recv→sender   | see [`Summary`] |
//! | 10   | `BLOCK_REQUEST`| recv→sender   | count u32 (1 ≤ n ≤ [`MAX_REQUEST`]), n entry indices u64: send piece hashes |
//! | 11   | `BLOCK_HASHES` | sender→recv   | entry index u64, count u32 (≤ [`MAX_PIECES`]), count × 8-byte piece hash |
//! | 12   | `PIECE_REQUEST`| recv→sender   | entry index u64, piece count u32 (≤ [`MAX_PIECES`]), bitmap of ⌈count/8⌉ bytes: pieces to send |
//! | 13   | `KEEPALIVE`    | either        | empty: "still here, busy"; skipped by [`FrameReader::read_msg`] |
//! | 14   | `LIST`         | client→server | after `OPEN` with role 2: flags u32 (1 = a missing path is an empty listing, not an error), rule count u32 (≤ [`MAX_RULES`]) × (exclude u8: 0 include, 1 exclude; pattern bytes, 1 to [`MAX_PATTERN`] bytes of UTF-8) |
//! | 15   | `ENTRIES`      | server→client | count u32 (1 ≤ n ≤ [`MAX_LIST_BATCH`]) × entry: kind u8 (0 file, 1 directory, 2 symlink, 3 other: fifo, socket, device; 4 unreadable), path bytes (relative, see below), size u64, mtime seconds i64, mtime nanoseconds u32 (< 10⁹), mode u32 (full `st_mode`, type bits matching the kind for 0–2), uid u32, gid u32, target bytes (≤ [`MAX_PATH`]: the link text of a symlink, never empty; why, for an unreadable entry; empty for the others) |
//! | 16   | `LIST_END`     | server→client | entry count u64 (≤ [`MAX_ENTRIES`]): how many entries the `ENTRIES` carried |
//! | 17   | `APPLY`        | client→server | after `OPEN` with role 3: count u32 (1 ≤ n ≤ [`MAX_OPS`]) × op: code u8, path bytes (relative to `OPEN`'s path, see below; empty = that directory itself, for `MKDIR` and `ATTRS` only), then by code: 0 `MKDIR` mode u32 (≤ 0o7777); 1 `SYMLINK` target bytes (1 to [`MAX_PATH`], no NUL); 2 `ATTRS` which u8 (1 mode, 2 owner, 4 mtime; not 0), mode u32 (≤ 0o7777), uid u32, gid u32, mtime seconds i64, mtime nanoseconds u32 (< 10⁹); 3 `DELETE` nothing |
//! | 18   | `APPLIED`      | server→client | count u32 (1 ≤ n ≤ [`MAX_OPS`], one per op of the `APPLY` it answers, in order) × (status u8: 0 done, else the exit code of the op's failure; message bytes, ≤ [`MAX_OP_MESSAGE`] bytes of UTF-8: the failure, or with status 0 a warning or nothing) |
//! | 19   | `END`          | client→server | empty: no more `APPLY`; the server exits |
//! | 20   | `PIECES`       | recv→sender   | count u32 (≤ [`MAX_PIECE_REFS`]) × 16-byte digest of a piece of the receiver's cached manifest (see [`crate::content::manifest`]); optional, only right before `START` `0` |
//! | 21   | `MANIFEST_REF` | sender→recv   | piece index u32 into the receiver's `PIECES`: "these entries come next" |
//!
//! A relative path in `ENTRIES` and `APPLY` is at most [`MAX_PATH`] bytes of
//! `/`-separated names, none empty, `.` or `..`, with no NUL, no leading
//! and no trailing `/`: it cannot name anything outside the directory it is
//! relative to. Only the first entry of a listing has the empty path (the
//! listed path itself).
//!
//! A run: hello both ways; `OPEN`; the sender sends `FILE_INFO`; the
//! receiver answers `START`; the sender streams `MANIFEST`…`MANIFEST_END`
//! while the receiver streams `REQUEST`s and the sender answers each index
//! with a `CHUNK`; for a chunk it lacks but may partly hold (see
//! [`crate::content::refine`]) it asks `BLOCK_REQUEST`, gets `BLOCK_HASHES`, and
//! answers `PIECE_REQUEST` for the pieces it did not find, which come back
//! as a `CHUNK` carrying only those pieces; the receiver ends with `DONE`. `ERROR` may come at any
//! point and ends the run with its exit code.
//!
//! `-r` adds two roles. List (role 2): the client sends `LIST` with the
//! `--include`/`--exclude` rules; the server walks its path without
//! following symlinks and streams `ENTRIES`, the path itself first, each
//! directory before what it holds, then `LIST_END`. Apply (role 3): the
//! client sends batches of operations on the server's tree as `APPLY`, each
//! answered by `APPLIED`, then `END`. Files themselves travel in ordinary
//! runs, one per file.
//!
//! With `--timeout T` (sent in `OPEN`), each end treats T seconds without a
//! byte from the other as a dead peer, and sends `KEEPALIVE` whenever it has
//! written nothing for T/4 (while it indexes a large basis, fsyncs, or
//! verifies), so only a peer that is truly gone or stuck trips the timeout.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::content::hash::{ChunkHash, HASH_LEN};
use crate::content::refine::{PieceHash, MAX_PIECES, PIECE_HASH_LEN};
use crate::error::{fail, Exit};

/// Version of this protocol; bump on any change to the tables above.
pub const PROTOCOL_VERSION: u32 = 2;
/// Magic at the start of a hello.
pub const MAGIC: &[u8; 8] = b"VMSYNC\r\n";
/// Largest frame (type + payload) either end accepts or sends.
pub const MAX_FRAME: usize = 8 << 20;
/// Most indices in one `REQUEST`.
pub const MAX_REQUEST: usize = 65536;
/// Longest path or source name in `OPEN`.
pub const MAX_PATH: usize = 4096;
/// Longest error message.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most `--seed` files in `OPEN`.
pub const MAX_SEEDS: usize = 64;
/// Largest N of `--sample K/N`.
pub const MAX_SAMPLE: u32 = 1_000_000;
/// Longest `--timeout`, in seconds (a day).
pub const MAX_TIMEOUT: u32 = 86_400;
/// Most piece digests in `PIECES` (4 MiB; a piece is about 64 chunks).
pub const MAX_PIECE_REFS: usize = 1 << 18;
/// Most difference ranges listed in `DONE` (the total is always exact).
pub const MAX_RANGES: usize = 4096;
/// Most `--include`/`--exclude` rules in `LIST`.
pub const MAX_RULES: usize = 256;
/// Longest `--include`/`--exclude` pattern.
pub const MAX_PATTERN: usize = 1024;
/// Most entries in one `ENTRIES` (at most ~8 KiB each: well inside a frame).
pub const MAX_LIST_BATCH: usize = 512;
/// Most entries in a listing: directories of disk images hold few files,
/// and the client keeps the whole listing in memory.
pub const MAX_ENTRIES: u64 = 1 << 20;
/// Most operations in one `APPLY` (at most ~8 KiB each).
pub const MAX_OPS: usize = 512;
/// Longest message about one operation in `APPLIED`.
pub const MAX_OP_MESSAGE: usize = 1024;

const T_OPEN: u8 = 1;
const T_ERROR: u8 = 2;
const T_FILE_INFO: u8 = 3;
const T_START: u8 = 4;
const T_MANIFEST: u8 = 5;
const T_MANIFEST_END: u8 = 6;
const T_REQUEST: u8 = 7;
const T_CHUNK: u8 = 8;
const T_DONE: u8 = 9;
const T_BLOCK_REQUEST: u8 = 10;
const T_BLOCK_HASHES: u8 = 11;
const T_PIECE_REQUEST: u8 = 12;
const T_KEEPALIVE: u8 = 13;
const T_LIST: u8 = 14;
const T_ENTRIES: u8 = 15;
const T_LIST_END: u8 = 16;
const T_APPLY: u8 = 17;
const T_APPLIED: u8 = 18;
const T_END: u8 = 19;
const T_PIECES: u8 = 20;
const T_MANIFEST_REF: u8 = 21;

/// `CHUNK` encoding bits.
const ENC_ZSTD: u8 = 1;
const ENC_PIECES: u8 = 2;
const ENC_CHANGED: u8 = 4;

/// Which end the server plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The server reads its file and sends it.
    Send,
    /// The server receives into its file.
    Receive,
    /// The server lists the tree at its path (`-r`).
    List,
    /// The server applies operations to the tree at its path (`-r`).
    Apply,
}

/// `LIST` flags.
pub mod list_flags {
    /// A path that does not exist is an empty listing, not an error (a
    /// destination not created yet).
    pub const MISSING_OK: u32 = 1;
    pub const ALL: u32 = MISSING_OK;
}

/// An `--include` or `--exclude` rule, as sent in `LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRule {
    pub exclude: bool,
    pub pattern: String,
}

/// What a listed entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A fifo, socket or device: listed, never copied.
    Other,
    /// Could not be read (a directory without permission): its `target`
    /// says why. A listing with one is incomplete.
    Unreadable,
}

/// One entry of a listing (`ENTRIES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub kind: EntryKind,
    /// Relative to the listed path; empty for the path itself.
    pub path: Vec<u8>,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Full `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// A symlink's text, or why an entry is unreadable; else empty.
    pub target: Vec<u8>,
}

/// `ATTRS` bits: which attributes to set.
pub mod attrs {
    pub const MODE: u8 = 1;
    /// Owner and group; applied only by a server running as root.
    pub const OWNER: u8 = 2;
    pub const MTIME: u8 = 4;
    pub const ALL: u8 = MODE | OWNER | MTIME;
}

/// One operation on the server's tree (`APPLY`). Paths are relative to
/// the `OPEN` path and never lead out of it; no operation follows a
/// symlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a directory (replacing a symlink in the way); an existing
    /// directory is left as it is.
    Mkdir { path: Vec<u8>, mode: u32 },
    /// Make `path` a symlink to `target`, replacing a file or link there.
    Symlink { path: Vec<u8>, target: Vec<u8> },
    /// Set the attributes that `which` ([`attrs`]) names.
    Attrs {
        path: Vec<u8>,
        which: u8,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime_sec: i64,
        mtime_nsec: u32,
    },
    /// Remove a file, a symlink or an empty directory.
    Delete { path: Vec<u8> },
}

impl Op {
    pub fn path(&self) -> &[u8] {
        match self {
            Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Attrs { path, .. }
            | Op::Delete { path } => path,
        }
    }
}

/// How one operation went (`APPLIED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpResult {
    /// 0 done, else the exit code of its failure.
    pub status: u8,
    /// The failure, or a warning (status 0), or empty.
    pub message: String,
}

/// Whether `p` is a relative path that cannot leave the directory it is
/// relative to (see the module doc); `allow_empty` for the directory itself.
pub fn valid_rel_path(p: &[u8], allow_empty: bool) -> bool {
    if p.is_empty() {
        return allow_empty;
    }
    p.len() <= MAX_PATH
        && !p.contains(&0)
        && p.split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// How the receiver wants the run to go (`START`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Send the manifest; I will request what I lack.
    Manifest,
    /// Quick check: the destination is up to date; nothing follows but `DONE`.
    UpToDate,
    /// I hold nothing of this file: send every data chunk right after the
    /// manifest batch that lists it, unasked.
    Inline,
}

/// Option bits in `OPEN`.
pub mod flags {
    pub const CHECK: u32 = 1;
    pub const INPLACE: u32 = 2;
    pub const CHECKSUM: u32 = 4;
    pub const VERIFY: u32 = 8;
    pub const NO_PARTIAL: u32 = 16;
    /// Two bits: the client's `-v` level, for the server's log lines.
    pub const VERBOSE_SHIFT: u32 = 5;
    pub const VERBOSE: u32 = 3 << VERBOSE_SHIFT;
    /// `-n`: compare and count, write nothing.
    pub const DRY_RUN: u32 = 1 << 7;
    /// `--allow-changing-source`: commit a source that changed while read.
    pub const ALLOW_CHANGING: u32 = 1 << 8;
    pub const ALL: u32 =
        CHECK | INPLACE | CHECKSUM | VERIFY | NO_PARTIAL | VERBOSE | DRY_RUN | ALLOW_CHANGING;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub role: Role,
    pub flags: u32,
    pub compress_level: u8,
    pub chunking: u32,
    /// The server's path, raw bytes (Unix paths are bytes).
    pub path: Vec<u8>,
    /// File name of the source, for a destination that is a directory.
    pub source_name: Vec<u8>,
    /// Seconds of silence after which either end gives up; 0 = never.
    pub timeout_secs: u32,
    /// The server's cap on its own sending rate, bytes/s; 0 = none.
    pub bwlimit: u64,
    /// `--sample K/N`: check only slice K of N; `None` = the whole file.
    pub sample: Option<(u32, u32)>,
    /// `--seed` files on the receiving end, extra sources of chunks.
    pub seeds: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub mode: u32,
}

/// What the receiver reports at the end.
///
/// `DONE` payload: flags u8 (1 up to date, 2 identical, 4 verified, 8 basis
/// chunk list taken from the manifest cache, 16 the source changed while read
/// and was committed anyway, 32 dry run: nothing written),
/// source size u64, reused u64, literal u64, zero u64, differing bytes u64,
/// checked bytes u64 (what `--check` compared: the file, or its sample), total range
/// count u64, listed count u32 (≤ [`MAX_RANGES`]), listed × (offset u64, length u64).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub up_to_date: bool,
    pub identical: bool,
    pub verified: bool,
    pub basis_cached: bool,
    /// The source changed while it was read, and was committed anyway.
    pub source_changed: bool,
    /// `--dry-run`: the counts say what would have been done.
    pub dry_run: bool,
    pub source_bytes: u64,
    pub reused_bytes: u64,
    pub literal_bytes: u64,
    pub zero_bytes: u64,
    pub differing_bytes: u64,
    /// Bytes `--check` compared (less than the size with `--sample`).
    pub checked_bytes: u64,
    pub range_count: u64,
    pub ranges: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Open(Open),
    Error {
        exit: u8,
        message: String,
    },
    FileInfo(FileInfo),
    Start(StartMode),
    Manifest(Vec<u8>),
    ManifestEnd {
        count: u64,
        digest: ChunkHash,
        /// The source changed during the scan (`--allow-changing-source`).
        source_changed: bool,
    },
    Request(Vec<u64>),
    Chunk(ChunkMsg),
    Done(Summary),
    BlockRequest(Vec<u64>),
    BlockHashes {
        index: u64,
        hashes: Vec<PieceHash>,
    },
    PieceRequest {
        index: u64,
        count: u32,
        bitmap: Vec<u8>,
    },
    KeepAlive,
    List {
        flags: u32,
        rules: Vec<FilterRule>,
    },
    Entries(Vec<ListEntry>),
    ListEnd(u64),
    Apply(Vec<Op>),
    Applied(Vec<OpResult>),
    End,
    Pieces(Vec<crate::content::manifest::PieceDigest>),
    ManifestRef(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMsg {
    pub index: u64,
    pub raw_len: u32,
    pub compressed: bool,
    /// Only the requested pieces, concatenated, not the whole chunk.
    pub pieces: bool,
    /// The source changed under this chunk since its manifest entry: the
    /// payload is its new content (`--allow-changing-source` only).
    pub changed: bool,
    pub payload: Vec<u8>,
}

impl Msg {
    fn name(&self) -> &'static str {
        match self {
            Msg::Open(_) => "OPEN",
            Msg::Error { .. } => "ERROR",
            Msg::FileInfo(_) => "FILE_INFO",
            Msg::Start(_) => "START",
            Msg::Manifest(_) => "MANIFEST",
            Msg::ManifestEnd { .. } => "MANIFEST_END",
            Msg::Request(_) => "REQUEST",
            Msg::Chunk(_) => "CHUNK",
            Msg::Done(_) => "DONE",
            Msg::BlockRequest(_) => "BLOCK_REQUEST",
            Msg::BlockHashes { .. } => "BLOCK_HASHES",
            Msg::PieceRequest { .. } => "PIECE_REQUEST",
            Msg::KeepAlive => "KEEPALIVE",
            Msg::List { .. } => "LIST",
            Msg::Entries(_) => "ENTRIES",
            Msg::ListEnd(_) => "LIST_END",
            Msg::Apply(_) => "APPLY",
            Msg::Applied(_) => "APPLIED",
            Msg::End => "END",
            Msg::Pieces(_) => "PIECES",
            Msg::ManifestRef(_) => "MANIFEST_REF",
        }
    }

    /// An error naming a message that came when another was due.
    pub fn unexpected(&self, wanted: &str) -> anyhow::Error {
        fail(
            Exit::Protocol,
            format!(
                "protocol error: expected {wanted}, peer sent {}",
                self.name()
            ),
        )
    }

    /// Encodes type + payload into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        match self {
            Msg::Open(o) => {
                out.push(T_OPEN);
                out.push(match o.role {
                    Role::Send => 0,
                    Role::Receive => 1,
                    Role::List => 2,
                    Role::Apply => 3,
                });
                out.extend_from_slice(&o.flags.to_le_bytes());
                out.push(o.compress_level);
                out.extend_from_slice(&o.chunking.to_le_bytes());
                put_bytes(out, &o.path);
                put_bytes(out, &o.source_name);
                out.extend_from_slice(&o.timeout_secs.to_le_bytes());
                out.extend_from_slice(&o.bwlimit.to_le_bytes());
                let (k, n) = o.sample.unwrap_or((0, 0));
                out.extend_from_slice(&k.to_le_bytes());
                out.extend_from_slice(&n.to_le_bytes());
                out.extend_from_slice(&(o.seeds.len() as u32).to_le_bytes());
                for seed in &o.seeds {
                    put_bytes(out, seed);
                }
            }
            Msg::Error { exit, message } => {
                out.push(T_ERROR);
                out.push(*exit);
                let m = message.as_bytes();
                put_bytes(out, &m[..m.len().min(MAX_MESSAGE)]);
            }
            Msg::FileInfo(f) => {
                out.push(T_FILE_INFO);
                out.extend_from_slice(&f.size.to_le_bytes());
                out.extend_from_slice(&f.mtime_sec.to_le_bytes());
                out.extend_from_slice(&f.mtime_nsec.to_le_bytes());
                out.extend_from_slice(&f.mode.to_le_bytes());
            }
            Msg::Start(m) => {
                out.push(T_START);
                out.push(match m {
                    StartMode::Manifest => 0,
                    StartMode::UpToDate => 1,
                    StartMode::Inline => 2,
                });
            }
            Msg::Manifest(batch) => {
                out.push(T_MANIFEST);
                out.extend_from_slice(batch);
            }
            Msg::ManifestEnd {
                count,
                digest,
                source_changed,
            } => {
                out.push(T_MANIFEST_END);
                out.extend_from_slice(&count.to_le_bytes());
                out.extend_from_slice(&digest.0);
                out.push(u8::from(*source_changed));
            }
            Msg::Request(idx) | Msg::BlockRequest(idx) => {
                out.push(if matches!(self, Msg::Request(_)) {
                    T_REQUEST
                } else {
                    T_BLOCK_REQUEST
                });
                out.extend_from_slice(&(idx.len() as u32).to_le_bytes());
                for i in idx {
                    out.extend_from_slice(&i.to_le_bytes());
                }
            }
            Msg::BlockHashes { index, hashes } => {
                out.push(T_BLOCK_HASHES);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
                for h in hashes {
                    out.extend_from_slice(h);
                }
            }
            Msg::PieceRequest {
                index,
                count,
                bitmap,
            } => {
                out.push(T_PIECE_REQUEST);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
                out.extend_from_slice(bitmap);
            }
            Msg::KeepAlive => out.push(T_KEEPALIVE),
            Msg::List { flags, rules } => {
                out.push(T_LIST);
                out.extend_from_slice(&flags.to_le_bytes());
                out.extend_from_slice(&(rules.len() as u32).to_le_bytes());
                for r in rules {
                    out.push(u8::from(r.exclude));
                    put_bytes(out, r.pattern.as_bytes());
                }
            }
            Msg::Entries(entries) => {
                out.push(T_ENTRIES);
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for e in entries {
                    out.push(match e.kind {
                        EntryKind::File => 0,
                        EntryKind::Dir => 1,
                        EntryKind::Symlink => 2,
                        EntryKind::Other => 3,
                        EntryKind::Unreadable => 4,
                    });
                    put_bytes(out, &e.path);
                    out.extend_from_slice(&e.size.to_le_bytes());
                    out.extend_from_slice(&e.mtime_sec.to_le_bytes());
                    out.extend_from_slice(&e.mtime_nsec.to_le_bytes());
                    for v in [e.mode, e.uid, e.gid] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                    put_bytes(out, &e.target);
                }
            }
            Msg::ListEnd(count) => {
                out.push(T_LIST_END);
                out.extend_from_slice(&count.to_le_bytes());
            }
            Msg::Apply(ops) => {
                out.push(T_APPLY);
                out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
                for op in ops {
                    match op {
                        Op::Mkdir { path, mode } => {
                            out.push(0);
                            put_bytes(out, path);
                            out.extend_from_slice(&mode.to_le_bytes());
                        }
                        Op::Symlink { path, target } => {
                            out.push(1);
                            put_bytes(out, path);
                            put_bytes(out, target);
                        }
                        Op::Attrs {
                            path,
                            which,
                            mode,
                            uid,
                            gid,
                            mtime_sec,
                            mtime_nsec,
                        } => {
                            out.push(2);
                            put_bytes(out, path);
                            out.push(*which);
                            for v in [mode, uid, gid] {
                                out.extend_from_slice(&v.to_le_bytes());
                            }
                            out.extend_from_slice(&mtime_sec.to_le_bytes());
                            out.extend_from_slice(&mtime_nsec.to_le_bytes());
                        }
                        Op::Delete { path } => {
                            out.push(3);
                            put_bytes(out, path);
                        }
                    }
                }
            }
            Msg::Applied(results) => {
                out.push(T_APPLIED);
                out.extend_from_slice(&(results.len() as u32).to_le_bytes());
                for r in results {
                    out.push(r.status);
                    put_bytes(out, truncate_utf8(&r.message, MAX_OP_MESSAGE).as_bytes());
                }
            }
            Msg::End => out.push(T_END),
            Msg::Pieces(d) => {
                out.push(T_PIECES);
                out.extend_from_slice(&(d.len() as u32).to_le_bytes());
                for x in d {
                    out.extend_from_slice(x);
                }
            }
            Msg::ManifestRef(i) => {
                out.push(T_MANIFEST_REF);
                out.extend_from_slice(&i.to_le_bytes());
            }
            Msg::Chunk(c) => {
                out.push(T_CHUNK);
                out.extend_from_slice(&c.index.to_le_bytes());
                out.extend_from_slice(&c.raw_len.to_le_bytes());
                out.push(
                    if c.compressed { ENC_ZSTD } else { 0 }
                        | if c.pieces { ENC_PIECES } else { 0 }
                        | if c.changed { ENC_CHANGED } else { 0 },
                );
                out.extend_from_slice(&c.payload);
            }
            Msg::Done(s) => {
                out.push(T_DONE);
                let f = u8::from(s.up_to_date)
                    | u8::from(s.identical) << 1
                    | u8::from(s.verified) << 2
                    | u8::from(s.basis_cached) << 3
                    | u8::from(s.source_changed) << 4
                    | u8::from(s.dry_run) << 5;
                out.push(f);
                for v in [
                    s.source_bytes,
                    s.reused_bytes,
                    s.literal_bytes,
                    s.zero_bytes,
                    s.differing_bytes,
                    s.checked_bytes,
                    s.range_count,
                ] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                let listed = &s.ranges[..s.ranges.len().min(MAX_RANGES)];
                out.extend_from_slice(&(listed.len() as u32).to_le_bytes());
                for (o, l) in listed {
                    out.extend_from_slice(&o.to_le_bytes());
                    out.extend_from_slice(&l.to_le_bytes());
                }
            }
        }
        debug_assert!(out.len() <= MAX_FRAME);
    }

    /// Decodes type + payload; anything malformed is a protocol error.
    pub fn decode(frame: &[u8]) -> Result<Msg> {
        let (&t, payload) = frame
            .split_first()
            .ok_or_else(|| malformed("empty frame"))?;
        let mut r = Rd(payload);
        let msg = match t {
            T_OPEN => {
                let role = match r.u8()? {
                    0 => Role::Send,
                    1 => Role::Receive,
                    2 => Role::List,
                    3 => Role::Apply,
                    x => return Err(malformed(format!("OPEN with unknown role {x}"))),
                };
                let flags = r.u32()?;
                if flags & !flags::ALL != 0 {
                    return Err(malformed(format!("OPEN with unknown flags {flags:#x}")));
                }
                let compress_level = r.u8()?;
                let chunking = r.u32()?;
                let path = r.bytes(MAX_PATH)?.to_vec();
                let source_name = r.bytes(MAX_PATH)?.to_vec();
                let timeout_secs = r.u32()?;
                if timeout_secs > MAX_TIMEOUT {
                    return Err(malformed(format!("OPEN with a timeout of {timeout_secs} s")));
                }
                let bwlimit = r.u64()?;
                let sample = match (r.u32()?, r.u32()?) {
                    (0, 0) => None,
                    (k, n) if 1 <= k && k <= n && n <= MAX_SAMPLE => Some((k, n)),
                    (k, n) => return Err(malformed(format!("OPEN with sample {k}/{n}"))),
                };
                let count = r.u32()? as usize;
                if count > MAX_SEEDS {
                    return Err(malformed(format!("OPEN with {count} seeds")));
                }
                let mut seeds = Vec::with_capacity(count);
                for _ in 0..count {
                    seeds.push(r.bytes(MAX_PATH)?.to_vec());
                }
                Msg::Open(Open {
                    role,
                    flags,
                    compress_level,
                    chunking,
                    path,
                    source_name,
                    timeout_secs,
                    bwlimit,
                    sample,
                    seeds,
                })
            }
            T_ERROR => {
                let exit = r.u8()?;
                let message = String::from_utf8_lossy(r.bytes(MAX_MESSAGE)?).into_owned();
                Msg::Error { exit, message }
            }
            T_FILE_INFO => Msg::FileInfo(FileInfo {
                size: r.u64()?,
                mtime_sec: r.u64()? as i64,
                mtime_nsec: r.u32()?,
                mode: r.u32()?,
            }),
            T_START => Msg::Start(match r.u8()? {
                0 => StartMode::Manifest,
                1 => StartMode::UpToDate,
                2 => StartMode::Inline,
                x => return Err(malformed(format!("START with value {x}"))),
            }),
            T_MANIFEST => Msg::Manifest(r.rest().to_vec()),
            T_MANIFEST_END => {
                let count = r.u64()?;
                let mut h = [0u8; HASH_LEN];
                h.copy_from_slice(r.take(HASH_LEN)?);
                let flags = r.u8()?;
                if flags > 1 {
                    return Err(malformed(format!("MANIFEST_END with flags {flags:#x}")));
                }
                Msg::ManifestEnd {
                    count,
                    digest: ChunkHash(h),
                    source_changed: flags == 1,
                }
            }
            T_REQUEST | T_BLOCK_REQUEST => {
                let n = r.u32()? as usize;
                if n == 0 || n > MAX_REQUEST {
                    return Err(malformed(format!("REQUEST for {n} chunks")));
                }
                let raw = r.take(n * 8)?;
                let idx = raw
                    .chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                if t == T_REQUEST {
                    Msg::Request(idx)
                } else {
                    Msg::BlockRequest(idx)
                }
            }
            T_BLOCK_HASHES => {
                let index = r.u64()?;
                let n = r.u32()? as usize;
                if n == 0 || n > MAX_PIECES {
                    return Err(malformed(format!("BLOCK_HASHES with {n} pieces")));
                }
                let raw = r.take(n * PIECE_HASH_LEN)?;
                Msg::BlockHashes {
                    index,
                    hashes: raw
                        .chunks_exact(PIECE_HASH_LEN)
                        .map(|b| b.try_into().unwrap())
                        .collect(),
                }
            }
            T_PIECE_REQUEST => {
                let index = r.u64()?;
                let count = r.u32()?;
                if count == 0 || count as usize > MAX_PIECES {
                    return Err(malformed(format!("PIECE_REQUEST with {count} pieces")));
                }
                let bitmap = r.take((count as usize).div_ceil(8))?.to_vec();
                Msg::PieceRequest {
                    index,
                    count,
                    bitmap,
                }
            }
            T_KEEPALIVE => Msg::KeepAlive,
            T_LIST => {
                let flags = r.u32()?;
                if flags & !list_flags::ALL != 0 {
                    return Err(malformed(format!("LIST with unknown flags {flags:#x}")));
                }
                let n = r.u32()? as usize;
                if n > MAX_RULES {
                    return Err(malformed(format!("LIST with {n} rules")));
                }
                let mut rules = Vec::with_capacity(n);
                for _ in 0..n {
                    let exclude = match r.u8()? {
                        0 => false,
                        1 => true,
                        x => return Err(malformed(format!("LIST rule of kind {x}"))),
                    };
                    let p = r.bytes(MAX_PATTERN)?;
                    let pattern = std::str::from_utf8(p)
                        .ok()
                        .filter(|p| !p.is_empty() && !p.contains('\0'))
                        .ok_or_else(|| malformed("LIST with an empty or invalid pattern"))?;
                    rules.push(FilterRule {
                        exclude,
                        pattern: pattern.to_string(),
                    });
                }
                Msg::List { flags, rules }
            }
            T_ENTRIES => {
                let n = r.u32()? as usize;
                if n == 0 || n > MAX_LIST_BATCH {
                    return Err(malformed(format!("ENTRIES with {n} entries")));
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(decode_entry(&mut r)?);
                }
                Msg::Entries(entries)
            }
            T_LIST_END => {
                let count = r.u64()?;
                if count > MAX_ENTRIES {
                    return Err(malformed(format!("LIST_END with {count} entries")));
                }
                Msg::ListEnd(count)
            }
            T_APPLY => {
                let n = r.u32()? as usize;
                if n == 0 || n > MAX_OPS {
                    return Err(malformed(format!("APPLY with {n} operations")));
                }
                let mut ops = Vec::with_capacity(n);
                for _ in 0..n {
                    ops.push(decode_op(&mut r)?);
                }
                Msg::Apply(ops)
            }
            T_APPLIED => {
                let n = r.u32()? as usize;
                if n == 0 || n > MAX_OPS {
                    return Err(malformed(format!("APPLIED with {n} results")));
                }
                let mut results = Vec::with_capacity(n);
                for _ in 0..n {
                    let status = r.u8()?;
                    let message = std::str::from_utf8(r.bytes(MAX_OP_MESSAGE)?)
                        .map_err(|_| malformed("APPLIED with a message that is not UTF-8"))?
                        .to_string();
                    results.push(OpResult { status, message });
                }
                Msg::Applied(results)
            }
            T_END => Msg::End,
            T_PIECES => {
                let n = r.u32()? as usize;
                if n > MAX_PIECE_REFS {
                    return Err(malformed(format!("PIECES with {n} digests")));
                }
                let raw = r.take(n * 16)?;
                Msg::Pieces(
                    raw.chunks_exact(16)
                        .map(|c| c.try_into().expect("16 bytes"))
                        .collect(),
                )
            }
            T_MANIFEST_REF => Msg::ManifestRef(r.u32()?),
            T_CHUNK => {
                let index = r.u64()?;
                let raw_len = r.u32()?;
                let enc = r.u8()?;
                if enc & !(ENC_ZSTD | ENC_PIECES | ENC_CHANGED) != 0
                    || enc & ENC_PIECES != 0 && enc & ENC_CHANGED != 0
                {
                    return Err(malformed(format!("CHUNK with unknown encoding {enc}")));
                }
                Msg::Chunk(ChunkMsg {
                    index,
                    raw_len,
                    compressed: enc & ENC_ZSTD != 0,
                    pieces: enc & ENC_PIECES != 0,
                    changed: enc & ENC_CHANGED != 0,
                    payload: r.rest().to_vec(),
                })
            }
            T_DONE => {
                let f = r.u8()?;
                if f & !63 != 0 {
                    return Err(malformed(format!("DONE with unknown flags {f:#x}")));
                }
                let mut s = Summary {
                    up_to_date: f & 1 != 0,
                    identical: f & 2 != 0,
                    verified: f & 4 != 0,
                    basis_cached: f & 8 != 0,
                    source_changed: f & 16 != 0,
                    dry_run: f & 32 != 0,
                    source_bytes: r.u64()?,
                    reused_bytes: r.u64()?,
                    literal_bytes: r.u64()?,
                    zero_bytes: r.u64()?,
                    differing_bytes: r.u64()?,
                    checked_bytes: r.u64()?,
                    range_count: r.u64()?,
                    ranges: Vec::new(),
                };
                let n = r.u32()? as usize;
                if n > MAX_RANGES || n as u64 > s.range_count {
                    return Err(malformed(format!("DONE listing {n} ranges")));
                }
                for _ in 0..n {
                    s.ranges.push((r.u64()?, r.u64()?));
                }
                Msg::Done(s)
            }
            t => {
                return Err(fail(
                    Exit::Protocol,
                    format!(
                        "protocol error: unknown message type {t} (this vmsync speaks protocol v{PROTOCOL_VERSION})"
                    ),
                ))
            }
        };
        if !r.0.is_empty() {
            return Err(malformed(format!(
                "{} trailing bytes after {}",
                r.0.len(),
                msg.name()
            )));
        }
        Ok(msg)
    }
}

fn decode_entry(r: &mut Rd<'_>) -> Result<ListEntry> {
    let kind = match r.u8()? {
        0 => EntryKind::File,
        1 => EntryKind::Dir,
        2 => EntryKind::Symlink,
        3 => EntryKind::Other,
        4 => EntryKind::Unreadable,
        x => return Err(malformed(format!("entry of kind {x}"))),
    };
    let path = r.bytes(MAX_PATH)?.to_vec();
    let e = ListEntry {
        kind,
        size: r.u64()?,
        mtime_sec: r.u64()? as i64,
        mtime_nsec: r.u32()?,
        mode: r.u32()?,
        uid: r.u32()?,
        gid: r.u32()?,
        target: r.bytes(MAX_PATH)?.to_vec(),
        path,
    };
    let shown = String::from_utf8_lossy(&e.path);
    if !valid_rel_path(&e.path, true) {
        return Err(malformed(format!("entry with the path {shown:?}")));
    }
    if e.mtime_nsec > 999_999_999 {
        return Err(malformed(format!(
            "entry {shown:?} with {} ns",
            e.mtime_nsec
        )));
    }
    let file_type = e.mode & libc::S_IFMT;
    let type_ok = match kind {
        EntryKind::File => file_type == libc::S_IFREG,
        EntryKind::Dir => file_type == libc::S_IFDIR,
        EntryKind::Symlink => file_type == libc::S_IFLNK,
        EntryKind::Other => ![libc::S_IFREG, libc::S_IFDIR, libc::S_IFLNK].contains(&file_type),
        EntryKind::Unreadable => true,
    };
    let target_ok = match kind {
        EntryKind::Symlink | EntryKind::Unreadable => {
            !e.target.is_empty() && !e.target.contains(&0)
        }
        _ => e.target.is_empty(),
    };
    if !type_ok || !target_ok {
        return Err(malformed(format!(
            "entry {shown:?} whose mode or target does not fit its kind"
        )));
    }
    Ok(e)
}

fn decode_op(r: &mut Rd<'_>) -> Result<Op> {
    let code = r.u8()?;
    let path = r.bytes(MAX_PATH)?.to_vec();
    let shown = String::from_utf8_lossy(&path).into_owned();
    // The directory itself may be created or given attributes, never
    // replaced or deleted.
    if !valid_rel_path(&path, matches!(code, 0 | 2)) {
        return Err(malformed(format!("operation on the path {shown:?}")));
    }
    let op = match code {
        0 => Op::Mkdir {
            path,
            mode: r.u32()?,
        },
        1 => {
            let target = r.bytes(MAX_PATH)?.to_vec();
            if target.is_empty() || target.contains(&0) {
                return Err(malformed(format!(
                    "SYMLINK {shown:?} with an empty or NUL target"
                )));
            }
            Op::Symlink { path, target }
        }
        2 => {
            let which = r.u8()?;
            if which == 0 || which & !attrs::ALL != 0 {
                return Err(malformed(format!("ATTRS {shown:?} setting {which:#x}")));
            }
            let op = Op::Attrs {
                path,
                which,
                mode: r.u32()?,
                uid: r.u32()?,
                gid: r.u32()?,
                mtime_sec: r.u64()? as i64,
                mtime_nsec: r.u32()?,
            };
            if let Op::Attrs { mtime_nsec, .. } = op {
                if mtime_nsec > 999_999_999 {
                    return Err(malformed(format!("ATTRS {shown:?} with {mtime_nsec} ns")));
                }
            }
            op
        }
        3 => Op::Delete { path },
        x => return Err(malformed(format!("operation {x} on {shown:?}"))),
    };
    match op {
        Op::Mkdir { mode, .. } | Op::Attrs { mode, .. } if mode & !0o7777 != 0 => {
            Err(malformed(format!("mode {mode:#o} for {shown:?}")))
        }
        op => Ok(op),
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn malformed(msg: impl std::fmt::Display) -> anyhow::Error {
    fail(
        Exit::Protocol,
        format!("protocol error: malformed message: {msg}"),
    )
}

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(malformed("message truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bytes(&mut self, limit: usize) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > limit {
            return Err(malformed(format!("field of {n} bytes (limit {limit})")));
        }
        self.take(n)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// Connection failures are exit code 4, whatever the io error was.
fn conn_err(e: io::Error, peer: &str, doing: &str) -> anyhow::Error {
    let what = match e.kind() {
        io::ErrorKind::UnexpectedEof => "connection closed".to_string(),
        io::ErrorKind::BrokenPipe => "connection closed (broken pipe)".to_string(),
        _ => e.to_string(),
    };
    fail(Exit::Connection, format!("{peer}: {what} while {doing}"))
}

/// Reads frames, enforcing [`MAX_FRAME`] before allocating.
pub struct FrameReader<R: Read> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    peer: String,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, peer: &str) -> Self {
        FrameReader {
            inner: BufReader::with_capacity(256 * 1024, inner),
            buf: Vec::new(),
            peer: peer.to_string(),
        }
    }

    /// Reads and checks the peer's hello.
    pub fn read_hello(&mut self) -> Result<u32> {
        let mut h = [0u8; 16];
        let mut got = 0;
        while got < h.len() {
            match self.inner.read(&mut h[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(conn_err(e, &self.peer, "waiting for the handshake")),
            }
        }
        if got == 0 {
            return Err(fail(
                Exit::Connection,
                format!("{}: connection closed before the handshake", self.peer),
            ));
        }
        if got < 8 || &h[..8] != MAGIC {
            let text: String = String::from_utf8_lossy(&h[..got])
                .chars()
                .map(|c| if c.is_control() { '.' } else { c })
                .collect();
            return Err(fail(
                Exit::Protocol,
                format!(
                    "{}: peer does not speak the vmsync protocol (it sent {text:?}); \
                     check that the remote command is vmsync and that the shell prints nothing",
                    self.peer
                ),
            ));
        }
        if got < 16 {
            return Err(fail(
                Exit::Connection,
                format!("{}: connection closed during the handshake", self.peer),
            ));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if version != PROTOCOL_VERSION {
            return Err(fail(
                Exit::Protocol,
                format!(
                    "{}: protocol version mismatch: this vmsync speaks v{PROTOCOL_VERSION}, the peer speaks v{version}; \
                     install the same vmsync version on both ends",
                    self.peer
                ),
            ));
        }
        Ok(u32::from_le_bytes(h[12..16].try_into().unwrap()))
    }

    /// Reads one message. End of stream is a connection error: every run
    /// ends with an explicit message, so a silent close means the peer died.
    pub fn read_msg(&mut self) -> Result<Msg> {
        loop {
            match self.read_any()? {
                Msg::KeepAlive => continue,
                m => return Ok(m),
            }
        }
    }

    fn read_any(&mut self) -> Result<Msg> {
        let mut len = [0u8; 4];
        self.inner
            .read_exact(&mut len)
            .map_err(|e| conn_err(e, &self.peer, "reading"))?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(fail(
                Exit::Protocol,
                format!(
                    "{}: protocol error: frame of {len} bytes (limit {MAX_FRAME})",
                    self.peer
                ),
            ));
        }
        self.buf.resize(len, 0);
        self.inner
            .read_exact(&mut self.buf)
            .map_err(|e| conn_err(e, &self.peer, "reading a frame"))?;
        match Msg::decode(&self.buf)? {
            // The peer's failure becomes ours, with its exit code and its words.
            Msg::Error { exit, message } => {
                let exit = match exit {
                    0 | 1 => Exit::Protocol,
                    c => Exit::from_code(c),
                };
                // A local server's errors are about local files: no prefix.
                if self.peer == crate::wire::transport::LOCAL_PEER {
                    Err(fail(exit, message))
                } else {
                    Err(fail(exit, format!("{}: {message}", self.peer)))
                }
            }
            m => Ok(m),
        }
    }
}

/// Writes frames. The stream sits behind a lock so that a keepalive thread
/// ([`FrameWriter::keep_alive`]) can slip a whole `KEEPALIVE` frame in
/// between two messages, never inside one.
pub struct FrameWriter<W: Write> {
    out: Arc<Mutex<Out<W>>>,
    buf: Vec<u8>,
    peer: String,
}

struct Out<W: Write> {
    inner: BufWriter<W>,
    /// When bytes last went to the pipe (a flush), for the keepalive.
    last_flush: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while writing leaves at worst a broken stream, which the
    // peer detects; it is no reason to panic again here.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W, peer: &str) -> Self {
        FrameWriter {
            out: Arc::new(Mutex::new(Out {
                inner: BufWriter::with_capacity(256 * 1024, inner),
                last_flush: Instant::now(),
            })),
            buf: Vec::new(),
            peer: peer.to_string(),
        }
    }

    pub fn write_hello(&mut self) -> Result<()> {
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        let mut out = lock(&self.out);
        out.inner
            .write_all(&h)
            .and_then(|_| out.inner.flush())
            .map_err(|e| conn_err(e, &self.peer, "sending the handshake"))
    }

    /// Queues one message (buffered; see [`FrameWriter::flush`]).
    pub fn send(&mut self, msg: &Msg) -> Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        msg.encode(&mut buf);
        let r = write_frame(&mut lock(&self.out).inner, &buf)
            .map_err(|e| conn_err(e, &self.peer, "sending"));
        self.buf = buf;
        r
    }

    pub fn flush(&mut self) -> Result<()> {
        let mut out = lock(&self.out);
        out.last_flush = Instant::now();
        out.inner
            .flush()
            .map_err(|e| conn_err(e, &self.peer, "sending"))
    }

    /// Sends and flushes.
    pub fn send_now(&mut self, msg: &Msg) -> Result<()> {
        self.send(msg)?;
        self.flush()
    }

    /// Runs `f` on the underlying stream, after flushing what is buffered.
    pub fn with_inner<T>(&mut self, f: impl FnOnce(&mut W) -> T) -> Result<T> {
        let mut out = lock(&self.out);
        out.inner
            .flush()
            .map_err(|e| conn_err(e, &self.peer, "sending"))?;
        Ok(f(out.inner.get_mut()))
    }
}

#[cfg(test)]
impl<W: Write> FrameWriter<W> {
    fn into_bytes(self) -> W {
        let out = Arc::try_unwrap(self.out)
            .ok()
            .expect("no keepalive thread in tests");
        out.into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .inner
            .into_inner()
            .ok()
            .expect("flush")
    }
}

impl<W: Write + Send + 'static> FrameWriter<W> {
    /// Sends `KEEPALIVE` whenever nothing has been sent for `every`, from a
    /// thread that ends with this writer. The peer's `--timeout` then fires
    /// only when we are gone, not while we index, fsync or verify.
    pub fn keep_alive(&self, every: Duration) -> Result<()> {
        let out = Arc::downgrade(&self.out);
        let tick = (every / 2).max(Duration::from_millis(10));
        std::thread::Builder::new()
            .name("keepalive".into())
            .spawn(move || {
                let mut frame = Vec::new();
                Msg::KeepAlive.encode(&mut frame);
                loop {
                    std::thread::sleep(tick);
                    // Holding only a weak reference lets the writer's drop
                    // close the pipe, which is how the peer learns we ended.
                    let Some(out) = out.upgrade() else { return };
                    let mut out = lock(&out);
                    if out.last_flush.elapsed() < every {
                        continue;
                    }
                    out.last_flush = Instant::now();
                    let sent = write_frame(&mut out.inner, &frame).and_then(|_| out.inner.flush());
                    if sent.is_err() {
                        // The main thread meets the same error on its next write.
                        return;
                    }
                }
            })
            .map(drop)
            .map_err(|e| fail(Exit::Io, format!("cannot start a thread: {e}")))
    }
}

fn write_frame<W: Write>(w: &mut W, frame: &[u8]) -> io::Result<()> {
    w.write_all(&(frame.len() as u32).to_le_bytes())
        .and_then(|_| w.write_all(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code_of;

    fn round_trip(m: Msg) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        assert_eq!(Msg::decode(&buf).unwrap(), m);
        // Every strict prefix is rejected, never a panic.
        for cut in 0..buf.len() {
            let _ = Msg::decode(&buf[..cut]);
        }
        // Trailing garbage is rejected.
        buf.push(0);
        assert!(Msg::decode(&buf).is_err() || matches!(m, Msg::Manifest(_) | Msg::Chunk(_)));
    }

    /// An idle writer with a keepalive says `KEEPALIVE` on its own, as a
    /// whole frame, and its reader never returns one.
    #[test]
    fn idle_writer_sends_keepalives_that_readers_skip() {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two descriptors, which we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (r, w) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let mut writer = FrameWriter::new(w, "test");
        writer.keep_alive(Duration::from_millis(20)).unwrap();
        let mut raw = [0u8; 5];
        (&r).read_exact(&mut raw).unwrap();
        assert_eq!(raw, [1, 0, 0, 0, T_KEEPALIVE]);
        writer.send_now(&Msg::Start(StartMode::Inline)).unwrap();
        let mut reader = FrameReader::new(r, "test");
        assert_eq!(reader.read_msg().unwrap(), Msg::Start(StartMode::Inline));
        drop(writer);
        // The keepalive thread holds no strong reference: dropping the
        // writer closes the pipe, whatever it had sent.
        let e = reader.read_msg().unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Connection);
    }

    #[test]
    fn messages_round_trip() {
        round_trip(Msg::Open(Open {
            role: Role::Receive,
            flags: flags::CHECK | flags::VERIFY,
            compress_level: 3,
            chunking: 65536,
            path: b"/srv/a b/disk.img".to_vec(),
            source_name: b"disk.img".to_vec(),
            timeout_secs: 600,
            bwlimit: 10 << 20,
            sample: Some((3, 7)),
            seeds: vec![b"/srv/base.img".to_vec(), b"gold".to_vec()],
        }));
        round_trip(Msg::KeepAlive);
        round_trip(Msg::Error {
            exit: 3,
            message: "no space left".into(),
        });
        round_trip(Msg::FileInfo(FileInfo {
            size: u64::MAX,
            mtime_sec: -5,
            mtime_nsec: 999_999_999,
            mode: 0o100644,
        }));
        round_trip(Msg::Start(StartMode::UpToDate));
        round_trip(Msg::Start(StartMode::Inline));
        round_trip(Msg::Manifest(vec![1, 2, 3]));
        round_trip(Msg::ManifestEnd {
            count: 7,
            digest: ChunkHash([9; 32]),
            source_changed: true,
        });
        round_trip(Msg::Request(vec![0, 5, u64::MAX]));
        round_trip(Msg::Chunk(ChunkMsg {
            index: 3,
            raw_len: 100,
            compressed: true,
            pieces: true,
            changed: false,
            payload: vec![7; 10],
        }));
        round_trip(Msg::Chunk(ChunkMsg {
            index: 3,
            raw_len: 100,
            compressed: false,
            pieces: false,
            changed: true,
            payload: vec![7; 100],
        }));
        round_trip(Msg::BlockRequest(vec![1, 2]));
        round_trip(Msg::BlockHashes {
            index: 4,
            hashes: vec![[1; 8], [2; 8]],
        });
        round_trip(Msg::PieceRequest {
            index: 4,
            count: 9,
            bitmap: vec![0xff, 1],
        });
        round_trip(Msg::Done(Summary {
            up_to_date: false,
            identical: true,
            verified: true,
            basis_cached: true,
            source_changed: true,
            dry_run: true,
            source_bytes: 10,
            reused_bytes: 1,
            literal_bytes: 2,
            zero_bytes: 3,
            differing_bytes: 4,
            checked_bytes: 5,
            range_count: 9,
            ranges: vec![(1, 2), (3, 4)],
        }));
    }

    fn entry(kind: EntryKind, path: &str, mode: u32, target: &str) -> ListEntry {
        ListEntry {
            kind,
            path: path.as_bytes().to_vec(),
            size: 1 << 40,
            mtime_sec: -3,
            mtime_nsec: 999_999_999,
            mode,
            uid: 1000,
            gid: u32::MAX,
            target: target.as_bytes().to_vec(),
        }
    }

    #[test]
    fn tree_messages_round_trip() {
        for role in [Role::List, Role::Apply] {
            round_trip(Msg::Open(Open {
                role,
                flags: 0,
                compress_level: 0,
                chunking: 65536,
                path: b"/srv/images".to_vec(),
                source_name: Vec::new(),
                timeout_secs: 0,
                bwlimit: 0,
                sample: None,
                seeds: Vec::new(),
            }));
        }
        round_trip(Msg::List {
            flags: list_flags::MISSING_OK,
            rules: vec![
                FilterRule {
                    exclude: false,
                    pattern: "keep.tmp".into(),
                },
                FilterRule {
                    exclude: true,
                    pattern: "**/*.tmp".into(),
                },
            ],
        });
        round_trip(Msg::List {
            flags: 0,
            rules: Vec::new(),
        });
        round_trip(Msg::Entries(vec![
            entry(EntryKind::Dir, "", libc::S_IFDIR | 0o755, ""),
            entry(EntryKind::File, "a b/disk.img", libc::S_IFREG | 0o600, ""),
            entry(
                EntryKind::Symlink,
                "a b/l",
                libc::S_IFLNK | 0o777,
                "../../etc",
            ),
            entry(EntryKind::Other, "fifo", libc::S_IFIFO | 0o644, ""),
            entry(EntryKind::Unreadable, "locked", 0, "permission denied"),
        ]));
        round_trip(Msg::ListEnd(MAX_ENTRIES));
        round_trip(Msg::Apply(vec![
            Op::Mkdir {
                path: Vec::new(),
                mode: 0o755,
            },
            Op::Mkdir {
                path: b"a/b".to_vec(),
                mode: 0o7777,
            },
            Op::Symlink {
                path: b"a/l".to_vec(),
                target: b"/anywhere".to_vec(),
            },
            Op::Attrs {
                path: b"a".to_vec(),
                which: attrs::ALL,
                mode: 0o2750,
                uid: 0,
                gid: 7,
                mtime_sec: i64::MIN,
                mtime_nsec: 1,
            },
            Op::Delete {
                path: b"a/old.img".to_vec(),
            },
        ]));
        round_trip(Msg::Applied(vec![
            OpResult {
                status: 0,
                message: String::new(),
            },
            OpResult {
                status: 3,
                message: "Permission denied ✗".into(),
            },
        ]));
        round_trip(Msg::End);
        round_trip(Msg::Pieces(vec![[1; 16], [2; 16]]));
        round_trip(Msg::Pieces(Vec::new()));
        round_trip(Msg::ManifestRef(7));
        // A message longer than the limit is cut at a character boundary.
        let mut buf = Vec::new();
        Msg::Applied(vec![OpResult {
            status: 3,
            message: "é".repeat(MAX_OP_MESSAGE),
        }])
        .encode(&mut buf);
        let Msg::Applied(r) = Msg::decode(&buf).unwrap() else {
            panic!("not APPLIED")
        };
        assert!(r[0].message.len() <= MAX_OP_MESSAGE && r[0].message.starts_with('é'));
    }

    #[test]
    fn tree_messages_are_validated() {
        let encode = |m: Msg| {
            let mut b = Vec::new();
            m.encode(&mut b);
            b
        };
        let bad_entries = [
            entry(EntryKind::File, "../x", libc::S_IFREG, ""),
            entry(EntryKind::File, "/x", libc::S_IFREG, ""),
            entry(EntryKind::File, "a//x", libc::S_IFREG, ""),
            entry(EntryKind::File, "a/./x", libc::S_IFREG, ""),
            entry(EntryKind::File, "x/", libc::S_IFREG, ""),
            entry(EntryKind::File, "x\0", libc::S_IFREG, ""),
            entry(EntryKind::File, "x", libc::S_IFDIR, ""),
            entry(EntryKind::Symlink, "x", libc::S_IFLNK, ""),
            entry(EntryKind::File, "x", libc::S_IFREG, "target"),
            entry(EntryKind::Other, "x", libc::S_IFREG, ""),
        ];
        for e in bad_entries {
            let err = Msg::decode(&encode(Msg::Entries(vec![e.clone()]))).unwrap_err();
            assert_eq!(exit_code_of(&err), Exit::Protocol, "{e:?}");
        }
        let mut e = entry(EntryKind::File, "x", libc::S_IFREG, "");
        e.mtime_nsec = 1_000_000_000;
        assert!(Msg::decode(&encode(Msg::Entries(vec![e]))).is_err());
        let bad_ops = [
            Op::Delete { path: Vec::new() },
            Op::Symlink {
                path: Vec::new(),
                target: b"x".to_vec(),
            },
            Op::Delete {
                path: b"a/../../b".to_vec(),
            },
            Op::Symlink {
                path: b"l".to_vec(),
                target: Vec::new(),
            },
            Op::Mkdir {
                path: b"d".to_vec(),
                mode: 0o10000,
            },
            Op::Attrs {
                path: b"d".to_vec(),
                which: 0,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime_sec: 0,
                mtime_nsec: 0,
            },
            Op::Attrs {
                path: b"d".to_vec(),
                which: attrs::MTIME,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime_sec: 0,
                mtime_nsec: 1_000_000_000,
            },
        ];
        for op in bad_ops {
            let err = Msg::decode(&encode(Msg::Apply(vec![op.clone()]))).unwrap_err();
            assert_eq!(exit_code_of(&err), Exit::Protocol, "{op:?}");
        }
        for frame in [
            vec![T_ENTRIES, 0, 0, 0, 0],
            vec![T_APPLY, 0, 0, 0, 0],
            vec![T_APPLIED, 0, 0, 0, 0],
            vec![T_ENTRIES, 255, 255, 255, 255],
            vec![T_APPLY, 255, 255, 255, 255],
            vec![T_LIST, 2, 0, 0, 0, 0, 0, 0, 0],
            vec![T_LIST, 0, 0, 0, 0, 255, 255, 0, 0],
            vec![T_LIST_END, 255, 255, 255, 255, 255, 255, 255, 255],
            vec![T_END, 0],
        ] {
            let e = Msg::decode(&frame).unwrap_err();
            assert_eq!(exit_code_of(&e), Exit::Protocol, "{frame:?}");
        }
        // The largest batches fit in a frame.
        let long = |c: u8| vec![c; MAX_PATH];
        let mut e = entry(EntryKind::Symlink, "", libc::S_IFLNK, "");
        e.path = [b"a/".repeat(MAX_PATH / 2 - 1), b"b".to_vec()].concat();
        e.target = long(b't');
        assert!(encode(Msg::Entries(vec![e; MAX_LIST_BATCH])).len() <= MAX_FRAME);
        let op = Op::Symlink {
            path: long(b'p'),
            target: long(b't'),
        };
        assert!(encode(Msg::Apply(vec![op; MAX_OPS])).len() <= MAX_FRAME);
    }

    #[test]
    fn unknown_type_and_bad_fields_are_protocol_errors() {
        for frame in [
            vec![200u8],
            vec![T_START, 7],
            vec![T_REQUEST, 0, 0, 0, 0],
            vec![T_REQUEST, 255, 255, 255, 255],
            vec![T_OPEN, 9],
        ] {
            let e = Msg::decode(&frame).unwrap_err();
            assert_eq!(exit_code_of(&e), Exit::Protocol, "{frame:?}");
        }
    }

    #[test]
    fn oversized_frame_rejected_before_allocation() {
        for len in [0u32, (MAX_FRAME + 1) as u32, u32::MAX] {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&[T_START, 0]);
            let mut r = FrameReader::new(&bytes[..], "peer");
            let e = r.read_msg().unwrap_err();
            assert_eq!(exit_code_of(&e), Exit::Protocol);
        }
    }

    #[test]
    fn truncated_stream_is_connection_error() {
        let mut w = FrameWriter::new(Vec::new(), "peer");
        w.send_now(&Msg::Start(StartMode::Manifest)).unwrap();
        let bytes = w.into_bytes();
        for cut in 0..bytes.len() {
            let mut r = FrameReader::new(&bytes[..cut], "peer");
            let e = r.read_msg().unwrap_err();
            assert_eq!(exit_code_of(&e), Exit::Connection);
        }
        let mut r = FrameReader::new(&bytes[..], "peer");
        assert_eq!(r.read_msg().unwrap(), Msg::Start(StartMode::Manifest));
    }

    #[test]
    fn handshake_checks_magic_and_version() {
        let mut w = FrameWriter::new(Vec::new(), "peer");
        w.write_hello().unwrap();
        let good = w.into_bytes();
        assert!(FrameReader::new(&good[..], "p").read_hello().is_ok());
        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        let e = FrameReader::new(&newer[..], "p").read_hello().unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Protocol);
        let (ours, theirs) = (
            format!("v{PROTOCOL_VERSION}"),
            format!("v{}", PROTOCOL_VERSION + 1),
        );
        assert!(e.to_string().contains(&ours) && e.to_string().contains(&theirs));
        let e = FrameReader::new(&b"Welcome to host\n"[..], "p")
            .read_hello()
            .unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Protocol);
        let e = FrameReader::new(&b""[..], "p").read_hello().unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Connection);
    }
}
