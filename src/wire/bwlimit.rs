//! `--bwlimit RATE`: caps the rate at which we write to the peer, so a
//! daytime sync does not starve production traffic of bandwidth.
//!
//! What is limited is wire bytes: [`Limited`] wraps the pipe to the peer, so
//! it counts data after compression and including protocol framing, as rsync
//! does. That is what the network carries, which is what the limit is for;
//! with `-z` more file data fits under the same limit.
//!
//! Rates parse as rsync's do ([`parse_rate`]): a bare number is KiB/s, so
//! `--bwlimit 500` means the same here as it does to an rsync user.
//!
//! The mechanism is a token bucket ([`Limiter`]) that a writer draws from
//! before each slice of a write, sleeping off any deficit. Big writes are cut
//! into slices of about 50 ms of traffic so that a multi-megabyte frame goes
//! out as a steady stream rather than a line-rate burst followed by a stall.

use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Smallest bucket and slice: below this, per-write overhead (a lock, a
/// sleep, a syscall) would dominate at low rates.
const MIN_CHUNK: u64 = 4096;

/// Tokens are kept in billionths of a byte, so that refilling by elapsed
/// nanoseconds (`ns × bytes/s`) is exact integer arithmetic and rounding
/// never accumulates into a drift from the configured rate.
const NANOS: u128 = 1_000_000_000;

const EXAMPLES: &str = "examples: 500 (= 500 KiB/s), 1.5M, 10MiB/s; 0 = unlimited";

/// Parses a rate as rsync does: a bare number is KiB/s; suffixes K, M, G
/// (binary, optional trailing "B", "iB", "/s"), case-insensitive; decimals
/// allowed ("1.5M"). 0 means unlimited -> Ok(None). Junk, negative, overflow
/// -> Err(message naming the input and giving examples).
///
/// Returns bytes per second. Fractions of a byte are dropped.
pub fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    let bad = |why: &str| format!("'{s}' {why} ({EXAMPLES})");
    let t = s.trim();
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(num_end);
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (num, None),
    };
    // Require digits on both sides of a dot: ".5" and "5." are more likely
    // typos than deliberate, and "1.2.3" is certainly junk.
    let frac_ok = frac.is_none_or(|f| !f.is_empty() && !f.contains('.'));
    if int.is_empty() || !frac_ok {
        return Err(bad("is not a rate"));
    }
    let frac = frac.unwrap_or("");

    let unit = unit.to_ascii_uppercase();
    let (stem, per_sec) = match unit.strip_suffix("/S") {
        Some(stem) => (stem, true),
        None => (unit.as_str(), false),
    };
    let shift: u32 = match stem {
        // "500/s" and "500B" read as bytes per second to most people, but
        // rsync would take the bare number as KiB/s: refuse the ambiguity.
        "" if !per_sec => 10,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(bad("has an unknown unit (use K, M or G)")),
    };

    if int.bytes().chain(frac.bytes()).all(|b| b == b'0') {
        return Ok(None);
    }
    let too_large = || bad("is too large");
    let int: u128 = int.parse::<u64>().map_err(|_| too_large())?.into();
    // 19 digits keep 10^len and the product below within u128; further
    // digits are worth less than a byte even with the G multiplier.
    let frac = &frac[..frac.len().min(19)];
    let (frac_val, frac_scale) = if frac.is_empty() {
        (0, 1)
    } else {
        let v: u128 = frac.parse().map_err(|_| bad("is not a rate"))?;
        (v, 10u128.pow(frac.len() as u32))
    };
    let mult = 1u128 << shift;
    let bytes = int * mult + frac_val * mult / frac_scale;
    let bytes = u64::try_from(bytes).map_err(|_| too_large())?;
    if bytes == 0 {
        // Rounding a nonzero rate down to 0 would silently mean unlimited.
        return Err(bad("is less than 1 byte per second"));
    }
    Ok(Some(bytes))
}

/// A token bucket shared by the writers it limits (Clone = same bucket).
///
/// A rate of 0 means unlimited, matching [`parse_rate`], and is never used as
/// a divisor.
#[derive(Clone)]
pub struct Limiter {
    shared: Arc<Shared>,
}

struct Shared {
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    /// Most tokens the bucket holds (in billionths of a byte): about 100 ms
    /// of traffic, which bounds the burst after an idle spell.
    capacity: i128,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    /// Billionths of a byte; negative while writers owe (have reserved bytes
    /// whose time has not yet come).
    tokens: i128,
    last: Instant,
}

