//! `vmsync --server`: the far end, speaking the protocol on stdin/stdout.
//!
//! Started by the client through ssh (or directly, for local syncs). It
//! takes every instruction from the client's `OPEN` (role, path, options), so
//! nothing of the user's reaches a remote shell. Its own failures go back to
//! the client in an `ERROR` message, which the client prints with the host
//! name; the server itself prints nothing.
//!
//! Besides sending or receiving one file, it lists a tree or applies
//! operations to one for `-r` ([`crate::roles::list`], [`crate::roles::apply`]); `--root` confines those
//! too, and `--read-only` refuses the operations.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::content::chunk::ChunkParams;
use crate::content::compress::MAX_LEVEL;
use crate::dest::confine::Root;
use crate::error::{exit_code_of, fail, message_of, Exit};
use crate::progress::Progress;
use crate::roles::receive::{self, RecvOptions, Seed};
use crate::roles::send::{self, SendOptions, Source};
use crate::roles::{apply, list};
use crate::signals;
use crate::source::snapshot::{Snapshot, SnapshotOptions, MAX_VERIFY};
use crate::units::bytes_path;
use crate::wire::bwlimit::{Limited, Limiter};
use crate::wire::frame::{FrameReader, FrameWriter};
use crate::wire::messages::{Msg, Reason, Role};
use crate::wire::pipe::{keepalive_interval, Silence, Watched};

/// What the server may touch (`--root`, `--read-only`).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Confine every path to this directory.
    pub root: Option<PathBuf>,
    /// Refuse to write: only sending and `--check` are served.
    pub read_only: bool,
}

/// Serves one run on stdin/stdout; returns the exit code.
pub fn serve(umask: u32, limits: &Limits) -> Exit {
    let silence = Silence::default();
    // The client is gone: nobody is left to tell, and the main thread may
    // be blocked writing to it.
    silence.on_trip(Box::new(|| signals::abandon(Exit::Connection.code())));
    let reader = FrameReader::new(Watched::new(std::io::stdin(), silence.clone()), "client");
    let stdout = Watched::new(std::io::stdout(), silence.clone());
    let mut writer = FrameWriter::new(Limited::new(stdout, Limiter::new(0)), "client");
    match serve_on(reader, &mut writer, umask, limits, &silence) {
        Ok(()) => Exit::Ok,
        Err(e) => {
            let exit = exit_code_of(&e);
            if exit != Exit::Connection {
                let _ = writer.send_now(&Msg::Error {
                    exit: exit.code(),
                    message: message_of(&e),
                });
            }
            exit
        }
    }
}

type ClientReader = Watched<std::io::Stdin>;
type ClientWriter = Limited<Watched<std::io::Stdout>>;

