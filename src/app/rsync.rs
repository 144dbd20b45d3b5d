//! What each rsync option an admin types from habit does in vmsync: one
//! table, written into the README (between the `rsync-options` markers) and
//! the man page, and run flag by flag by `tests/it/rsync_flags.rs`, so the
//! three cannot drift apart.
//!
//! Every option here is accepted with rsync's meaning, accepted as a
//! documented no-op where vmsync already behaves that way, or refused with
//! a message that says what to use instead ([`crate::app::config`]).

/// How vmsync takes an rsync option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takes {
    /// Does what rsync's does.
    Same,
    /// Accepted; vmsync behaves that way anyway.
    NoOp,
    /// Refused (exit 2) with what to use instead.
    Refused,
}

impl Takes {
    pub fn name(self) -> &'static str {
        match self {
            Takes::Same => "same",
            Takes::NoOp => "no-op",
            Takes::Refused => "refused",
        }
    }
}

/// (options as typed, separated by ", ", how vmsync takes them, what it does).
pub const RSYNC_OPTIONS: &[(&str, Takes, &str)] = &[
    (
        "-a, --archive",
        Takes::Same,
        "-r -D: a tree with links, permissions, times, owners and groups (as root), devices and specials",
    ),
    (
        "-r, --recursive",
        Takes::Same,
        "a tree; each regular file by the delta engine, up to 3 at once",
    ),
    (
        "-l, -p, -t, -g, -o",
        Takes::NoOp,
        "-r always keeps symlinks, permissions, modification times (ns) and, as root, owners and groups",
    ),
    (
        "-H, --hard-links",
        Takes::Same,
        "files that are one inode in the source are one at the destination; one copy is sent",
    ),
    (
        "-X, --xattrs",
        Takes::Same,
        "extended attributes (user.*; as root every namespace but system.*, SELinux labels included)",
    ),
    (
        "-A, --acls",
        Takes::Same,
        "POSIX access and default ACLs, by numeric ids",
    ),
    (
        "-D, --devices, --specials",
        Takes::Same,
        "device nodes (as root), fifos and sockets are recreated",
    ),
    (
        "-x, --one-file-system",
        Takes::Same,
        "a mount point inside the tree is created; what is mounted there is not copied",
    ),
    (
        "--numeric-ids",
        Takes::NoOp,
        "owners, groups and ACLs travel as numbers anyway",
    ),
    (
        "-z, --compress",
        Takes::NoOp,
        "chunk data is always zstd-compressed (level 3); takes no value, as in rsync",
    ),
    (
        "--compress-level",
        Takes::Same,
        "the zstd level, 1 to 19; 0 turns compression off",
    ),
    (
        "-P",
        Takes::NoOp,
        "--partial --progress: both are what vmsync does anyway",
    ),
    (
        "--progress",
        Takes::NoOp,
        "a progress bar is drawn on a terminal anyway (with -r one for the whole run)",
    ),
    (
        "--info=progress2",
        Takes::Same,
        "one bar for the whole run: bytes of all files, rate, ETA, files done of total (the default on a terminal); progress0 draws none, stats1 is --stats",
    ),
    (
        "--partial",
        Takes::NoOp,
        "an interrupted sync keeps its partial file and the next run resumes from it (--no-partial: not)",
    ),
    (
        "-S, --sparse",
        Takes::NoOp,
        "holes are always kept, and runs of zeros are written as holes",
    ),
    (
        "--inplace",
        Takes::Same,
        "writes into the existing destination, but journaled, so a crash cannot leave a mix (rsync's unjournaled way is --write-mode unsafe-inplace)",
    ),
    (
        "-W, --whole-file",
        Takes::Refused,
        "vmsync always sends only the chunks the destination lacks; a fresh copy beside the old one is --write-mode copy",
    ),
    (
        "--delete, --delete-after, --delete-delay",
        Takes::Same,
        "deletes what the source lacks, after every file was synced, and nothing when anything failed",
    ),
    (
        "--include, --exclude",
        Takes::Same,
        "rsync's rules: first match wins; no /: any depth; a trailing /: directories only",
    ),
    (
        "--include-from, --exclude-from",
        Takes::Same,
        "patterns from a file (- is stdin), one per line; blank lines, # and ; comments skipped",
    ),
    (
        "--files-from",
        Takes::Same,
        "only the listed paths (relative to SRC), the directories leading to them, and what listed directories hold",
    ),
    (
        "-i, --itemize-changes",
        Takes::Same,
        "one line per changed entry in rsync's format (>f.st...... disk.img)",
    ),
    (
        "-b, --backup, --backup-dir",
        Takes::Refused,
        "no copies of replaced files are kept; snapshot the destination before the run (cp --reflink=always, btrfs, LVM)",
    ),
    (
        "-c, --checksum, -I, --ignore-times",
        Takes::Same,
        "never skip a file for its size and time: compare contents",
    ),
    (
        "-n, --dry-run",
        Takes::Same,
        "reports what would be sent; writes nothing",
    ),
    (
        "-e, --rsh",
        Takes::Same,
        "the remote shell command",
    ),
    (
        "--rsync-path",
        Takes::Refused,
        "the remote vmsync is --remote-path",
    ),
    (
        "--bwlimit",
        Takes::Same,
        "a rate cap; a bare number is KiB/s, as in rsync",
    ),
    (
        "--timeout",
        Takes::Same,
        "gives up when the peer is silent that long (exit 4)",
    ),
    (
        "--stats",
        Takes::Same,
        "a summary at the end",
    ),
    (
        "-v, -q",
        Takes::Same,
        "more (-vv: more still) or fewer messages",
    ),
    (
        "-h, --human-readable",
        Takes::NoOp,
        "numbers are human-readable anyway; -h alone prints the help, as in rsync",
    ),
    (
        "--append, --append-verify",
        Takes::Refused,
        "an interrupted copy resumes from its partial file on its own, every kept chunk checked",
    ),
    (
        "-u, --update",
        Takes::Refused,
        "the destination is made a copy of the source whatever the times; leave files out with --exclude",
    ),
];

