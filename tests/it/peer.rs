//! A scripted (and, where a test wants, lying) peer for `vmsync --server`.
//!
//! [`Server::spawn`] starts the real binary with `--server` and piped
//! stdin/stdout, under `/usr/bin/time` (or a small python3 stand-in) so that
//! the server's peak RSS is known after it exits. The test plays the other
//! end with the library's own protocol types: [`Server::send`] frames a
//! [`Msg`] with [`FrameWriter`], [`Server::send_raw`] writes any bytes (for
//! malformed frames), and a reader thread decodes everything the server
//! writes with [`Msg::decode`] (so an `ERROR` frame arrives as
//! [`Msg::Error`], not as a failure).
//!
//! [`Server::finish`] closes the server's stdin, waits for it and returns an
//! [`Outcome`]: exit code, stderr, the messages it sent, its peak RSS.
//! Nothing waits on a clock except the safety timeouts (a hung server is
//! killed and the test fails with what it printed).
//!
//! A module of the `it` test crate (`crate::peer`), beside `common`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vmsync::content::chunk::{ChunkParams, Cutter};
use vmsync::content::compress::StreamEncoder;
use vmsync::content::hash::{ChunkHash, FileDigest};
use vmsync::content::manifest::{encode_batch, Entry, Kind, MAX_BATCH};
use vmsync::wire::{
    ChunkMsg, FileInfo, FrameWriter, Msg, Open, Role, StartMode, MAGIC, PROTOCOL_VERSION,
};

use crate::common::{bin, cache_dir, tempdir};

/// How long any one step may take before the server is declared hung.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Peak RSS a server may reach whatever its peer sends.
pub const RSS_LIMIT_KIB: u64 = 200 * 1024;
/// The mtime every scripted source claims.
pub const MTIME_SEC: i64 = 1_600_000_000;

/// Something the server wrote.
#[derive(Debug, Clone, PartialEq)]
pub enum In {
    /// A frame that decoded.
    Msg(Msg),
    /// A frame that did not decode (the server is broken if this happens).
    Bad(String),
    /// End of its stdout.
    Eof,
}

/// A running `vmsync --server`.
pub struct Server {
    /// The exit status, from a thread that waits for the wrapper.
    exited: mpsc::Receiver<std::process::ExitStatus>,
    pgid: i32,
    /// The server's stdin, framed by the library's writer...
    w: Option<FrameWriter<File>>,
    /// ...and the same pipe for raw bytes.
    raw: Option<File>,
    rx: mpsc::Receiver<In>,
    hello: mpsc::Receiver<Vec<u8>>,
    stderr: mpsc::Receiver<Vec<u8>>,
    /// Everything received so far, in order.
    pub transcript: Vec<Msg>,
    rss_file: PathBuf,
    _dir: tempfile::TempDir,
    started: Instant,
    reaped: bool,
}

/// How a server run ended.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code (128 + N for a death by signal N).
    pub code: i32,
    pub stderr: String,
    /// Every message the server sent, in order (including those read before
    /// [`Server::finish`]).
    pub messages: Vec<Msg>,
    /// Peak resident set size in KiB, when the wrapper could tell.
    pub peak_rss_kib: Option<u64>,
    pub elapsed: Duration,
}

impl Outcome {
    /// The server's `ERROR` message, if it sent one.
    pub fn error(&self) -> Option<(u8, &str)> {
        self.messages.iter().find_map(|m| match m {
            Msg::Error { exit, message } => Some((*exit, message.as_str())),
            _ => None,
        })
    }

    /// The server's `DONE`, if it sent one.
    pub fn done(&self) -> Option<&vmsync::wire::Summary> {
        self.messages.iter().find_map(|m| match m {
            Msg::Done(s) => Some(s),
            _ => None,
        })
    }

    /// Exit code as expected, no panic, memory within [`RSS_LIMIT_KIB`].
    #[track_caller]
    pub fn assert_code(&self, expected: i32) -> &Self {
        self.assert_sane();
        assert_eq!(self.code, expected, "server exit code\n{self}");
        self
    }

    /// Exit code one of `expected`.
    #[track_caller]
    pub fn assert_code_in(&self, expected: &[i32]) -> &Self {
        self.assert_sane();
        assert!(
            expected.contains(&self.code),
            "server exit code {} not in {expected:?}\n{self}",
            self.code
        );
        self
    }

