//! The `vmsync` binary: parse the command line and hand it to the library,
//! which validates it, runs it and maps the outcome to the exit code once
//! (`vmsync::app::main`).

use std::process::ExitCode;

fn main() -> ExitCode {
    vmsync::app::start();
    let cli = vmsync::app::cli::parse();
    vmsync::app::main(&cli)
}
