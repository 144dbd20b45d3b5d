//! Reaching the other end: operands, the ssh (or local) child, its pipes.
//!
//! The remote end is always a child process speaking the protocol on its
//! stdin/stdout: `ssh [user@]host vmsync --server` for a remote operand, or
//! this very binary with `--server` for local-to-local syncs, so one code
//! path serves both. Paths never appear on the ssh command line; they travel
//! inside the protocol, so no remote shell ever parses them.

use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Result;

use crate::error::{fail, Exit};
use crate::signals;
use crate::wire::bwlimit::{Limited, Limiter};

/// Name of the peer in a local-to-local sync, for messages.
pub const LOCAL_PEER: &str = "local server";

/// A command-line operand: a local path or `[user@]host:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    Local(PathBuf),
    Remote(Remote),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// What ssh is given: `user@host` or `host`.
    pub login: String,
    /// The host alone, for messages.
    pub host: String,
    /// The path on the remote end, as bytes.
    pub path: Vec<u8>,
}

/// Parses an operand by scp/rsync rules: a colon before any slash makes it
/// remote (`host:path`, `user@host:path`, `[v6::addr]:path`); `./a:b` and
/// `/a:b` are local.
pub fn parse_operand(arg: &OsStr) -> Result<Operand, String> {
    let bytes = arg.as_bytes();
    if bytes.is_empty() {
        return Err("empty path".into());
    }
    let colon = if bytes.first() == Some(&b'[') || bytes.contains(&b'@') && bytes.contains(&b'[') {
        // [addr]:path or user@[addr]:path
        bytes
            .iter()
            .position(|&b| b == b']')
            .and_then(|close| (bytes.get(close + 1) == Some(&b':')).then_some(close + 1))
    } else {
        let colon = bytes.iter().position(|&b| b == b':');
        let slash = bytes.iter().position(|&b| b == b'/');
        match (colon, slash) {
            (Some(c), Some(s)) if s < c => None,
            (c, _) => c,
        }
    };
    let Some(colon) = colon else {
        return Ok(Operand::Local(PathBuf::from(arg)));
    };
    let login = std::str::from_utf8(&bytes[..colon])
        .map_err(|_| "host name is not valid UTF-8".to_string())?
        .to_string();
    let host_part = login.rsplit_once('@').map_or(login.as_str(), |(_, h)| h);
    let host = host_part
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(format!(
            "'{}' has an empty host name; write ./{} for a local path",
            arg.to_string_lossy(),
            arg.to_string_lossy()
        ));
    }
    if login.starts_with('-') {
        return Err(format!("host name '{login}' may not start with '-'"));
    }
    if login.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "host name '{login}' contains white space or control characters"
        ));
    }
    let mut path = bytes[colon + 1..].to_vec();
    if path.is_empty() {
        path = b".".to_vec();
    }
    Ok(Operand::Remote(Remote { login, host, path }))
}

/// Splits an `-e/--rsh` command into words: white space separates, single
/// and double quotes group, a backslash escapes the next character.
pub fn split_command(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => match chars.next() {
                Some(n) => cur.push(n),
                None => return Err(format!("trailing backslash in '{s}'")),
            },
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
        if quote.is_some() || !cur.is_empty() {
            in_word = true;
        }
    }
    if quote.is_some() {
        return Err(format!("unterminated quote in '{s}'"));
    }
    if in_word {
        words.push(cur);
    }
    if words.is_empty() {
        return Err("the remote shell command is empty".into());
    }
    Ok(words)
}

/// Counts bytes crossing the transport, both directions together.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

pub struct Counted<T> {
    inner: T,
    counter: Counter,
}

impl<T: Read> Read for Counted<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.add(n);
        Ok(n)
    }
}

impl<T: Write> Write for Counted<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.counter.add(n);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// How long the peer may stay silent before we give up (`--timeout`), and
/// what giving up does. Shared (clones are the same), because the server
/// learns the limit from `OPEN`, after its pipes are wrapped.
///
/// Two ways to be stuck on a peer: waiting to read ([`Watched`] polls with
/// the limit) and waiting to write, when the peer stopped reading and the
/// pipe is full. The second is caught by a watchdog thread ([`Silence::set`])
/// that looks at how long the current write has been blocked; a writer that
/// is merely slow still returns from each (bounded) write in time.
#[derive(Clone, Default)]
pub struct Silence(Arc<SilenceInner>);