    /// No panic, no abort, memory bounded.
    #[track_caller]
    pub fn assert_sane(&self) -> &Self {
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("RUST_BACKTRACE"),
            "server panicked\n{self}"
        );
        assert!(
            self.code != 101 && self.code < 128,
            "server crashed (exit {})\n{self}",
            self.code
        );
        if let Some(kib) = self.peak_rss_kib {
            assert!(
                kib < RSS_LIMIT_KIB,
                "server peak RSS {kib} KiB over the {RSS_LIMIT_KIB} KiB bound\n{self}"
            );
        }
        self
    }

    /// Exit 5 (protocol error) with an `ERROR` frame carrying 5. `about`
    /// says what the message should be about; since wording changes, a
    /// word it lacks is only reported, not a failure (use
    /// [`Outcome::assert_protocol_error`] where the words are the contract).
    #[track_caller]
    pub fn assert_rejected(&self, about: &[&str]) -> &Self {
        self.assert_error(5, &[]);
        let (_, message) = self.error().expect("checked above");
        for w in about {
            if !message.contains(w) {
                eprintln!("note: the ERROR message {message:?} does not mention {w:?}");
            }
        }
        self
    }

    /// Exit 5 (protocol error) with an `ERROR` frame saying so whose
    /// message contains every one of `words`.
    #[track_caller]
    pub fn assert_protocol_error(&self, words: &[&str]) -> &Self {
        self.assert_error(5, words)
    }

    /// Exit `code` with an `ERROR` frame carrying the same code and a
    /// message containing every one of `words`.
    #[track_caller]
    pub fn assert_error(&self, code: i32, words: &[&str]) -> &Self {
        self.assert_code(code);
        let Some((exit, message)) = self.error() else {
            panic!("server exited {code} without an ERROR frame\n{self}");
        };
        assert_eq!(i32::from(exit), code, "code in the ERROR frame\n{self}");
        for w in words {
            assert!(
                message.contains(w),
                "ERROR message {message:?} does not mention {w:?}\n{self}"
            );
        }
        self
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "---- server exit {} after {:.2?}, peak RSS {:?} KiB",
            self.code, self.elapsed, self.peak_rss_kib
        )?;
        writeln!(f, "---- messages from the server:")?;
        for m in &self.messages {
            writeln!(f, "  {}", short(m))?;
        }
        write!(f, "---- server stderr:\n{}\n----", self.stderr)
    }
}

/// A message for failure output (payloads elided).
pub fn short(m: &Msg) -> String {
    match m {
        Msg::Manifest(p) => format!("MANIFEST ({} bytes)", p.len()),
        Msg::Chunk(c) => format!(
            "CHUNK index {} raw_len {} compressed {} pieces {} ({} bytes)",
            c.index,
            c.raw_len,
            c.compressed,
            c.pieces,
            c.payload.len()
        ),
        Msg::Request(v) if v.len() > 8 => format!("REQUEST {:?}… ({} indices)", &v[..8], v.len()),
        Msg::BlockRequest(v) if v.len() > 8 => {
            format!("BLOCK_REQUEST {:?}… ({} indices)", &v[..8], v.len())
        }
        m => format!("{m:?}"),
    }
}

