//! One run of the binary from start to end: read what must be read before
//! any thread exists, dispatch to the server or the client, report the
//! outcome (human or JSON, log file, metrics) and map it to the exit code
//! once. `main.rs` only parses and calls [`start`] and [`main`].

use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use crate::app::cli::Cli;
use crate::app::{config::Config, report};
use crate::client::tree;
use crate::{client, server, signals};

/// The process umask, read by [`start`].
static UMASK: AtomicU32 = AtomicU32::new(0o022);

/// What must happen before any thread starts: reading the umask (reading it
/// means setting it, which would race with threads creating files) and
/// blocking the signals, so that every thread inherits the mask.
pub fn start() {
    use rustix::fs::Mode;
    let old = rustix::process::umask(Mode::from_raw_mode(0o022));
    rustix::process::umask(old);
    UMASK.store(old.as_raw_mode(), Ordering::Relaxed);
    signals::install();
}

/// What a run produced: one file's report, or a tree's.
enum Outcome {
    File(client::Report),
    Tree(tree::TreeReport),
}

/// Runs the command line `cli` to its end: the `--server` loop, or one
/// sync or check (a file or a tree), reported as asked; returns the exit
/// code. [`start`] must have run first.
pub fn main(cli: &Cli) -> ExitCode {
    let umask = UMASK.load(Ordering::Relaxed);
    if let Some(dir) = &cli.state_dir {
        crate::dest::paths::set_state_dir(dir.clone());
    }
    if cli.server {
        signals::set_quiet(true);
        let limits = server::Limits {
            root: cli.root.clone(),
            read_only: cli.read_only,
            hooks: crate::source::quiesce::Hooks {
                freeze: cli.freeze.clone(),
                thaw: cli.thaw.clone(),
            },
        };
        let code = server::serve(umask, &limits);
        signals::hold_if_interrupted();
        return ExitCode::from(code.code());
    }
    if let Some(shell) = cli.completions {
        let mut cmd = <crate::app::cli::Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "vmsync", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.recover {
        crate::log::init(if cli.quiet { 0 } else { cli.verbose });
        return recover(std::path::Path::new(path), cli.json, cli.quiet);
    }
    let (json, recursive) = (cli.json, cli.recursive);
    signals::set_fallback(Box::new(move |sig| {
        report::error_message(sig.exit(), &sig.message(), json, recursive);
    }));
    crate::log::init(if cli.quiet { 0 } else { cli.verbose });
    crate::log::set_quiet(cli.quiet);
    if let Some(path) = &cli.log_file {
        match crate::log::open_file(path) {
            Ok(()) => crate::log::to_file(&format!(
                "start: {}",
                std::env::args_os()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            Err(e) => eprintln!("vmsync: warning: {}", crate::error::message_of(&e)),
        }
    }
    let start = Instant::now();
    let outcome = Config::from_cli(cli).and_then(|cfg| {
        // `-i` on one file: the tree path, which knows the entry before
        // and after (its single-file branch runs the same engine).
        let r = if cfg.recursive || (cfg.itemize && !cfg.json) {
            Outcome::Tree(tree::run(&cfg, umask)?)
        } else {
            Outcome::File(client::run(&cfg, umask)?)
        };
        Ok((cfg, r))
    });
    let mut outcome = outcome;
    if let Some(sig) = signals::claim_report() {
        // The signal thread stopped our children, so whatever the run
        // returned is a consequence of the signal: report the signal.
        match &mut outcome {
            Ok((_, Outcome::Tree(r))) => r.fatal = Some((sig.exit(), sig.message())),
            _ => outcome = Err(crate::error::fail(sig.exit(), sig.message())),
        }
    }
    let exit = match &outcome {
        Ok((cfg, Outcome::File(r))) => {
            report::print(r, cfg.stats, cfg.json, cfg.quiet);
            r.exit()
        }
        Ok((cfg, Outcome::Tree(r))) => {
            report::print_tree(r, cfg.stats, cfg.json, cfg.quiet);
            r.exit()
        }
        Err(e) => report::error(e, cli.json, cli.recursive),
    };
    // A tree is recorded by its totals, as one series for its destination.
    let totals = match &outcome {
        Ok((_, Outcome::File(r))) => Some(r.clone()),
        Ok((_, Outcome::Tree(r))) => Some(r.totals()),
        Err(_) => None,
    };
    match &outcome {
        Ok((_, Outcome::Tree(r))) => report::log_tree_outcome(r, exit),
        Ok((_, Outcome::File(r))) => report::log_outcome(Ok(r), exit),
        Err(e) => report::log_outcome(Err(e), exit),
    }
    if let (Some(path), Some(src), Some(dst)) = (&cli.metrics_file, &cli.src, &cli.dst) {
        report::write_metrics(
            path,
            &src.to_string_lossy(),
            &dst.to_string_lossy(),
            cli.check,
            // An unparsable --sample failed the run before it checked
            // anything: recorded as a failed check, outside any cycle.
            cli.sample
                .as_deref()
                .and_then(|k_n| crate::app::config::parse_sample(k_n).ok()),
            totals.as_ref(),
            exit,
            start.elapsed(),
        );
    }
    ExitCode::from(exit.code())
}

/// `--recover PATH`: finishes (or reports) the interrupted journaled write
/// of PATH, as every sync and check would before touching it.
fn recover(path: &std::path::Path, json: bool, quiet: bool) -> ExitCode {
    use serde_json::json;
    let device = std::fs::metadata(path).is_ok_and(|m| crate::content::scan::is_block_device(&m));
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let done = if parent.is_dir() {
        crate::dest::recover::finish_pending(path, device)
    } else {
        // A typo more likely than a file with nothing to finish.
        Err(crate::error::fail(
            crate::error::Exit::Io,
            format!(
                "--recover {}: no such directory {}",
                path.display(),
                parent.display()
            ),
        ))
    };
    match done {
        Ok(done) => {
            let (state, journal, records, bytes, text) = match (&done.applied, &done.uncommitted) {
                (Some((j, n, b)), _) => (
                    "applied",
                    Some(j),
                    *n,
                    *b,
                    format!(
                        "{}: applied the committed journal {} ({n} records, {}): it holds the new version",
                        path.display(),
                        j.display(),
                        crate::units::bytes(*b)
                    ),
                ),
                (None, Some((j, n))) => (
                    "uncommitted",
                    Some(j),
                    *n,
                    0,
                    format!(
                        "{}: the journal {} ({n} records) of an interrupted sync was never \
                         committed, so nothing of it was applied; it is kept for the next sync to \
                         reuse (--check tells whether the file is as it was)",
                        path.display(),
                        j.display()
                    ),
                ),
                (None, None) => (
                    "none",
                    None,
                    0,
                    0,
                    format!("{}: no interrupted write to finish", path.display()),
                ),
            };
            if json {
                let v = json!({
                    "path": path.to_string_lossy(),
                    "state": state,
                    "journal": journal.map(|j| j.to_string_lossy().into_owned()),
                    "records": records,
                    "data_bytes": bytes,
                    "exit_code": 0,
                    "error": serde_json::Value::Null,
                });
                println!("{v}");
            } else if !quiet {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let exit = crate::error::exit_code_of(&e);
            let msg = crate::error::message_of(&e);
            if json {
                let v = json!({
                    "path": path.to_string_lossy(),
                    "state": "error",
                    "journal": serde_json::Value::Null,
                    "records": 0,
                    "data_bytes": 0,
                    "exit_code": exit.code(),
                    "error": msg,
                });
                println!("{v}");
            }
            eprintln!("vmsync: error: {msg}");
            ExitCode::from(exit.code())
        }
    }
}
