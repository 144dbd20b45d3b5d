//! Frames: how messages are cut out of the byte stream, and the hello
//! that opens it.
//!
//! Both ends speak over any byte pipe: `ssh host vmsync --server` in
//! production, a local child's pipes for local-to-local syncs. Each end
//! writes its hello at once, then reads the peer's; the versions must be
//! equal, and a mismatch names both. Then the stream is frames, each one
//! message ([`crate::wire::messages`]).
//!
//! # Hello
//!
//! | offset | size | meaning                                                   |
//! |--------|------|-----------------------------------------------------------|
//! | 0      | 8    | magic [`MAGIC`] `VMSYNC\r\n` (catches line-ending mangling and shell noise) |
//! | 8      | 4    | protocol version, u32 LE: [`PROTOCOL_VERSION`] = 5        |
//! | 12     | 4    | feature flags, u32 LE (none defined; ignored if unknown)  |
//!
//! # Frame
//!
//! | offset | size  | meaning                                                  |
//! |--------|-------|----------------------------------------------------------|
//! | 0      | 4     | length L of type + payload, u32 LE, 1 ≤ L ≤ [`MAX_FRAME`] (8 MiB) |
//! | 4      | 1     | message type                                             |
//! | 5      | L − 1 | payload                                                  |
//!
//! The length is checked against [`MAX_FRAME`] before anything is
//! allocated for it: a hostile peer cannot make us reserve 4 GiB.
//!
//! # Keepalive
//!
//! With `--timeout T` (sent in `OPEN`), each end treats T seconds without a
//! byte from the other as a dead peer ([`crate::wire::pipe::Silence`]), and
//! sends `KEEPALIVE` whenever it has written nothing for T/4
//! ([`FrameWriter::keep_alive`]) while it indexes a large basis, fsyncs, or
//! verifies, so only a peer that is truly gone or stuck trips the timeout.
//! [`FrameReader::read_msg`] skips them.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::error::{fail, Exit};
use crate::wire::messages::{known_type, Msg};

/// Version of this protocol; bump on any change to the frame or message
/// tables.
pub const PROTOCOL_VERSION: u32 = 5;
/// Magic at the start of a hello.
pub const MAGIC: &[u8; 8] = b"VMSYNC\r\n";
/// Largest frame (type + payload) either end accepts or sends.
pub const MAX_FRAME: usize = 8 << 20;

/// Name of the peer in a local-to-local sync, for messages. Its errors are
/// about local files, so they are shown without a host prefix.
pub const LOCAL_PEER: &str = "local server";

/// Connection failures are exit code 4, whatever the io error was.
fn conn_err(e: io::Error, peer: &str, doing: &str) -> anyhow::Error {
    let what = match e.kind() {
        io::ErrorKind::UnexpectedEof => "connection closed".to_string(),
        io::ErrorKind::BrokenPipe => "connection closed (broken pipe)".to_string(),
        _ => e.to_string(),
    };
    fail(Exit::Connection, format!("{peer}: {what} while {doing}"))
}

