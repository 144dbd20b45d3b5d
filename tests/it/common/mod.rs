//! Shared harness for vmsync's integration tests.
//!
//! * running the binary ([`run`], [`run_json`], the [`vmsync`] builder) with
//!   a timeout, capturing exit code, stdout and stderr;
//! * deterministic data ([`random_bytes`], [`mixed_bytes`]) from a tiny
//!   splitmix64 PRNG, so every failure reproduces;
//! * file helpers (sparse files, allocated blocks, mtimes, streaming
//!   comparison, leftover temp files);
//! * [`Sshd`], a throwaway OpenSSH server on 127.0.0.1;
//! * [`Relay`], the fault-injecting `-e` command in `tests/fixtures/relay.py`;
//! * [`Tmpfs`], a tiny mounted file system for a real "disk full" (root).
//! * `crate::peer` (`tests/it/peer.rs`, beside this directory): a scripted
//!   (lying) peer that drives a real `vmsync --server` with the library's
//!   protocol types. It is not part of this module, which the benches
//!   include alone with `#[path]`: keep this file self-contained, using
//!   only the CLI, so the benches never depend on the library's internals.
//!
//! Every run gets `VMSYNC_CACHE_DIR` pointing into cargo's target tmp dir, so
//! the receiver's manifest cache never lands in `~/.cache`. A run that takes
//! longer than `VMSYNC_TEST_TIMEOUT` seconds (default 120) is killed with its
//! process group and fails with a list of the processes that were left.

pub mod fs;
pub mod live;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde_json::Value;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// Exit codes from the CLI contract.
pub mod exit {
    pub const OK: i32 = 0;
    pub const DIFFERENT: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const IO: i32 = 3;
    pub const CONNECTION: i32 = 4;
    pub const PROTOCOL: i32 = 5;
    // The whole contract is listed, though no test provokes a verify failure
    // end to end yet.
    #[allow(dead_code)]
    pub const VERIFY: i32 = 6;
    pub const SIGINT: i32 = 130;
    pub const SIGTERM: i32 = 143;
    pub const SOURCE_CHANGED: i32 = 7;
    pub const LOCKED: i32 = 8;
}

/// Every key that `--json` must always print.
pub const JSON_KEYS: &[&str] = &[
    "source_bytes",
    "reused_bytes",
    "literal_bytes",
    "wire_bytes",
    "zero_bytes",
    "duration_s",
    "identical",
    "exit_code",
    "up_to_date",
    "differences",
    "differing_bytes",
    "checked_bytes",
    "write_mode",
    "dest_written_bytes",
    "source_changed",
    "dry_run",
    "error",
];

/// Path of the binary under test.
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vmsync"))
}

/// Path of the fault-injection relay script.
pub fn relay_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/relay.py")
}

/// A fresh temporary directory, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmsync-test-")
        .tempdir()
        .expect("create temp dir")
}

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

/// The outcome of one run of the binary.
#[derive(Debug)]
pub struct Run {
    /// Exit code; a death by signal N is reported as 128 + N (like a shell),
    /// and `signal` is set.
    pub code: i32,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub args: Vec<String>,
    pub elapsed: Duration,
}

impl Run {
    /// Asserts the exit code (and that nothing panicked), printing the whole
    /// run on failure.
    #[track_caller]
    pub fn assert_code(&self, expected: i32) -> &Self {
        assert_no_panic(self);
        assert!(
            self.code == expected,
            "expected exit code {expected}, got {}\n{self}",
            self.code
        );
        self
    }

    /// Asserts exit code 0.
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        self.assert_code(exit::OK)
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "---- command: {} {}",
            bin().display(),
            self.args.join(" ")
        )?;
        writeln!(
            f,
            "---- exit code: {} (signal {:?}) after {:.2?}",
            self.code, self.signal, self.elapsed
        )?;
        writeln!(f, "---- stdout:\n{}", self.stdout)?;
        writeln!(f, "---- stderr:\n{}", self.stderr)?;
        write!(f, "----")
    }
}

