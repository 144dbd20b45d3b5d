//! `--freeze CMD` / `--thaw CMD`: quiescing a guest around the clone.
//!
//! A clone on its own is crash-consistent: it holds what a power cut at
//! that instant would have left on disk. Freezing the guest's filesystems
//! first (`virsh domfsfreeze`, qemu-guest-agent `guest-fsfreeze-freeze`)
//! makes it filesystem-consistent; the clone takes milliseconds, so the
//! guest is frozen only that long.
//!
//! The commands run with `/bin/sh -c` on the sending host, with
//! `VMSYNC_SOURCE` set to the source's path, standard input closed and
//! their output on our standard error (our standard output may be JSON).
//! Once the freeze has started, the thaw runs whatever happens: the freeze
//! failing, the clone failing, or a signal. The whole stretch is
//! [`crate::signals::critical`], so SIGINT/SIGTERM wait for the thaw before
//! the process exits; a signal still stops the freeze command itself (it is
//! registered as our child), never the thaw.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::error::{fail, Exit, WithExit};
use crate::signals;

/// The commands around the clone; either may be absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    pub freeze: Option<String>,
    pub thaw: Option<String>,
}

/// Runs `clone` between the freeze and the thaw; returns what it returned
/// and how long the source was frozen (from the freeze's start to the
/// thaw's end; `None` without `--freeze`).
pub fn around<T>(
    hooks: &Hooks,
    source: &Path,
    clone: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<Duration>)> {
    let critical = signals::critical();
    let start = Instant::now();
    let frozen = match &hooks.freeze {
        Some(cmd) => run(cmd, source, true).map_err(|e| e.context("freeze command failed")),
        None => Ok(()),
    };
    let result = frozen.and_then(|()| {
        if let Some(sig) = signals::interrupted() {
            return Err(fail(sig.exit(), sig.message()));
        }
        clone()
    });
    let thawed = match &hooks.thaw {
        Some(cmd) => run(cmd, source, false).map_err(|e| {
            e.context("thaw command failed: the source may still be frozen; thaw it by hand")
        }),
        None => Ok(()),
    };
    let took = hooks.freeze.as_ref().map(|_| start.elapsed());
    drop(critical);
    let value = result?;
    thawed?;
    if let Some(sig) = signals::interrupted() {
        return Err(fail(sig.exit(), sig.message()));
    }
    Ok((value, took))
}

/// Runs one hook and waits for it; a failure names the command and how it
/// ended. The freeze is our child for the signal thread to stop; the thaw
/// is not, so that nothing interrupts it.
fn run(cmd: &str, source: &Path, stoppable: bool) -> Result<()> {
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .env("VMSYNC_SOURCE", source)
        .stdin(Stdio::null())
        .stdout(std::io::stderr());
    signals::unblock_in_child(&mut c);
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot run `{cmd}`"))
        .exit_with(Exit::Io)?;
    if stoppable {
        signals::register_child(child.id());
    }
    let status = child.wait();
    if stoppable {
        signals::unregister_child(child.id());
    }
    let status = status
        .with_context(|| format!("cannot wait for `{cmd}`"))
        .exit_with(Exit::Io)?;
    if !status.success() {
        return Err(fail(Exit::Io, format!("`{cmd}` ended with {status}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code_of;

    #[test]
    fn the_thaw_runs_whatever_the_freeze_and_the_clone_did() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("thawed");
        let hooks = |freeze: &str| Hooks {
            freeze: Some(freeze.into()),
            thaw: Some(format!("echo $VMSYNC_SOURCE >> {}", mark.display())),
        };
        let src = Path::new("/the/source");

        let (v, took) = around(&hooks("true"), src, || Ok(5)).unwrap();
        assert_eq!(v, 5);
        assert!(took.is_some());
        assert_eq!(std::fs::read_to_string(&mark).unwrap(), "/the/source\n");

        let e = around(&hooks("exit 3"), src, || -> Result<()> {
            panic!("no clone after a failed freeze")
        })
        .unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Io);
        assert!(format!("{e:#}").contains("freeze command failed"), "{e:#}");

        let e = around(&hooks("true"), src, || -> Result<()> {
            Err(fail(Exit::Io, "clone refused"))
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("clone refused"));
        assert_eq!(std::fs::read_to_string(&mark).unwrap().lines().count(), 3);

        let bad_thaw = Hooks {
            freeze: None,
            thaw: Some("false".into()),
        };
        let e = around(&bad_thaw, src, || Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("thaw command failed"), "{e:#}");
        let (_, took) = around(&Hooks::default(), src, || Ok(())).unwrap();
        assert_eq!(took, None);
    }
}
