//! The messages both ends exchange, one per frame ([`crate::wire::frame`]):
//! their type codes, and their encoding and decoding.
//!
//! Nothing a peer sends is trusted: every count and length is checked
//! against a hard limit before anything is allocated for it, and a message
//! must be consumed exactly, with no trailing bytes. Whatever does not
//! decode is a protocol error (exit code 5), never a panic.
//!
//! A frame's first byte is the message type, the rest its payload
//! (integers little-endian; `bytes` = u32 length + that many bytes). The
//! messages with a structured payload give their layout in their own docs:
//! [`Open`], [`FileInfo`], [`ChunkMsg`], [`Summary`] ([`mod@file`]), [`ListEntry`],
//! [`Op`], [`OpResult`] ([`mod@tree`]).
//!
//! | type | name           | direction     | payload |
//! |------|----------------|---------------|---------|
//! | 1    | `OPEN`         | client→server | see [`Open`] |
//! | 2    | `ERROR`        | either        | exit code u8, message bytes (UTF-8, ≤ [`MAX_MESSAGE`]) |
//! | 3    | `FILE_INFO`    | sender→recv   | see [`FileInfo`] |
//! | 4    | `START`        | recv→sender   | u8, see [`StartMode`] |
//! | 5    | `MANIFEST`     | sender→recv   | a manifest batch, see [`crate::content::manifest`] |
//! | 6    | `MANIFEST_END` | sender→recv   | entry count u64, file digest (32 bytes), flags u8 (1: the source changed while it was scanned and `ALLOW_CHANGING` lets it be committed) |
//! | 7    | `REQUEST`      | recv→sender   | count u32 (1 ≤ n ≤ [`MAX_REQUEST`]), n entry indices u64 |
//! | 8    | `CHUNK`        | sender→recv   | see [`ChunkMsg`] |
//! | 9    | `DONE`         | recv→sender   | see [`Summary`] |
//! | 10   | `BLOCK_REQUEST`| recv→sender   | count u32 (1 ≤ n ≤ [`MAX_REQUEST`]), n entry indices u64: send block hashes |
//! | 11   | `BLOCK_HASHES` | sender→recv   | entry index u64, count u32 (1 ≤ n ≤ [`MAX_BLOCKS`]), count × 8-byte block hash |
//! | 12   | `BLOCK_FETCH`  | recv→sender   | entry index u64, block count u32 (1 ≤ n ≤ [`MAX_BLOCKS`]), bitmap of ⌈count/8⌉ bytes: blocks to send |
//! | 13   | `KEEPALIVE`    | either        | empty: "still here, busy"; skipped by [`crate::wire::frame::FrameReader::read_msg`] |
//! | 14   | `LIST`         | client→server | after `OPEN` with role 2: flags u32 ([`list_flags`]: 1 missing is empty, 2 xattrs, 4 ACLs, 8 one filesystem), rule count u32 (≤ [`MAX_RULES`]) × (exclude u8: 0 include, 1 exclude; pattern bytes, 1 to [`MAX_PATTERN`] bytes of UTF-8) |
//! | 15   | `ENTRIES`      | server→client | count u32 (1 ≤ n ≤ [`MAX_LIST_BATCH`]) × [`ListEntry`]; a frame's size is the limit too (a lister cuts batches at 1 MiB) |
//! | 16   | `LIST_END`     | server→client | entry count u64 (≤ [`MAX_ENTRIES`]): how many entries the `ENTRIES` carried |
//! | 17   | `APPLY`        | client→server | after `OPEN` with role 3: count u32 (1 ≤ n ≤ [`MAX_OPS`]) × [`Op`]; a client cuts batches at 1 MiB |
//! | 18   | `APPLIED`      | server→client | count u32 (1 ≤ n ≤ [`MAX_OPS`]) × [`OpResult`] |
//! | 19   | `END`          | client→server | empty: no more `APPLY`; the server exits |
//! | 20   | `PIECES`       | recv→sender   | count u32 (≤ [`MAX_PIECE_REFS`]) × 16-byte digest of a piece of the receiver's cached manifest (see [`crate::content::manifest`]); optional, only right before `START` `0` |
//! | 21   | `MANIFEST_REF` | sender→recv   | piece index u32 into the receiver's `PIECES`: "these entries come next" |
//! | 22   | `SNAPSHOT`     | sender→recv   | `--snapshot`, right before `FILE_INFO`: see [`mod@snapshot`] |
//! | 23   | `RANGES`       | sender→recv   | after `START` 3 (delta): the ranges the manifest covers, see [`mod@snapshot`] |
//!
//! A run: hello both ways; `OPEN`; the sender sends `FILE_INFO`; the
//! receiver answers `START`; the sender streams `MANIFEST`…`MANIFEST_END`
//! while the receiver streams `REQUEST`s and the sender answers each index
//! with a `CHUNK`; for a chunk it lacks but may partly hold (see
//! [`crate::content::refine`]) it asks `BLOCK_REQUEST`, gets `BLOCK_HASHES`, and
//! sends `BLOCK_FETCH` for the blocks it did not find, which come back
//! as a `CHUNK` carrying only those blocks; the receiver ends with `DONE`. `ERROR` may come at any
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
//! Any change to these tables bumps [`crate::wire::frame::PROTOCOL_VERSION`].

