//! The invoking end of a run: open the local file, start the other end,
//! shake hands, play the local role, collect the result.
//!
//! Which end sends follows the operands: a local source is scanned here and
//! the other end receives; a remote source is scanned there and we receive.
//! Local-to-local starts `vmsync --server` as a child and pushes to it, so
//! every sync runs the same protocol code. A recursive run ([`crate::client::tree`])
//! runs one such session per file. Starting the other end is [`spawn`].

pub mod spawn;

pub mod config;
pub mod tree;

use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::client::config::Config;
use crate::client::spawn::{Launch, Operand, Peer, PeerReader, PeerWriter, Remote};
use crate::error::{exit_code_of, fail, Exit};
use crate::progress::Progress;
use crate::roles::receive::{self, RecvOptions, Seed};
use crate::roles::send::{self, SendOptions, Source};
use crate::source::snapshot::Snapshot;
use crate::units::path_bytes;
use crate::wire::frame::{FrameReader, FrameWriter};
use crate::wire::messages::Reason;
use crate::wire::messages::{Msg, Open, Role, Summary};
use crate::wire::options::Options;
use crate::wire::pipe::{keepalive_interval, Silence};

/// The outcome of a run that completed.
#[derive(Debug, Clone)]
pub struct Report {
    pub summary: Summary,
    pub source_bytes: u64,
    pub wire_bytes: u64,
    pub duration: Duration,
    pub check: bool,
}

impl Report {
    pub fn exit(&self) -> Exit {
        if self.check && !self.summary.identical {
            Exit::Differ
        } else {
            Exit::Ok
        }
    }
}

/// Runs the sync (or check) that `cfg` describes.
pub fn run(cfg: &Config, umask: u32) -> Result<Report> {
    if let Operand::Local(src) = &cfg.src {
        if src.is_dir() {
            return Err(is_a_directory(src));
        }
    }
    let mut progress = Progress::new(cfg.progress);
    let report = transfer(cfg, &cfg.src, &cfg.dst, None, true, umask, &mut progress);
    progress.finish();
    report
}

/// A directory source without `-r`.
pub(crate) fn is_a_directory(path: &std::path::Path) -> anyhow::Error {
    fail(
        Exit::Io,
        format!(
            "source {} is a directory; vmsync copies one file (use -r to sync a directory tree)",
            path.display()
        ),
    )
}

/// The options `cfg` gives the server (and the local receiver alike).
pub(crate) fn options(cfg: &Config) -> Options {
    Options {
        check: cfg.check,
        write_mode: cfg.write_mode,
        checksum: cfg.checksum,
        verify: cfg.verify,
        no_partial: cfg.no_partial,
        dry_run: cfg.dry_run,
        allow_changing: cfg.allow_changing_source,
        verbose: crate::log::level(),
        snapshot: cfg.snapshot.is_some(),
        snapshot_verify: cfg.snapshot.as_ref().map_or(0, |s| s.verify),
        snapshot_full: false,
    }
}

/// How to reach the other end for one session. Each session gets its own
/// [`Silence`]: it stops that session's child, and `-r` runs several.
pub(crate) fn launch(cfg: &Config) -> Launch<'_> {
    let silence = Silence::default();
    silence.set(cfg.timeout_secs);
    Launch {
        rsh: &cfg.rsh,
        remote_path: &cfg.remote_path,
        silence,
        bwlimit: cfg.bwlimit,
        state_dir: cfg.state_dir.as_deref(),
    }
}

