//! SIGINT/SIGTERM/SIGHUP: leave nothing half-done behind, and let the code
//! that owns the report say what happened.
//!
//! [`install`] blocks the signals in the calling thread before any other
//! thread exists (so every thread inherits the mask) and waits for them in a
//! dedicated thread with `sigwait`. On a signal that thread records it
//! ([`interrupted`]), stops our children (ssh or a local server) and waits
//! for them, so their own cleanup is over, and removes every temporary file
//! registered with [`TempGuard`]. It prints nothing: with its children gone
//! the main thread's I/O fails at once, and `main`, which owns the report,
//! sees [`interrupted`] and ends the run with the signal's exit code and the
//! report it would give for any failed run (a `-r` run keeps its `files` and
//! `errors`; the metrics file is written). Only if the main thread has not
//! claimed the report within [`GRACE`] (it may be deep in a local scan) does
//! the signal thread end the process itself, through the fallback `main`
//! registered with [`set_fallback`]. No async-signal handler runs, so all of
//! this may lock, allocate and print.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How long the main thread has, after a signal, to claim the report.
pub const GRACE: Duration = Duration::from_secs(5);

/// Files to remove on a signal, and whether only when empty.
static TEMP_FILES: Mutex<Vec<(PathBuf, bool)>> = Mutex::new(Vec::new());
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static QUIET: AtomicBool = AtomicBool::new(false);
/// The process is ending (a signal, or [`abandon`]): the main thread must
/// not report a broken connection of its own.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// The signal being handled; 0 while none.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Who prints the run's outcome once a signal came.
static REPORT: Mutex<Reporter> = Mutex::new(Reporter::Nobody);
static REPORT_CLAIMED: Condvar = Condvar::new();
static FALLBACK: Mutex<Option<Fallback>> = Mutex::new(None);
/// Held while a committed write is being applied ([`critical`]): the
/// process does not exit on a signal before it is released.
static CRITICAL: Mutex<()> = Mutex::new(());

/// What prints the outcome when the main thread cannot.
pub type Fallback = Box<dyn Fn(Signal) + Send>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reporter {
    Nobody,
    Main,
    SignalThread,
}

/// A signal that ended (or is ending) the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal(i32);

impl Signal {
    /// `SIGINT`, `SIGTERM` or `SIGHUP`.
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            _ => "SIGHUP",
        }
    }

    /// The process exit code: 128 + the signal number.
    pub fn exit(self) -> crate::error::Exit {
        crate::error::Exit::from_code((128 + self.0) as u8)
    }

    /// What the report says happened.
    pub fn message(self) -> String {
        format!("interrupted by {}", self.name())
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks the signals and starts the thread that handles them. Call first
/// thing in `main`, before any thread is spawned.
pub fn install() {
    let set = signal_set();
    // SAFETY: a valid sigset; pthread_sigmask changes only this thread's mask,
    // and sigwait only writes the signal number through a valid pointer.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut sig: libc::c_int = 0;
                if libc::sigwait(&set, &mut sig) == 0 {
                    on_signal(sig);
                }
            })
            .expect("spawn signal thread");
    }
}

/// The server leaves messages to the client, which knows what happened, and
/// exits at once on a signal.
pub fn set_quiet(on: bool) {
    QUIET.store(on, Ordering::Relaxed);
}

/// What to print and exit with if the main thread does not claim the report
/// within [`GRACE`] of a signal.
pub fn set_fallback(f: Fallback) {
    if let Ok(mut slot) = FALLBACK.lock() {
        *slot = Some(f);
    }
}

/// The signal that interrupted the run, if one did.
pub fn interrupted() -> Option<Signal> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        n => Some(Signal(n)),
    }
}

/// Called by the main thread before it reports anything. After a signal
/// it removes what the run left registered, and returns the signal; if the
/// signal thread already took over the report it never returns.
pub fn claim_report() -> Option<Signal> {
    let mut who = REPORT.lock().unwrap_or_else(|e| e.into_inner());
    if *who == Reporter::SignalThread {
        drop(who);
        loop {
            std::thread::park();
        }
    }
    *who = Reporter::Main;
    REPORT_CLAIMED.notify_all();
    drop(who);
    let sig = interrupted();
    if sig.is_some() {
        remove_temp_files();
    }
    sig
}

