//! vmsync: keep a copy of a large disk image in sync over SSH, sending only
//! what changed.
//!
//! Both ends cut their file into content-defined chunks ([`chunk`], [`scan`])
//! named by BLAKE3 hashes ([`hash`]). The sender streams a [`manifest`] of
//! the source over the [`protocol`]; the receiver indexes its current file,
//! requests only the chunks it lacks, and the [`writer`] writes only chunks
//! whose hash checked out, into a temporary file renamed over the destination
//! at the end. [`verify`] compares files with manifests for `--check` and
//! `--verify`.
//!
//! Module map: [`cli`] (clap) → [`config`] (validated settings) → [`client`]
//! (the invoking end) ⇄ [`transport`] (ssh or local child) ⇄ [`server`] (the
//! far end); the roles are [`sender`] and [`receiver`]; [`report`] prints
//! results; [`error`] holds the exit codes; [`signals`] cleans up on SIGINT
//! and SIGTERM.

pub mod app;
pub mod client;
pub mod content;
pub mod dest;
pub mod error;
pub mod filter;
pub mod log;
pub mod progress;
pub mod roles;
pub mod server;
pub mod signals;
pub mod sys;
pub mod units;
pub mod wire;

/// The process umask, read once before any thread starts (reading it means
/// setting it, which would race with threads creating files).
pub fn read_umask() -> u32 {
    use rustix::fs::Mode;
    let old = rustix::process::umask(Mode::from_raw_mode(0o022));
    rustix::process::umask(old);
    old.as_raw_mode()
}
