//! Running vmsync with a manifest cache of the test's own, and in the
//! background.
//!
//! The `--snapshot` tests (`tests/it/snapshot.rs`) need both, which
//! [`super::Vmsync`] does not give:
//!
//! * whether a run may read only the changed extents depends on what the
//!   receiver's manifest cache (`$VMSYNC_CACHE_DIR`) says about the
//!   destination, so each test gets a fresh cache ([`Runner`]) rather than
//!   the one the whole binary shares, and no other test can make or spoil
//!   its delta state;
//! * a run that a test signals while it waits in a `--freeze` command must
//!   be started, watched and waited for separately ([`Background`]).
//!
//! Like [`super::Vmsync::run`], a run gets its own process group, which is
//! killed when the run times out and once it has exited (so a command it
//! started and left behind, e.g. a hung freeze command, cannot hold the
//! output pipes open or outlive the test).

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{bin, tempdir, Run};

/// How long a run may take before it is killed and the test fails.
const TIMEOUT: Duration = Duration::from_secs(180);

/// Runs vmsync with `VMSYNC_CACHE_DIR` set to a temporary directory of its
/// own (removed on drop).
pub struct Runner {
    cache: tempfile::TempDir,
}

impl Default for Runner {
    fn default() -> Self {
        Runner { cache: tempdir() }
    }
}

impl Runner {
    pub fn new() -> Runner {
        Runner::default()
    }

    /// The manifest cache directory, e.g. to give a remote receiver the same
    /// one through `--remote-path "VMSYNC_CACHE_DIR=... vmsync"`.
    pub fn cache(&self) -> &Path {
        self.cache.path()
    }

    /// Starts vmsync with `args` and returns without waiting.
    pub fn spawn(&self, args: &[&dyn AsRef<OsStr>]) -> Background {
        let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let mut child = Command::new(bin())
            .args(&args)
            .env_remove("RUST_LOG")
            .env("VMSYNC_CACHE_DIR", self.cache())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin().display()));
        let out = drain(child.stdout.take().unwrap());
        let err = drain(child.stderr.take().unwrap());
        Background {
            pid: child.id() as i32,
            child: Some(child),
            out,
            err,
            args: args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            start: Instant::now(),
        }
    }

    /// Runs vmsync with `args` to completion.
    pub fn run(&self, args: &[&dyn AsRef<OsStr>]) -> Run {
        self.spawn(args).wait()
    }

    /// Runs vmsync with `--json` and `args`; stdout must be one JSON object.
    pub fn run_json(&self, args: &[&dyn AsRef<OsStr>]) -> (Run, Value) {
        let mut all: Vec<&dyn AsRef<OsStr>> = vec![&"--json"];
        all.extend_from_slice(args);
        let run = self.run(&all);
        let v = match serde_json::from_str::<Value>(run.stdout.trim()) {
            Ok(v) if v.is_object() => v,
            Ok(v) => panic!("--json printed {v}, not an object\n{run}"),
            Err(e) => panic!("stdout is not one JSON object ({e})\n{run}"),
        };
        (run, v)
    }
}

/// A vmsync run in progress; its process group is killed if it is dropped
/// before [`Background::wait`].
pub struct Background {
    pid: i32,
    child: Option<Child>,
    out: mpsc::Receiver<Vec<u8>>,
    err: mpsc::Receiver<Vec<u8>>,
    args: Vec<String>,
    start: Instant,
}

impl Background {
    /// Whether vmsync has exited already (without reaping it).
    pub fn has_exited(&mut self) -> bool {
        let child = self.child.as_mut().unwrap();
        // Rust's try_wait reaps; waitid with WNOWAIT leaves the zombie, so
        // `wait` still gets the status.
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let flags = rustix::process::WaitIdOptions::EXITED
            | rustix::process::WaitIdOptions::NOHANG
            | rustix::process::WaitIdOptions::NOWAIT;
        matches!(
            rustix::process::waitid(rustix::process::WaitId::Pid(pid), flags),
            Ok(Some(_))
        )
    }

    /// Sends `signal` to vmsync alone (not its group, as `kill PID` from a
    /// service manager would).
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain syscall; the child is not reaped yet, so the pid is
        // still ours.
        let rc = unsafe { libc::kill(self.pid, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid);
    }

    /// Waits for the run to end (killing its group after [`TIMEOUT`], which
    /// fails the test), then kills what is left in its group and collects
    /// its output.
    pub fn wait(mut self) -> Run {
        let mut child = self.child.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let (status, timed_out) = match rx.recv_timeout(TIMEOUT) {
            Ok(status) => (status.expect("wait for vmsync"), false),
            Err(_) => {
                kill_group(self.pid);
                (rx.recv().unwrap().expect("wait for vmsync"), true)
            }
        };
        let elapsed = self.start.elapsed();
        kill_group(self.pid);
        let text = |rx: &mpsc::Receiver<Vec<u8>>| {
            String::from_utf8_lossy(&rx.recv().unwrap_or_default()).into_owned()
        };
        let signal = status.signal();
        let run = Run {
            code: status.code().unwrap_or_else(|| 128 + signal.unwrap_or(0)),
            signal,
            stdout: text(&self.out),
            stderr: text(&self.err),
            args: std::mem::take(&mut self.args),
            elapsed,
        };
        assert!(
            !timed_out,
            "vmsync did not finish within {TIMEOUT:?} and was killed\n{run}"
        );
        run
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(self.pid);
            let _ = child.wait();
        }
    }
}

fn drain<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

fn kill_group(pgid: i32) {
    // SAFETY: plain syscall on the process group this module started.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}