fn reader_thread(
    mut out: impl Read + Send + 'static,
) -> (mpsc::Receiver<Vec<u8>>, mpsc::Receiver<In>) {
    let (htx, hrx) = mpsc::channel();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut hello = [0u8; 16];
        let mut got = 0;
        while got < hello.len() {
            match out.read(&mut hello[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        let _ = htx.send(hello[..got].to_vec());
        if got < hello.len() {
            let _ = tx.send(In::Eof);
            return;
        }
        loop {
            let mut len = [0u8; 4];
            if out.read_exact(&mut len).is_err() {
                let _ = tx.send(In::Eof);
                return;
            }
            let len = u32::from_le_bytes(len) as usize;
            if len == 0 || len > vmsync::wire::MAX_FRAME {
                let _ = tx.send(In::Bad(format!("server sent a frame of {len} bytes")));
                let _ = tx.send(In::Eof);
                return;
            }
            let mut frame = vec![0u8; len];
            if out.read_exact(&mut frame).is_err() {
                let _ = tx.send(In::Bad("server's stdout ended inside a frame".into()));
                let _ = tx.send(In::Eof);
                return;
            }
            let item = match Msg::decode(&frame) {
                Ok(m) => In::Msg(m),
                Err(e) => In::Bad(format!("undecodable frame from the server: {e:#}")),
            };
            if tx.send(item).is_err() {
                return;
            }
        }
    });
    (hrx, rx)
}

impl Server {
    /// Starts `vmsync --server` under a peak-RSS wrapper.
    pub fn spawn() -> Server {
        Server::start(None)
    }

    /// Starts a server whose stdin is the file `input` (a whole client side
    /// recorded in advance): it reads as fast as the page cache serves,
    /// faster than any pipe, so whatever it buffers shows in its memory.
    pub fn spawn_reading(input: &Path) -> Server {
        Server::start(Some(File::open(input).expect("open the recorded input")))
    }

    fn start(input: Option<File>) -> Server {
        let dir = tempdir();
        let rss_file = dir.path().join("rss");
        let mut cmd = if Path::new("/usr/bin/time").exists() {
            let mut c = Command::new("/usr/bin/time");
            c.arg("-o")
                .arg(&rss_file)
                .args(["-f", "vmsync-rss-kib %M"])
                .arg(bin());
            c
        } else {
            // wait4 gives the child's peak RSS, like time(1) does.
            let mut c = Command::new("python3");
            c.arg("-c")
                .arg(
                    "import os, sys\n\
                     pid = os.fork()\n\
                     if pid == 0:\n    os.execv(sys.argv[2], sys.argv[2:])\n\
                     _, st, ru = os.wait4(pid, 0)\n\
                     open(sys.argv[1], 'w').write('vmsync-rss-kib %d\\n' % ru.ru_maxrss)\n\
                     os._exit(128 + os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st))\n",
                )
                .arg(&rss_file)
                .arg(bin());
            c
        };
        let fed = input.is_some();
        cmd.arg("--server")
            .stdin(input.map_or_else(Stdio::piped, Stdio::from))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG")
            .env_remove("RUST_BACKTRACE")
            .env("VMSYNC_CACHE_DIR", cache_dir())
            .process_group(0);
        let mut child = cmd.spawn().expect("start vmsync --server");
        let pgid = child.id() as i32;
        let (w, raw) = if fed {
            (None, None)
        } else {
            let stdin = File::from(OwnedFd::from(child.stdin.take().unwrap()));
            let raw = stdin.try_clone().expect("dup the server's stdin");
            (Some(FrameWriter::new(stdin, "server")), Some(raw))
        };
        let (hello, rx) = reader_thread(child.stdout.take().unwrap());
        let mut err = child.stderr.take().unwrap();
        let (xtx, exited) = mpsc::channel();
        thread::spawn(move || {
            if let Ok(st) = child.wait() {
                let _ = xtx.send(st);
            }
        });
        let (etx, stderr) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf);
            let _ = etx.send(buf);
        });
        Server {
            exited,
            pgid,
            w,
            raw,
            rx,
            hello,
            stderr,
            transcript: Vec::new(),
            rss_file,
            _dir: dir,
            started: Instant::now(),
            reaped: false,
        }
    }

    /// Starts a server and shakes hands: our hello (written with the
    /// library's [`FrameWriter::write_hello`]) and a check of theirs.
    pub fn connect() -> Server {
        let mut s = Server::spawn();
        s.w.as_mut()
            .expect("stdin open")
            .write_hello()
            .expect("send hello");
        s.expect_hello();
        s
    }

    /// The server's hello: magic and our protocol version.
    #[track_caller]
    pub fn expect_hello(&mut self) {
        let h = match self.hello.recv_timeout(STEP_TIMEOUT) {
            Ok(h) => h,
            Err(_) => self.hung("its hello"),
        };
        assert!(
            h.len() == 16 && &h[..8] == MAGIC,
            "server hello {h:?} is not a vmsync hello"
        );
        assert_eq!(
            u32::from_le_bytes(h[8..12].try_into().unwrap()),
            PROTOCOL_VERSION
        );
    }

    /// Frames and sends one message (flushed). An error means the server
    /// has stopped reading, which tests that expect it to fail may ignore.
    pub fn send(&mut self, m: &Msg) -> io::Result<()> {
        self.queue(m)?;
        self.flush()
    }

    /// Frames one message into the writer's buffer (see [`Server::flush`]).
    pub fn queue(&mut self, m: &Msg) -> io::Result<()> {
        match self.w.as_mut() {
            Some(w) => w.send(m).map_err(|e| io::Error::other(format!("{e:#}"))),
            None => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match self.w.as_mut() {
            Some(w) => w.flush().map_err(|e| io::Error::other(format!("{e:#}"))),
            None => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// Writes raw bytes to the server's stdin (after anything queued).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.flush()?;
        match self.raw.as_mut() {
            Some(w) => w.write_all(bytes).and_then(|_| w.flush()),
            None => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// Closes the server's stdin (end of stream), after anything queued.
    pub fn close(&mut self) {
        if let Some(mut w) = self.w.take() {
            let _ = w.flush();
        }
        self.raw = None;
    }

    /// The next thing the server sends ([`In::Eof`] once its stdout ends).
    #[track_caller]
    pub fn recv(&mut self) -> In {
        match self.rx.recv_timeout(STEP_TIMEOUT) {
            Ok(In::Msg(m)) => {
                self.transcript.push(m.clone());
                In::Msg(m)
            }
            Ok(x) => x,
            Err(mpsc::RecvTimeoutError::Disconnected) => In::Eof,
            Err(mpsc::RecvTimeoutError::Timeout) => self.hung("a message"),
        }
    }

    /// The next message, which must be one (not the end, not garbage).
    #[track_caller]
    pub fn recv_msg(&mut self) -> Msg {
        match self.recv() {
            In::Msg(m) => m,
            other => {
                let o = self.finish();
                panic!("expected a message from the server, got {other:?}\n{o}")
            }
        }
    }

    /// Sends `OPEN` and `FILE_INFO` and returns the server's `START` (for a
    /// server that receives).
    #[track_caller]
    pub fn open_receive(&mut self, open: Open, info: FileInfo) -> StartMode {
        let _ = self.send(&Msg::Open(open));
        let _ = self.send(&Msg::FileInfo(info));
        let mut first = self.recv_msg();
        // A receiver with a cached manifest of its destination offers its
        // pieces first; scripted senders ignore the offer.
        if let Msg::Pieces(_) = first {
            first = self.recv_msg();
        }
        match first {
            Msg::Start(m) => m,
            m => {
                let o = self.finish();
                panic!("expected START, got {}\n{o}", short(&m))
            }
        }
    }

    /// Sends `OPEN` for a server that sends, and returns its `FILE_INFO`.
    #[track_caller]
    pub fn open_send(&mut self, open: Open) -> FileInfo {
        let _ = self.send(&Msg::Open(open));
        match self.recv_msg() {
            Msg::FileInfo(i) => i,
            m => {
                let o = self.finish();
                panic!("expected FILE_INFO, got {}\n{o}", short(&m))
            }
        }
    }

    /// Closes stdin, waits for the server to exit and collects the rest.
    pub fn finish(&mut self) -> Outcome {
        self.close();
        let mut messages = std::mem::take(&mut self.transcript);
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(In::Msg(m)) => messages.push(m),
                Ok(In::Bad(b)) => panic!("{b}"),
                Ok(In::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.transcript = messages;
                    self.hung("its exit")
                }
            }
        }
        let status = self.wait(deadline);
        let elapsed = self.started.elapsed();
        let stderr = self
            .stderr
            .recv_timeout(STEP_TIMEOUT)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let wrapper = std::fs::read_to_string(&self.rss_file).unwrap_or_default();
        let peak_rss_kib = wrapper
            .lines()
            .find_map(|l| l.strip_prefix("vmsync-rss-kib "))
            .and_then(|v| v.trim().parse().ok());
        let code = match (status.code(), wrapper.contains("terminated by signal")) {
            (Some(c), false) => c,
            (Some(c), true) => c.max(128),
            (None, _) => 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0),
        };
        Outcome {
            code,
            stderr: format!("{stderr}{}", wrapper_notes(&wrapper)),
            messages,
            peak_rss_kib,
            elapsed,
        }
    }

    fn wait(&mut self, deadline: Instant) -> std::process::ExitStatus {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.exited.recv_timeout(left) {
            Ok(st) => {
                self.reaped = true;
                st
            }
            Err(_) => self.hung("its exit"),
        }
    }

    #[track_caller]
    fn hung(&mut self, what: &str) -> ! {
        // SAFETY: plain syscall on our own child's process group.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
        let _ = self.exited.recv_timeout(Duration::from_secs(10));
        self.reaped = true;
        let stderr = self
            .stderr
            .recv_timeout(Duration::from_secs(5))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let msgs: Vec<String> = self.transcript.iter().map(short).collect();
        panic!(
            "server hung: no {what} within {STEP_TIMEOUT:?}; killed.\nmessages so far: {msgs:#?}\nstderr:\n{stderr}"
        );
    }
}

