//! vmsync: keep a copy of a large disk image in sync over SSH, sending only
//! what changed.
//!
//! Both ends cut their file into content-defined chunks
//! ([`content::chunk`], [`content::scan`]) named by BLAKE3 hashes
//! ([`content::hash`]). The sender streams a [`content::manifest`] of the
//! source over the [`wire`]; the receiver indexes its current file, requests
//! only the chunks it lacks, and the writer writes only chunks whose hash
//! checked out.
//!
//! # Layers
//! Folders are concerns, and an import points down this list only (checked
//! by `tests/it/layout.rs`): `app` (cli, config, report, metrics, the run)
//! → `client` and `server` → `roles` (send, receive, list, apply) → `dest`
//! (writer, lock, cache, confine, journal, recover) and `source` (the
//! `--snapshot` clone, its state, extent comparison, freeze/thaw) → `wire` (frame, codec, messages,
//! options, pipe, bwlimit) → `content` (chunk, scan, hash, manifest, refine,
//! compress, sample, verify, ranges) → `sys` (fd-level calls) → the leaves
//! `error`, `units`, `log`, `signals`, `progress`, `filter`. The library's
//! public API is what the tests, benches, examples and fuzz targets use:
//! [`app::cli`], [`content`], [`wire`], [`error`], [`units`] and
//! [`source::extents`].
//!
//! # Glossary (one word per concept)
//! - **source**, **destination**: the file read, the file written. The
//!   **client** is the end the user ran; the **server** is the far end
//!   (`vmsync --server`). The **sender** and **receiver** are roles: either
//!   end may be either.
//! - **chunk**: a content-defined stretch of a file (about 64 KiB), named by
//!   its BLAKE3 **chunk hash**.
//! - **manifest**: the list of a file's chunks (length and hash each, zero
//!   runs merged); its **file digest** is BLAKE3 over it.
//! - **block**: the 4 KiB unit of refinement, at absolute file offsets; a
//!   chunk the receiver lacks is fetched block by block where it can.
//! - **piece**: a content-defined span of the manifest (about 64 chunks),
//!   sent as a short reference when the receiver already holds it.
//! - **part**: a stretch of a segment cut on its own thread by the scanner.
//! - **basis**: what the receiver already holds (its old destination);
//!   **seeds** are other local files used as extra basis.
//! - **literal** bytes travel on the wire; **reused** bytes come from the
//!   basis; **zero** bytes are neither sent nor written (holes).
//! - **partial file**: the hidden `.NAME.vmsync-partial` beside the
//!   destination that a safe run writes and renames over it; the **lock**
//!   is a `flock` on it.
//! - **frame**: a length-prefixed unit on the wire; a **message** is what a
//!   frame holds.
//! - **sample**: the slice K of N that `--check --sample K/N` compares.
//! - **snapshot**: the reflink clone of the source a `--snapshot` run
//!   reads; the **kept** snapshot is the previous run's, the base that says
//!   which ranges changed.
//! - **entry** and **op**: a `-r` listing's file, directory or link, and an
//!   operation applied to one.

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
pub mod source;
pub(crate) mod sys;
pub mod units;
pub mod wire;