impl Limiter {
    pub fn new(bytes_per_sec: u64) -> Limiter {
        let capacity = (bytes_per_sec / 10).max(MIN_CHUNK);
        Limiter {
            shared: Arc::new(Shared {
                rate: bytes_per_sec,
                capacity: i128::from(capacity) * NANOS as i128,
                // Starting empty rather than full: a full bucket would let
                // the first 100 ms worth out at once, so a short transfer
                // would average well above the limit (1 MiB at 4 MiB/s in
                // 0.15 s instead of 0.25 s). Empty costs the first write
                // only its own bytes' worth of time.
                bucket: Mutex::new(Bucket {
                    tokens: 0,
                    last: Instant::now(),
                }),
            }),
        }
    }

    /// Blocks until `n` bytes may go out.
    pub fn take(&self, n: usize) {
        let rate = self.shared.rate;
        if rate == 0 || n == 0 {
            return;
        }
        let wait = {
            let mut b = self.lock();
            self.refill(&mut b);
            b.tokens = b.tokens.saturating_sub(n as i128 * NANOS as i128);
            if b.tokens >= 0 {
                return;
            }
            // The debt stays recorded while we sleep (outside the lock), so
            // writers sharing the bucket queue up behind each other instead
            // of all waking at once; sleeping exactly the debt's worth keeps
            // the long-run rate exact, and oversleeping is credited back by
            // the next refill (up to the capacity).
            let debt = b.tokens.unsigned_abs();
            let ns = debt.div_ceil(u128::from(rate));
            Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
        };
        thread::sleep(wait);
    }

    /// Returns `n` bytes taken but not sent (a short or failed write), so a
    /// retry of the same bytes is not charged twice.
    fn give_back(&self, n: usize) {
        if self.shared.rate == 0 || n == 0 {
            return;
        }
        let mut b = self.lock();
        let tokens = b.tokens.saturating_add(n as i128 * NANOS as i128);
        b.tokens = tokens.min(self.shared.capacity);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // The critical sections cannot leave the bucket inconsistent, so a
        // panic elsewhere while holding the lock is no reason to stop.
        self.shared
            .bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn refill(&self, b: &mut Bucket) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.last).as_nanos();
        b.last = now;
        // Saturating: a long idle spell at a rate near u64::MAX overflows
        // even u128, and the capacity caps the result anyway.
        let gain = elapsed.saturating_mul(u128::from(self.shared.rate));
        let gain = i128::try_from(gain).unwrap_or(i128::MAX);
        b.tokens = b.tokens.saturating_add(gain).min(self.shared.capacity);
    }

    /// Largest slice [`Limited`] writes at once: about 50 ms of traffic.
    fn slice_len(&self) -> usize {
        match self.shared.rate {
            0 => usize::MAX,
            rate => usize::try_from((rate / 20).max(MIN_CHUNK)).unwrap_or(usize::MAX),
        }
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("bytes_per_sec", &self.shared.rate)
            .finish_non_exhaustive()
    }
}

/// A `Write` that passes everything to `inner`, never faster than the limiter
/// allows. Large writes are split into slices (so a 8 MiB frame does not
/// produce a burst followed by a long stall): each slice at most
/// max(rate/20, 4 KiB) bytes.
#[derive(Debug)]
pub struct Limited<W> {
    inner: W,
    limiter: Limiter,
    slice: usize,
}

impl<W: Write> Limited<W> {
    pub fn new(inner: W, limiter: Limiter) -> Self {
        let slice = limiter.slice_len();
        Limited {
            inner,
            limiter,
            slice,
        }
    }

    /// Replaces the limit (the server learns it from the client's `OPEN`,
    /// after its writer exists).
    pub fn set_limiter(&mut self, limiter: Limiter) {
        self.slice = limiter.slice_len();
        self.limiter = limiter;
    }
}

