//! Cutting a byte stream into chunks, and zero detection.
//!
//! Content-defined chunking uses FastCDC (the 2020 variant, normalization
//! level 1) from the `fastcdc` crate, whose version is pinned in `Cargo.toml`:
//! both ends must cut identically, and the crate's cut points have changed
//! between releases. `tests/golden.rs` pins the cut points we produce.
//!
//! A cut depends only on the bytes from the chunk's start to at most `max`
//! bytes after it, so a scanner may feed any window of at least `max` bytes
//! (or the rest of the file) and get the same chunks as a whole-file pass.

use crate::error::{fail, Exit};

/// Smallest average chunk size accepted by `--chunk-size`.
pub const MIN_AVG: u32 = 4 * 1024;
/// Largest average chunk size accepted by `--chunk-size`.
pub const MAX_AVG: u32 = 1024 * 1024;
/// Largest chunk any configuration produces (`MAX_AVG * 4`); the protocol
/// refuses longer chunks before allocating for them.
pub const MAX_CHUNK: u32 = MAX_AVG * 4;
/// The default average chunk size.
pub const DEFAULT_AVG: u32 = 64 * 1024;

/// Validated chunking: content-defined (`min = avg / 4`, `max = avg * 4`,
/// `avg` a power of two) or fixed-size blocks at aligned offsets.
///
/// Fixed blocks skip the gear hash, so scanning is bound by BLAKE3 alone;
/// they find unchanged data only where it has not moved, which is what raw
/// disk images do. Content-defined chunks also find data that shifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    avg: u32,
    fixed: bool,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            avg: DEFAULT_AVG,
            fixed: false,
        }
    }
}

impl ChunkParams {
    /// Accepts an average size that is a power of two from 4 KiB to 1 MiB.
    ///
    /// The crate only debug-asserts its limits, and a non-power-of-two average
    /// is silently rounded to the nearest mask, so we refuse anything else.
    pub fn new(avg: u64) -> anyhow::Result<ChunkParams> {
        Ok(ChunkParams {
            avg: power_of_two_in(avg, MAX_AVG, "chunk size")?,
            fixed: false,
        })
    }

    /// Fixed-size blocks: a power of two from 4 KiB to 4 MiB.
    pub fn fixed(size: u64) -> anyhow::Result<ChunkParams> {
        Ok(ChunkParams {
            avg: power_of_two_in(size, MAX_CHUNK, "block size")?,
            fixed: true,
        })
    }

    /// The chunking as one number on the wire and in cache keys: the average
    /// chunk size, or the block size plus one for fixed blocks (sizes are
    /// powers of two, so bit 0 is free).
    pub fn code(&self) -> u32 {
        self.avg | u32::from(self.fixed)
    }

    /// The inverse of [`ChunkParams::code`], validating as the constructors do.
    pub fn from_code(code: u32) -> anyhow::Result<ChunkParams> {
        if code & 1 == 1 {
            ChunkParams::fixed(u64::from(code & !1))
        } else {
            ChunkParams::new(u64::from(code))
        }
    }

    pub fn avg(&self) -> u32 {
        self.avg
    }
    pub fn min(&self) -> u32 {
        if self.fixed {
            self.avg
        } else {
            self.avg / 4
        }
    }
    pub fn max(&self) -> u32 {
        if self.fixed {
            self.avg
        } else {
            self.avg * 4
        }
    }
}

/// `n` if it is a power of two from [`MIN_AVG`] to `max`, else a usage error.
fn power_of_two_in(n: u64, max: u32, what: &str) -> anyhow::Result<u32> {
    if n.is_power_of_two() && n >= u64::from(MIN_AVG) && n <= u64::from(max) {
        return Ok(n as u32);
    }
    Err(fail(
        Exit::Usage,
        format!(
            "invalid {what} {n}: must be a power of two from {} to {} (e.g. 64K)",
            crate::units::bytes(MIN_AVG.into()),
            crate::units::bytes(max.into())
        ),
    ))
}

/// Finds cut points for one [`ChunkParams`].
#[derive(Debug, Clone)]
pub struct Cutter {
    params: ChunkParams,
    mask_s: u64,
    mask_l: u64,
    /// Length of a chunk that starts inside at least `max` zero bytes.
    zero_run_len: u32,
}

