//! The receiver's manifest cache: what a destination file holds, remembered
//! so that the next sync to it need not read it all again.
//!
//! After a sync the receiver stores the manifest of the file it just wrote,
//! keyed by the destination's path and checked against the file's device,
//! inode, size, mtime and ctime (ctime cannot be set by users, and any write
//! or rename moves it). The next run against the same, untouched destination
//! takes its chunk list from here instead of scanning it. A stale entry is
//! harmless: every chunk reused from the destination is re-hashed as it is
//! read, so a wrong cache costs a re-fetch, never wrong data.
//!
//! The cache lives under `$VMSYNC_CACHE_DIR`, else `$XDG_CACHE_HOME/vmsync`,
//! else `~/.cache/vmsync` — never beside the images. It keeps at most 1000
//! entries, and none older than 90 days.
//!
//! # File layout (integers little-endian)
//!
//! | offset | size | field                                              |
//! |--------|------|----------------------------------------------------|
//! | 0      | 8    | magic `VMSYNCMC`                                   |
//! | 8      | 4    | format version ([`CACHE_VERSION`])                 |
//! | 12     | 4    | chunking the manifest was cut with (`ChunkParams::code`) |
//! | 16     | 56   | dev, ino, size (u64 each), mtime s, mtime ns, ctime s, ctime ns (i64 each) |
//! | 72     | 32   | origin: the id of the `--snapshot` clone whose bytes the file holds (all zero: none; see [`crate::wire::messages::snapshot`]) |
//! | 104    | 8    | entry count (`u64::MAX`: no manifest, only the origin) |
//! | 112    | …    | manifest batches, each: length u32 + a batch as in [`crate::content::manifest`] |
//! | end−32 | 32   | BLAKE3 of everything before it                     |
//!
//! A cache file is at most [`MAX_CACHE_FILE`] bytes; anything malformed,
//! truncated or of another version is ignored (and the file scanned).
//!
//! The origin is what lets a `--snapshot` sender send only what changed
//! since its previous clone: it is recorded only after a run that wrote (or
//! found up to date) exactly that clone's bytes, and it is believed only
//! while the file's identity above is unchanged, so any later write to the
//! destination (which moves its ctime) makes the next run a full one. A run
//! that sent only ranges keeps no manifest: its old one is stale there.

use std::fs::{File, Metadata};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::content::chunk::ChunkParams;
use crate::content::manifest::{encode_batch, Entry, Validator, MAX_BATCH};
use crate::wire::messages::SnapshotId;

pub const CACHE_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"VMSYNCMC";
/// Largest cache file read (a 16 TiB image at 64 KiB chunks is ~10 GiB of
/// manifest, so huge images at tiny chunks simply are not cached).
pub const MAX_CACHE_FILE: u64 = 1 << 30;
const HEADER: usize = 112;
/// The entry count that says no manifest is kept.
const NO_MANIFEST: u64 = u64::MAX;

/// The directory of the cache, if one can be named.
pub fn dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("VMSYNC_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("vmsync"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/vmsync"))
}

/// Cache file for a destination path (its absolute form, hashed).
fn entry_path(dest: &Path, params: ChunkParams) -> Option<PathBuf> {
    let abs = std::path::absolute(dest).ok()?;
    let mut h = blake3::Hasher::new();
    h.update(abs.as_os_str().as_encoded_bytes());
    h.update(&params.code().to_le_bytes());
    Some(dir()?.join(format!("{}.manifest", &h.finalize().to_hex()[..32])))
}

fn key(meta: &Metadata, params: ChunkParams) -> Vec<u8> {
    let mut k = Vec::with_capacity(HEADER);
    k.extend_from_slice(MAGIC);
    k.extend_from_slice(&CACHE_VERSION.to_le_bytes());
    k.extend_from_slice(&params.code().to_le_bytes());
    for v in [meta.dev(), meta.ino(), meta.len()] {
        k.extend_from_slice(&v.to_le_bytes());
    }
    for v in [
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    ] {
        k.extend_from_slice(&v.to_le_bytes());
    }
    k
}