/// Reads frames, enforcing [`MAX_FRAME`] before allocating.
pub struct FrameReader<R: Read> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    peer: String,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, peer: &str) -> Self {
        FrameReader {
            inner: BufReader::with_capacity(256 * 1024, inner),
            buf: Vec::new(),
            peer: peer.to_string(),
        }
    }

    /// Reads and checks the peer's hello.
    pub fn read_hello(&mut self) -> Result<u32> {
        let mut h = [0u8; 16];
        let mut got = 0;
        while got < h.len() {
            match self.inner.read(&mut h[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(conn_err(e, &self.peer, "waiting for the handshake")),
            }
        }
        if got == 0 {
            return Err(fail(
                Exit::Connection,
                format!("{}: connection closed before the handshake", self.peer),
            ));
        }
        // The start of our magic, then the end: a peer cut off while it
        // greeted us, not one that speaks something else.
        if got < 8 && h[..got] == MAGIC[..got] {
            return Err(fail(
                Exit::Connection,
                format!("{}: connection closed during the handshake", self.peer),
            ));
        }
        if got < 8 || &h[..8] != MAGIC {
            let text: String = String::from_utf8_lossy(&h[..got])
                .chars()
                .map(|c| if c.is_control() { '.' } else { c })
                .collect();
            return Err(fail(
                Exit::Protocol,
                format!(
                    "{}: peer does not speak the vmsync protocol (it sent {text:?}); \
                     check that the remote command is vmsync and that the shell prints nothing",
                    self.peer
                ),
            ));
        }
        if got < 16 {
            return Err(fail(
                Exit::Connection,
                format!("{}: connection closed during the handshake", self.peer),
            ));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if version != PROTOCOL_VERSION {
            return Err(fail(
                Exit::Protocol,
                format!(
                    "{}: protocol version mismatch: this vmsync speaks v{PROTOCOL_VERSION}, the peer speaks v{version}; \
                     install the same vmsync version on both ends",
                    self.peer
                ),
            ));
        }
        Ok(u32::from_le_bytes(h[12..16].try_into().unwrap()))
    }

    /// Reads one message. End of stream is a connection error: every run
    /// ends with an explicit message, so a silent close means the peer died.
    pub fn read_msg(&mut self) -> Result<Msg> {
        loop {
            match self.read_any()? {
                Msg::KeepAlive => continue,
                m => return Ok(m),
            }
        }
    }

    fn read_any(&mut self) -> Result<Msg> {
        let mut len = [0u8; 4];
        self.inner
            .read_exact(&mut len)
            .map_err(|e| conn_err(e, &self.peer, "reading"))?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(fail(
                Exit::Protocol,
                format!(
                    "{}: protocol error: frame of {len} bytes (limit {MAX_FRAME})",
                    self.peer
                ),
            ));
        }
        self.buf.resize(len, 0);
        self.inner
            .read_exact(&mut self.buf)
            .map_err(|e| conn_err(e, &self.peer, "reading a frame"))?;
        if !known_type(self.buf[0]) {
            return Err(fail(
                Exit::Protocol,
                format!(
                    "protocol error: unknown message type {} (this vmsync speaks protocol v{PROTOCOL_VERSION})",
                    self.buf[0]
                ),
            ));
        }
        match Msg::decode(&self.buf)? {
            // The peer's failure becomes ours, with its exit code and its words.
            Msg::Error { exit, message } => {
                let exit = match exit {
                    0 | 1 => Exit::Protocol,
                    c => Exit::from_code(c),
                };
                // A local server's errors are about local files: no prefix.
                if self.peer == LOCAL_PEER {
                    Err(fail(exit, message))
                } else {
                    Err(fail(exit, format!("{}: {message}", self.peer)))
                }
            }
            m => Ok(m),
        }
    }
}

/// Writes frames. The stream sits behind a lock so that a keepalive thread
/// ([`FrameWriter::keep_alive`]) can slip a whole `KEEPALIVE` frame in
/// between two messages, never inside one.
pub struct FrameWriter<W: Write> {
    out: Arc<Mutex<Out<W>>>,
    buf: Vec<u8>,
    peer: String,
}

struct Out<W: Write> {
    inner: BufWriter<W>,
    /// When bytes last went to the pipe (a flush), for the keepalive.
    last_flush: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while writing leaves at worst a broken stream, which the
    // peer detects; it is no reason to panic again here.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W, peer: &str) -> Self {
        FrameWriter {
            out: Arc::new(Mutex::new(Out {
                inner: BufWriter::with_capacity(256 * 1024, inner),
                last_flush: Instant::now(),
            })),
            buf: Vec::new(),
            peer: peer.to_string(),
        }
    }

    pub fn write_hello(&mut self) -> Result<()> {
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        let mut out = lock(&self.out);
        out.inner
            .write_all(&h)
            .and_then(|_| out.inner.flush())
            .map_err(|e| conn_err(e, &self.peer, "sending the handshake"))
    }

    /// Queues one message (buffered; see [`FrameWriter::flush`]).
    pub fn send(&mut self, msg: &Msg) -> Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        msg.encode(&mut buf);
        debug_assert!(buf.len() <= MAX_FRAME);
        let r = write_frame(&mut lock(&self.out).inner, &buf)
            .map_err(|e| conn_err(e, &self.peer, "sending"));
        self.buf = buf;
        r
    }

    pub fn flush(&mut self) -> Result<()> {
        let mut out = lock(&self.out);
        out.last_flush = Instant::now();
        out.inner
            .flush()
            .map_err(|e| conn_err(e, &self.peer, "sending"))
    }

    /// Sends and flushes.
    pub fn send_now(&mut self, msg: &Msg) -> Result<()> {
        self.send(msg)?;
        self.flush()
    }

    /// Runs `f` on the underlying stream, after flushing what is buffered.
    pub fn with_inner<T>(&mut self, f: impl FnOnce(&mut W) -> T) -> Result<T> {
        let mut out = lock(&self.out);
        out.inner
            .flush()
            .map_err(|e| conn_err(e, &self.peer, "sending"))?;
        Ok(f(out.inner.get_mut()))
    }
}

