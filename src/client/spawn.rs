//! Starting the other end: parsing the operands, then spawning ssh (or
//! this binary, for a local-to-local sync) and wrapping its pipes.
//!
//! The remote end is always a child process speaking the protocol on its
//! stdin/stdout: `ssh [user@]host vmsync --server` for a remote operand, or
//! this very binary with `--server` for local-to-local syncs, so one code
//! path serves both. Paths never appear on the ssh command line; they travel
//! inside the protocol, so no remote shell ever parses them.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Result;
use rustix::process::{kill_process, Pid, Signal};

use crate::error::{fail, Exit};
use crate::progress::Counter;
use crate::signals;
use crate::wire::bwlimit::{Limited, Limiter};
use crate::wire::frame::LOCAL_PEER;
use crate::wire::pipe::{Counted, Silence, Watched};

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

/// Splits an `-e/--rsh` command into words as a POSIX shell would (the
/// `shlex` crate): white space separates; single quotes keep everything
/// literally; double quotes group, and a backslash in them escapes only
/// `$`, `` ` ``, `"` and `\`; outside quotes a backslash escapes any
/// character; a `#` that starts a word starts a comment. An unterminated
/// quote or a trailing backslash is an error, and so is an empty command.
pub fn split_command(s: &str) -> Result<Vec<String>, String> {
    let words = shlex::split(s).ok_or_else(|| {
        format!("unterminated quote or trailing backslash in the remote shell command '{s}'")
    })?;
    if words.is_empty() {
        return Err("the remote shell command is empty".into());
    }
    Ok(words)
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
    /// `--state-dir`, passed on to the server (where it receives, its
    /// devices' journals go there).
    pub state_dir: Option<&'a std::path::Path>,
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
            if let Some(dir) = launch.state_dir {
                // ssh hands the words to the remote shell: quote the path.
                let dir = dir.to_string_lossy();
                let quoted = shlex::try_quote(&dir).map_err(|_| {
                    fail(
                        Exit::Usage,
                        format!("--state-dir {dir}: cannot be passed to ssh"),
                    )
                })?;
                cmd.arg("--state-dir").arg(quoted.as_ref());
            }
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
            if let Some(dir) = launch.state_dir {
                cmd.arg("--state-dir").arg(dir);
            }
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
    // A thread blocked reading or writing a peer that went silent is freed
    // by stopping the child, which closes its pipes. SIGCONT too: a stopped
    // child would keep SIGTERM pending.
    let child_pid = Pid::from_child(&child);
    launch.silence.on_trip(Box::new(move || {
        // Our own child, reaped by the Peer only after the session (and its
        // reads and writes) ended, so the pid cannot have been reused. A
        // child already gone is fine: the pipes are closed then.
        let _ = kill_process(child_pid, Signal::TERM);
        let _ = kill_process(child_pid, Signal::CONT);
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
            Counted::new(stdout, counter.clone()),
            launch.silence.clone(),
        ),
        Limited::new(
            Watched::new(Counted::new(stdin, counter), launch.silence.clone()),
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

    /// The `-e` strings people write for rsync mean the same here.
    #[test]
    fn rsh_quoting_follows_the_shell() {
        assert_eq!(
            split_command(r#"ssh -p 2222 -o "ProxyCommand=nc %h %p""#).unwrap(),
            ["ssh", "-p", "2222", "-o", "ProxyCommand=nc %h %p"]
        );
        assert_eq!(
            split_command(r#"ssh -i "/path with space/key""#).unwrap(),
            ["ssh", "-i", "/path with space/key"]
        );
        // Single quotes are literal: no escape works inside them.
        assert_eq!(
            split_command(r#"ssh -o 'A=\"$x\"'"#).unwrap(),
            ["ssh", "-o", r#"A=\"$x\""#]
        );
        // In double quotes a backslash escapes only $ ` " and itself.
        assert_eq!(
            split_command(r#"ssh "a\"b" "c\d" "e\\f""#).unwrap(),
            ["ssh", r#"a"b"#, r"c\d", r"e\f"]
        );
        // Outside quotes it escapes anything; quotes join adjacent text.
        assert_eq!(
            split_command(r#"ssh x\'y a"b c"'d'"#).unwrap(),
            ["ssh", "x'y", "ab cd"]
        );
        assert_eq!(split_command("ssh\t-v\n").unwrap(), ["ssh", "-v"]);
        for bad in [r#"ssh -o "ProxyCommand=nc %h %p"#, "ssh -i 'key", "ssh \\"] {
            let e = split_command(bad).unwrap_err();
            assert!(e.contains("unterminated quote"), "{bad}: {e}");
            assert!(e.contains(bad), "the message quotes the command: {e}");
        }
    }
}
