//! Validating the command line into the settings of one run.
//!
//! Everything a user can get wrong is caught here, before any file is opened
//! or any connection made, as a usage error (exit 2). The result is a
//! [`Config`], defined by the client (the layer that runs it) so that the
//! layers below `app` never see clap's types.

use anyhow::Result;

use crate::app::cli::Cli;
use crate::content::chunk::ChunkParams;
use crate::error::{fail, Exit};
use crate::source::quiesce::Hooks;
use crate::source::snapshot::{SnapshotOptions, DEFAULT_VERIFY, MAX_VERIFY};

pub use crate::client::config::Config;
use crate::client::spawn::{parse_operand, split_command, Operand};

/// Parses `K/N` with 1 ≤ K ≤ N ≤ [`crate::wire::MAX_SAMPLE`].
pub fn parse_sample(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("'{s}' is not K/N with 1 <= K <= N (for example 3/7)");
    let (k, n) = s.trim().split_once('/').ok_or_else(bad)?;
    let k: u32 = k.trim().parse().map_err(|_| bad())?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    if k == 0 || k > n || n > crate::wire::MAX_SAMPLE {
        return Err(bad());
    }
    Ok((k, n))
}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    fail(Exit::Usage, msg)
}

/// `--snapshot` and the options that go with it, refused where they cannot
/// apply.
fn snapshot_options(cli: &Cli, src: &Operand) -> Result<Option<SnapshotOptions>> {
    if !cli.snapshot {
        return Ok(None);
    }
    if cli.recursive {
        return Err(usage(
            "--snapshot works on one file; -r does not take snapshots yet (snapshot each image, \
             or the filesystem, and sync that)",
        ));
    }
    let verify = cli.snapshot_verify.unwrap_or(DEFAULT_VERIFY);
    if verify > MAX_VERIFY {
        return Err(usage(format!(
            "--snapshot-verify {verify}: at most {MAX_VERIFY} (0 turns it off)"
        )));
    }
    if matches!(src, Operand::Remote(_)) {
        for (given, flag) in [
            (cli.snapshot_dir.is_some(), "--snapshot-dir"),
            (cli.freeze.is_some(), "--freeze"),
            (cli.thaw.is_some(), "--thaw"),
        ] {
            if given {
                return Err(usage(format!(
                    "{flag} applies where the source is; with a remote source the remote \
                     vmsync takes the snapshot beside it (run vmsync on the source's host to \
                     use {flag})"
                )));
            }
        }
    }
    Ok(Some(SnapshotOptions {
        dir: cli.snapshot_dir.clone(),
        verify,
        hooks: Hooks {
            freeze: cli.freeze.clone(),
            thaw: cli.thaw.clone(),
        },
    }))
}

impl Config {
    pub fn from_cli(cli: &Cli) -> Result<Config> {
        let (Some(src), Some(dst)) = (&cli.src, &cli.dst) else {
            return Err(usage("both SRC and DST are required"));
        };
        let src = parse_operand(src).map_err(|e| usage(format!("source: {e}")))?;
        let dst = parse_operand(dst).map_err(|e| usage(format!("destination: {e}")))?;
        if let (Operand::Remote(a), Operand::Remote(b)) = (&src, &dst) {
            return Err(usage(format!(
                "both operands are remote ({} and {}); vmsync syncs between a local file and a remote one, \
                 so run it on one of the two hosts",
                a.host, b.host
            )));
        }
        let params = match &cli.block_size {
            Some(b) => ChunkParams::fixed(
                crate::units::parse_size(b).map_err(|e| usage(format!("--block-size: {e}")))?,
            )?,
            None => ChunkParams::new(
                crate::units::parse_size(&cli.chunk_size)
                    .map_err(|e| usage(format!("--chunk-size: {e}")))?,
            )?,
        };
        let rsh = split_command(&cli.rsh).map_err(|e| usage(format!("--rsh: {e}")))?;
        let bwlimit = match &cli.bwlimit {
            Some(r) => crate::wire::bwlimit::parse_rate(r)
                .map_err(|e| usage(format!("--bwlimit: {e}")))?
                .unwrap_or(0),
            None => 0,
        };
        let sample = match &cli.sample {
            Some(s) => Some(parse_sample(s).map_err(|e| usage(format!("--sample: {e}")))?),
            None => None,
        };
        if cli.seed.len() > crate::wire::MAX_SEEDS {
            return Err(usage(format!(
                "at most {} --seed files",
                crate::wire::MAX_SEEDS
            )));
        }
        // Bad patterns are usage errors before anything is listed.
        crate::filter::Filter::new(&cli.filters)?;
        if cli.remote_path.trim().is_empty() {
            return Err(usage("--remote-path is empty"));
        }
        let snapshot = snapshot_options(cli, &src)?;
        Ok(Config {
            src,
            dst,
            params,
            compress_level: cli.compress_level,
            check: cli.check,
            verify: cli.verify,
            write_mode: match (cli.write_mode, cli.inplace) {
                (Some(m), _) => m,
                (None, true) => crate::wire::WriteMode::Journal,
                (None, false) => crate::wire::WriteMode::Auto,
            },
            state_dir: cli.state_dir.clone(),
            checksum: cli.checksum,
            no_partial: cli.no_partial,
            rsh,
            remote_path: cli.remote_path.clone(),
            stats: cli.stats,
            json: cli.json,
            quiet: cli.quiet,
            timeout_secs: cli.timeout.unwrap_or(0),
            bwlimit,
            dry_run: cli.dry_run,
            seeds: cli.seed.clone(),
            sample,
            allow_changing_source: cli.allow_changing_source,
            snapshot,
            recursive: cli.recursive,
            delete: cli.delete,
            filters: cli.filters.clone(),
        })
    }
}
