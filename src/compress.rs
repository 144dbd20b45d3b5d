//! Literal chunk data on the wire: one zstd stream per connection.
//!
//! Compressing each chunk as its own frame costs about 1.5× the bytes on disk
//! images (`DESIGN-NOTES.md`): new data compresses far better with the
//! context of what came before. So the sender keeps one zstd stream for the
//! whole connection and flushes it after every chunk, which makes each
//! `CHUNK` message decodable as soon as it arrives.
//!
//! The receiver's decoder is bounded: its window is capped at
//! [`WINDOW_LOG_MAX`], and each chunk decodes into a buffer of exactly the
//! length the manifest promised, so a zstd bomb can neither allocate more nor
//! produce a byte past that length.

use anyhow::Result;
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use crate::error::{fail, Exit};

/// Largest zstd window the receiver accepts (32 MiB).
pub const WINDOW_LOG_MAX: u32 = 25;
/// Highest compression level accepted by `-z`.
pub const MAX_LEVEL: u8 = 19;

/// The sender's side of the stream.
pub struct StreamEncoder {
    enc: Encoder<'static>,
}

impl StreamEncoder {
    pub fn new(level: u8) -> Result<StreamEncoder> {
        let mut enc = Encoder::new(i32::from(level))
            .map_err(|e| anyhow::anyhow!("cannot start zstd at level {level}: {e}"))?;
        // The receiver refuses larger windows; stay within them.
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(WINDOW_LOG_MAX - 2))
            .map_err(|e| anyhow::anyhow!("zstd window: {e}"))?;
        Ok(StreamEncoder { enc })
    }

    /// Compresses `data` and flushes, replacing `out`'s contents with bytes
    /// that decode to exactly `data` given everything sent before.
    pub fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(data.len()) + 64);
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            self.grow(out);
            let mut o = OutBuffer::around_pos(out, out.len());
            self.enc
                .run(&mut input, &mut o)
                .map_err(|e| anyhow::anyhow!("zstd compression failed: {e}"))?;
        }
        loop {
            self.grow(out);
            let mut o = OutBuffer::around_pos(out, out.len());
            let left = self
                .enc
                .flush(&mut o)
                .map_err(|e| anyhow::anyhow!("zstd flush failed: {e}"))?;
            if left == 0 {
                return Ok(());
            }
        }
    }

    fn grow(&self, out: &mut Vec<u8>) {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity().max(64 * 1024));
        }
    }
}

/// The receiver's side of the stream.
pub struct StreamDecoder {
    dec: Decoder<'static>,
}

impl StreamDecoder {
    pub fn new() -> Result<StreamDecoder> {
        let mut dec = Decoder::new().map_err(|e| anyhow::anyhow!("cannot start zstd: {e}"))?;
        dec.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(WINDOW_LOG_MAX))
            .map_err(|e| anyhow::anyhow!("zstd window: {e}"))?;
        Ok(StreamDecoder { dec })
    }

    /// Decodes one chunk's payload into `out`, which must come out exactly full.
    pub fn decode(&mut self, payload: &[u8], out: &mut [u8]) -> Result<()> {
        let want = out.len();
        let mut input = InBuffer::around(payload);
        let mut o = OutBuffer::around(out);
        loop {
            let before = (input.pos(), o.pos());
            self.dec
                .run(&mut input, &mut o)
                .map_err(|e| bad(format!("zstd data corrupt: {e}")))?;
            let stalled = before == (input.pos(), o.pos());
            if o.pos() == want || (input.pos() == payload.len() && stalled) {
                break;
            }
        }
        if o.pos() == want {
            // Full: the payload (or the decoder's buffer) must hold nothing more.
            let mut probe = [0u8; 1];
            let mut p = OutBuffer::around(&mut probe[..]);
            self.dec
                .run(&mut input, &mut p)
                .map_err(|e| bad(format!("zstd data corrupt: {e}")))?;
            if p.pos() > 0 || input.pos() < payload.len() {
                return Err(bad(format!(
                    "chunk decompresses to more than its {want} bytes"
                )));
            }
        }
        if o.pos() != want {
            return Err(bad(format!(
                "chunk decompressed to {} bytes, expected {want}",
                o.pos()
            )));
        }
        Ok(())
    }
}

fn bad(msg: String) -> anyhow::Error {
    fail(Exit::Protocol, format!("protocol error: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_round_trips_chunk_by_chunk() {
        let mut e = StreamEncoder::new(3).unwrap();
        let mut d = StreamDecoder::new().unwrap();
        let mut wire = Vec::new();
        let chunks: Vec<Vec<u8>> = (0..20u8)
            .map(|i| {
                (0..(1000 + i as usize * 5000))
                    .map(|j| (j as u8).wrapping_mul(i))
                    .collect()
            })
            .collect();
        for c in &chunks {
            e.encode(c, &mut wire).unwrap();
            let mut out = vec![0u8; c.len()];
            d.decode(&wire, &mut out).unwrap();
            assert_eq!(&out, c);
        }
    }

    #[test]
    fn context_makes_repeats_cheap() {
        let mut e = StreamEncoder::new(3).unwrap();
        let mut x = 1u64;
        let block: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut wire = Vec::new();
        e.encode(&block, &mut wire).unwrap();
        assert!(wire.len() > 60000);
        e.encode(&block, &mut wire).unwrap();
        assert!(wire.len() < 1000, "second copy cost {}", wire.len());
    }

    #[test]
    fn length_lies_are_rejected() {
        let mut e = StreamEncoder::new(3).unwrap();
        let data = vec![7u8; 10000];
        let mut wire = Vec::new();
        e.encode(&data, &mut wire).unwrap();
        let mut d = StreamDecoder::new().unwrap();
        let mut small = vec![0u8; 9999];
        assert!(d.decode(&wire, &mut small).is_err());
        let mut d = StreamDecoder::new().unwrap();
        let mut big = vec![0u8; 10001];
        assert!(d.decode(&wire, &mut big).is_err());
        let mut d = StreamDecoder::new().unwrap();
        let mut out = vec![0u8; 10000];
        assert!(d
            .decode(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3], &mut out)
            .is_err());
    }

    #[test]
    fn bomb_is_bounded() {
        // 64 MiB of zeros compresses to a few KiB; a receiver promised 1 KiB
        // must fail without producing (or allocating) the rest.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
        assert!(bomb.len() < 64 * 1024);
        let mut d = StreamDecoder::new().unwrap();
        let mut out = vec![0u8; 1024];
        assert!(d.decode(&bomb, &mut out).is_err());
    }
}