#[cfg(test)]
impl<W: Write> FrameWriter<W> {
    fn into_bytes(self) -> W {
        let out = Arc::try_unwrap(self.out)
            .ok()
            .expect("no keepalive thread in tests");
        out.into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .inner
            .into_inner()
            .ok()
            .expect("flush")
    }
}

impl<W: Write + Send + 'static> FrameWriter<W> {
    /// Sends `KEEPALIVE` whenever nothing has been sent for `every`, from a
    /// thread that ends with this writer. The peer's `--timeout` then fires
    /// only when we are gone, not while we index, fsync or verify.
    pub fn keep_alive(&self, every: Duration) -> Result<()> {
        let out = Arc::downgrade(&self.out);
        let tick = (every / 2).max(Duration::from_millis(10));
        std::thread::Builder::new()
            .name("keepalive".into())
            .spawn(move || {
                let mut frame = Vec::new();
                Msg::KeepAlive.encode(&mut frame);
                loop {
                    std::thread::sleep(tick);
                    // Holding only a weak reference lets the writer's drop
                    // close the pipe, which is how the peer learns we ended.
                    let Some(out) = out.upgrade() else { return };
                    let mut out = lock(&out);
                    if out.last_flush.elapsed() < every {
                        continue;
                    }
                    out.last_flush = Instant::now();
                    let sent = write_frame(&mut out.inner, &frame).and_then(|_| out.inner.flush());
                    if sent.is_err() {
                        // The main thread meets the same error on its next write.
                        return;
                    }
                }
            })
            .map(drop)
            .map_err(|e| fail(Exit::Io, format!("cannot start a thread: {e}")))
    }
}

