//! The `vmsync` binary: parse, validate, run, map the outcome to an exit code.

use std::process::ExitCode;
use std::time::Instant;

use vmsync::app::{config::Config, report};
use vmsync::client::tree;
use vmsync::{client, server, signals};

/// What a run produced: one file's report, or a tree's.
enum Outcome {
    File(client::Report),
    Tree(tree::TreeReport),
}

fn main() -> ExitCode {
    let umask = vmsync::read_umask();
    signals::install();
    let cli = vmsync::app::cli::parse();
    if cli.server {
        signals::set_quiet(true);
        let limits = server::Limits {
            root: cli.root.clone(),
            read_only: cli.read_only,
        };
        let code = server::serve(umask, &limits);
        signals::hold_if_interrupted();
        return ExitCode::from(code.code());
    }
    if let Some(shell) = cli.completions {
        let mut cmd = <vmsync::app::cli::Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "vmsync", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let (json, recursive) = (cli.json, cli.recursive);
    signals::set_fallback(Box::new(move |sig| {
        report::error_message(sig.exit(), &sig.message(), json, recursive);
    }));
    vmsync::log::init(if cli.quiet { 0 } else { cli.verbose });
    vmsync::log::set_quiet(cli.quiet);
    if let Some(path) = &cli.log_file {
        match vmsync::log::open_file(path) {
            Ok(()) => vmsync::log::to_file(&format!(
                "start: {}",
                std::env::args_os()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            Err(e) => eprintln!("vmsync: warning: {}", vmsync::error::message_of(&e)),
        }
    }
    let start = Instant::now();
    let outcome = Config::from_cli(&cli).and_then(|cfg| {
        let r = if cfg.recursive {
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
            _ => outcome = Err(vmsync::error::fail(sig.exit(), sig.message())),
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
            totals.as_ref(),
            exit,
            start.elapsed(),
        );
    }
    ExitCode::from(exit.code())
}
