//! The progress bar: bytes of the source done, wire bytes, rate, ETA.
//!
//! Drawn on stderr only when stderr is a terminal and neither `-q` nor
//! `--json` was given; otherwise every call is a no-op, so the engine can
//! report progress unconditionally.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Counts bytes crossing the transport, both directions together. Clones
/// share the count: the pipes add to it, the bar and the report read it.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    wire: Option<Counter>,
}

impl Progress {
    /// A bar if `enabled` and stderr is a terminal.
    pub fn new(enabled: bool) -> Progress {
        if !enabled || !std::io::stderr().is_terminal() {
            return Progress::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(4));
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {bytes:>10}/{total_bytes:<10} [{wide_bar}] {bytes_per_sec:>12} ETA {eta:>4}  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress {
            bar: Some(bar),
            wire: None,
        }
    }

    pub fn hidden() -> Progress {
        Progress {
            bar: None,
            wire: None,
        }
    }

    /// Shows the wire byte count beside the bar.
    pub fn watch_wire(&mut self, counter: Counter) {
        self.wire = Some(counter);
    }

    pub fn set_total(&self, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
    }

    pub fn advance(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
            if let Some(w) = &self.wire {
                b.set_message(format!("wire {}", crate::units::bytes(w.get())));
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