fn serve_on(
    mut reader: FrameReader<ClientReader>,
    writer: &mut FrameWriter<ClientWriter>,
    umask: u32,
    limits: &Limits,
    silence: &Silence,
) -> Result<()> {
    writer.write_hello()?;
    reader.read_hello()?;
    let open = match reader.read_msg()? {
        Msg::Open(o) => o,
        m => return Err(m.unexpected("OPEN")),
    };
    if open.path.is_empty() || open.path.contains(&0) {
        return Err(fail(Exit::Usage, "empty path or a path with a NUL byte"));
    }
    if open.compress_level > MAX_LEVEL {
        return Err(fail(
            Exit::Protocol,
            format!("compression level {} out of range", open.compress_level),
        ));
    }
    if open.timeout_secs > 0 {
        silence.set(open.timeout_secs);
        writer.keep_alive(keepalive_interval(open.timeout_secs))?;
    }
    if open.bwlimit > 0 {
        writer.with_inner(|w| w.set_limiter(Limiter::new(open.bwlimit)))?;
    }
    let params = ChunkParams::from_code(open.chunking)
        .map_err(|e| fail(Exit::Protocol, format!("protocol error: {e}")))?;
    // Decoding refused unknown bits: these are all the client asked for.
    let options = open.options();
    crate::log::init(options.verbose);
    let path = bytes_path(&open.path);
    let root = limits.root.as_deref().map(Root::open).transpose()?;
    let quiet = Progress::hidden();
    match open.role {
        Role::Send => {
            // `here`: the source's name where a snapshot goes beside it (a
            // confined server has entered its directory beneath the root).
            let (src, here) = match &root {
                Some(r) => {
                    let here = finish_pending_beneath(r, &path, limits.read_only)?;
                    let file = r.open_source(&path)?;
                    if file.metadata().is_ok_and(|m| m.is_dir()) {
                        return Err(crate::client::is_a_directory(&path));
                    }
                    (Source::from_file(file, &path)?, here)
                }
                None if path.is_dir() => return Err(crate::client::is_a_directory(&path)),
                None => (Source::open(&path, limits.read_only)?, Some(path.clone())),
            };
            let opts = SendOptions {
                params,
                compress_level: open.compress_level,
                allow_changing: options.allow_changing,
                sample: open.sample,
            };
            if !options.snapshot {
                send::send(&src, reader, writer, &opts, &quiet, None, None)?;
                return Ok(());
            }
            let Some(here) = here else {
                return Err(fail(
                    Exit::Io,
                    format!("--snapshot: {} is not a file", path.display()),
                ));
            };
            let full = if options.check || options.dry_run || open.sample.is_some() {
                Some(Reason::Compare)
            } else if options.verify {
                Some(Reason::FullVerify)
            } else if options.snapshot_full {
                Some(Reason::VerifyMismatch)
            } else {
                None
            };
            let so = SnapshotOptions {
                verify: options.snapshot_verify.min(MAX_VERIFY),
                ..SnapshotOptions::default()
            };
            let snap = Snapshot::take(&src.file, &here, &so, full)?;
            let clone = snap
                .file
                .try_clone()
                .map_err(|e| fail(Exit::Io, format!("cannot duplicate a file handle: {e}")))?;
            let src = Source::snapshot(clone, &path, snap.info)?;
            let s = send::send(&src, reader, writer, &opts, &quiet, None, Some(&snap))?;
            if full != Some(Reason::Compare) && s.verify_mismatch_bytes == 0 {
                snap.commit()?;
            }
        }
        Role::Receive => {
            if limits.read_only && !options.check && !options.dry_run {
                return Err(fail(
                    Exit::Usage,
                    format!(
                        "cannot write {}: this server is read-only (--read-only)",
                        path.display()
                    ),
                ));
            }
            // Seeds are opened before entering the destination's
            // directory: relative seed paths mean what the client meant.
            let seeds = open
                .seeds
                .iter()
                .map(|p| {
                    let p = bytes_path(p);
                    match &root {
                        Some(r) => Ok(Seed::from_file(r.open_source(&p)?, &p)),
                        None => Seed::open(&p),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let (path, source_name) = match &root {
                // The name is already chosen: the receiver must not pick
                // another by following a symlink to a directory.
                Some(r) => (r.enter_destination(&path, &open.source_name)?, Vec::new()),
                None => (path, open.source_name),
            };
            let opts = RecvOptions::new(&options, params, umask, open.sample);
            receive::receive(
                Path::new(&path),
                &source_name,
                seeds,
                reader,
                writer,
                &opts,
                &quiet,
            )?;
        }
        Role::List => list::serve_list(&path, root.as_ref(), &mut reader, writer)?,
        Role::Apply => {
            if limits.read_only {
                return Err(fail(
                    Exit::Usage,
                    format!(
                        "cannot change {}: this server is read-only (--read-only)",
                        path.display()
                    ),
                ));
            }
            apply::serve_apply(&path, root.as_ref(), &mut reader, writer)?
        }
    }
    Ok(())
}

/// Before a confined server sends `path`: from inside its directory beneath
/// the root, as a receive would, what [`crate::dest::recover::before_reading`]
/// does. Returns the source's name in that directory, now the working one.
fn finish_pending_beneath(root: &Root, path: &Path, read_only: bool) -> Result<Option<PathBuf>> {
    // Only a file has a journal beside it; anything else is refused by
    // `open_source` or by the sender itself.
    let Ok(name) = root.enter_destination(path, b"") else {
        return Ok(None);
    };
    crate::dest::recover::before_reading(&name, read_only)?;
    Ok(Some(name))
}