pub mod file;
pub mod snapshot;
pub mod tree;

use anyhow::Result;

use crate::content::hash::{ChunkHash, HASH_LEN};
use crate::content::manifest::PieceDigest;
use crate::content::refine::{BlockHash, BLOCK_HASH_LEN, MAX_BLOCKS};
use crate::error::{fail, Exit};
use crate::wire::codec::{malformed, put_bytes, Rd};

pub use crate::filter::{FilterRule, MAX_PATTERN, MAX_RULES};
pub use file::{
    ChunkMsg, FileInfo, Open, Role, StartMode, Summary, MAX_MESSAGE, MAX_PATH, MAX_PIECE_REFS,
    MAX_RANGES, MAX_REQUEST, MAX_SAMPLE, MAX_SEEDS, MAX_TIMEOUT,
};
pub use snapshot::{DeltaRange, Reason, SnapshotId, SnapshotMsg, SnapshotStats};
pub use tree::{
    attrs, is_device, list_flags, valid_rel_path, valid_xattrs, xattr_in_play, xattr_name_ok,
    EntryKind, ListEntry, Op, OpResult, Xattrs, ACL_NAMES, MAX_ENTRIES, MAX_LIST_BATCH, MAX_OPS,
    MAX_OP_MESSAGE, MAX_XATTRS, MAX_XATTR_BYTES, MAX_XATTR_NAME, MAX_XATTR_VALUE,
};

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
const T_BLOCK_FETCH: u8 = 12;
/// Public for the frame layer's tests, which look at raw keepalive bytes.
pub const T_KEEPALIVE: u8 = 13;
const T_LIST: u8 = 14;
const T_ENTRIES: u8 = 15;
const T_LIST_END: u8 = 16;
const T_APPLY: u8 = 17;
const T_APPLIED: u8 = 18;
const T_END: u8 = 19;
const T_PIECES: u8 = 20;
const T_MANIFEST_REF: u8 = 21;
const T_SNAPSHOT: u8 = 22;
const T_RANGES: u8 = 23;

/// Whether `t` is a message type of this protocol version; the frame layer
/// names the version when it is not.
pub fn known_type(t: u8) -> bool {
    (T_OPEN..=T_RANGES).contains(&t)
}

