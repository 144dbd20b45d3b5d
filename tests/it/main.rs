//! vmsync's integration tests, as one test binary (`it`) so the shared
//! harness compiles once: they run the real `vmsync` binary (local syncs, a
//! throwaway OpenSSH server on 127.0.0.1, the fault-injecting relay in
//! `tests/fixtures/relay.py`, block devices on loop devices), drive
//! `vmsync --server` with scripted lying peers, and hold the golden cut
//! points, the decoders' property tests and the man-page check.
//!
//! * `common`: the harness (running the binary, data, files, `Sshd`,
//!   `Relay`, `Tmpfs`); the benches include it too, so it stays one
//!   self-contained file;
//! * `peer`: a scripted peer for `vmsync --server`, on the library's
//!   protocol types;
//! * `prom`: a strict Prometheus text parser (`src/app/metrics/`'s unit tests
//!   include it too);
//! * one module per area, the rest.
//!
//! Run everything with `cargo test --release`, one module with
//! `cargo test --release --test it MODULE::` (e.g. `sync_ssh::`), one test
//! with its full name (`cargo test --release --test it man::man_page_is_current`).

mod common;
mod peer;
mod prom;

mod admin;
mod ansible;
mod block_device;
mod check;
mod chunk_bounds;
mod cli_errors;
mod confined;
mod crash;
mod deploy_rules;
mod drill;
mod examples_scripts;
mod extents;
mod filesystems;
mod golden;
mod harness;
mod interrupt;
mod layout;
mod malicious_peer;
mod man;
mod package;
mod pieces;
mod prescan;
mod proptest_decoders;
mod reliability;
mod rsync_flags;
mod sample;
mod seed_dry_run;
mod snapshot;
mod sparse;
mod sync_local;
mod sync_ssh;
mod tree;
mod tree_rsync;
mod write_modes;
