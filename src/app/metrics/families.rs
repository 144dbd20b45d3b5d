//! The families of the metrics file: names, HELP texts, and how one run's
//! outcome replaces its series.
//!
//! The order of [`FAMILIES`] is the order of the file. New families go at
//! the end, so that a file without them keeps its bytes, and a HELP text
//! must not change: node_exporter refuses two textfiles that give one
//! family different HELP texts, and vmsync binaries of two versions may
//! write beside each other.

use std::collections::BTreeMap;

use super::text::{round_ms, seconds};
use super::RunMetrics;

const LAST_RUN: usize = 0;
const LAST_SUCCESS: usize = 1;
const EXIT_CODE: usize = 2;
const DURATION: usize = 3;
const SOURCE: usize = 4;
const WIRE: usize = 5;
const LITERAL: usize = 6;
const REUSED: usize = 7;
const DIFFERING: usize = 8;
const DEST_WRITTEN: usize = 9;
const WRITE_MODE: usize = 10;
const SOURCE_READ: usize = 11;
const SOURCE_SKIPPED: usize = 12;
const SNAPSHOT_SECONDS: usize = 13;
const FROZEN_SECONDS: usize = 14;
const VERIFY_MISMATCH: usize = 15;
const SNAPSHOT_DELTA: usize = 16;
// From here on: the state of `--check --sample` cycles (see `cycle.rs`),
// which a run of the same series keeps rather than replaces.
pub(super) const SAMPLE_SLICES: usize = 17;
pub(super) const SLICE_SUCCESS: usize = 18;
pub(super) const CYCLE_STARTED: usize = 19;
pub(super) const CYCLE_COMPLETED: usize = 20;

/// (name, HELP text) in output order, indexed by the constants above; all
/// gauges. The HELP text must not change lightly: node_exporter refuses two
/// textfiles that give one family different HELP.
pub(super) const FAMILIES: [(&str, &str); 21] = [
    (
        "vmsync_last_run_timestamp_seconds",
        "End time of the last vmsync run, in seconds since the epoch.",
    ),
    (
        "vmsync_last_success_timestamp_seconds",
        "End time of the last vmsync run that exited with 0 (for --check: files identical), in seconds since the epoch.",
    ),
    (
        "vmsync_last_exit_code",
        "Exit code of the last vmsync run (see vmsync --help).",
    ),
    (
        "vmsync_last_run_duration_seconds",
        "Duration of the last vmsync run, in seconds.",
    ),
    (
        "vmsync_source_bytes",
        "Size of the source in the last vmsync run, in bytes.",
    ),
    (
        "vmsync_wire_bytes",
        "Bytes sent and received over the connection in the last vmsync run.",
    ),
    (
        "vmsync_literal_bytes",
        "Chunk data sent in the last vmsync run, in bytes.",
    ),
    (
        "vmsync_reused_bytes",
        "Bytes of the last vmsync run taken from the old destination instead of being sent.",
    ),
    (
        "vmsync_differing_bytes",
        "Bytes that differed between source and destination in the last vmsync --check run.",
    ),
    (
        "vmsync_dest_written_bytes",
        "Bytes the receiver of the last vmsync sync wrote to storage for the destination (its partial file or journal included).",
    ),
    (
        "vmsync_write_mode",
        "How the last vmsync sync wrote the destination: 1 reflink clone, 2 journal, 3 full copy, 4 unjournaled in place, 0 nothing written.",
    ),
    (
        "vmsync_source_read_bytes",
        "Bytes of the source snapshot the last vmsync --snapshot run read.",
    ),
    (
        "vmsync_source_skipped_bytes",
        "Bytes of the source the last vmsync --snapshot run skipped as unchanged since the previous snapshot.",
    ),
    (
        "vmsync_snapshot_seconds",
        "Time the last vmsync --snapshot run took to clone the source, in seconds.",
    ),
    (
        "vmsync_frozen_seconds",
        "Time the source was frozen (--freeze to --thaw) in the last vmsync --snapshot run, in seconds.",
    ),
    (
        "vmsync_snapshot_verify_mismatch_bytes",
        "Bytes the last vmsync --snapshot run's verify slice found different at the destination though the snapshots said unchanged.",
    ),
    (
        "vmsync_snapshot_delta",
        "Whether the last vmsync --snapshot run read only what changed since the previous snapshot (1) or everything (0).",
    ),
    (
        "vmsync_check_sample_slices",
        "Number of slices N of the last vmsync --check --sample K/N run.",
    ),
    (
        "vmsync_check_slice_success_timestamp_seconds",
        "End time of the last vmsync --check --sample run that found this slice identical in the current cycle, in seconds since the epoch.",
    ),
    (
        "vmsync_check_cycle_started_timestamp_seconds",
        "Start of the current vmsync --check --sample cycle (the previous completion, or the first sampled check with this N), in seconds since the epoch.",
    ),
    (
        "vmsync_check_cycle_completed_timestamp_seconds",
        "Time by which every slice of the last vmsync --check --sample cycle had been found identical, in seconds since the epoch.",
    ),
];

