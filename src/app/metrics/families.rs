//! What the metrics file holds: a finished run ([`RunMetrics`]), the families
//! it is written as (names and HELP texts), and the key of one sample.
//!
//! The order of [`FAMILIES`] is the order of the file. New families go at
//! the end, so that a file without them keeps its bytes, and a HELP text
//! must not change: node_exporter refuses two textfiles that give one
//! family different HELP texts, and vmsync binaries of two versions may
//! write beside each other.

use std::collections::BTreeMap;

/// One finished run, as the metrics file records it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunMetrics {
    /// The source operand as typed. Not written: a label that changes from
    /// run to run (dated snapshot names) would start a new series each time
    /// and break the alerts, which need one series per destination.
    pub source: String,
    /// The destination operand as typed: the label that identifies the series.
    pub destination: String,
    /// A `--check` run (`mode="check"`) rather than a sync (`mode="sync"`).
    pub check: bool,
    pub exit_code: u8,
    /// Wall-clock end time, seconds since the epoch.
    pub end_unix: f64,
    pub duration_secs: f64,
    pub source_bytes: u64,
    /// Bytes on the wire, both directions.
    pub wire_bytes: u64,
    /// Chunk data sent.
    pub literal_bytes: u64,
    /// Bytes taken from the old destination.
    pub reused_bytes: u64,
    /// `--check` only; written only for check runs that got as far as comparing.
    pub differing_bytes: Option<u64>,
    /// Syncs only: bytes the receiver wrote to storage for the destination.
    pub dest_written_bytes: Option<u64>,
    /// Syncs only: how the destination was written (`None`: not at all).
    pub write_mode: Option<Option<crate::wire::WriteMode>>,
    /// `--snapshot` runs only: what the sending side read.
    pub snapshot: Option<crate::wire::messages::SnapshotStats>,
    /// `--check --sample K/N`: (K, N).
    pub sample: Option<(u32, u32)>,
}

pub(super) const LAST_RUN: usize = 0;
pub(super) const LAST_SUCCESS: usize = 1;
pub(super) const EXIT_CODE: usize = 2;
pub(super) const DURATION: usize = 3;
pub(super) const SOURCE: usize = 4;
pub(super) const WIRE: usize = 5;
pub(super) const LITERAL: usize = 6;
pub(super) const REUSED: usize = 7;
pub(super) const DIFFERING: usize = 8;
pub(super) const DEST_WRITTEN: usize = 9;
pub(super) const WRITE_MODE: usize = 10;
pub(super) const SOURCE_READ: usize = 11;
pub(super) const SOURCE_SKIPPED: usize = 12;
pub(super) const SNAPSHOT_SECONDS: usize = 13;
pub(super) const FROZEN_SECONDS: usize = 14;
pub(super) const VERIFY_MISMATCH: usize = 15;
pub(super) const SNAPSHOT_DELTA: usize = 16;
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
