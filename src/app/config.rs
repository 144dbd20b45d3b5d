//! Validating the command line into the settings of one run.
//!
//! Everything a user can get wrong is caught here, before any file is opened
//! or any connection made, as a usage error (exit 2). The result is a
//! [`Config`], defined by the client (the layer that runs it) so that the
//! layers below `app` never see clap's types.

use anyhow::Result;

use crate::app::cli::{Cli, FilterArg};
use crate::content::chunk::ChunkParams;
use crate::error::{fail, Exit};
use crate::source::quiesce::Hooks;
use crate::source::snapshot::{SnapshotOptions, DEFAULT_VERIFY, MAX_VERIFY};

pub use crate::client::config::{Config, TreeOptions};
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
        if let Some(flag) = [(&cli.freeze, "--freeze"), (&cli.thaw, "--thaw")]
            .iter()
            .find_map(|(v, f)| v.as_ref().map(|_| f))
        {
            return Err(usage(format!(
                "{flag} runs around the clone of --snapshot: add --snapshot"
            )));
        }
        return Ok(None);
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
                     vmsync takes the snapshot beside it: give {flag} to the remote's \
                     `vmsync --server` (its authorized_keys command), or run vmsync on the \
                     source's host"
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

/// Most bytes read from a `--*-from` file: lists of patterns or paths, not data.
const MAX_LIST_FILE: u64 = 16 << 20;

/// The lines of a `--include-from`, `--exclude-from` or `--files-from` file
/// (`-` is stdin), without blank lines and `#`/`;` comments, as rsync reads them.
fn list_file(path: &std::path::Path, option: &str) -> Result<Vec<String>> {
    use std::io::Read;
    let mut text = Vec::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_LIST_FILE + 1)
            .read_to_end(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX_LIST_FILE + 1).read_to_end(&mut text))
    };
    read.map_err(|e| usage(format!("{option} {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_LIST_FILE {
        return Err(usage(format!(
            "{option} {}: longer than {} MiB",
            path.display(),
            MAX_LIST_FILE >> 20
        )));
    }
    let text = String::from_utf8(text)
        .map_err(|_| usage(format!("{option} {}: not UTF-8 text", path.display())))?;
    Ok(text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(str::to_string)
        .collect())
}

/// `--include`, `--exclude` and the patterns of `--include-from` and
/// `--exclude-from`, in command-line order.
fn filter_rules(cli: &Cli) -> Result<Vec<crate::wire::FilterRule>> {
    let mut rules = Vec::new();
    for f in &cli.filters {
        match f {
            FilterArg::Rule(r) => rules.push(r.clone()),
            FilterArg::From { exclude, path } => {
                let option = if *exclude {
                    "--exclude-from"
                } else {
                    "--include-from"
                };
                for pattern in list_file(path, option)? {
                    rules.push(crate::wire::FilterRule {
                        exclude: *exclude,
                        pattern,
                    });
                }
            }
        }
    }
    // Bad patterns are usage errors before anything is listed.
    crate::filter::Filter::new(&rules)?;
    Ok(rules)
}

/// `--files-from`: tree-relative paths (a leading `/`, `./` and a trailing
/// `/` dropped, as rsync does); `..` is refused, `.` is the whole tree.
fn files_from(path: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for line in list_file(path, "--files-from")? {
        let parts: Vec<&str> = line
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        if parts.contains(&"..") {
            return Err(usage(format!(
                "--files-from {}: {line:?} leads out of the tree",
                path.display()
            )));
        }
        let rel = parts.join("/").into_bytes();
        if !crate::wire::valid_rel_path(&rel, true) {
            return Err(usage(format!(
                "--files-from {}: {line:?} is not a path vmsync can sync",
                path.display()
            )));
        }
        out.push(rel);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// rsync options vmsync does not have, each refused with what to use
/// instead: the words of the README's table ([`crate::app::rsync`]).
fn refuse_rsync_options(cli: &Cli) -> Result<()> {
    let refused = [
        (cli.whole_file, "-W, --whole-file"),
        (
            cli.backup || cli.backup_dir.is_some(),
            "-b, --backup, --backup-dir",
        ),
        (cli.rsync_path.is_some(), "--rsync-path"),
        (cli.append || cli.append_verify, "--append, --append-verify"),
        (cli.update, "-u, --update"),
    ];
    match refused.iter().find(|(given, _)| *given) {
        Some((_, row)) => Err(usage(crate::app::rsync::refusal(row))),
        None => Ok(()),
    }
}

/// `--info=FLAGS`: whether a progress bar is wanted and whether `--stats`
/// is (`None`: not said).
fn info_flags(cli: &Cli) -> Result<(Option<bool>, Option<bool>)> {
    let (mut progress, mut stats) = (None, None);
    for flag in cli.info.iter().flat_map(|s| s.split(',')) {
        match flag.trim() {
            "progress1" | "progress2" => progress = Some(true),
            "progress0" => progress = Some(false),
            "stats1" | "stats2" | "stats3" => stats = Some(true),
            "stats0" => stats = Some(false),
            "" => {}
            other => {
                return Err(usage(format!(
                    "--info={other}: vmsync knows progress0, progress1, progress2, stats0, \
                     stats1 and stats2 (-v says what each phase does)"
                )))
            }
        }
    }
    Ok((progress, stats))
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
        refuse_rsync_options(cli)?;
        let filters = filter_rules(cli)?;
        let files_from = match &cli.files_from {
            Some(p) => Some(files_from(p)?),
            None => None,
        };
        if !cli.recursive {
            for (given, flag) in [
                (cli.delete, "--delete"),
                (!filters.is_empty(), "--include/--exclude"),
                (files_from.is_some(), "--files-from"),
            ] {
                if given {
                    return Err(usage(format!("{flag} applies to a tree: add -r (or -a)")));
                }
            }
        }
        let (progress, stats) = info_flags(cli)?;
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
            checksum: cli.checksum || cli.ignore_times,
            no_partial: cli.no_partial,
            rsh,
            remote_path: cli.remote_path.clone(),
            stats: stats.unwrap_or(cli.stats),
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
            filters,
            files_from,
            tree: TreeOptions {
                hard_links: cli.hard_links,
                xattrs: cli.xattrs,
                acls: cli.acls,
                devices: cli.devices,
                specials: cli.specials,
                one_file_system: cli.one_file_system,
            },
            progress: progress.unwrap_or(true) && !cli.quiet && !cli.json,
            itemize: cli.itemize_changes,
        })
    }
}