/// One sample's identity. The derived order (family, then label values) is
/// the output order, with slices in numeric order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Key {
    pub family: usize,
    pub destination: String,
    pub mode: String,
    /// The `slice` label: only [`SLICE_SUCCESS`] has it.
    pub slice: Option<u32>,
}

impl Key {
    pub fn new(family: usize, destination: &str, mode: &str) -> Key {
        Key {
            family,
            destination: destination.to_string(),
            mode: mode.to_string(),
            slice: None,
        }
    }
}

/// Values are kept as text so that samples of other series are written back
/// exactly as they were read.
pub(super) type Samples = BTreeMap<Key, String>;

/// Replaces `run`'s series in `samples`, and carries its sampled-check
/// cycle on.
pub(super) fn merge(samples: &mut Samples, run: &RunMetrics) {
    let mode = if run.check { "check" } else { "sync" };
    let key = |family| Key::new(family, &run.destination, mode);
    let previous_success = samples.remove(&key(LAST_SUCCESS));
    samples.retain(|k, _| {
        !(k.destination == run.destination && k.mode == mode && k.family < SAMPLE_SLICES)
    });
    let end = seconds(round_ms(run.end_unix));
    let success = if run.exit_code == 0 {
        Some(end.clone())
    } else {
        previous_success
    };
    let values = [
        (LAST_RUN, Some(end)),
        (LAST_SUCCESS, success),
        (EXIT_CODE, Some(run.exit_code.to_string())),
        (DURATION, Some(seconds(run.duration_secs))),
        (SOURCE, Some(run.source_bytes.to_string())),
        (WIRE, Some(run.wire_bytes.to_string())),
        (LITERAL, Some(run.literal_bytes.to_string())),
        (REUSED, Some(run.reused_bytes.to_string())),
        (
            DIFFERING,
            run.differing_bytes
                .filter(|_| run.check)
                .map(|b| b.to_string()),
        ),
        (
            DEST_WRITTEN,
            run.dest_written_bytes
                .filter(|_| !run.check)
                .map(|b| b.to_string()),
        ),
        (
            WRITE_MODE,
            run.write_mode
                .filter(|_| !run.check)
                .map(|m| m.map_or(0, |m| m as u8).to_string()),
        ),
    ];
    let snap = run.snapshot;
    let snap_values = [
        (SOURCE_READ, snap.map(|s| s.read_bytes.to_string())),
        (SOURCE_SKIPPED, snap.map(|s| s.skipped_bytes.to_string())),
        (
            SNAPSHOT_SECONDS,
            snap.map(|s| seconds(s.snapshot_us as f64 / 1e6)),
        ),
        (
            FROZEN_SECONDS,
            snap.and_then(|s| s.frozen_us)
                .map(|f| seconds(f as f64 / 1e6)),
        ),
        (
            VERIFY_MISMATCH,
            snap.map(|s| s.verify_mismatch_bytes.to_string()),
        ),
        (SNAPSHOT_DELTA, snap.map(|s| u8::from(s.delta).to_string())),
    ];
    for (family, value) in values.into_iter().chain(snap_values) {
        if let Some(v) = value {
            samples.insert(key(family), v);
        }
    }
    super::cycle::advance(samples, run);
}