fn write_frame<W: Write>(w: &mut W, frame: &[u8]) -> io::Result<()> {
    w.write_all(&(frame.len() as u32).to_le_bytes())
        .and_then(|_| w.write_all(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit_code_of;
    use crate::wire::messages::{
        EntryKind, ListEntry, Op, StartMode, MAX_LIST_BATCH, MAX_OPS, MAX_PATH, T_KEEPALIVE,
    };

    #[test]
    fn idle_writer_sends_keepalives_that_readers_skip() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        let (r, w) = (std::fs::File::from(r), std::fs::File::from(w));
        let mut writer = FrameWriter::new(w, "test");
        writer.keep_alive(Duration::from_millis(20)).unwrap();
        let mut raw = [0u8; 5];
        (&r).read_exact(&mut raw).unwrap();
        assert_eq!(raw, [1, 0, 0, 0, T_KEEPALIVE]);
        writer.send_now(&Msg::Start(StartMode::Inline)).unwrap();
        let mut reader = FrameReader::new(r, "test");
        assert_eq!(reader.read_msg().unwrap(), Msg::Start(StartMode::Inline));
        drop(writer);
        // The keepalive thread holds no strong reference: dropping the
        // writer closes the pipe, whatever it had sent.
        let e = reader.read_msg().unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Connection);
    }

    #[test]
    fn oversized_frame_rejected_before_allocation() {
        for len in [0u32, (MAX_FRAME + 1) as u32, u32::MAX] {
            let mut bytes = len.to_le_bytes().to_vec();
            let mut start = Vec::new();
            Msg::Start(StartMode::Manifest).encode(&mut start);
            bytes.extend_from_slice(&start);
            let mut r = FrameReader::new(&bytes[..], "peer");
            let e = r.read_msg().unwrap_err();
            assert_eq!(exit_code_of(&e), Exit::Protocol);
        }
    }

    #[test]
    fn truncated_stream_is_connection_error() {
        let mut w = FrameWriter::new(Vec::new(), "peer");
        w.send_now(&Msg::Start(StartMode::Manifest)).unwrap();
        let bytes = w.into_bytes();
        for cut in 0..bytes.len() {
            let mut r = FrameReader::new(&bytes[..cut], "peer");
            let e = r.read_msg().unwrap_err();
            assert_eq!(exit_code_of(&e), Exit::Connection);
        }
        let mut r = FrameReader::new(&bytes[..], "peer");
        assert_eq!(r.read_msg().unwrap(), Msg::Start(StartMode::Manifest));
    }

    #[test]
    fn handshake_checks_magic_and_version() {
        let mut w = FrameWriter::new(Vec::new(), "peer");
        w.write_hello().unwrap();
        let good = w.into_bytes();
        assert!(FrameReader::new(&good[..], "p").read_hello().is_ok());
        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        let e = FrameReader::new(&newer[..], "p").read_hello().unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Protocol);
        let (ours, theirs) = (
            format!("v{PROTOCOL_VERSION}"),
            format!("v{}", PROTOCOL_VERSION + 1),
        );
        assert!(e.to_string().contains(&ours) && e.to_string().contains(&theirs));
        // Cut off while greeting: a prefix of the magic, or all of it and
        // part of the rest, is a lost connection, not another protocol.
        for cut in [3, 8, 12] {
            let e = FrameReader::new(&good[..cut], "p")
                .read_hello()
                .unwrap_err();
            assert_eq!(exit_code_of(&e), Exit::Connection, "cut after {cut}: {e}");
        }
        let e = FrameReader::new(&b"Welcome to host\n"[..], "p")
            .read_hello()
            .unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Protocol);
        let e = FrameReader::new(&b""[..], "p").read_hello().unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Connection);
    }

    #[test]
    fn unknown_type_names_our_version() {
        let mut bytes = 1u32.to_le_bytes().to_vec();
        bytes.push(99);
        let e = FrameReader::new(&bytes[..], "peer").read_msg().unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Protocol);
        let text = e.to_string();
        assert!(text.contains("unknown message type 99"), "{text}");
        assert!(text.contains(&format!("v{PROTOCOL_VERSION}")), "{text}");
    }

    #[test]
    fn the_largest_batches_fit_in_a_frame() {
        let encode = |m: Msg| {
            let mut b = Vec::new();
            m.encode(&mut b);
            b
        };
        let long = |c: u8| vec![c; MAX_PATH];
        let e = ListEntry {
            kind: EntryKind::Symlink,
            path: [b"a/".repeat(MAX_PATH / 2 - 1), b"b".to_vec()].concat(),
            size: u64::MAX,
            mtime_sec: 0,
            mtime_nsec: 0,
            mode: rustix::fs::FileType::Symlink.as_raw_mode(),
            target: long(b't'),
            ..ListEntry::default()
        };
        assert!(encode(Msg::Entries(vec![e.clone(); MAX_LIST_BATCH])).len() <= MAX_FRAME);
        // With attributes, a lister cuts a batch by bytes (1 MiB, then one
        // more entry); a client its `APPLY` alike.
        let mut big = e;
        big.kind = EntryKind::File;
        big.mode = rustix::fs::FileType::RegularFile.as_raw_mode();
        big.target.clear();
        big.xattrs = (0..2)
            .map(|i| {
                (
                    format!("user.{i}").into_bytes(),
                    vec![0; crate::wire::MAX_XATTR_VALUE],
                )
            })
            .collect();
        let n = (1 << 20) / big.wire_size() + 1;
        assert!(encode(Msg::Entries(vec![big; n])).len() <= MAX_FRAME);
        let op = Op::Symlink {
            path: long(b'p'),
            target: long(b't'),
        };
        assert!(encode(Msg::Apply(vec![op; MAX_OPS])).len() <= MAX_FRAME);
    }
}