impl Cutter {
    pub fn new(params: ChunkParams) -> Cutter {
        let (mask_s, mask_l) = fastcdc::v2020::select_masks(
            params.avg as usize,
            fastcdc::v2020::Normalization::Level1,
        );
        let mut c = Cutter {
            params,
            mask_s,
            mask_l,
            zero_run_len: 0,
        };
        let zeros = vec![0u8; params.max() as usize];
        c.zero_run_len = c.cut(&zeros) as u32;
        c
    }

    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// Length of the first chunk of `data`.
    ///
    /// `data` must hold at least `max` bytes, or all that is left of the file.
    pub fn cut(&self, data: &[u8]) -> usize {
        if self.params.fixed {
            // Blocks start at multiples of the size: the scan begins at 0
            // and every block but the last is full.
            return data.len().min(self.params.avg as usize);
        }
        // Zeros written out (free space of a guest filesystem that was never
        // trimmed) cut like a hole: the cut sees only the first `max` bytes,
        // and checking them for zeros is several times faster than the gear
        // hash (which stops at the first non-zero block on real data).
        let max = self.params.max() as usize;
        if self.zero_run_len != 0 && data.len() >= max && is_zero(&data[..max]) {
            return self.zero_run_len as usize;
        }
        let (_, n) = fastcdc::v2020::cut(
            data,
            self.params.min() as usize,
            self.params.avg as usize,
            self.params.max() as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        n
    }

    /// Length of the first chunk of `len` zero bytes (`len` ≤ `max` is cut
    /// for real, longer runs use the precomputed length): lets a scanner step
    /// over holes without reading or gear-hashing them, with the exact cut
    /// points a byte-by-byte pass would find.
    pub fn cut_zeros(&self, len: u64) -> usize {
        if len >= u64::from(self.params.max()) {
            self.zero_run_len as usize
        } else {
            let zeros = vec![0u8; len as usize];
            self.cut(&zeros)
        }
    }
}

/// True when every byte of `buf` is zero.
///
/// Word-wise OR over blocks so the compiler vectorizes it, with an early exit
/// per block because data chunks usually fail on the first bytes.
pub fn is_zero(buf: &[u8]) -> bool {
    const BLOCK: usize = 256;
    let mut blocks = buf.chunks_exact(BLOCK);
    for b in &mut blocks {
        if b.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_validated() {
        assert!(ChunkParams::new(64 * 1024).is_ok());
        assert!(ChunkParams::new(4096).is_ok());
        assert!(ChunkParams::new(1 << 20).is_ok());
        for bad in [0, 1, 2048, 3 * 1024, 2 << 20, 65535, u64::MAX] {
            assert!(ChunkParams::new(bad).is_err(), "{bad}");
        }
        let p = ChunkParams::default();
        assert_eq!((p.min(), p.avg(), p.max()), (16384, 65536, 262144));
    }

    #[test]
    fn fixed_blocks_are_aligned_and_coded_apart() {
        let p = ChunkParams::fixed(65536).unwrap();
        assert_eq!((p.min(), p.max()), (65536, 65536));
        let c = Cutter::new(p);
        assert_eq!(c.cut(&[1u8; 200_000]), 65536);
        assert_eq!(c.cut(&[1u8; 100]), 100);
        assert_eq!(c.cut_zeros(1 << 30), 65536);
        assert_ne!(p.code(), ChunkParams::new(65536).unwrap().code());
        assert_eq!(ChunkParams::from_code(p.code()).unwrap(), p);
        let d = ChunkParams::default();
        assert_eq!(ChunkParams::from_code(d.code()).unwrap(), d);
        for bad in [0u32, 1, 4099, 3 << 12, (8 << 20) | 1] {
            assert!(ChunkParams::from_code(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        let mut v = vec![0u8; 70000];
        v[69999] = 1;
        assert!(!is_zero(&v));
        v[69999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn zero_shortcut_matches_real_cut() {
        for avg in [4096u64, 65536] {
            let c = Cutter::new(ChunkParams::new(avg).unwrap());
            let big = vec![0u8; c.params().max() as usize * 3];
            assert_eq!(c.cut_zeros(big.len() as u64), c.cut(&big));
            for len in [0u64, 1, 100, 5000, u64::from(c.params().max()) - 1] {
                assert_eq!(c.cut_zeros(len), c.cut(&big[..len as usize]), "len {len}");
            }
        }
    }

    #[test]
    fn written_zeros_cut_as_the_gear_hash_does() {
        for avg in [4096u64, 65536, 1 << 20] {
            let c = Cutter::new(ChunkParams::new(avg).unwrap());
            let max = c.params().max() as usize;
            let (mask_s, mask_l) =
                fastcdc::v2020::select_masks(avg as usize, fastcdc::v2020::Normalization::Level1);
            let gear = |d: &[u8]| {
                fastcdc::v2020::cut(
                    d,
                    max / 16,
                    avg as usize,
                    max,
                    mask_s,
                    mask_l,
                    mask_s << 1,
                    mask_l << 1,
                )
                .1
            };
            // Zeros for exactly max bytes, then data; zeros then data inside
            // the window; and zeros to the end of a short input.
            for zeros in [max, max - 1, max / 2, 100] {
                let mut d = vec![0u8; zeros];
                d.extend((0..max as u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8));
                assert_eq!(c.cut(&d), gear(&d), "avg {avg} zeros {zeros}");
            }
            let short = vec![0u8; max - 1];
            assert_eq!(c.cut(&short), gear(&short));
        }
    }

    #[test]
    fn cut_never_exceeds_max_or_input() {
        let c = Cutter::new(ChunkParams::new(4096).unwrap());
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut pos = 0;
        while pos < data.len() {
            let n = c.cut(&data[pos..]);
            assert!(n > 0 && n <= c.params().max() as usize);
            if pos + n < data.len() {
                assert!(n >= c.params().min() as usize);
            }
            pos += n;
        }
    }
}