/// Errors must never surface as a Rust panic or backtrace.
#[track_caller]
pub fn assert_no_panic(run: &Run) {
    assert!(
        !run.stderr.contains("panicked") && !run.stderr.contains("RUST_BACKTRACE"),
        "vmsync panicked:\n{run}"
    );
}

/// Builder for one invocation of the binary.
pub struct Vmsync {
    args: Vec<OsString>,
    timeout: Duration,
    file_size_limit: Option<u64>,
    dir: Option<PathBuf>,
    user: Option<(u32, u32)>,
}

/// Starts building an invocation of the binary under test.
pub fn vmsync() -> Vmsync {
    let timeout = std::env::var("VMSYNC_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Vmsync {
        args: Vec::new(),
        timeout: Duration::from_secs(timeout),
        file_size_limit: None,
        dir: None,
        user: None,
    }
}

impl Vmsync {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Kill the process group and fail the test after this long.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs in this working directory.
    pub fn in_dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// Limits the size of files that vmsync (and its children) may write
    /// (RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG): a
    /// "disk full" that needs no privileges.
    pub fn file_size_limit(mut self, bytes: u64) -> Self {
        self.file_size_limit = Some(bytes);
        self
    }

    /// Runs as this user and group (needs root; see [`unprivileged_user`]),
    /// with no supplementary groups.
    pub fn run_as(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// Runs the binary to completion.
    pub fn run(self) -> Run {
        let mut cmd = Command::new(bin());
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG")
            .env("VMSYNC_CACHE_DIR", cache_dir())
            // Own process group, so a timeout can kill vmsync together with
            // its children (server, rsh, relay).
            .process_group(0);
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        if let Some((uid, gid)) = self.user {
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let Some(limit) = self.file_size_limit {
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    let lim = libc::rlimit {
                        rlim_cur: limit as libc::rlim_t,
                        rlim_max: limit as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin().display()));
        let pgid = child.id() as i32;
        let out = reader(child.stdout.take().unwrap());
        let err = reader(child.stderr.take().unwrap());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let deadline = start + self.timeout;
        let mut hang_report = String::new();
        let (status, timed_out) = match rx.recv_timeout(self.timeout) {
            Ok(status) => (status.expect("wait for vmsync"), false),
            Err(_) => {
                hang_report = processes_in_group(pgid);
                kill_group(pgid);
                (rx.recv().unwrap().expect("wait for vmsync"), true)
            }
        };
        let elapsed = start.elapsed();
        // Descendants that inherited stdout/stderr may still hold them open.
        let grace = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(30));
        let stdout = collect(&out, grace, pgid);
        let stderr = collect(&err, grace, pgid);
        let signal = std::os::unix::process::ExitStatusExt::signal(&status);
        let run = Run {
            code: status.code().unwrap_or_else(|| 128 + signal.unwrap_or(0)),
            signal,
            stdout,
            stderr,
            args,
            elapsed,
        };
        assert!(
            !timed_out,
            "vmsync did not finish within {:?} and was killed\n{run}\n\
             processes in its group at the time:\n{hang_report}",
            self.timeout
        );
        run
    }

    /// Runs with `--json` and parses stdout, which must be one JSON object.
    pub fn run_json(mut self) -> (Run, Value) {
        self.args.insert(0, "--json".into());
        let run = self.run();
        let value = parse_json(&run);
        (run, value)
    }
}

/// The receiver's manifest cache for this test binary (`it`, or a bench):
/// under cargo's target tmp dir rather than `~/.cache`, emptied when the
/// binary starts.
/// (Over real ssh the server gets it through sshd's `SetEnv`.)
pub fn cache_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().into_owned();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("vmsync-cache")
            .join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

/// Runs the binary with these arguments.
pub fn run(args: &[&dyn AsRef<OsStr>]) -> Run {
    vmsync().args(args).run()
}

/// Runs the binary with `--json` added and returns the parsed object.
pub fn run_json(args: &[&dyn AsRef<OsStr>]) -> (Run, Value) {
    vmsync().args(args).run_json()
}

fn reader<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

fn collect(rx: &mpsc::Receiver<Vec<u8>>, grace: Duration, pgid: i32) -> String {
    let bytes = match rx.recv_timeout(grace) {
        Ok(b) => b,
        Err(_) => {
            kill_group(pgid);
            rx.recv().unwrap_or_default()
        }
    };
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `ps` lines of the processes in a process group (for hang reports).
fn processes_in_group(pgid: i32) -> String {
    let out = Command::new("ps")
        .args(["-e", "-o", "pid=,pgid=,stat=,wchan:24=,args="])
        .output();
    let Ok(out) = out else {
        return "(ps not available)".into();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(&pgid.to_string()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn kill_group(pgid: i32) {
    // SAFETY: plain syscall.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

fn parse_json(run: &Run) -> Value {
    let text = run.stdout.trim();
    match serde_json::from_str::<Value>(text) {
        Ok(v) if v.is_object() => v,
        Ok(v) => panic!("--json printed {v}, not an object\n{run}"),
        Err(e) => panic!("stdout is not one JSON object ({e})\n{run}"),
    }
}

// ---------------------------------------------------------------------------
// JSON helpers
// ---------------------------------------------------------------------------

#[track_caller]
pub fn json_u64(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("JSON key {key:?} missing or not a u64 in {v}"))
}

#[track_caller]
pub fn json_bool(v: &Value, key: &str) -> bool {
    v.get(key)
        .and_then(Value::as_bool)
        .unwrap_or_else(|| panic!("JSON key {key:?} missing or not a bool in {v}"))
}

/// `(offset, length)` pairs of the `differences` array.
#[track_caller]
pub fn json_differences(v: &Value) -> Vec<(u64, u64)> {
    let arr = v
        .get("differences")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("JSON key \"differences\" missing or not an array in {v}"));
    arr.iter()
        .map(|d| (json_u64(d, "offset"), json_u64(d, "length")))
        .collect()
}

/// Checks the shape of the `--json` object against the contract: every key
/// present with the right type, `exit_code` equal to the real one, `error`
/// null on success and a message on failure, `identical` used only by
/// `--check`, `differences` only by `--check` and `--dry-run` (the ranges
/// a sync would fetch).
#[track_caller]
pub fn assert_json_contract(run: &Run, v: &Value) {
    for key in JSON_KEYS {
        assert!(
            v.get(*key).is_some(),
            "JSON key {key:?} missing\n{v}\n{run}"
        );
    }
    for key in [
        "source_bytes",
        "reused_bytes",
        "literal_bytes",
        "wire_bytes",
        "zero_bytes",
        "differing_bytes",
        "dest_written_bytes",
    ] {
        json_u64(v, key);
    }
    assert!(
        v["write_mode"].is_null()
            || ["clone", "journal", "copy", "unsafe-inplace"]
                .contains(&v["write_mode"].as_str().unwrap_or("?")),
        "write_mode: {v}"
    );
    assert!(v["duration_s"].is_number(), "duration_s: {v}");
    assert!(v["duration_s"].as_f64().unwrap() >= 0.0, "duration_s: {v}");
    assert!(v["up_to_date"].is_boolean(), "up_to_date: {v}");
    assert_eq!(
        v["exit_code"].as_i64(),
        Some(run.code as i64),
        "exit_code in JSON differs from the real one\n{run}"
    );
    let check = run.args.iter().any(|a| a == "--check");
    let dry_run = run.args.iter().any(|a| a == "-n" || a == "--dry-run");
    let diffs = json_differences(v);
    if check {
        if run.code == exit::OK || run.code == exit::DIFFERENT {
            assert_eq!(
                v["identical"].as_bool(),
                Some(run.code == exit::OK),
                "identical must match the exit code\n{run}"
            );
        }
    } else {
        assert!(
            v["identical"].is_null(),
            "identical must be null without --check: {v}"
        );
        assert!(
            diffs.is_empty() || dry_run,
            "differences must be empty without --check or --dry-run: {v}"
        );
    }
    match run.code {
        exit::OK => assert!(v["error"].is_null(), "error must be null on success: {v}"),
        exit::DIFFERENT if check => {}
        _ => assert!(
            v["error"].as_str().is_some_and(|s| !s.is_empty()),
            "error must be a message when exit code is {}: {v}",
            run.code
        ),
    }
}

/// For a sync that read the whole source: every source byte is either reused
/// from the destination, sent as a literal, or an all-zero chunk.
#[track_caller]
pub fn assert_accounting(v: &Value) {
    let (src, reused, lit, zero) = (
        json_u64(v, "source_bytes"),
        json_u64(v, "reused_bytes"),
        json_u64(v, "literal_bytes"),
        json_u64(v, "zero_bytes"),
    );
    assert_eq!(
        reused + lit + zero,
        src,
        "reused_bytes + literal_bytes + zero_bytes != source_bytes: {v}"
    );
}

// ---------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------

/// splitmix64: tiny, fast, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform-ish in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// `len` incompressible bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

const WORDS: &[&str] = &[
    "the",
    "kernel",
    "block",
    "device",
    "mount",
    "usr",
    "lib",
    "systemd",
    "config",
    "error",
    "warning",
    "info",
    "debug",
    "service",
    "started",
    "stopped",
    "network",
    "interface",
    "eth0",
    "packet",
    "file",
    "system",
    "ext4",
    "journal",
    "commit",
    "inode",
    "page",
    "cache",
    "memory",
    "process",
    "thread",
    "signal",
    "user",
    "root",
    "home",
    "var",
    "log",
    "tmp",
    "boot",
    "grub",
];

/// Disk-image-like bytes of mixed compressibility: runs of random data,
/// text (log-like lines), structured records and zeros (about 10%). No
/// non-zero chunk repeats, so deduplication inside the file cannot blur the
/// byte accounting.
pub fn mixed_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = vec![0u8; len];
    let mut pos = 0usize;
    let mut record = 0u64;
    while pos < len {
        let kind = rng.below(10);
        let seg = if kind == 9 {
            rng.range(64 * KIB, 2 * MIB)
        } else {
            rng.range(16 * KIB, 2 * MIB)
        } as usize;
        let end = (pos + seg).min(len);
        let out = &mut v[pos..end];
        match kind {
            0..=3 => rng.fill(out),
            4..=6 => {
                let mut i = 0;
                while i < out.len() {
                    let mut line = format!("{:08x} ", rng.next_u64() as u32);
                    for _ in 0..rng.range(3, 14) {
                        line.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
                        line.push(' ');
                    }
                    line.push('\n');
                    let n = line.len().min(out.len() - i);
                    out[i..i + n].copy_from_slice(&line.as_bytes()[..n]);
                    i += n;
                }
            }
            7..=8 => {
                for rec in out.chunks_mut(64) {
                    let mut r = [0u8; 64];
                    r[..8].copy_from_slice(&record.to_le_bytes());
                    r[8..16]
                        .copy_from_slice(&(rng.next_u64() & 0x0000_ffff_00ff_00ff).to_le_bytes());
                    r[16..20].copy_from_slice(b"REC\x01");
                    record += 1;
                    rec.copy_from_slice(&r[..rec.len()]);
                }
            }
            _ => {} // zeros
        }
        pos = end;
    }
    v
}

/// Number of non-zero bytes.
pub fn count_nonzero(data: &[u8]) -> u64 {
    data.iter().filter(|&&b| b != 0).count() as u64
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Creates a sparse file of `len` bytes with data only at the given extents.
pub fn sparse_file(path: &Path, len: u64, extents: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(len).unwrap();
    for (off, data) in extents {
        f.write_all_at(data, *off).unwrap();
    }
    f.sync_all().unwrap();
}

/// Bytes actually allocated on disk.
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

pub fn inode(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// Modification time in nanoseconds since the epoch.
pub fn mtime_ns(path: &Path) -> i128 {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

/// Sets the modification time (nanoseconds since the epoch, >= 0).
pub fn set_mtime_ns(path: &Path, ns: i128) {
    let t = UNIX_EPOCH + Duration::from_nanos(ns as u64);
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.set_modified(t).unwrap();
}

/// A fixed, odd-nanosecond mtime, so a sync that drops nanoseconds shows.
pub const SOURCE_MTIME_NS: i128 = 1_600_000_000_123_456_789;
/// The mtime given to pre-existing destinations.
pub const OLD_MTIME_NS: i128 = 1_500_000_000_987_654_321;

/// `pair.dst` is still the old file (bytes and mtime), and nothing but a
/// hidden `.disk.img.vmsync-partial*` is left beside it.
#[track_caller]
pub fn assert_old_destination(pair: &Pair, old: &[u8]) {
    assert_content(&pair.dst, old);
    assert_eq!(
        mtime_ns(&pair.dst),
        OLD_MTIME_NS,
        "destination mtime changed"
    );
    assert_no_stray_files(&pair.dst_dir(), &["disk.img"]);
}

/// Asserts that `dst` has the size and the nanosecond mtime of `src`.
#[track_caller]
pub fn assert_same_meta(src: &Path, dst: &Path) {
    assert_eq!(file_len(dst), file_len(src), "size of {}", dst.display());
    assert_eq!(
        mtime_ns(dst),
        mtime_ns(src),
        "mtime (ns) of {} differs from {}",
        dst.display(),
        src.display()
    );
}

/// Streams both files in 1 MiB blocks and reports the first differing offset.
#[track_caller]
pub fn assert_same_content(a: &Path, b: &Path) {
    let (la, lb) = (file_len(a), file_len(b));
    if let Some(off) = first_difference(a, b) {
        panic!(
            "{} ({la} bytes) and {} ({lb} bytes) differ at offset {off}",
            a.display(),
            b.display()
        );
    }
}

/// Compares a file with expected bytes.
#[track_caller]
pub fn assert_content(path: &Path, expected: &[u8]) {
    let actual = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    if let Some(off) = first_diff_in(&actual, expected) {
        panic!(
            "{} ({} bytes) differs from the expected {} bytes at offset {off}",
            path.display(),
            actual.len(),
            expected.len()
        );
    }
}

/// First offset where the files differ (a length difference counts at the
/// shorter length), or `None` when identical. Reads 1 MiB blocks, skipping
/// ranges that are holes in both files (SEEK_DATA), so comparing two sparse
/// 8 GiB images costs only their data.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 1 << 20;
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (fa, fb) = (open(a), open(b));
    let (la, lb) = (file_len(a), file_len(b));
    let n = la.min(lb);
    let (mut ba, mut bb) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    let mut off = 0u64;
    while off < n {
        let next = next_data(&fa, off, la).min(next_data(&fb, off, lb)).min(n);
        if next > off {
            off = next; // a hole in both files: zeros on both sides
            continue;
        }
        let len = BLOCK.min(n - off) as usize;
        fa.read_exact_at(&mut ba[..len], off).unwrap();
        fb.read_exact_at(&mut bb[..len], off).unwrap();
        if let Some(i) = first_diff_in(&ba[..len], &bb[..len]) {
            return Some(off + i);
        }
        off += len as u64;
    }
    (la != lb).then_some(n)
}

/// Start of the next data at or after `off` (`len` when only a hole follows;
/// `off` itself when the file system cannot tell).
fn next_data(f: &File, off: u64, len: u64) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if r >= 0 {
        r as u64
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
        len
    } else {
        off
    }
}

fn first_diff_in(a: &[u8], b: &[u8]) -> Option<u64> {
    if a == b {
        return None;
    }
    let n = a.len().min(b.len());
    let i = (0..n).find(|&i| a[i] != b[i]).unwrap_or(n);
    Some(i as u64)
}

/// Names in a directory, sorted.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The directory holds `expected` and nothing else, apart from a hidden
/// `.NAME.vmsync-partial*` or an uncommitted `.NAME.vmsync-journal*` left
/// for resuming.
#[track_caller]
pub fn assert_no_stray_files(dir: &Path, expected: &[&str]) {
    let entries = dir_entries(dir);
    let stray: Vec<&String> = entries
        .iter()
        .filter(|n| !expected.contains(&n.as_str()))
        .filter(|n| {
            !(n.starts_with('.') && (n.contains("vmsync-partial") || n.contains("vmsync-journal")))
        })
        .collect();
    assert!(
        stray.is_empty(),
        "unexpected files left in {}: {stray:?} (all entries: {entries:?})",
        dir.display()
    );
}

/// For permission tests: `Some((uid, gid))` of `nobody` when running as root
/// (root ignores file modes, so the test runs vmsync as `nobody` with
/// [`Vmsync::run_as`]); `None` when not root, where modes apply as they are.
pub fn unprivileged_user() -> Option<(u32, u32)> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    // SAFETY: getpwnam with a NUL-terminated name; the fields are copied at once.
    let pw = unsafe { libc::getpwnam(c"nobody".as_ptr()) };
    if pw.is_null() {
        return Some((65534, 65534));
    }
    // SAFETY: non-null result of getpwnam.
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

/// Waits until a process has exited (gone or a zombie). Returns false on
/// timeout.
pub fn wait_pid_gone(pid: i32, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) => {
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|s| s.trim().chars().next());
                if matches!(state, Some('Z') | Some('X')) {
                    return true;
                }
            }
        }
        if start.elapsed() > timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Fault-injection relay (tests/fixtures/relay.py)
// ---------------------------------------------------------------------------

/// One use of the relay as `-e`. It records its child's pid (the "remote"
/// `vmsync --server`) and, at exit, the number of bytes it relayed.
pub struct Relay {
    pid_file: PathBuf,
    count_file: PathBuf,
    options: String,
}

impl Relay {
    /// `options` are relay options such as `--cut-after 1000`; `dir` holds the
    /// relay's bookkeeping files (not the destination directory).
    pub fn new(dir: &Path, options: &str) -> Relay {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Relay {
            pid_file: dir.join(format!("relay-{n}.pid")),
            count_file: dir.join(format!("relay-{n}.count")),
            options: options.to_string(),
        }
    }

    /// The value for `-e`.
    pub fn rsh(&self) -> String {
        format!(
            "python3 {} --pid-file {} --count-file {} {}",
            shell_word(&relay_script()),
            shell_word(&self.pid_file),
            shell_word(&self.count_file),
            self.options
        )
    }

    /// Waits until the relay's child (the server side) has exited, so that
    /// whatever it does on the way out (cleanup, a late rename) has happened.
    #[track_caller]
    pub fn wait_server_gone(&self) {
        let Ok(text) = std::fs::read_to_string(&self.pid_file) else {
            return; // the relay never started its child
        };
        let pid: i32 = text.trim().parse().expect("pid file");
        assert!(
            wait_pid_gone(pid, Duration::from_secs(60)),
            "server process {pid} still running 60 s after the client exited"
        );
    }

    /// Bytes relayed in both directions, once the relay has exited.
    pub fn relayed_bytes(&self) -> Option<u64> {
        std::fs::read_to_string(&self.count_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

/// Single-quotes a path for vmsync's shell-like `-e` splitting when needed.
fn shell_word(p: &Path) -> String {
    let s = p.to_string_lossy();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------------------
// A throwaway OpenSSH server on 127.0.0.1
// ---------------------------------------------------------------------------

const SSHD: &str = "/usr/sbin/sshd";

/// A real `sshd` listening on 127.0.0.1 with throwaway keys; killed on drop.
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    client_key: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Sshd {
    /// Starts sshd. Returns `None` (the test should return early) only when
    /// `VMSYNC_SKIP_SSH=1`; a missing sshd is a test failure otherwise.
    pub fn start() -> Option<Sshd> {
        if std::env::var("VMSYNC_SKIP_SSH").as_deref() == Ok("1") {
            eprintln!("VMSYNC_SKIP_SSH=1: skipping a test that needs sshd");
            return None;
        }
        for tool in [SSHD, "ssh", "ssh-keygen"] {
            let found = if tool.starts_with('/') {
                Path::new(tool).exists()
            } else {
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            };
            assert!(
                found,
                "{tool} not found: the SSH tests need OpenSSH (apt-get install \
                 openssh-server openssh-client; .ci/run does this). Set \
                 VMSYNC_SKIP_SSH=1 to skip them."
            );
        }
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } == 0 {
            // Privilege separation directory, required when sshd runs as root.
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let dir = tempfile::Builder::new()
            .prefix("vmsync-sshd-")
            .tempdir()
            .expect("temp dir");
        let host_key = dir.path().join("host_ed25519");
        let client_key = dir.path().join("client_ed25519");
        keygen(&host_key);
        keygen(&client_key);
        let pubkey = std::fs::read_to_string(client_key.with_extension("pub")).unwrap();
        write_file(&dir.path().join("authorized_keys"), pubkey.as_bytes());

        let mut last_log = Vec::new();
        for _attempt in 0..10 {
            let port = free_port();
            let config = dir.path().join("sshd_config");
            let d = dir.path().display();
            write_file(
                &config,
                format!(
                    "ListenAddress 127.0.0.1\n\
                     Port {port}\n\
                     HostKey {}\n\
                     AuthorizedKeysFile {d}/authorized_keys\n\
                     PubkeyAuthentication yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     UsePAM no\n\
                     StrictModes no\n\
                     PermitRootLogin yes\n\
                     PidFile {d}/sshd.pid\n\
                     PrintMotd no\n\
                     LogLevel INFO\n\
                     MaxStartups 64\n\
                     SetEnv VMSYNC_CACHE_DIR={}\n",
                    host_key.display(),
                    cache_dir().display()
                )
                .as_bytes(),
            );
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {SSHD}: {e}"));
            let log = Arc::new(Mutex::new(Vec::new()));
            let (tx, rx) = mpsc::channel();
            let stderr = child.stderr.take().unwrap();
            let log2 = Arc::clone(&log);
            // Keep draining sshd's stderr for its whole life, so it never
            // blocks on a full pipe.
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log2.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
            let ready = format!("Server listening on 127.0.0.1 port {port}");
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut listening = false;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(line) if line.contains(&ready) => {
                        listening = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break, // exited (channel closed) or timed out
                }
            }
            if listening {
                return Some(Sshd {
                    child,
                    dir,
                    port,
                    client_key,
                    log,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = log.lock().unwrap().clone();
            let bind_failed = last_log
                .iter()
                .any(|l| l.contains("Bind to port") || l.contains("Address already in use"));
            if !bind_failed {
                break;
            }
        }
        panic!(
            "sshd did not start listening on 127.0.0.1; its log:\n{}",
            last_log.join("\n")
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The value for `-e`: ssh to this server with the throwaway key, ignoring
    /// any user ssh configuration.
    pub fn rsh(&self) -> String {
        format!(
            "ssh -F /dev/null -p {} -i {} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no \
             -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR",
            self.port,
            shell_word(&self.client_key)
        )
    }

    /// `127.0.0.1:/abs/path`.
    pub fn remote(&self, path: &Path) -> String {
        assert!(path.is_absolute(), "remote paths in tests are absolute");
        format!("127.0.0.1:{}", path.display())
    }

    /// `user@127.0.0.1:/abs/path` for the current user.
    pub fn remote_with_user(&self, path: &Path) -> String {
        format!("{}@{}", current_user(), self.remote(path))
    }

    /// The vmsync binary to run on the "remote" side (`--remote-path`).
    pub fn remote_path(&self) -> String {
        bin().display().to_string()
    }

    /// Restricts the client key to `command` (a forced command with
    /// `restrict`, as an admin would in authorized_keys); sshd reads the
    /// file afresh on every connection.
    pub fn force_command(&self, command: &str) {
        let pubkey = std::fs::read_to_string(self.client_key.with_extension("pub")).unwrap();
        write_file(
            &self.dir.path().join("authorized_keys"),
            format!("command=\"{command}\",restrict {pubkey}").as_bytes(),
        );
    }

    /// sshd's log so far, for failure messages.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Common arguments for a run through this server.
    pub fn args(&self) -> Vec<String> {
        vec![
            "-e".into(),
            self.rsh(),
            "--remote-path".into(),
            self.remote_path(),
        ]
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "vmsync-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("run ssh-keygen");
    assert!(st.success(), "ssh-keygen failed for {}", path.display());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port on 127.0.0.1")
}

pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

// ---------------------------------------------------------------------------
// Small conveniences
// ---------------------------------------------------------------------------

/// A source/destination pair in separate directories (so leftovers in the
/// destination directory are easy to check).
pub struct Pair {
    pub tmp: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
}

impl Pair {
    pub fn new() -> Pair {
        let tmp = tempdir();
        std::fs::create_dir(tmp.path().join("src")).unwrap();
        std::fs::create_dir(tmp.path().join("dst")).unwrap();
        let src = tmp.path().join("src/disk.img");
        let dst = tmp.path().join("dst/disk.img");
        Pair { tmp, src, dst }
    }

    /// Writes the source with the fixed source mtime.
    pub fn write_src(&self, data: &[u8]) {
        write_file(&self.src, data);
        set_mtime_ns(&self.src, SOURCE_MTIME_NS);
    }

    /// Writes a pre-existing destination with an old mtime.
    pub fn write_dst(&self, data: &[u8]) {
        write_file(&self.dst, data);
        set_mtime_ns(&self.dst, OLD_MTIME_NS);
    }

    pub fn dst_dir(&self) -> PathBuf {
        self.dst.parent().unwrap().to_path_buf()
    }

    /// Destination equals source in content, size and mtime, and nothing but
    /// the destination is left in its directory (not even a partial file: a
    /// successful run leaves nothing behind).
    #[track_caller]
    pub fn assert_synced(&self) {
        assert_same_content(&self.src, &self.dst);
        assert_same_meta(&self.src, &self.dst);
        let entries = dir_entries(&self.dst_dir());
        assert_eq!(entries, ["disk.img"], "leftovers after a successful sync");
    }
}

impl Default for Pair {
    fn default() -> Self {
        Pair::new()
    }
}

/// Writes `data` at `offset` of an existing file, keeping its mtime.
pub fn patch_file(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let mtime = mtime_ns(path);
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    drop(f);
    set_mtime_ns(path, mtime);
}

/// Flushes written data (so allocated-block counts are final).
pub fn sync_file(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

/// A small tmpfs mounted on a temporary directory (unmounted on drop), for a
/// real "disk full". `None` when mounting is not permitted (not root).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: u64) -> Option<Tmpfs> {
        let dir = tempdir();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tmpfs")
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
