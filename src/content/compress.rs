//! Literal chunk data on the wire: one zstd stream per connection.
//!
//! Compressing each chunk as its own frame costs about 1.5× the bytes on disk
//! images (`docs/DESIGN.md`, finding 1): new data compresses far better with the
//! context of what came before. So the sender keeps one zstd stream for the
//! whole connection and flushes it after every chunk, which makes each
//! `CHUNK` message decodable as soon as it arrives.
//!
//! On a first copy, where every chunk travels, the level adapts to the link
//! ([`Adapt`]): between 1 and the level asked for, lowered while compressing
//! is what holds the transfer back and raised while the link is. A level
//! change ends the zstd frame (a new one starts at the new level), which the
//! decoder follows without being told: frames simply follow each other.
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
    level: u8,
    /// The end of a frame closed by [`StreamEncoder::set_level`], sent at
    /// the head of the next payload.
    pending: Vec<u8>,
}

impl StreamEncoder {
    pub fn new(level: u8) -> Result<StreamEncoder> {
        let mut enc = Encoder::new(i32::from(level))
            .map_err(|e| anyhow::anyhow!("cannot start zstd at level {level}: {e}"))?;
        // The receiver refuses larger windows; stay within them.
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(WINDOW_LOG_MAX - 2))
            .map_err(|e| anyhow::anyhow!("zstd window: {e}"))?;
        Ok(StreamEncoder {
            enc,
            level,
            pending: Vec::new(),
        })
    }

    pub fn level(&self) -> u8 {
        self.level
    }

    /// Compresses what follows at `level`. zstd applies a new level only
    /// from a frame's start, so this ends the current frame (its last bytes
    /// lead the next payload) and the next [`StreamEncoder::encode`] starts
    /// a new one: the data before is no longer a source of matches.
    pub fn set_level(&mut self, level: u8) -> Result<()> {
        if level == self.level {
            return Ok(());
        }
        loop {
            self.grow_pending();
            let at = self.pending.len();
            let mut o = OutBuffer::around_pos(&mut self.pending, at);
            let left = self
                .enc
                .finish(&mut o, true)
                .map_err(|e| anyhow::anyhow!("zstd frame end failed: {e}"))?;
            if left == 0 {
                break;
            }
        }
        self.enc
            .set_parameter(zstd::stream::raw::CParameter::CompressionLevel(i32::from(
                level,
            )))
            .map_err(|e| anyhow::anyhow!("cannot set zstd level {level}: {e}"))?;
        self.level = level;
        Ok(())
    }

    fn grow_pending(&mut self) {
        if self.pending.capacity() - self.pending.len() < 64 {
            self.pending.reserve(256);
        }
    }

    /// Compresses `data` and flushes, replacing `out`'s contents with bytes
    /// that decode to exactly `data` given everything sent before.
    pub fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(data.len()) + 64 + self.pending.len());
        out.append(&mut self.pending);
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

/// Picks the level of a first copy's stream from how the sending side
/// spends its time, one segment (16 MiB of source) at a time: working
/// (reading, cutting, hashing, compressing) or blocked handing batches on
/// because the link (ssh, the network, the receiver) is slower. Over a
/// window of [`Adapt::WINDOW`] segments: blocked under 5% of the time means
/// compressing holds the transfer back, so one level lower; over 30%
/// means the link does and there is time to spare, so one level higher.
/// At most one step per window, so a level is measured before it moves
/// again and each frame restart (a lost context) is amortized over 128 MiB.
#[derive(Debug, Clone)]
pub struct Adapt {
    lo: u8,
    hi: u8,
    level: u8,
    segments: u32,
    working: std::time::Duration,
    blocked: std::time::Duration,
}

impl Adapt {
    /// Segments per decision.
    pub const WINDOW: u32 = 8;

    /// Between 1 and `hi` (the level asked for), starting at `hi`.
    pub fn new(hi: u8) -> Adapt {
        let hi = hi.max(1);
        Adapt {
            lo: 1,
            hi,
            level: hi,
            segments: 0,
            working: std::time::Duration::ZERO,
            blocked: std::time::Duration::ZERO,
        }
    }

    /// Records one segment; returns the new level when it changes.
    pub fn record(
        &mut self,
        working: std::time::Duration,
        blocked: std::time::Duration,
    ) -> Option<u8> {
        self.segments += 1;
        self.working += working;
        self.blocked += blocked;
        if self.segments < Self::WINDOW {
            return None;
        }
        let total = (self.working + self.blocked).as_secs_f64();
        let share = if total > 0.0 {
            self.blocked.as_secs_f64() / total
        } else {
            0.0
        };
        self.segments = 0;
        self.working = std::time::Duration::ZERO;
        self.blocked = std::time::Duration::ZERO;
        let next = if share < 0.05 {
            self.level.saturating_sub(1).max(self.lo)
        } else if share > 0.30 {
            (self.level + 1).min(self.hi)
        } else {
            self.level
        };
        (next != self.level).then(|| {
            self.level = next;
            next
        })
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
    fn level_changes_between_chunks_decode_in_one_stream() {
        let mut e = StreamEncoder::new(3).unwrap();
        let mut d = StreamDecoder::new().unwrap();
        let mut wire = Vec::new();
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog "
            .iter()
            .copied()
            .cycle()
            .take(70_000)
            .collect();
        for (i, level) in [3u8, 3, 1, 1, 2, 3, 19, 1].into_iter().enumerate() {
            e.set_level(level).unwrap();
            assert_eq!(e.level(), level);
            let mut chunk = text.clone();
            chunk[i] = i as u8; // each differs
            e.encode(&chunk, &mut wire).unwrap();
            assert!(
                wire.len() < chunk.len() / 4,
                "level {level}: {}",
                wire.len()
            );
            let mut out = vec![0u8; chunk.len()];
            d.decode(&wire, &mut out).unwrap();
            assert_eq!(out, chunk, "chunk {i} at level {level}");
        }
    }

    #[test]
    fn adapt_steps_down_when_compressing_is_the_bottleneck_and_up_when_the_link_is() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        let mut a = Adapt::new(3);
        let window = |a: &mut Adapt, work: u64, blocked: u64| {
            let mut out = None;
            for _ in 0..Adapt::WINDOW {
                if let Some(l) = a.record(ms(work), ms(blocked)) {
                    assert!(out.is_none(), "one step per window");
                    out = Some(l);
                }
            }
            out
        };
        // Never blocked: compressing is the bottleneck.
        assert_eq!(window(&mut a, 100, 0), Some(2));
        assert_eq!(window(&mut a, 100, 1), Some(1));
        assert_eq!(window(&mut a, 100, 0), None, "1 is the floor");
        // In between: stay.
        assert_eq!(window(&mut a, 100, 20), None);
        // Mostly blocked: the link is slower; climb back, not past 3.
        assert_eq!(window(&mut a, 50, 100), Some(2));
        assert_eq!(window(&mut a, 50, 100), Some(3));
        assert_eq!(window(&mut a, 50, 100), None);
        // Level 1 asked for: nothing to adapt.
        let mut one = Adapt::new(1);
        assert_eq!(window(&mut one, 100, 0), None);
        assert_eq!(window(&mut one, 10, 100), None);
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
