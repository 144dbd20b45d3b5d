//! Named crash points: a test stops the process dead (SIGKILL) at one of
//! them, to prove that a write survives a crash at exactly that moment.
//!
//! A clean exit at the same place would prove little: it runs destructors,
//! flushes buffers and releases locks in order, which a crash does not. So
//! the process kills itself with SIGKILL, which nothing can catch, and the
//! test then looks at what the disk holds.
//!
//! The point is chosen with the environment variable `VMSYNC_CRASH_AT`:
//! `NAME` stops at the first time the process reaches point `NAME`,
//! `NAME:N` at the N-th time (1-based; points inside a loop count each
//! pass). It is read once. Unset (always, outside tests) it costs one
//! relaxed atomic load per point reached. The names are the constants
//! below; a test that names a point that does not exist simply never
//! crashes, so each crash test also asserts that the process died by
//! SIGKILL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Journal mode: after some records were written, before the journal's
/// fsync (count: each record written).
pub const JOURNAL_RECORD: &str = "journal-record";
/// Journal mode: the records are fsync'd, the commit record not written.
pub const JOURNAL_SYNCED: &str = "journal-synced";
/// Journal mode: the commit record is durable, nothing applied yet.
pub const JOURNAL_COMMITTED: &str = "journal-committed";
/// Journal mode: during the apply (count: each record applied).
pub const APPLY_RECORD: &str = "apply-record";
/// Journal mode: applied and fsync'd, the journal not yet removed.
pub const APPLIED: &str = "applied";
/// `--snapshot`: the new clone is taken, nothing sent yet.
pub const SNAPSHOT_TAKEN: &str = "snapshot-taken";
/// `--snapshot`: the destination committed, the new clone not yet kept.
pub const SNAPSHOT_SENT: &str = "snapshot-sent";
/// `--snapshot`: the new clone renamed over the kept one, its state not
/// yet written.
pub const SNAPSHOT_KEPT: &str = "snapshot-kept";
/// Partial (copy or clone) mode: written and fsync'd, not yet renamed.
pub const BEFORE_RENAME: &str = "before-rename";
/// Partial (copy or clone) mode: renamed, the directory not yet fsync'd.
pub const AFTER_RENAME: &str = "after-rename";

/// The environment variable that names the point.
pub const ENV: &str = "VMSYNC_CRASH_AT";

struct Armed {
    name: String,
    nth: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var(ENV).ok()?;
            let (name, nth) = match v.rsplit_once(':') {
                Some((n, k)) => (n.to_string(), k.parse().ok().filter(|&k| k > 0)?),
                None => (v, 1),
            };
            Some(Armed {
                name,
                nth,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Passes point `name`: dies by SIGKILL here if a test asked for it.
pub fn point(name: &str) {
    let Some(a) = armed() else {
        return;
    };
    if a.name != name {
        return;
    }
    if a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.nth {
        crate::vlog!(1, "crash point {name} reached: SIGKILL");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL to ourselves is delivered before kill returns; should it
        // somehow not be, still never go on past the point.
        std::process::abort();
    }
}
