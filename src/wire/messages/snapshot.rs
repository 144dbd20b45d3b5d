//! The messages of a `--snapshot` run, and what its report says.
//!
//! A sender reading a point-in-time clone of its source announces it with
//! `SNAPSHOT`, before `FILE_INFO`: the id of the clone it reads now
//! (`next`), and the id of the clone the previous run read (`base`) when
//! it can tell which ranges changed since then. A receiver whose destination
//! is known to hold exactly the `base` clone's bytes (its manifest cache
//! says so, see [`crate::dest::cache`]) answers `START` 3 (delta); the sender
//! then lists the ranges it will scan in `RANGES` and sends a manifest of
//! those ranges only: everything outside them is, by the extent maps, what
//! the destination already holds. Some ranges are *verify* ranges: bytes
//! the extent maps call unchanged, re-read to check that reasoning; the
//! receiver counts any difference found there.
//!
//! `SNAPSHOT` payload:
//!
//! | size | field                                                          |
//! |------|----------------------------------------------------------------|
//! | 32   | base id (all zero: none, a full read)                          |
//! | 32   | next id: the clone read now                                    |
//! | 1    | why the read is full ([`Reason`]; 0 when a base is offered)    |
//! | 8    | microseconds the clone took                                    |
//! | 8    | microseconds the source was frozen (`u64::MAX`: no `--freeze`) |
//!
//! `RANGES` payload (only after `START` 3; one or more, the last flagged):
//!
//! | size     | field                                                     |
//! |----------|-----------------------------------------------------------|
//! | 1        | flags: bit 0 = last `RANGES` message                      |
//! | 4        | count n (≤ [`MAX_RANGES_BATCH`])                          |
//! | n × 17   | offset u64, length u64 (≥ 1), kind u8 (0 changed, 1 verify) |
//!
//! Ranges come sorted, disjoint and inside the file; all the messages
//! together list at most [`MAX_DELTA_RANGES`] ([`check_ranges`]).

use anyhow::Result;

use crate::wire::codec::{malformed, Rd};

/// A clone's id: random, made when the clone is taken.
pub type SnapshotId = [u8; 32];
/// Most ranges in one `RANGES` message.
pub const MAX_RANGES_BATCH: usize = 65536;
/// Most ranges of a delta run in all (the sender merges nearby ranges to
/// stay under it): 16 MiB of ranges at the receiver.
pub const MAX_DELTA_RANGES: usize = 1 << 20;

/// Why a `--snapshot` run reads its whole source. The values are the
/// protocol's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// A base is offered (or the read was a delta).
    Delta = 0,
    NoBase = 1,
    StateDamaged = 2,
    SizeChanged = 3,
    NoExtents = 4,
    DestDiffers = 5,
    FullVerify = 6,
    VerifyMismatch = 7,
    Compare = 8,
    TooManyRanges = 9,
}

impl Reason {
    const ALL: [Reason; 10] = [
        Reason::Delta,
        Reason::NoBase,
        Reason::StateDamaged,
        Reason::SizeChanged,
        Reason::NoExtents,
        Reason::DestDiffers,
        Reason::FullVerify,
        Reason::VerifyMismatch,
        Reason::Compare,
        Reason::TooManyRanges,
    ];

    pub fn from_code(c: u8) -> Option<Reason> {
        Reason::ALL.get(usize::from(c)).copied()
    }

    /// What `-v` and the JSON `reason` say; `None` for a delta.
    pub fn text(self) -> Option<&'static str> {
        Some(match self {
            Reason::Delta => return None,
            Reason::NoBase => "no previous snapshot",
            Reason::StateDamaged => "previous snapshot state damaged",
            Reason::SizeChanged => "size changed",
            Reason::NoExtents => "extent maps not comparable",
            Reason::DestDiffers => "destination is not the copy of the previous snapshot",
            Reason::FullVerify => "--verify reads everything",
            Reason::VerifyMismatch => "verify slice mismatch",
            Reason::Compare => "--check and --dry-run read everything",
            Reason::TooManyRanges => "too many changed ranges",
        })
    }
}

/// `SNAPSHOT`: see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotMsg {
    pub base: Option<SnapshotId>,
    pub next: SnapshotId,
    pub reason: Reason,
    pub snapshot_us: u64,
    pub frozen_us: Option<u64>,
}

impl SnapshotMsg {
    pub(super) fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.base.unwrap_or([0; 32]));
        out.extend_from_slice(&self.next);
        out.push(self.reason as u8);
        out.extend_from_slice(&self.snapshot_us.to_le_bytes());
        out.extend_from_slice(&self.frozen_us.unwrap_or(u64::MAX).to_le_bytes());
    }

    pub(super) fn get(r: &mut Rd<'_>) -> Result<SnapshotMsg> {
        let id = |r: &mut Rd<'_>| -> Result<SnapshotId> { Ok(r.take(32)?.try_into().unwrap()) };
        let base = Some(id(r)?).filter(|b| b != &[0; 32]);
        let next = id(r)?;
        let code = r.u8()?;
        let reason = Reason::from_code(code)
            .ok_or_else(|| malformed(format!("SNAPSHOT with unknown reason {code}")))?;
        if base.is_some() != (reason == Reason::Delta) {
            return Err(malformed(
                "SNAPSHOT: a base comes without a reason, and only then",
            ));
        }
        Ok(SnapshotMsg {
            base,
            next,
            reason,
            snapshot_us: r.u64()?,
            frozen_us: Some(r.u64()?).filter(|&f| f != u64::MAX),
        })
    }
}