/// Lines the RSS wrapper adds beyond its own number (time(1)'s notes on
/// how the command ended), for failure output.
fn wrapper_notes(w: &str) -> String {
    w.lines()
        .filter(|l| !l.starts_with("vmsync-rss-kib ") && !l.starts_with("Command exited with"))
        .map(|l| format!("[rss wrapper] {l}\n"))
        .collect()
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: plain syscall on our own child's process group.
            unsafe {
                libc::kill(-self.pgid, libc::SIGKILL);
            }
            let _ = self.exited.recv_timeout(Duration::from_secs(10));
        }
    }
}

// ---------------------------------------------------------------------------
// Building a session
// ---------------------------------------------------------------------------

/// Default chunk parameters: average 64 KiB, min 16 KiB, max 256 KiB.
pub const AVG: u32 = 64 * 1024;

/// `OPEN` for a server that receives into `dest`.
pub fn open_receive(dest: &Path) -> Open {
    Open {
        role: Role::Receive,
        flags: 0,
        compress_level: 3,
        chunking: AVG,
        path: dest.as_os_str().as_bytes().to_vec(),
        source_name: b"disk.img".to_vec(),
        timeout_secs: 0,
        bwlimit: 0,
        sample: None,
        seeds: Vec::new(),
    }
}

/// `OPEN` for a server that sends `src`.
pub fn open_send(src: &Path) -> Open {
    Open {
        role: Role::Send,
        flags: 0,
        compress_level: 3,
        chunking: AVG,
        path: src.as_os_str().as_bytes().to_vec(),
        source_name: Vec::new(),
        timeout_secs: 0,
        bwlimit: 0,
        sample: None,
        seeds: Vec::new(),
    }
}