#[derive(Default)]
struct SilenceInner {
    /// Milliseconds; 0 = wait forever.
    limit_ms: AtomicU64,
    tripped: AtomicBool,
    /// When the write in progress started (ms on [`clock_ms`]); 0 = none.
    writing_since: AtomicU64,
    /// Run once when the limit is passed: it must unblock every thread
    /// that waits on the peer (stop the child, or end the process).
    on_trip: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl std::fmt::Debug for Silence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Silence")
            .field("limit_ms", &self.0.limit_ms.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Milliseconds on a monotonic clock, never 0.
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

impl Silence {
    /// Sets the limit and, for a limit, starts the write watchdog.
    pub fn set(&self, secs: u32) {
        let limit = u64::from(secs) * 1000;
        self.0.limit_ms.store(limit, Ordering::Relaxed);
        if limit == 0 {
            return;
        }
        let weak = Arc::downgrade(&self.0);
        let tick = std::time::Duration::from_millis((limit / 4).max(10));
        let _ = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(tick);
                let Some(inner) = weak.upgrade() else { return };
                let since = inner.writing_since.load(Ordering::SeqCst);
                if since != 0 && clock_ms().saturating_sub(since) > limit {
                    Silence(inner).trip();
                    return;
                }
            });
    }

    /// What to do when the limit passes (see [`SilenceInner::on_trip`]).
    pub fn on_trip(&self, f: Box<dyn Fn() + Send>) {
        *self.0.on_trip.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    fn trip(&self) {
        if !self.0.tripped.swap(true, Ordering::SeqCst) {
            if let Some(f) = self
                .0
                .on_trip
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                f();
            }
        }
    }

    /// The peer stayed silent past the limit (and the run was ended for it).
    pub fn tripped(&self) -> bool {
        self.0.tripped.load(Ordering::SeqCst)
    }

    /// Why the run ended, for the user.
    pub fn message(&self) -> String {
        let secs = self.0.limit_ms.load(Ordering::Relaxed) / 1000;
        format!("nothing received for {secs} s (--timeout {secs})")
    }
}

/// How often an end that has sent nothing says `KEEPALIVE`, for a peer
/// that gives up after `timeout_secs` of silence: often enough that a
/// delayed keepalive or two does not trip it.
pub fn keepalive_interval(timeout_secs: u32) -> std::time::Duration {
    std::time::Duration::from_millis(u64::from(timeout_secs) * 1000 / 4)
}

/// Largest single write while a timeout is set: a blocking pipe write
/// returns only when all of it is taken, and the watchdog must see a slow
/// but live peer make progress within the limit.
const WATCHED_WRITE: usize = 64 * 1024;

/// A pipe to or from the peer under [`Silence`]: reads give up after the
/// limit, writes are timed for the watchdog. A peer that vanished without
/// closing (a dead network path, a stopped process) then ends the run
/// instead of hanging it.
pub struct Watched<T> {
    inner: T,
    fd: RawFd,
    silence: Silence,
}

impl<T: AsRawFd> Watched<T> {
    pub fn new(inner: T, silence: Silence) -> Self {
        let fd = inner.as_raw_fd();
        Watched { inner, fd, silence }
    }
}

impl<R: Read> Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = self.silence.0.limit_ms.load(Ordering::Relaxed);
        if limit > 0 {
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(limit);
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd for the duration of the call.
                let r = unsafe { libc::poll(&mut pfd, 1, ms) };
                if r > 0 {
                    break;
                }
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                self.silence.trip();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    self.silence.message(),
                ));
            }
        }
        self.inner.read(buf)
    }
}

impl<W: Write> Write for Watched<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.silence.0.limit_ms.load(Ordering::Relaxed) == 0 {
            return self.inner.write(buf);
        }
        let buf = &buf[..buf.len().min(WATCHED_WRITE)];
        self.silence
            .0
            .writing_since
            .store(clock_ms(), Ordering::SeqCst);
        let r = self.inner.write(buf);
        self.silence.0.writing_since.store(0, Ordering::SeqCst);
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: AsRawFd> AsRawFd for Counted<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

