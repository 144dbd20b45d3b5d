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
pub(crate) mod client;
pub mod content;
pub(crate) mod dest;
pub mod error;
pub(crate) mod filter;
pub(crate) mod log;
pub(crate) mod progress;
pub(crate) mod roles;
pub(crate) mod server;
pub(crate) mod signals;
pub(crate) mod sys;
pub mod units;
pub mod wire;
