//! The `vmsync` binary: parse, validate, run, map the outcome to an exit code.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use vmsync::{cli::Cli, client, config::Config, report, server, signals};

fn main() -> ExitCode {
    let umask = vmsync::read_umask();
    signals::install();
    let cli = Cli::parse();
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
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "vmsync", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    signals::set_json(cli.json);
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
        let r = client::run(&cfg, umask)?;
        Ok((cfg, r))
    });
    signals::hold_if_interrupted();
    let exit = match &outcome {
        Ok((cfg, r)) => {
            report::print(r, cfg.stats, cfg.json, cfg.quiet);
            r.exit()
        }
        Err(e) => report::error(e, cli.json),
    };
    report::log_outcome(outcome.as_ref().map(|(_, r)| r), exit);
    if let (Some(path), Some(src), Some(dst)) = (&cli.metrics_file, &cli.src, &cli.dst) {
        report::write_metrics(
            path,
            &src.to_string_lossy(),
            &dst.to_string_lossy(),
            cli.check,
            outcome.as_ref().ok().map(|(_, r)| r),
            exit,
            start.elapsed(),
        );
    }
    ExitCode::from(exit.code())
}