/// The running child that is the other end.
pub struct Peer {
    child: Child,
    /// Host name, or [`LOCAL_PEER`], for messages.
    pub name: String,
    program: String,
    stderr: Option<JoinHandle<()>>,
    last_stderr: Arc<Mutex<Vec<String>>>,
    pub counter: Counter,
}

pub type PeerReader = Watched<Counted<ChildStdout>>;
pub type PeerWriter = Limited<Watched<Counted<ChildStdin>>>;

/// How to start the remote end.
pub struct Launch<'a> {
    pub rsh: &'a [String],
    pub remote_path: &'a str,
    /// `--timeout`, applied to our reads from the start.
    pub silence: Silence,
    /// `--bwlimit` for what we send, bytes/s; 0 = none.
    pub bwlimit: u64,
}

/// Starts the other end: ssh to `remote`, or this binary when `None`.
pub fn spawn(remote: Option<&Remote>, launch: &Launch) -> Result<(Peer, PeerReader, PeerWriter)> {
    let (mut cmd, name, program) = match remote {
        Some(r) => {
            let mut cmd = Command::new(&launch.rsh[0]);
            cmd.args(&launch.rsh[1..])
                .arg(&r.login)
                .arg(launch.remote_path)
                .arg("--server");
            (cmd, r.host.clone(), launch.rsh[0].clone())
        }
        None => {
            let exe = std::env::current_exe().map_err(|e| {
                fail(
                    Exit::Connection,
                    format!("cannot find the vmsync binary: {e}"),
                )
            })?;
            let mut cmd = Command::new(&exe);
            cmd.arg("--server");
            (cmd, LOCAL_PEER.to_string(), exe.display().to_string())
        }
    };
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    signals::unblock_in_child(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        fail(
            Exit::Connection,
            format!("cannot start '{program}' to reach {name}: {e}"),
        )
    })?;
    signals::register_child(child.id());
    let pid = child.id();
    // A thread blocked reading or writing a peer that went silent is freed
    // by stopping the child, which closes its pipes. SIGCONT too: a stopped
    // child would keep SIGTERM pending.
    launch.silence.on_trip(Box::new(move || {
        // SAFETY: plain syscalls on our own child, which the Peer reaps
        // only after the session (and its reads and writes) ended.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
            libc::kill(pid as libc::pid_t, libc::SIGCONT);
        }
    }));
    let counter = Counter::default();
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let last_stderr = Arc::new(Mutex::new(Vec::new()));
    let prefix = name.clone();
    let keep = last_stderr.clone();
    let stderr = std::thread::Builder::new()
        .name("peer-stderr".into())
        .spawn(move || forward_stderr(stderr, &prefix, &keep))
        .ok();
    Ok((
        Peer {
            child,
            name,
            program,
            stderr,
            last_stderr,
            counter: counter.clone(),
        },
        Watched::new(
            Counted {
                inner: stdout,
                counter: counter.clone(),
            },
            launch.silence.clone(),
        ),
        Limited::new(
            Watched::new(
                Counted {
                    inner: stdin,
                    counter,
                },
                launch.silence.clone(),
            ),
            Limiter::new(launch.bwlimit),
        ),
    ))
}

/// Copies the child's stderr to ours, line by line, prefixed with the host.
fn forward_stderr(stderr: impl Read, prefix: &str, keep: &Mutex<Vec<String>>) {
    let mut r = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                eprintln!("{prefix}: {text}");
                crate::log::to_file(&format!("{prefix}: {text}"));
                if let Ok(mut k) = keep.lock() {
                    if k.len() == 8 {
                        k.remove(0);
                    }
                    k.push(text.to_string());
                }
            }
        }
    }
}

