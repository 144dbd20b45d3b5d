//! Exit codes and the one typed error that callers branch on.
//!
//! Every failure that reaches `main` is an [`anyhow::Error`]. Most carry a
//! [`Failure`] somewhere in their chain, which says which exit code the
//! process ends with; an error without one is classified by its cause
//! (`std::io::Error` from a file → [`Exit::Io`]). `main` maps an error to an
//! exit code exactly once, through [`exit_code_of`].

use std::fmt;

/// The process exit codes, documented in `--help`, the README and the man page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success, or `--check` found the files identical.
    Ok = 0,
    /// `--check` found differences.
    Differ = 1,
    /// Bad arguments.
    Usage = 2,
    /// File I/O: source missing or unreadable, destination not writable, disk full.
    Io = 3,
    /// Connection: ssh failed, remote vmsync missing, peer vanished.
    Connection = 4,
    /// Protocol: version mismatch, malformed frame, chunk failed its hash.
    Protocol = 5,
    /// `--verify` found the written destination different from the source.
    Verify = 6,
    /// The source changed while it was being read.
    SourceChanged = 7,
    /// Another vmsync holds the destination's lock.
    Locked = 8,
    /// A redo journal left by an interrupted write could not be applied:
    /// damaged, or written for another file; nothing was changed.
    Journal = 9,
    /// `-r`: some files (or other entries) of the tree failed; the others
    /// were synced (rsync's code for the same case).
    Partial = 23,
    /// Hung up on by SIGHUP.
    Hangup = 129,
    /// Interrupted by SIGINT.
    Interrupted = 130,
    /// Terminated by SIGTERM.
    Terminated = 143,
}

/// Every exit code with its meaning: the one table `--help`, the man page
/// and the README are written from.
pub const EXIT_CODES: &[(u8, &str)] = &[
    (0, "success, or --check found the files identical"),
    (1, "--check found differences"),
    (2, "usage error (bad arguments)"),
    (
        3,
        "file I/O error: source missing or unreadable, destination not writable, disk full",
    ),
    (
        4,
        "connection error: ssh failed, remote vmsync missing, peer vanished",
    ),
    (
        5,
        "protocol error: version mismatch, malformed data, a chunk failed its hash",
    ),
    (
        6,
        "--verify found the written file different from the source (not replaced; in place or on a device: rerun to repair)",
    ),
    (
        7,
        "the source changed while it was being read (use a snapshot)",
    ),
    (
        8,
        "the destination is locked by another vmsync run (its pid and host are named)",
    ),
    (
        9,
        "a journal of an interrupted write is damaged or not for this destination; it was not applied and nothing was changed",
    ),
    (
        23,
        "partial transfer: some files failed (with -r; the others were synced, the summary lists the failures)",
    ),
    (
        130,
        "interrupted by SIGINT (143: SIGTERM, 129: SIGHUP); destination left unchanged",
    ),
];

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The exit kind a peer sent in an error frame; unknown codes are protocol errors.
    pub fn from_code(code: u8) -> Exit {
        match code {
            0 => Exit::Ok,
            1 => Exit::Differ,
            2 => Exit::Usage,
            3 => Exit::Io,
            4 => Exit::Connection,
            6 => Exit::Verify,
            7 => Exit::SourceChanged,
            8 => Exit::Locked,
            9 => Exit::Journal,
            23 => Exit::Partial,
            129 => Exit::Hangup,
            130 => Exit::Interrupted,
            143 => Exit::Terminated,
            _ => Exit::Protocol,
        }
    }
}

/// A failure with a known exit code and a message meant for the user.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
    /// The message already spells out the causes below it in the chain.
    whole: bool,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Build an `anyhow::Error` carrying an exit code.
pub fn fail(exit: Exit, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Failure {
        exit,
        message: message.into(),
        whole: false,
    })
}

/// Attach an exit code to any error, keeping its message chain.
pub trait WithExit<T> {
    fn exit_with(self, exit: Exit) -> anyhow::Result<T>;
}

impl<T, E> WithExit<T> for Result<T, E>
where
    E: Into<anyhow::Error>,
{
    fn exit_with(self, exit: Exit) -> anyhow::Result<T> {
        // A fresh error whose message spells out the whole chain: anyhow's
        // chain cannot downcast to a context type, so the Failure must be
        // an error object of its own to be found by `exit_code_of`.
        self.map_err(|e| {
            let e: anyhow::Error = e.into();
            anyhow::Error::new(Failure {
                exit,
                message: format!("{e:#}"),
                whole: true,
            })
        })
    }
}

/// The exit code an error ends the process with.
///
/// The outermost [`Failure`] wins; an error with none is an I/O error when
/// an `std::io::Error` is in its chain (we only do file and pipe I/O), and a
/// protocol error otherwise.
pub fn exit_code_of(err: &anyhow::Error) -> Exit {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.exit;
        }
    }
    if err.chain().any(|c| c.is::<std::io::Error>()) {
        Exit::Io
    } else {
        Exit::Protocol
    }
}

/// The message to show for an error: its chain, outermost first, without
/// repeating what a [`Failure`] already folded into its own message.
pub fn message_of(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        match cause.downcast_ref::<Failure>() {
            Some(f) => {
                parts.push(f.message.clone());
                if f.whole {
                    break;
                }
            }
            None => parts.push(cause.to_string()),
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    /// Every code the binary can exit with is explained in the table
    /// (143 and 129 share the signal row).
    #[test]
    fn every_exit_code_is_documented() {
        for code in 0..=255u8 {
            let e = Exit::from_code(code);
            if e.code() == code && code != 143 && code != 129 {
                assert!(
                    EXIT_CODES.iter().any(|(c, _)| *c == code),
                    "exit code {code} ({e:?}) is missing from EXIT_CODES"
                );
            }
        }
    }

    #[test]
    fn failure_sets_exit_code_through_context() {
        let e: anyhow::Result<()> = Err(fail(Exit::Connection, "peer vanished"));
        let e = e.context("while syncing").unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Connection);
    }

    #[test]
    fn bare_io_error_is_io() {
        let e: anyhow::Result<()> =
            Err(std::io::Error::from(std::io::ErrorKind::NotFound)).context("open x");
        assert_eq!(exit_code_of(&e.unwrap_err()), Exit::Io);
    }

    #[test]
    fn exit_with_keeps_message() {
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("disk on fire"));
        let e = r.context("write /x").exit_with(Exit::Io).unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Io);
        assert!(message_of(&e).contains("disk on fire"));
        assert!(message_of(&e).contains("write /x"));
    }

    #[test]
    fn exit_with_wins_over_io_and_survives_context() {
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("pipe"));
        let e = r
            .exit_with(Exit::Connection)
            .context("talking to host")
            .unwrap_err();
        assert_eq!(exit_code_of(&e), Exit::Connection);
        assert_eq!(message_of(&e), "talking to host: pipe");
    }

    #[test]
    fn unknown_peer_code_is_protocol() {
        assert_eq!(Exit::from_code(99), Exit::Protocol);
        assert_eq!(Exit::from_code(3), Exit::Io);
    }
}
