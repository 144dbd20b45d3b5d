//! `-v`/`-vv`: what each phase did and when, on stderr.
//!
//! Lines carry the seconds since the process started, so a slow phase
//! stands out. The server gets the client's level in `OPEN`, and its lines
//! reach the user through the forwarded stderr, prefixed with the host.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static LEVEL: AtomicU8 = AtomicU8::new(0);
static START: OnceLock<Instant> = OnceLock::new();

/// Sets the verbosity (0 quiet, 1 phases, 2 details) and starts the clock.
pub fn init(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
    START.get_or_init(Instant::now);
}

pub fn level() -> u8 {
    LEVEL.load(Ordering::Relaxed)
}

#[doc(hidden)]
pub fn emit(args: std::fmt::Arguments<'_>) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:8.3}s] {args}");
}

/// Logs at level `$lvl` (1 = `-v`, 2 = `-vv`).
#[macro_export]
macro_rules! vlog {
    ($lvl:expr, $($arg:tt)*) => {
        if $crate::log::level() >= $lvl {
            $crate::log::emit(format_args!($($arg)*));
        }
    };
}
