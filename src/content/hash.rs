//! Chunk identity: the BLAKE3 hash of a chunk's bytes, and the file digest.

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Length of a chunk hash on the wire and in memory.
pub const HASH_LEN: usize = 32;

/// The BLAKE3 hash of one chunk's bytes: the chunk's name on both ends.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; HASH_LEN]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(data).as_bytes())
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight bytes are plenty to tell chunks apart in a debug print.
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

/// A `Hasher` for maps keyed by BLAKE3 output: the key is already uniformly
/// random, so its first eight bytes are the hash. SipHash would only cost time.
#[derive(Default)]
pub struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its bytes; fold the first eight in.
        let mut b = [0u8; 8];
        let n = bytes.len().min(8);
        b[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(b);
    }
    fn write_usize(&mut self, _: usize) {
        // The length prefix std writes for slices carries no entropy.
    }
}

/// Build-hasher for `HashMap<ChunkHash, _>`.
pub type ChunkHashMap<V> =
    std::collections::HashMap<ChunkHash, V, BuildHasherDefault<PrehashedHasher>>;

/// Digest of a whole file: BLAKE3 over its manifest (every entry's kind,
/// length and chunk hash, in order).
///
/// It commits to every byte of the file as surely as a BLAKE3 of the bytes
/// would, since each chunk hash is one, but it costs nothing beyond the chunk
/// hashes both ends compute anyway, and holes are not hashed byte by byte.
#[derive(Clone)]
pub struct FileDigest(blake3::Hasher);

impl Default for FileDigest {
    fn default() -> Self {
        FileDigest(blake3::Hasher::new_derive_key(
            "vmsync 2026-11 file digest v1",
        ))
    }
}

impl FileDigest {
    pub fn add_data(&mut self, len: u64, hash: &ChunkHash) {
        self.0.update(&[0]);
        self.0.update(&len.to_le_bytes());
        self.0.update(&hash.0);
    }
    pub fn add_zero(&mut self, len: u64) {
        self.0.update(&[1]);
        self.0.update(&len.to_le_bytes());
    }
    pub fn finish(&self) -> ChunkHash {
        ChunkHash(*self.0.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_blake3_and_hex_displays() {
        let h = ChunkHash::of(b"abc");
        assert_eq!(
            h.to_string(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    #[test]
    fn digest_depends_on_order_and_kind() {
        let a = ChunkHash::of(b"a");
        let b = ChunkHash::of(b"b");
        let mut d1 = FileDigest::default();
        d1.add_data(1, &a);
        d1.add_data(1, &b);
        let mut d2 = FileDigest::default();
        d2.add_data(1, &b);
        d2.add_data(1, &a);
        assert_ne!(d1.finish(), d2.finish());
        let mut z1 = FileDigest::default();
        z1.add_zero(10);
        let mut z2 = FileDigest::default();
        z2.add_zero(11);
        assert_ne!(z1.finish(), z2.finish());
    }
}