/// The server's version of [`claim_report`]: it reports nothing, so once a
/// signal is being handled it waits for the signal thread to exit.
pub fn hold_if_interrupted() {
    if STOPPING.load(Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}

/// A stretch that must run to its end once started, whatever signal comes
/// or whether the peer is still there: applying a committed journal. A
/// signal is still recorded at once and the children stopped, but the
/// process exits only when the guard is dropped. (SIGKILL, and a power
/// cut, still stop it: that is what replaying the journal is for.)
pub fn critical() -> std::sync::MutexGuard<'static, ()> {
    CRITICAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Exits with `code` once no [`critical`] stretch is running.
fn exit_when_not_critical(code: i32) -> ! {
    let _held = critical();
    std::process::exit(code)
}

fn on_signal(sig: libc::c_int) {
    if SIGNAL
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return; // a second signal while the first is handled
    }
    STOPPING.store(true, Ordering::SeqCst);
    stop_children();
    remove_temp_files();
    let signal = Signal(sig);
    if QUIET.load(Ordering::Relaxed) {
        exit_when_not_critical(128 + sig);
    }
    let who = REPORT.lock().unwrap_or_else(|e| e.into_inner());
    let (mut who, _) = REPORT_CLAIMED
        .wait_timeout_while(who, GRACE, |w| *w == Reporter::Nobody)
        .unwrap_or_else(|e| e.into_inner());
    if *who == Reporter::Main {
        return; // main reports and exits
    }
    *who = Reporter::SignalThread;
    drop(who);
    match FALLBACK.lock().ok().and_then(|mut f| f.take()) {
        Some(f) => f(signal),
        None => eprintln!("vmsync: {}", signal.message()),
    }
    remove_temp_files();
    exit_when_not_critical(128 + sig);
}

fn stop_children() {
    let children: Vec<u32> = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
    for &pid in &children {
        terminate(pid);
    }
    for pid in children.iter().filter_map(|&p| pid_of(p)) {
        let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
    }
}

/// Ends the process at once with `code`, cleaning up as for a signal: for
/// a server whose client is gone (`--timeout`), where the main thread may
/// be blocked writing to it and would never see the error.
pub fn abandon(code: u8) -> ! {
    STOPPING.store(true, Ordering::SeqCst);
    remove_temp_files();
    exit_when_not_critical(i32::from(code));
}

fn pid_of(pid: u32) -> Option<rustix::process::Pid> {
    rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)
}

/// SIGTERM to a child we spawned and have not reaped.
fn terminate(pid: u32) {
    if let Some(pid) = pid_of(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

fn remove_temp_files() {
    if let Ok(files) = TEMP_FILES.lock() {
        for (f, only_if_empty) in files.iter() {
            let empty = std::fs::symlink_metadata(f).is_ok_and(|m| m.len() == 0);
            if !only_if_empty || empty {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// Registers a file for removal on a signal (a temporary file, a lock file);
/// dropping the guard unregisters it (the file itself is the owner's business).
pub struct TempGuard(PathBuf);

impl TempGuard {
    pub fn new(path: &Path) -> TempGuard {
        Self::register(path, false)
    }

    /// Removal on a signal only if the file is empty then.
    pub fn if_empty(path: &Path) -> TempGuard {
        Self::register(path, true)
    }

    fn register(path: &Path, only_if_empty: bool) -> TempGuard {
        if let Ok(mut f) = TEMP_FILES.lock() {
            f.push((path.to_path_buf(), only_if_empty));
        }
        TempGuard(path.to_path_buf())
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Ok(mut f) = TEMP_FILES.lock() {
            if let Some(k) = f.iter().position(|(p, _)| p == &self.0) {
                f.remove(k);
            }
        }
    }
}

/// Records a child to stop on a signal. A child started after the signal
/// (a `-r` worker racing the signal thread) is stopped at once.
pub fn register_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.push(pid);
    }
    if interrupted().is_some() {
        terminate(pid); // its owner reaps it
    }
}

/// Forgets a child once it has been reaped.
pub fn unregister_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.retain(|&p| p != pid);
    }
}

/// Children inherit the blocked mask across exec; give them the default
/// behaviour back so ssh and the local server can be interrupted.
pub fn unblock_in_child(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only calls async-signal-safe sigprocmask on a
    // set built before the fork.
    unsafe {
        let set = signal_set();
        cmd.pre_exec(move || {
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
}