impl Peer {
    /// Waits for the child to exit after the session ended normally.
    pub fn finish(mut self) -> Result<()> {
        let status = self.child.wait();
        signals::unregister_child(self.child.id());
        if let Some(h) = self.stderr.take() {
            let _ = h.join();
        }
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(fail(
                Exit::Connection,
                format!(
                    "{}: '{}' exited with {s} after the sync",
                    self.name, self.program
                ),
            )),
            Err(e) => Err(fail(Exit::Connection, format!("{}: {e}", self.name))),
        }
    }

    /// After a connection failure: stops the child and explains how it ended,
    /// so "connection closed" can say "ssh exited with status 255" or
    /// "the remote shell could not find vmsync".
    pub fn explain(mut self) -> String {
        // The child may still be running (we are the side that failed):
        // closing our ends is done by the caller dropping the pipes.
        // Our end of its stdin is closed, so a child that lost its peer is
        // exiting: give it a moment to say how, then stop it.
        let mut status = None;
        for _ in 0..200 {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    status = Some(s);
                    break;
                }
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        if status.is_none() {
            let _ = self.child.kill();
            status = self.child.wait().ok();
        }
        signals::unregister_child(self.child.id());
        if let Some(h) = self.stderr.take() {
            let _ = h.join();
        }
        let lines = self
            .last_stderr
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.and_then(|s| s.signal()) {
            return format!("'{}' was killed by signal {sig}", self.program);
        }
        match status.and_then(|s| s.code()) {
            Some(127) => format!(
                "the remote shell on {} could not run the vmsync command; install vmsync there or give its path with --remote-path",
                self.name
            ),
            Some(126) => format!(
                "the vmsync command on {} is not executable; check --remote-path",
                self.name
            ),
            Some(255) if self.program.ends_with("ssh") => format!(
                "ssh could not connect to {}{}",
                self.name,
                lines.last().map(|l| format!(" ({l})")).unwrap_or_default()
            ),
            Some(c) => format!("'{}' exited with status {c}", self.program),
            None => format!("'{}' did not exit", self.program),
        }
    }
}

/// Turns an OsString into wire bytes and back (Unix paths are bytes).
pub fn path_bytes(p: &OsStr) -> Vec<u8> {
    p.as_bytes().to_vec()
}

pub fn bytes_path(b: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(b.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(s: &str) -> Remote {
        match parse_operand(OsStr::new(s)).unwrap() {
            Operand::Remote(r) => r,
            o => panic!("{s} parsed as {o:?}"),
        }
    }

    #[test]
    fn operands_follow_scp_rules() {
        assert_eq!(
            parse_operand(OsStr::new("disk.img")).unwrap(),
            Operand::Local("disk.img".into())
        );
        assert_eq!(
            parse_operand(OsStr::new("./a:b")).unwrap(),
            Operand::Local("./a:b".into())
        );
        assert_eq!(
            parse_operand(OsStr::new("/x/a:b")).unwrap(),
            Operand::Local("/x/a:b".into())
        );
        let r = remote("backup:/srv/disk.img");
        assert_eq!((r.login.as_str(), r.host.as_str()), ("backup", "backup"));
        assert_eq!(r.path, b"/srv/disk.img");
        let r = remote("root@backup:img");
        assert_eq!(
            (r.login.as_str(), r.host.as_str()),
            ("root@backup", "backup")
        );
        let r = remote("[::1]:/x");
        assert_eq!((r.login.as_str(), r.host.as_str()), ("[::1]", "::1"));
        assert_eq!(remote("h:").path, b".");
        assert!(parse_operand(OsStr::new("-oProxyCommand=x:y")).is_err());
        assert!(parse_operand(OsStr::new(":path")).is_err());
        assert!(parse_operand(OsStr::new("")).is_err());
    }

    #[test]
    fn rsh_words_split_like_a_shell() {
        assert_eq!(split_command("ssh").unwrap(), ["ssh"]);
        assert_eq!(
            split_command("ssh -p 2222  -i 'my key'").unwrap(),
            ["ssh", "-p", "2222", "-i", "my key"]
        );
        assert_eq!(
            split_command(r#"ssh -o "A=b c" x\ y ''"#).unwrap(),
            ["ssh", "-o", "A=b c", "x y", ""]
        );
        assert!(split_command("ssh 'oops").is_err());
        assert!(split_command("   ").is_err());
    }
}
