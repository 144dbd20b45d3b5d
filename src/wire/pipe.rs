//! Wrappers around the pipes to the peer: counting their bytes, and
//! noticing when the peer has gone silent (`--timeout`).
//!
//! They sit below the frame layer, which sees only `Read` and `Write`: a
//! [`Counted`] pipe feeds the wire byte count of the progress bar and the
//! report; a [`Watched`] pipe turns a peer that stopped answering (a dead
//! network path, a stopped process) into an error instead of a hang.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use crate::progress::Counter;

/// A pipe whose traffic is added to a [`Counter`].
pub struct Counted<T> {
    inner: T,
    counter: Counter,
}

impl<T> Counted<T> {
    pub fn new(inner: T, counter: Counter) -> Self {
        Counted { inner, counter }
    }
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

    /// What to do when the limit passes (it must unblock every thread waiting on the peer).
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
    silence: Silence,
}

impl<T: AsFd> Watched<T> {
    pub fn new(inner: T, silence: Silence) -> Self {
        Watched { inner, silence }
    }
}

impl<R: Read + AsFd> Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = self.silence.0.limit_ms.load(Ordering::Relaxed);
        if limit > 0 {
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(limit);
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let timeout = Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: left.subsec_nanos().into(),
                };
                let mut pfd = [PollFd::new(&self.inner, PollFlags::IN)];
                match poll(&mut pfd, Some(&timeout)) {
                    Ok(0) => {}
                    Ok(_) => break,
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
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

impl<T: AsFd> AsFd for Counted<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}