/// The message that refuses the options of `row` (its first column).
pub fn refusal(row: &str) -> String {
    let what = RSYNC_OPTIONS
        .iter()
        .find(|(flags, takes, _)| *flags == row && *takes == Takes::Refused)
        .map_or("", |(_, _, what)| what);
    format!(
        "rsync's {} is not supported: {what}",
        row.replace(", ", "/")
    )
}

/// The README's table (between its `rsync-options` markers).
pub fn markdown_table() -> String {
    let mut s = String::from("| rsync option | vmsync | what vmsync does |\n|---|---|---|\n");
    for (flags, takes, what) in RSYNC_OPTIONS {
        let flags: Vec<String> = flags.split(", ").map(|f| format!("`{f}`")).collect();
        s.push_str(&format!(
            "| {} | {} | {what} |\n",
            flags.join(", "),
            takes.name()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_is_parsed_and_refusals_say_what_instead() {
        use crate::app::cli::try_parse_from;
        for (flags, takes, _) in RSYNC_OPTIONS {
            for flag in flags.split(", ") {
                let mut args = vec!["vmsync"];
                // Options that take a value get one.
                let flag = match flag {
                    "--compress-level" => "--compress-level=3",
                    "--include" | "--exclude" => continue,
                    "--include-from" | "--exclude-from" | "--files-from" => continue,
                    "-e" | "--rsh" => continue,
                    "--bwlimit" => "--bwlimit=1M",
                    "--timeout" => "--timeout=60",
                    "--backup-dir" => "--backup-dir=/tmp",
                    "--rsync-path" => "--rsync-path=rsync",
                    "-h" => "-vh",
                    f => f,
                };
                if flag.starts_with("--delete") {
                    args.push("-r");
                }
                args.extend([flag, "a", "b"]);
                let cli =
                    try_parse_from(&args).unwrap_or_else(|e| panic!("{flag} is not parsed: {e}"));
                let cfg = crate::app::config::Config::from_cli(&cli);
                match takes {
                    Takes::Refused => {
                        let e = cfg.expect_err(flag);
                        assert_eq!(crate::error::exit_code_of(&e), crate::error::Exit::Usage);
                        let msg = crate::error::message_of(&e);
                        assert!(msg.contains("is not supported:"), "{flag}: {msg}");
                        let row = RSYNC_OPTIONS.iter().find(|r| r.0 == *flags).unwrap();
                        assert!(msg.ends_with(row.2), "{flag}: {msg}");
                    }
                    _ => {
                        cfg.unwrap_or_else(|e| panic!("{flag}: {e:#}"));
                    }
                }
            }
        }
    }
}