/// Syncs (or checks) one file from `src` to `dst` with `cfg`'s options.
/// `name` overrides the source's name, which a destination that is a
/// directory receives the file under: `-r` gives an empty one, so that a
/// directory where a file belongs is an error, never a place to write into.
/// `prescan`: when pushing, start scanning the source while the other end
/// starts up ([`send::Prescan`]); worth it unless the destination is
/// known to be up to date or missing.
pub(crate) fn transfer(
    cfg: &Config,
    src: &Operand,
    dst: &Operand,
    name: Option<&[u8]>,
    prescan: bool,
    umask: u32,
    progress: &mut Progress,
) -> Result<Report> {
    let start = Instant::now();
    // A local source with --snapshot: cloned once, for both passes.
    let (source, mut snap) = match (src, &cfg.snapshot) {
        (Operand::Local(p), Some(so)) => {
            let source = Source::open(p, false)?;
            let snap = Snapshot::take(&source.file, p, so, full_reason(cfg))?;
            let file = snap
                .file
                .try_clone()
                .context("cannot duplicate a file handle")?;
            (Some(Source::snapshot(file, p, snap.info)?), Some(snap))
        }
        _ => (None, None),
    };
    let pass = |progress: &mut Progress, snap: Option<&Snapshot>, full: bool| {
        transfer_once(
            cfg,
            src,
            dst,
            name,
            prescan,
            umask,
            progress,
            source.as_ref(),
            snap,
            full,
        )
    };
    let mut report = pass(progress, snap.as_ref(), false)?;
    let mismatch = report.summary.verify_mismatch_bytes;
    if mismatch > 0 && cfg.snapshot.is_some() {
        crate::log::warn(&format!(
            "verify slice mismatch: {mismatch} bytes that the snapshots' extent maps call \
             unchanged differ at the destination; syncing again with a full read"
        ));
        if let Some(s) = &mut snap {
            s.read_all(Reason::VerifyMismatch);
        }
        let wire = report.wire_bytes;
        report = pass(progress, snap.as_ref(), true)?;
        report.wire_bytes += wire;
        if let Some(st) = &mut report.summary.snapshot {
            st.verify_mismatch_bytes = mismatch;
            st.reason = Reason::VerifyMismatch.text();
        }
    }
    if let Some(s) = snap {
        if !cfg.check && !cfg.dry_run {
            s.commit()?;
        }
    }
    report.duration = start.elapsed();
    Ok(report)
}

/// Why a `--snapshot` run of `cfg` must read everything, if it must.
fn full_reason(cfg: &Config) -> Option<Reason> {
    if cfg.check || cfg.dry_run {
        Some(Reason::Compare)
    } else if cfg.verify {
        Some(Reason::FullVerify)
    } else {
        None
    }
}

