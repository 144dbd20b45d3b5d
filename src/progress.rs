//! The progress bar: bytes of the source done, wire bytes, rate, ETA; for
//! `-r` one bar for the whole tree, which each file's run advances.
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
    /// For a [`Progress::part`]: what this part has advanced the bar by.
    part: Option<Arc<AtomicU64>>,
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
                "{spinner} {bytes:>10}/{total_bytes:<10} {percent:>3}% [{wide_bar}] {bytes_per_sec:>12} ETA {eta:>4}  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress {
            bar: Some(bar),
            wire: None,
            part: None,
        }
    }

    pub fn hidden() -> Progress {
        Progress {
            bar: None,
            wire: None,
            part: None,
        }
    }

    /// Shows the wire byte count beside the bar (not for a part: the
    /// whole's bar shows the files done there).
    pub fn watch_wire(&mut self, counter: Counter) {
        if self.part.is_none() {
            self.wire = Some(counter);
        }
    }

    /// One part of the work this bar shows (one file of a tree, like
    /// rsync's `--info=progress2`): it advances the shared bar, while the
    /// total and the end stay the whole's, so the engine can treat it as
    /// a bar of its own.
    pub fn part(&self) -> Progress {
        Progress {
            bar: self.bar.clone(),
            wire: None,
            part: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    /// `part` (of this bar) is over: what it was expected to cover but did
    /// not advance (a file found up to date, one that failed) counts as done.
    pub fn finish_part(&self, part: &Progress, expected: u64) {
        if let (Some(b), Some(done)) = (&self.bar, &part.part) {
            b.inc(expected.saturating_sub(done.load(Ordering::Relaxed)));
        }
    }

    /// Text beside the bar.
    pub fn set_message(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg);
        }
    }

    pub fn set_total(&self, total: u64) {
        if let (Some(b), None) = (&self.bar, &self.part) {
            b.set_length(total);
        }
    }

    pub fn advance(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
            if let Some(done) = &self.part {
                done.fetch_add(n, Ordering::Relaxed);
            }
            if let Some(w) = &self.wire {
                b.set_message(format!("wire {}", crate::units::bytes(w.get())));
            }
        }
    }

    pub fn finish(&self) {
        if let (Some(b), None) = (&self.bar, &self.part) {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_advance_the_whole_and_count_what_they_skipped() {
        let bar = ProgressBar::hidden();
        let whole = Progress {
            bar: Some(bar.clone()),
            wire: None,
            part: None,
        };
        whole.set_total(300);
        let mut a = whole.part();
        // The engine sets its own total and finishes its own bar: both
        // belong to the whole here.
        a.set_total(100);
        a.watch_wire(Counter::default());
        a.advance(40);
        a.advance(60);
        a.finish();
        whole.finish_part(&a, 100);
        assert_eq!((bar.position(), bar.length()), (100, Some(300)));
        // Up to date: never advanced, done all the same.
        let b = whole.part();
        whole.finish_part(&b, 150);
        assert_eq!(bar.position(), 250);
        // A part that went past what was expected adds nothing more.
        let c = whole.part();
        c.advance(70);
        whole.finish_part(&c, 50);
        assert_eq!(bar.position(), 320);
        assert!(!bar.is_finished());
        whole.finish();
        assert!(bar.is_finished());
    }
}
