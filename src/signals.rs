//! SIGINT/SIGTERM/SIGHUP: leave nothing half-done behind.
//!
//! [`install`] blocks the signals in the calling thread before any other
//! thread exists (so every thread inherits the mask) and waits for them in a
//! dedicated thread with `sigwait`. On a signal that thread stops our child
//! (ssh or a local server) and waits for it, so the child's own cleanup is
//! over before we exit, removes every temporary file registered with
//! [`TempGuard`], and exits with 128 + the signal number. No async-signal
//! handler runs, so the cleanup may lock, allocate and print.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Files to remove on a signal, and whether only when empty.
static TEMP_FILES: Mutex<Vec<(PathBuf, bool)>> = Mutex::new(Vec::new());
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static JSON: AtomicBool = AtomicBool::new(false);
static QUIET: AtomicBool = AtomicBool::new(false);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

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
    // SAFETY: valid sigset; pthread_sigmask only changes this thread's mask.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: valid set and out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            on_signal(sig);
        })
        .expect("spawn signal thread");
}

/// The server leaves messages to the client, which knows what happened.
pub fn set_quiet(on: bool) {
    QUIET.store(on, Ordering::Relaxed);
}

/// When `--json` is on, an interrupted run still prints one JSON object.
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

/// Called by the main thread before it reports anything: once a signal is
/// being handled, stopping our child makes the main thread see a broken
/// connection, and it must not report that (or exit with its code) while
/// the signal thread cleans up and exits with 128 + N.
pub fn hold_if_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}

fn on_signal(sig: libc::c_int) -> ! {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let children: Vec<u32> = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
    for pid in &children {
        // SAFETY: plain syscalls on pids we spawned and have not reaped.
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGTERM);
        }
    }
    for pid in &children {
        let mut status = 0;
        // SAFETY: as above.
        unsafe {
            libc::waitpid(*pid as libc::pid_t, &mut status, 0);
        }
    }
    remove_temp_files();
    let name = match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    };
    let code = 128 + sig;
    if JSON.load(Ordering::Relaxed) {
        let v = crate::app::report::error_json(code as u8, &format!("interrupted by {name}"));
        println!("{v}");
    }
    if !QUIET.load(Ordering::Relaxed) {
        eprintln!("vmsync: interrupted by {name}; the destination was left as it was");
    }
    std::process::exit(code);
}

/// Ends the process at once with `code`, cleaning up as for a signal: for
/// a server whose client is gone (`--timeout`), where the main thread may
/// be blocked writing to it and would never see the error.
pub fn abandon(code: u8) -> ! {
    INTERRUPTED.store(true, Ordering::SeqCst);
    remove_temp_files();
    std::process::exit(i32::from(code));
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

/// Records a child to stop on a signal.
pub fn register_child(pid: u32) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.push(pid);
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
