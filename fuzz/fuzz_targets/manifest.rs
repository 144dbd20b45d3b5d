//! `manifest::Validator` over arbitrary batches. Never a panic; whatever it
//! accepts tiles `[0, covered)` without gaps or overlaps, stays within the
//! declared size and the chunk limits, and `finish` agrees with what arrived.
//!
//! Input: size u64 LE, chunk-size selector u8, then batches, each a u16 LE
//! length followed by that many bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmsync::content::chunk::ChunkParams;
use vmsync::content::hash::FileDigest;
use vmsync::content::manifest::{Entry, Kind, Validator};

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    // Small sizes are far more interesting than random u64s: mostly keep
    // them small, sometimes keep all 64 bits.
    let raw = u64::from_le_bytes(data[..8].try_into().unwrap());
    let size = if raw >> 63 == 1 {
        raw & (u64::MAX >> 1)
    } else {
        raw % (1 << 22)
    };
    let params = ChunkParams::new(4096u64 << (data[8] % 9)).unwrap();
    let (min, max) = (u64::from(params.min()), u64::from(params.max()));
    let mut v = Validator::new(size, params);
    let mut rest = &data[9..];
    let mut all: Vec<Entry> = Vec::new();
    let mut digest = FileDigest::default();
    let mut failed = false;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let batch = &rest[2..2 + n];
        rest = &rest[2 + n..];
        let before = all.len();
        if v.decode_batch(batch, &mut all).is_err() {
            failed = true;
            break;
        }
        assert!(all.len() > before, "an accepted batch adds entries");
    }
    let mut pos = 0u64;
    for e in &all {
        assert_eq!(e.offset, pos, "gap or overlap at {pos}");
        assert!(!e.is_empty());
        match e.kind {
            Kind::Data { len, hash } => {
                assert!(u64::from(len) <= max, "chunk longer than max");
                digest.add_data(u64::from(len), &hash);
            }
            Kind::Zero { len } => digest.add_zero(len),
        }
        pos = e.end();
        assert!(pos <= size, "entries past the declared size");
        assert!(e.len() >= min || pos == size, "short entry before the end");
    }
    if failed {
        return;
    }
    assert_eq!(v.covered(), pos);
    let d = digest.finish();
    let count = all.len() as u64;
    assert_eq!(v.finish(count, &d).is_ok(), pos == size);
    assert!(v.finish(count + 1, &d).is_err());
});