/// The cache file of exactly this file (`meta` from the open file) and
/// these chunk parameters, checksum and identity checked: its body.
fn read_entry(dest: &Path, meta: &Metadata, params: ChunkParams) -> Option<Vec<u8>> {
    let path = entry_path(dest, params)?;
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    if !(HEADER as u64 + 32..=MAX_CACHE_FILE).contains(&len) {
        return None;
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.read_to_end(&mut buf).ok()?;
    let sum: [u8; 32] = buf[buf.len() - 32..].try_into().ok()?;
    buf.truncate(buf.len() - 32);
    if blake3::hash(&buf).as_bytes() != &sum {
        return None;
    }
    let want = key(meta, params);
    (buf[..want.len()] == want[..]).then_some(buf)
}

/// The cached manifest of `dest`, if the cache holds one for exactly this
/// file (`meta` from the open file) and these chunk parameters.
pub fn load(dest: &Path, meta: &Metadata, params: ChunkParams) -> Option<Vec<Entry>> {
    let body = read_entry(dest, meta, params)?;
    let count = u64::from_le_bytes(body[104..112].try_into().ok()?);
    if count == NO_MANIFEST {
        return None;
    }
    let mut v = Validator::new(meta.len(), params);
    let mut entries = Vec::new();
    let mut rest = &body[HEADER..];
    while !rest.is_empty() {
        let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let batch = rest.get(4..4 + n)?;
        v.decode_batch(batch, &mut entries).ok()?;
        rest = &rest[4 + n..];
    }
    if entries.len() as u64 != count || v.covered() != meta.len() {
        return None;
    }
    Some(entries)
}

/// The `--snapshot` clone whose bytes `dest` holds, if the cache recorded
/// one for exactly this file.
pub fn origin(dest: &Path, meta: &Metadata, params: ChunkParams) -> Option<SnapshotId> {
    let body = read_entry(dest, meta, params)?;
    let id: SnapshotId = body[72..104].try_into().ok()?;
    (id != [0; 32]).then_some(id)
}

/// Records that `file` (now at `dest`) holds `entries` (`None`: keep no
/// manifest) and the bytes of the clone `origin`. Written to a temp file
/// and renamed, so a reader never sees half a cache file.
pub fn store(
    dest: &Path,
    file: &File,
    params: ChunkParams,
    entries: Option<&[Entry]>,
    origin: Option<SnapshotId>,
) -> Result<()> {
    let Some(path) = entry_path(dest, params) else {
        return Ok(());
    };
    let meta = file.metadata().context("stat the written file")?;
    let mut body = key(&meta, params);
    body.extend_from_slice(&origin.unwrap_or([0; 32]));
    body.extend_from_slice(
        &entries
            .map_or(NO_MANIFEST, |e| e.len() as u64)
            .to_le_bytes(),
    );
    let mut batch = Vec::new();
    for part in entries.unwrap_or_default().chunks(MAX_BATCH) {
        batch.clear();
        encode_batch(part, &mut batch);
        body.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        body.extend_from_slice(&batch);
    }
    if body.len() as u64 + 32 > MAX_CACHE_FILE {
        return Ok(());
    }
    let sum = *blake3::hash(&body).as_bytes();
    body.extend_from_slice(&sum);
    let dir = path.parent().expect("cache entries live in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("create a file in {}", dir.display()))?;
    tmp.write_all(&body)?;
    tmp.persist(&path)
        .map_err(|e| e.error)
        .with_context(|| format!("write {}", path.display()))?;
    prune(dir);
    Ok(())
}

/// Drops what the cache says of `dest` (a run that changed it without
/// knowing its new manifest or origin).
pub fn forget(dest: &Path, params: ChunkParams) {
    if let Some(path) = entry_path(dest, params) {
        let _ = std::fs::remove_file(path);
    }
}

/// Most entries kept; the least recently written go first.
const MAX_ENTRIES: usize = 1000;
/// Entries not rewritten for this long belong to destinations no longer synced.
const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// Keeps the cache from growing without bound: one entry per destination
/// ever synced would otherwise accumulate forever.
fn prune(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let now = std::time::SystemTime::now();
    let mut entries: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".manifest"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    entries.sort();
    let excess = entries.len().saturating_sub(MAX_ENTRIES);
    for (k, (mtime, path)) in entries.iter().enumerate() {
        let old = now.duration_since(*mtime).is_ok_and(|age| age > MAX_AGE);
        if k < excess || old {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::hash::ChunkHash;
    use crate::content::manifest::Kind;

    #[test]
    fn stores_loads_and_notices_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("VMSYNC_CACHE_DIR", dir.path().join("cache"));
        let params = ChunkParams::new(4096).unwrap();
        let dest = dir.path().join("img");
        std::fs::write(&dest, vec![7u8; 5000]).unwrap();
        let entries = vec![
            Entry {
                offset: 0,
                kind: Kind::Data {
                    len: 3000,
                    hash: ChunkHash([1; 32]),
                },
            },
            Entry {
                offset: 3000,
                kind: Kind::Zero { len: 2000 },
            },
        ];
        let f = File::open(&dest).unwrap();
        store(&dest, &f, params, Some(&entries), None).unwrap();
        let meta = f.metadata().unwrap();
        assert_eq!(load(&dest, &meta, params), Some(entries.clone()));
        assert_eq!(origin(&dest, &meta, params), None);
        // An origin alone, and with a manifest.
        store(&dest, &f, params, None, Some([7; 32])).unwrap();
        assert_eq!(load(&dest, &meta, params), None);
        assert_eq!(origin(&dest, &meta, params), Some([7; 32]));
        store(&dest, &f, params, Some(&entries), Some([8; 32])).unwrap();
        assert_eq!(load(&dest, &meta, params), Some(entries.clone()));
        assert_eq!(origin(&dest, &meta, params), Some([8; 32]));
        // Other chunk parameters: no entry.
        assert_eq!(load(&dest, &meta, ChunkParams::new(8192).unwrap()), None);
        // The file is written to: ctime moves, the entry no longer applies.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&dest)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        let meta2 = std::fs::metadata(&dest).unwrap();
        assert_eq!(load(&dest, &meta2, params), None);
        assert_eq!(origin(&dest, &meta2, params), None);
        // A corrupted cache file is ignored, not trusted.
        store(
            &dest,
            &File::open(&dest).unwrap(),
            params,
            Some(&[Entry {
                offset: 0,
                kind: Kind::Zero { len: 5001 },
            }]),
            Some([9; 32]),
        )
        .unwrap();
        let p = entry_path(&dest, params).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 40] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(load(&dest, &meta2, params), None);
        assert_eq!(origin(&dest, &meta2, params), None);
    }

    #[test]
    fn prune_keeps_the_newest_entries() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for k in 0..MAX_ENTRIES + 5 {
            let p = dir.path().join(format!("{k:05}.manifest"));
            std::fs::write(&p, b"x").unwrap();
            let f = File::options().write(true).open(&p).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(k as u64))
                .unwrap();
        }
        let ancient = dir.path().join("ancient.manifest");
        std::fs::write(&ancient, b"x").unwrap();
        File::options()
            .write(true)
            .open(&ancient)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - MAX_AGE * 2)
            .unwrap();
        std::fs::write(dir.path().join("unrelated"), b"x").unwrap();
        prune(dir.path());
        assert!(!ancient.exists());
        // The ancient one and the five oldest of the rest make room.
        for k in 0..5 {
            assert!(!dir.path().join(format!("{k:05}.manifest")).exists(), "{k}");
        }
        assert!(dir.path().join("00005.manifest").exists());
        assert!(dir
            .path()
            .join(format!("{:05}.manifest", MAX_ENTRIES + 4))
            .exists());
        assert!(dir.path().join("unrelated").exists());
    }
}