/// One range of a delta run's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaRange {
    pub offset: u64,
    pub len: u64,
    /// Unchanged by the extent maps, re-read to check them.
    pub verify: bool,
}

impl DeltaRange {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

pub(super) fn put_ranges(out: &mut Vec<u8>, last: bool, ranges: &[DeltaRange]) {
    assert!(ranges.len() <= MAX_RANGES_BATCH);
    out.push(u8::from(last));
    out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for r in ranges {
        out.extend_from_slice(&r.offset.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
        out.push(u8::from(r.verify));
    }
}

pub(super) fn get_ranges(r: &mut Rd<'_>) -> Result<(bool, Vec<DeltaRange>)> {
    let last = match r.u8()? {
        0 => false,
        1 => true,
        f => return Err(malformed(format!("RANGES with unknown flags {f:#x}"))),
    };
    let n = r.u32()? as usize;
    if n > MAX_RANGES_BATCH || n * 17 > r.left() {
        return Err(malformed(format!("RANGES of {n} ranges")));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (offset, len) = (r.u64()?, r.u64()?);
        let verify = match r.u8()? {
            0 => false,
            1 => true,
            k => return Err(malformed(format!("RANGES with unknown kind {k}"))),
        };
        out.push(DeltaRange {
            offset,
            len,
            verify,
        });
    }
    Ok((last, out))
}

/// Checks a peer's ranges for a file of `size` bytes: non-empty, sorted,
/// disjoint, inside the file, and at most [`MAX_DELTA_RANGES`].
pub fn check_ranges(ranges: &[DeltaRange], size: u64) -> Result<()> {
    if ranges.len() > MAX_DELTA_RANGES {
        return Err(malformed(format!(
            "{} delta ranges (limit {MAX_DELTA_RANGES})",
            ranges.len()
        )));
    }
    let mut at = 0;
    for r in ranges {
        let end = r.offset.checked_add(r.len).filter(|&e| e <= size);
        match end {
            Some(end) if r.len > 0 && r.offset >= at => at = end,
            _ => {
                return Err(malformed(format!(
                    "delta range at {} of {} bytes: empty, out of order or past the end ({size})",
                    r.offset, r.len
                )))
            }
        }
    }
    Ok(())
}

/// What a `--snapshot` run reports (JSON `snapshot`, metrics); not sent
/// in `DONE`, each end puts it together from `SNAPSHOT` and `RANGES`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    pub delta: bool,
    /// Why the read was full; `None` for a delta.
    pub reason: Option<&'static str>,
    /// Bytes of the source scanned: the whole file, or the ranges.
    pub read_bytes: u64,
    pub skipped_bytes: u64,
    /// Of `read_bytes`, those re-read to check the extent maps.
    pub verify_bytes: u64,
    pub verify_mismatch_bytes: u64,
    pub snapshot_us: u64,
    pub frozen_us: Option<u64>,
}

impl SnapshotStats {
    /// The stats of a run of a `size`-byte file announced by `msg`: a delta
    /// over `ranges` when there are some (the receiver said `START` 3);
    /// else a full read, for the sender's reason, or because the receiver
    /// refused the base it offered.
    pub fn of(msg: &SnapshotMsg, size: u64, delta: Option<&[DeltaRange]>) -> Self {
        let reason = match msg.reason {
            Reason::Delta => Reason::DestDiffers,
            r => r,
        };
        let (read, verify) = match delta {
            Some(r) => (
                r.iter().map(|r| r.len).sum(),
                r.iter().filter(|r| r.verify).map(|r| r.len).sum(),
            ),
            None => (size, 0),
        };
        SnapshotStats {
            delta: delta.is_some(),
            reason: if delta.is_some() { None } else { reason.text() },
            read_bytes: read,
            skipped_bytes: size - read.min(size),
            verify_bytes: verify,
            verify_mismatch_bytes: 0,
            snapshot_us: msg.snapshot_us,
            frozen_us: msg.frozen_us,
        }
    }
}

impl SnapshotStats {
    /// A run the quick check found up to date: nothing of the clone read.
    pub fn up_to_date(msg: &SnapshotMsg, size: u64) -> Self {
        SnapshotStats {
            delta: true,
            reason: None,
            read_bytes: 0,
            skipped_bytes: size,
            verify_bytes: 0,
            verify_mismatch_bytes: 0,
            snapshot_us: msg.snapshot_us,
            frozen_us: msg.frozen_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        let r = |offset, len| DeltaRange {
            offset,
            len,
            verify: false,
        };
        assert!(check_ranges(&[r(0, 10), r(10, 5), r(20, 80)], 100).is_ok());
        for bad in [
            vec![r(0, 0)],
            vec![r(10, 5), r(0, 5)],
            vec![r(0, 10), r(5, 10)],
            vec![r(90, 11)],
            vec![r(u64::MAX, 2)],
        ] {
            assert!(check_ranges(&bad, 100).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reasons_round_trip_and_have_words() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r as u8), Some(r));
            assert_eq!(r.text().is_none(), r == Reason::Delta);
        }
        assert_eq!(Reason::from_code(10), None);
    }
}