impl<W: Write> Write for Limited<W> {
    /// Writes at most one slice and returns how many of its bytes `inner`
    /// took; `write_all` loops, pacing each slice.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len().min(self.slice);
        // Paid for before writing, so the wait precedes the bytes rather
        // than following a burst.
        self.limiter.take(len);
        match self.inner.write(&buf[..len]) {
            Ok(n) => {
                self.limiter.give_back(len.saturating_sub(n));
                Ok(n)
            }
            Err(e) => {
                self.limiter.give_back(len);
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;

    #[test]
    fn bare_numbers_are_kib() {
        assert_eq!(parse_rate("500"), Ok(Some(500 * KIB)));
        assert_eq!(parse_rate(" 1 "), Ok(Some(KIB)));
        assert_eq!(parse_rate("1.5"), Ok(Some(1536)));
    }

    #[test]
    fn suffixes_are_binary_and_case_insensitive() {
        for s in ["2K", "2k", "2KB", "2kib", "2KiB", "2K/s", "2kB/s", "2KiB/S"] {
            assert_eq!(parse_rate(s), Ok(Some(2 * KIB)), "{s}");
        }
        for s in ["10M", "10m", "10MB", "10MiB", "10MiB/s", "10mb/s"] {
            assert_eq!(parse_rate(s), Ok(Some(10 * MIB)), "{s}");
        }
        for s in ["3G", "3g", "3GB", "3GiB", "3GiB/s"] {
            assert_eq!(parse_rate(s), Ok(Some(3 << 30)), "{s}");
        }
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_rate("1.5M"), Ok(Some(3 * MIB / 2)));
        assert_eq!(parse_rate("0.5G"), Ok(Some(512 * MIB)));
        assert_eq!(parse_rate("0.25k"), Ok(Some(256)));
        // Fractions of a byte are dropped, not rounded up.
        assert_eq!(parse_rate("0.001K"), Ok(Some(1)));
        assert_eq!(parse_rate("1.0000000000000000000000000001M"), Ok(Some(MIB)));
    }

    #[test]
    fn zero_is_unlimited() {
        for s in ["0", "0K", "0M", "0.0", "000", "0.000G/s"] {
            assert_eq!(parse_rate(s), Ok(None), "{s}");
        }
    }

    #[test]
    fn rejects_junk_negative_and_overflow() {
        for s in [
            "", " ", "banana", "-1", "-0", "+5", "1.5.0", ".5M", "5.M", "1e3", "10X", "10T",
            "10 M", "M", "10B", "10/s", "10KiBs", "0X",
        ] {
            let e = parse_rate(s).expect_err(s);
            assert!(e.contains(&format!("'{s}'")), "{e}");
            assert!(e.contains("1.5M"), "{e}");
        }
        for s in ["99999999999999999999", "17179869184G", "18014398509481984K"] {
            assert!(parse_rate(s).unwrap_err().contains("too large"), "{s}");
        }
        // The largest value that fits is accepted.
        assert_eq!(parse_rate("18014398509481983.999K"), Ok(Some(u64::MAX - 1)));
        // A nonzero rate that rounds to nothing must not become "unlimited".
        assert!(parse_rate("0.0001").is_err());
    }

    #[test]
    fn passes_bytes_through_unchanged() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut w = Limited::new(Vec::new(), Limiter::new(1 << 30));
        w.write_all(&data).unwrap();
        w.write_all(&[]).unwrap();
        w.flush().unwrap();
        assert_eq!(w.inner, data);
    }

    /// Takes at most 7 bytes per call, as a pipe may under pressure.
    struct Trickle(Vec<u8>);

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_writes_report_what_inner_took() {
        let mut w = Limited::new(Trickle(Vec::new()), Limiter::new(64 * MIB));
        assert_eq!(w.write(b"0123456789").unwrap(), 7);
        w.write_all(b"abcdefghijklmnopqrstuvwxyz").unwrap();
        assert_eq!(w.inner.0, b"0123456abcdefghijklmnopqrstuvwxyz");
    }

    #[test]
    fn slices_are_bounded() {
        assert_eq!(Limiter::new(1).slice_len(), 4096);
        assert_eq!(Limiter::new(80 * KIB).slice_len(), 4096);
        assert_eq!(Limiter::new(20 * MIB).slice_len(), MIB as usize);
        assert_eq!(Limiter::new(0).slice_len(), usize::MAX);
        let big = Limiter::new(u64::MAX).slice_len();
        assert!(big >= 4096);
    }

    #[test]
    fn extreme_rates_neither_overflow_nor_stall() {
        // 0 = unlimited: never divides, never waits.
        Limiter::new(0).take(usize::MAX);
        let fast = Limiter::new(u64::MAX);
        for _ in 0..1000 {
            fast.take(1 << 30);
        }
        fast.give_back(usize::MAX);
        fast.take(1);
        let mut w = Limited::new(Vec::new(), fast);
        w.write_all(&[1; 100_000]).unwrap();
        assert_eq!(w.inner.len(), 100_000);
    }

    #[test]
    fn one_mib_at_four_mib_per_second_takes_at_least_a_fifth_of_a_second() {
        let start = Instant::now();
        let mut w = Limited::new(io::sink(), Limiter::new(4 * MIB));
        w.write_all(&vec![0; MIB as usize]).unwrap();
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(200), "took {took:?}");
    }

    #[test]
    fn clones_share_one_bucket() {
        // Two writers on clones of one limiter, 512 KiB each: together they
        // must still be held to 4 MiB/s, i.e. 1 MiB in no less than ~0.25 s.
        let limiter = Limiter::new(4 * MIB);
        let start = Instant::now();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let limiter = limiter.clone();
                thread::spawn(move || {
                    let mut w = Limited::new(io::sink(), limiter);
                    w.write_all(&vec![0; 512 * KIB as usize]).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(200), "took {took:?}");
    }
}