/// One message; the variants follow the type table in the module doc.
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
        hashes: Vec<BlockHash>,
    },
    BlockFetch {
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
    Pieces(Vec<PieceDigest>),
    ManifestRef(u32),
    /// Boxed: every message in a queue would otherwise be this large.
    Snapshot(Box<SnapshotMsg>),
    Ranges {
        last: bool,
        ranges: Vec<DeltaRange>,
    },
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
            Msg::BlockFetch { .. } => "BLOCK_FETCH",
            Msg::KeepAlive => "KEEPALIVE",
            Msg::List { .. } => "LIST",
            Msg::Entries(_) => "ENTRIES",
            Msg::ListEnd(_) => "LIST_END",
            Msg::Apply(_) => "APPLY",
            Msg::Applied(_) => "APPLIED",
            Msg::End => "END",
            Msg::Pieces(_) => "PIECES",
            Msg::ManifestRef(_) => "MANIFEST_REF",
            Msg::Snapshot(_) => "SNAPSHOT",
            Msg::Ranges { .. } => "RANGES",
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
                o.put(out);
            }
            Msg::Error { exit, message } => {
                out.push(T_ERROR);
                out.push(*exit);
                let m = message.as_bytes();
                put_bytes(out, &m[..m.len().min(MAX_MESSAGE)]);
            }
            Msg::FileInfo(f) => {
                out.push(T_FILE_INFO);
                f.put(out);
            }
            Msg::Start(m) => {
                out.push(T_START);
                out.push(match m {
                    StartMode::Manifest => 0,
                    StartMode::UpToDate => 1,
                    StartMode::Inline => 2,
                    StartMode::Delta => 3,
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
            Msg::BlockFetch {
                index,
                count,
                bitmap,
            } => {
                out.push(T_BLOCK_FETCH);
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
                out.extend_from_slice(bitmap);
            }
            Msg::KeepAlive => out.push(T_KEEPALIVE),
            Msg::List { flags, rules } => {
                out.push(T_LIST);
                tree::put_list(out, *flags, rules);
            }
            Msg::Entries(entries) => {
                out.push(T_ENTRIES);
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for e in entries {
                    e.put(out);
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
                    op.put(out);
                }
            }
            Msg::Applied(results) => {
                out.push(T_APPLIED);
                out.extend_from_slice(&(results.len() as u32).to_le_bytes());
                for r in results {
                    r.put(out);
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
            Msg::Snapshot(m) => {
                out.push(T_SNAPSHOT);
                m.put(out);
            }
            Msg::Ranges { last, ranges } => {
                out.push(T_RANGES);
                snapshot::put_ranges(out, *last, ranges);
            }
            Msg::Chunk(c) => {
                out.push(T_CHUNK);
                c.put(out);
            }
            Msg::Done(s) => {
                out.push(T_DONE);
                s.put(out);
            }
        }
    }

    /// Decodes type + payload; anything malformed is a protocol error.
    pub fn decode(frame: &[u8]) -> Result<Msg> {
        let (&t, payload) = frame
            .split_first()
            .ok_or_else(|| malformed("empty frame"))?;
        let mut r = Rd(payload);
        let msg = match t {
            T_OPEN => Msg::Open(Open::get(&mut r)?),
            T_ERROR => {
                let exit = r.u8()?;
                let message = String::from_utf8_lossy(r.bytes(MAX_MESSAGE)?).into_owned();
                Msg::Error { exit, message }
            }
            T_FILE_INFO => Msg::FileInfo(FileInfo::get(&mut r)?),
            T_START => Msg::Start(match r.u8()? {
                0 => StartMode::Manifest,
                1 => StartMode::UpToDate,
                2 => StartMode::Inline,
                3 => StartMode::Delta,
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
                if n == 0 || n > MAX_BLOCKS {
                    return Err(malformed(format!("BLOCK_HASHES with {n} pieces")));
                }
                let raw = r.take(n * BLOCK_HASH_LEN)?;
                Msg::BlockHashes {
                    index,
                    hashes: raw
                        .chunks_exact(BLOCK_HASH_LEN)
                        .map(|b| b.try_into().unwrap())
                        .collect(),
                }
            }
            T_BLOCK_FETCH => {
                let index = r.u64()?;
                let count = r.u32()?;
                if count == 0 || count as usize > MAX_BLOCKS {
                    return Err(malformed(format!("BLOCK_FETCH with {count} pieces")));
                }
                let bitmap = r.take((count as usize).div_ceil(8))?.to_vec();
                Msg::BlockFetch {
                    index,
                    count,
                    bitmap,
                }
            }
            T_KEEPALIVE => Msg::KeepAlive,
            T_LIST => {
                let (flags, rules) = tree::get_list(&mut r)?;
                Msg::List { flags, rules }
            }
            T_ENTRIES => {
                let n = r.u32()? as usize;
                if n == 0 || n > MAX_LIST_BATCH {
                    return Err(malformed(format!("ENTRIES with {n} entries")));
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(ListEntry::get(&mut r)?);
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
                    ops.push(Op::get(&mut r)?);
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
                    results.push(OpResult::get(&mut r)?);
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
            T_SNAPSHOT => Msg::Snapshot(Box::new(SnapshotMsg::get(&mut r)?)),
            T_RANGES => {
                let (last, ranges) = snapshot::get_ranges(&mut r)?;
                Msg::Ranges { last, ranges }
            }
            T_CHUNK => Msg::Chunk(ChunkMsg::get(&mut r)?),
            T_DONE => Msg::Done(Summary::get(&mut r)?),
            t => {
                // The frame layer adds the protocol version (see known_type).
                return Err(fail(
                    Exit::Protocol,
                    format!("protocol error: unknown message type {t}"),
                ));
            }
        };
        if r.left() != 0 {
            return Err(malformed(format!(
                "{} trailing bytes after {}",
                r.left(),
                msg.name()
            )));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code_of;
    use crate::wire::options::{flags, WriteMode};
    use rustix::fs::FileType;

    const S_IFREG: u32 = FileType::RegularFile.as_raw_mode();
    const S_IFDIR: u32 = FileType::Directory.as_raw_mode();
    const S_IFLNK: u32 = FileType::Symlink.as_raw_mode();
    const S_IFIFO: u32 = FileType::Fifo.as_raw_mode();

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
        round_trip(Msg::BlockFetch {
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
            write_mode: Some(WriteMode::Clone),
            dest_written_bytes: 77,
            verify_mismatch_bytes: 8,
            snapshot: None,
        }));
        round_trip(Msg::Done(Summary::default()));
        round_trip(Msg::Start(StartMode::Delta));
        round_trip(Msg::Snapshot(Box::new(SnapshotMsg {
            base: Some([3; 32]),
            next: [4; 32],
            reason: Reason::Delta,
            snapshot_us: 1234,
            frozen_us: Some(99),
        })));
        round_trip(Msg::Snapshot(Box::new(SnapshotMsg {
            base: None,
            next: [4; 32],
            reason: Reason::NoBase,
            snapshot_us: 1,
            frozen_us: None,
        })));
        round_trip(Msg::Ranges {
            last: true,
            ranges: vec![DeltaRange {
                offset: 4096,
                len: 8192,
                verify: true,
            }],
        });
        round_trip(Msg::Ranges {
            last: false,
            ranges: Vec::new(),
        });
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
            dev: 7,
            ino: u64::MAX,
            nlink: 2,
            ..ListEntry::default()
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
            entry(EntryKind::Dir, "", S_IFDIR | 0o755, ""),
            entry(EntryKind::File, "a b/disk.img", S_IFREG | 0o600, ""),
            entry(EntryKind::Symlink, "a b/l", S_IFLNK | 0o777, "../../etc"),
            entry(EntryKind::Other, "fifo", S_IFIFO | 0o644, ""),
            ListEntry {
                rdev: 0x0103,
                ..entry(EntryKind::Other, "null", libc::S_IFCHR | 0o666, "")
            },
            ListEntry {
                xattrs: vec![
                    (
                        b"security.selinux".to_vec(),
                        b"system_u:object_r:virt_image_t:s0".to_vec(),
                    ),
                    (b"system.posix_acl_access".to_vec(), vec![2, 0, 0, 0]),
                    (b"user.a".to_vec(), Vec::new()),
                ],
                ..entry(EntryKind::File, "x", S_IFREG | 0o600, "")
            },
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
                xattrs: Vec::new(),
            },
            Op::Attrs {
                path: b"a/x".to_vec(),
                which: attrs::OWNER | attrs::XATTRS | attrs::ACLS,
                mode: 0,
                uid: 0,
                gid: 7,
                mtime_sec: 0,
                mtime_nsec: 0,
                xattrs: vec![
                    (b"system.posix_acl_default".to_vec(), vec![2, 0, 0, 0]),
                    (b"trusted.t".to_vec(), b"v".to_vec()),
                ],
            },
            Op::Delete {
                path: b"a/old.img".to_vec(),
            },
            Op::Link {
                path: b"a/b/second".to_vec(),
                target: b"first".to_vec(),
            },
            Op::Mknod {
                path: b"fifo".to_vec(),
                mode: S_IFIFO | 0o640,
                rdev: 0,
            },
            Op::Mknod {
                path: b"sda".to_vec(),
                mode: libc::S_IFBLK | 0o660,
                rdev: 0x0800,
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
            entry(EntryKind::File, "../x", S_IFREG, ""),
            entry(EntryKind::File, "/x", S_IFREG, ""),
            entry(EntryKind::File, "a//x", S_IFREG, ""),
            entry(EntryKind::File, "a/./x", S_IFREG, ""),
            entry(EntryKind::File, "x/", S_IFREG, ""),
            entry(EntryKind::File, "x\0", S_IFREG, ""),
            entry(EntryKind::File, "x", S_IFDIR, ""),
            entry(EntryKind::Symlink, "x", S_IFLNK, ""),
            entry(EntryKind::File, "x", S_IFREG, "target"),
            entry(EntryKind::Other, "x", S_IFREG, ""),
            // A device number on what is not a device.
            ListEntry {
                rdev: 1,
                ..entry(EntryKind::Other, "x", S_IFIFO, "")
            },
            ListEntry {
                rdev: 1,
                ..entry(EntryKind::File, "x", S_IFREG, "")
            },
        ];
        let xattr_entry = |x: Vec<(&str, usize)>| ListEntry {
            xattrs: x
                .into_iter()
                .map(|(n, len)| (n.as_bytes().to_vec(), vec![b'v'; len]))
                .collect(),
            ..entry(EntryKind::File, "x", S_IFREG, "")
        };
        let big = MAX_XATTR_BYTES / 2;
        let bad_xattrs = [
            vec![("system.other", 1)],
            vec![("user.", 1)],
            vec![("nonamespace", 1)],
            vec![("user.b", 1), ("user.a", 1)],
            vec![("user.a", 1), ("user.a", 2)],
            vec![("user.a", MAX_XATTR_VALUE + 1)],
            vec![("user.a", big), ("user.b", big), ("user.c", big)],
        ];
        for x in bad_xattrs {
            let e = xattr_entry(x.clone());
            let err = Msg::decode(&encode(Msg::Entries(vec![e]))).unwrap_err();
            assert_eq!(exit_code_of(&err), Exit::Protocol, "{x:?}");
        }
        let many: Vec<(String, usize)> = (0..=MAX_XATTRS)
            .map(|i| (format!("user.{i:04}"), 0))
            .collect();
        let e = xattr_entry(many.iter().map(|(n, l)| (n.as_str(), *l)).collect());
        assert!(Msg::decode(&encode(Msg::Entries(vec![e]))).is_err());
        for e in bad_entries {
            let err = Msg::decode(&encode(Msg::Entries(vec![e.clone()]))).unwrap_err();
            assert_eq!(exit_code_of(&err), Exit::Protocol, "{e:?}");
        }
        let mut e = entry(EntryKind::File, "x", S_IFREG, "");
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
                xattrs: Vec::new(),
            },
            Op::Attrs {
                path: b"d".to_vec(),
                which: attrs::MTIME,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime_sec: 0,
                mtime_nsec: 1_000_000_000,
                xattrs: Vec::new(),
            },
            // An attribute the op does not set.
            Op::Attrs {
                path: b"d".to_vec(),
                which: attrs::XATTRS,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime_sec: 0,
                mtime_nsec: 0,
                xattrs: vec![(b"system.posix_acl_access".to_vec(), Vec::new())],
            },
            Op::Attrs {
                path: b"d".to_vec(),
                which: 32,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime_sec: 0,
                mtime_nsec: 0,
                xattrs: Vec::new(),
            },
            Op::Link {
                path: b"a".to_vec(),
                target: b"../b".to_vec(),
            },
            Op::Link {
                path: b"a".to_vec(),
                target: Vec::new(),
            },
            Op::Link {
                path: b"a".to_vec(),
                target: b"a".to_vec(),
            },
            Op::Link {
                path: Vec::new(),
                target: b"a".to_vec(),
            },
            Op::Mknod {
                path: b"f".to_vec(),
                mode: S_IFREG | 0o644,
                rdev: 0,
            },
            Op::Mknod {
                path: b"f".to_vec(),
                mode: S_IFIFO | 0o644,
                rdev: 3,
            },
            Op::Mknod {
                path: b"d".to_vec(),
                mode: S_IFDIR | 0o755,
                rdev: 0,
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
            vec![T_LIST, 16, 0, 0, 0, 0, 0, 0, 0],
            vec![T_LIST, 0, 0, 0, 0, 255, 255, 0, 0],
            vec![T_LIST_END, 255, 255, 255, 255, 255, 255, 255, 255],
            vec![T_END, 0],
        ] {
            let e = Msg::decode(&frame).unwrap_err();
            assert_eq!(exit_code_of(&e), Exit::Protocol, "{frame:?}");
        }
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
}