/// `FILE_INFO` for a scripted source of `size` bytes.
pub fn file_info(size: u64) -> FileInfo {
    FileInfo {
        size,
        mtime_sec: MTIME_SEC,
        mtime_nsec: 0,
        mode: 0o100644,
    }
}

/// A scripted source: its bytes and a manifest with fixed-size chunks
/// (all-zero chunks become zero runs).
pub struct Source {
    pub data: Vec<u8>,
    pub entries: Vec<Entry>,
}

impl Source {
    /// Cuts `data` every `chunk` bytes (the last chunk may be shorter).
    pub fn new(data: Vec<u8>, chunk: usize) -> Source {
        let cuts: Vec<(usize, usize)> = (0..data.len())
            .step_by(chunk)
            .map(|a| (a, (a + chunk).min(data.len())))
            .collect();
        Source::from_cuts(data, &cuts)
    }

    /// Cuts `data` where the real sender would (FastCDC with average
    /// `avg`), so chunks a basis shares with it get the same hashes there.
    pub fn cdc(data: Vec<u8>, avg: u32) -> Source {
        let cutter = Cutter::new(ChunkParams::new(u64::from(avg)).unwrap());
        let max = avg as usize * 4;
        let mut cuts = Vec::new();
        let mut off = 0usize;
        while off < data.len() {
            let n = cutter.cut(&data[off..(off + max).min(data.len())]);
            cuts.push((off, off + n));
            off += n;
        }
        Source::from_cuts(data, &cuts)
    }

    fn from_cuts(data: Vec<u8>, cuts: &[(usize, usize)]) -> Source {
        let entries = cuts
            .iter()
            .map(|&(a, b)| {
                let piece = &data[a..b];
                let kind = if piece.iter().all(|&x| x == 0) {
                    Kind::Zero {
                        len: piece.len() as u64,
                    }
                } else {
                    Kind::Data {
                        len: piece.len() as u32,
                        hash: ChunkHash::of(piece),
                    }
                };
                Entry {
                    offset: a as u64,
                    kind,
                }
            })
            .collect();
        Source { data, entries }
    }

    pub fn info(&self) -> FileInfo {
        file_info(self.data.len() as u64)
    }

    /// The bytes of entry `i`.
    pub fn bytes(&self, i: usize) -> &[u8] {
        let e = self.entries[i];
        &self.data[e.offset as usize..e.end() as usize]
    }

    /// `MANIFEST` messages for all entries.
    pub fn manifest(&self) -> Vec<Msg> {
        manifest_msgs(&self.entries)
    }

    /// `MANIFEST_END` with the right count and digest.
    pub fn manifest_end(&self) -> Msg {
        manifest_end(&self.entries)
    }

    /// Indices of the data entries.
    pub fn data_indices(&self) -> Vec<usize> {
        (0..self.entries.len())
            .filter(|&i| matches!(self.entries[i].kind, Kind::Data { .. }))
            .collect()
    }
}

