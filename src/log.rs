//! `-v`/`-vv` on stderr, and `--log-file` for cron jobs.
//!
//! Stderr lines carry the seconds since the process started, so a slow
//! phase stands out. The server gets the client's level in `OPEN`, and its
//! lines reach the user through the forwarded stderr, prefixed with the host.
//!
//! `--log-file PATH` appends, whatever `-v` says, every phase line (level 1,
//! or the `-v` level if higher) and one line with the run's outcome, each
//! stamped with the UTC wall-clock time and our pid, so a nightly job leaves
//! a record that can be read the next morning. Lines from the remote end are
//! added to it when `-v` also brings them to stderr. A log file that cannot
//! be written is reported once and never fails the run.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

static LEVEL: AtomicU8 = AtomicU8::new(0);
static START: OnceLock<Instant> = OnceLock::new();
static FILE: Mutex<Option<File>> = Mutex::new(None);
static FILE_LEVEL: AtomicU8 = AtomicU8::new(0);
static FILE_FAILED: AtomicBool = AtomicBool::new(false);
static QUIET: AtomicBool = AtomicBool::new(false);

/// `-q`: warnings go only to the log file.
pub fn set_quiet(on: bool) {
    QUIET.store(on, Ordering::Relaxed);
}

/// Sets the verbosity (0 quiet, 1 phases, 2 details) and starts the clock.
pub fn init(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
    START.get_or_init(Instant::now);
}

pub fn level() -> u8 {
    LEVEL.load(Ordering::Relaxed)
}

/// Appends to `path` from now on (`--log-file`).
pub fn open_file(path: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open log file {}", path.display()))?;
    *FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    FILE_LEVEL.store(level().max(1), Ordering::Relaxed);
    Ok(())
}

/// Whether a line at `lvl` goes anywhere.
pub fn enabled(lvl: u8) -> bool {
    level() >= lvl || FILE_LEVEL.load(Ordering::Relaxed) >= lvl
}

#[doc(hidden)]
pub fn emit(lvl: u8, args: std::fmt::Arguments<'_>) {
    if level() >= lvl {
        let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
        eprintln!("[{t:8.3}s] {args}");
    }
    if FILE_LEVEL.load(Ordering::Relaxed) >= lvl {
        to_file(&args.to_string());
    }
}

/// A warning: on stderr unless `-q` (the server's reaches the user through
/// the forwarded stderr), and in the log file.
pub fn warn(msg: &str) {
    if !QUIET.load(Ordering::Relaxed) {
        eprintln!("vmsync: warning: {msg}");
    }
    to_file(&format!("warning: {msg}"));
}

/// Writes one stamped line to the log file, if there is one.
pub fn to_file(line: &str) {
    let mut guard = FILE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(f) = guard.as_mut() else { return };
    let line = format!("{} [{}] {line}\n", utc_now(), std::process::id());
    // One write per line, so lines from concurrent runs do not interleave
    // inside a line (O_APPEND makes each write land at the end).
    if let Err(e) = f.write_all(line.as_bytes()) {
        if !FILE_FAILED.swap(true, Ordering::Relaxed) {
            eprintln!("vmsync: warning: cannot write the log file: {e}");
        }
    }
}

/// `2026-11-27T23:10:05.123Z`
fn utc_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm), to avoid a date crate for one timestamp.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Logs at level `$lvl` (1 = `-v`, 2 = `-vv`).
#[macro_export]
macro_rules! vlog {
    ($lvl:expr, $($arg:tt)*) => {
        if $crate::log::enabled($lvl) {
            $crate::log::emit($lvl, format_args!($($arg)*));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_from_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_784), (2026, 11, 27));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