/// One session of [`transfer`]: `snap_source` reads `snap`, the snapshot
/// of a local source (else the source is opened here); `full` is the
/// re-sync after a verify mismatch, which reads and compares everything.
#[allow(clippy::too_many_arguments)]
fn transfer_once(
    cfg: &Config,
    src: &Operand,
    dst: &Operand,
    name: Option<&[u8]>,
    prescan: bool,
    umask: u32,
    progress: &mut Progress,
    snap_source: Option<&Source>,
    snap: Option<&Snapshot>,
    full: bool,
) -> Result<Report> {
    let start = Instant::now();
    let launch = launch(cfg);
    let mut options = options(cfg);
    // The re-sync after a verify mismatch compares every byte: the first
    // pass left the destination with the source's size and mtime, which
    // the quick check would take for up to date.
    options.snapshot_full = full;
    options.checksum |= full;
    let open_flags = options.to_bits();
    let (summary, source_bytes, wire_bytes) = match (src, dst) {
        (Operand::Local(src), dst) => {
            // Fail on a missing source before dialing anyone.
            let opened;
            let source = match snap_source {
                Some(s) => s,
                None => {
                    opened = Source::open(src, false)?;
                    &opened
                }
            };
            let (remote, path) = match dst {
                Operand::Local(p) => (None, path_bytes(p.as_os_str())),
                Operand::Remote(r) => (Some(r), r.path.clone()),
            };
            let open = Open {
                role: Role::Receive,
                flags: open_flags,
                compress_level: cfg.compress_level,
                chunking: cfg.params.code(),
                path,
                source_name: match name {
                    Some(n) => n.to_vec(),
                    None => src
                        .file_name()
                        .map(|n| n.as_bytes().to_vec())
                        .unwrap_or_default(),
                },
                timeout_secs: cfg.timeout_secs,
                bwlimit: cfg.bwlimit,
                sample: cfg.sample,
                // The receiver is at the far end: so are its seeds.
                seeds: cfg.seeds.iter().map(|p| path_bytes(p)).collect(),
            };
            let opts = SendOptions {
                params: cfg.params,
                compress_level: cfg.compress_level,
                allow_changing: options.allow_changing,
                sample: cfg.sample,
            };
            let size = source.info.size;
            // A snapshot offering a base reads its ranges only, once asked.
            let prescan = if prescan && snap.is_none_or(|s| s.msg.base.is_none()) {
                send::Prescan::start(source, &opts)?
            } else {
                None
            };
            let s = session(
                remote,
                &launch,
                open,
                progress,
                |reader, writer, progress| {
                    send::send(source, reader, writer, &opts, progress, prescan, snap)
                },
            )?;
            (s.0, size, s.1)
        }
        (Operand::Remote(r), Operand::Local(dst)) => {
            let name = match name {
                Some(n) => n.to_vec(),
                None => r
                    .path
                    .rsplit(|&b| b == b'/')
                    .next()
                    .unwrap_or_default()
                    .to_vec(),
            };
            let open = Open {
                role: Role::Send,
                flags: open_flags,
                compress_level: cfg.compress_level,
                chunking: cfg.params.code(),
                path: r.path.clone(),
                source_name: Vec::new(),
                timeout_secs: cfg.timeout_secs,
                bwlimit: cfg.bwlimit,
                sample: cfg.sample,
                seeds: Vec::new(),
            };
            let seeds = cfg
                .seeds
                .iter()
                .map(|p| Seed::open(std::path::Path::new(p)))
                .collect::<Result<Vec<_>>>()?;
            let opts = RecvOptions::new(&options, cfg.params, umask, cfg.sample);
            let s = session(
                Some(r),
                &launch,
                open,
                progress,
                |reader, writer, progress| {
                    receive::receive(dst, &name, seeds, reader, writer, &opts, progress)
                },
            )?;
            let size = s.0.source_bytes;
            (s.0, size, s.1)
        }
        (Operand::Remote(_), Operand::Remote(_)) => {
            return Err(fail(Exit::Usage, "remote to remote is not supported"))
        }
    };
    Ok(Report {
        summary,
        source_bytes,
        wire_bytes,
        duration: start.elapsed(),
        check: cfg.check,
    })
}

/// Starts the other end, shakes hands, sends `OPEN`, runs `role`, and
/// reaps the child. Returns what `role` returned and the wire byte count.
pub(crate) fn session<T>(
    remote: Option<&Remote>,
    launch: &Launch,
    open: Open,
    progress: &mut Progress,
    role: impl FnOnce(FrameReader<PeerReader>, &mut FrameWriter<PeerWriter>, &Progress) -> Result<T>,
) -> Result<(T, u64)> {
    let (peer, r, w) = spawn::spawn(remote, launch)?;
    let mut reader = FrameReader::new(r, &peer.name);
    let mut writer = FrameWriter::new(w, &peer.name);
    progress.watch_wire(peer.counter.clone());
    let timeout = open.timeout_secs;
    let result = writer
        .write_hello()
        .and_then(|_| reader.read_hello())
        .and_then(|_| writer.send_now(&Msg::Open(open)))
        .and_then(|_| match timeout {
            0 => Ok(()),
            t => writer.keep_alive(keepalive_interval(t)),
        })
        .and_then(|_| role(reader, &mut writer, progress));
    let wire = peer.counter.get();
    drop(writer); // closes the child's stdin: a server still running sees the end
    match result {
        Ok(s) => {
            peer.finish()?;
            Ok((s, wire))
        }
        Err(e) => Err(explain(e, peer, &launch.silence)),
    }
}

/// Adds how the child ended to a connection error ("ssh could not
/// connect", "remote vmsync not found"); reaps it in any case.
fn explain(e: anyhow::Error, peer: Peer, silence: &Silence) -> anyhow::Error {
    if silence.tripped() {
        // Whatever error the stopped child caused, the cause is the silence.
        let name = peer.name.clone();
        peer.explain();
        return fail(Exit::Connection, format!("{name}: {}", silence.message()));
    }
    let why = peer.explain();
    if exit_code_of(&e) == Exit::Connection {
        let msg = crate::error::message_of(&e);
        fail(Exit::Connection, format!("{msg}: {why}"))
    } else {
        e
    }
}