/// `MANIFEST` messages for `entries`, in batches of at most [`MAX_BATCH`].
pub fn manifest_msgs(entries: &[Entry]) -> Vec<Msg> {
    entries
        .chunks(MAX_BATCH)
        .map(|part| {
            let mut buf = Vec::new();
            encode_batch(part, &mut buf);
            Msg::Manifest(buf)
        })
        .collect()
}

/// The digest a correct sender computes for `entries`.
pub fn digest_of(entries: &[Entry]) -> ChunkHash {
    let mut d = FileDigest::default();
    for e in entries {
        match e.kind {
            Kind::Data { len, hash } => d.add_data(u64::from(len), &hash),
            Kind::Zero { len } => d.add_zero(len),
        }
    }
    d.finish()
}

pub fn manifest_end(entries: &[Entry]) -> Msg {
    Msg::ManifestEnd {
        count: entries.len() as u64,
        digest: digest_of(entries),
        source_changed: false,
    }
}

/// Makes `CHUNK` messages the way the real sender does (one zstd stream for
/// the connection, or raw bytes).
pub struct Chunker {
    enc: Option<StreamEncoder>,
}

impl Chunker {
    pub fn compressed() -> Chunker {
        Chunker {
            enc: Some(StreamEncoder::new(3).unwrap()),
        }
    }

    pub fn raw() -> Chunker {
        Chunker { enc: None }
    }

    pub fn chunk(&mut self, index: usize, data: &[u8], pieces: bool) -> ChunkMsg {
        let (compressed, payload) = match &mut self.enc {
            Some(e) => {
                let mut out = Vec::new();
                e.encode(data, &mut out).unwrap();
                (true, out)
            }
            None => (false, data.to_vec()),
        };
        ChunkMsg {
            index: index as u64,
            raw_len: data.len() as u32,
            compressed,
            pieces,
            changed: false,
            payload,
        }
    }
}

/// The raw bytes of one frame carrying `m`.
pub fn frame(m: &Msg) -> Vec<u8> {
    let mut body = Vec::new();
    m.encode(&mut body);
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// A hello with this version and feature flags.
pub fn hello_bytes(version: u32, features: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&features.to_le_bytes());
    h
}

/// Plays a correct sender against a server in `Manifest` mode until its
/// `DONE`: answers `REQUEST`, `BLOCK_REQUEST` and `BLOCK_FETCH` from
/// `src`, passing every `CHUNK` through `tamper` first. Returns early (with
/// the message) when the server sends anything else, or at its end.
pub fn answer_requests(
    server: &mut Server,
    src: &Source,
    chunker: &mut Chunker,
    mut tamper: impl FnMut(&mut ChunkMsg),
) -> In {
    loop {
        match server.recv() {
            In::Msg(Msg::Request(idx)) => {
                for i in idx {
                    let mut c = chunker.chunk(i as usize, src.bytes(i as usize), false);
                    tamper(&mut c);
                    let _ = server.send(&Msg::Chunk(c));
                }
            }
            In::Msg(Msg::BlockRequest(idx)) => {
                for i in idx {
                    let e = src.entries[i as usize];
                    let hashes =
                        vmsync::content::refine::block_hashes(e.offset, src.bytes(i as usize));
                    let _ = server.send(&Msg::BlockHashes { index: i, hashes });
                }
            }
            In::Msg(Msg::BlockFetch {
                index,
                count: _,
                bitmap,
            }) => {
                let e = src.entries[index as usize];
                let data = src.bytes(index as usize);
                let wanted = vmsync::content::refine::gather(e.offset, data, &bitmap);
                let mut c = chunker.chunk(index as usize, &wanted, true);
                tamper(&mut c);
                let _ = server.send(&Msg::Chunk(c));
            }
            other => return other,
        }
    }
}

/// Sends the whole manifest of `src` with every data chunk inline (what a
/// correct sender does after `START(Inline)`), then `MANIFEST_END`.
pub fn send_inline(server: &mut Server, src: &Source, chunker: &mut Chunker) {
    for (b, batch) in src.entries.chunks(MAX_BATCH).enumerate() {
        let mut buf = Vec::new();
        encode_batch(batch, &mut buf);
        let _ = server.queue(&Msg::Manifest(buf));
        for k in 0..batch.len() {
            let i = b * MAX_BATCH + k;
            if let Kind::Data { .. } = src.entries[i].kind {
                let c = chunker.chunk(i, src.bytes(i), false);
                let _ = server.queue(&Msg::Chunk(c));
            }
        }
    }
    let _ = server.send(&src.manifest_end());
}
