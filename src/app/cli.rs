//! Command-line definitions (clap). Nothing else in the crate touches clap
//! types: [`crate::app::config`] turns a [`Cli`] into a validated configuration.

use std::ffi::OsString;

use clap::Parser;

/// The help heading of the options that exist for rsync users' habits.
const RSYNC: &str = "rsync compatibility";

const ABOUT: &str =
    "Keep a copy of a large disk image in sync over SSH, sending only what changed.";

const LONG_ABOUT: &str = "\
Keep a copy of a large disk image (raw, qcow2, any big file) in sync over SSH,
sending only what changed.

Both ends cut their file into content-defined chunks named by BLAKE3 hashes;
the destination requests only the chunks it lacks, which travel zstd-compressed
and are hash-checked before a byte is written. The new file is assembled in a
temporary file beside the destination and renamed over it at the end, so the
destination is always either the complete old version or the complete new one.

A remote operand is [user@]host:path (a colon before any slash). The remote end
runs the same binary: `ssh [user@]host vmsync --server`. Local-to-local syncs
run the same protocol with a local child process.";

/// Usage examples: `--help` and the man page are written from this list.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "vmsync disk.img backup:/srv/images/disk.img",
        "push a disk image over ssh",
    ),
    (
        "vmsync backup:/srv/images/disk.img restore.img",
        "pull it back",
    ),
    (
        "vmsync disk.img /mnt/backup/",
        "local to local, into a directory",
    ),
    (
        "vmsync --check disk.img backup:/srv/images/disk.img",
        "compare only; exit 0 if identical, 1 if not",
    ),
    (
        "vmsync --stats --verify disk.img backup:/srv/images/",
        "sync, re-read the result, print a summary",
    ),
    (
        "vmsync -e 'ssh -p 2222 -i ~/.ssh/backup' disk.img backup:/srv/",
        "use another ssh port and key",
    ),
    (
        "vmsync -r --delete /var/lib/libvirt/images/ backup:/srv/images/",
        "mirror a directory of images; exit 23 if some files failed",
    ),
    (
        "vmsync --bwlimit 20M --timeout 300 disk.img backup:/srv/images/",
        "daytime sync: at most 20 MiB/s, give up if the link dies for 5 minutes",
    ),
];

/// The text after the options in `--help`: examples and exit codes.
pub fn after_help() -> String {
    let mut s = String::from("Examples:\n");
    for (cmd, what) in EXAMPLES {
        s.push_str(&format!("  {cmd}\n      {what}\n"));
    }
    s.push_str("\nExit status:\n");
    for (code, what) in crate::error::EXIT_CODES {
        s.push_str(&format!("  {code:<4} {what}\n"));
    }
    s
}

/// Parses the command line, keeping the order of --include and --exclude
/// (which clap's derive loses between two options).
pub fn parse() -> Cli {
    try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// [`parse`] for given arguments.
pub fn try_parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    use clap::{CommandFactory, FromArgMatches};
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // rsync prints its help for a lone -h, and reads -h beside other
    // options as --human-readable.
    if args.len() == 2 && args[1] == "-h" {
        args[1] = "--help".into();
    }
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    let mut rules: Vec<(usize, FilterArg)> = Vec::new();
    for (id, exclude) in [("include", false), ("exclude", true)] {
        if let (Some(idx), Some(vals)) = (matches.indices_of(id), matches.get_many::<String>(id)) {
            for (i, pattern) in idx.zip(vals) {
                rules.push((
                    i,
                    FilterArg::Rule(crate::wire::FilterRule {
                        exclude,
                        pattern: pattern.clone(),
                    }),
                ));
            }
        }
    }
    for (id, exclude) in [("include_from", false), ("exclude_from", true)] {
        if let (Some(idx), Some(vals)) = (
            matches.indices_of(id),
            matches.get_many::<std::path::PathBuf>(id),
        ) {
            for (i, path) in idx.zip(vals) {
                rules.push((
                    i,
                    FilterArg::From {
                        exclude,
                        path: path.clone(),
                    },
                ));
            }
        }
    }
    rules.sort_by_key(|(i, _)| *i);
    cli.filters = rules.into_iter().map(|(_, r)| r).collect();
    // rsync's -a is -rlptgoD; -r keeps l, p, t, g and o already.
    if cli.archive {
        cli.recursive = true;
        cli.devices_specials = true;
    }
    if cli.devices_specials {
        cli.devices = true;
        cli.specials = true;
    }
    Ok(cli)
}

/// One filter option as given: a pattern, or a file of patterns (read when
/// the configuration is built, so that parsing does no I/O).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterArg {
    Rule(crate::wire::FilterRule),
    From {
        exclude: bool,
        path: std::path::PathBuf,
    },
}

#[derive(Parser, Debug)]
#[command(
    name = "vmsync",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    override_usage = "vmsync [OPTIONS] SRC DST",
    after_help = after_help(),
    max_term_width = 100,
    disable_help_flag = true
)]
pub struct Cli {
    /// Source file (or directory, with -r): a local path or [user@]host:path.
    #[arg(value_name = "SRC", required_unless_present_any = ["server", "completions", "recover"])]
    pub src: Option<OsString>,

    /// Destination file or directory: a local path or [user@]host:path.
    #[arg(value_name = "DST", required_unless_present_any = ["server", "completions", "recover"])]
    pub dst: Option<OsString>,

    /// Compare only: change nothing; exit 0 if identical, 1 if not, listing differing byte ranges.
    #[arg(long, conflicts_with_all = ["inplace", "write_mode", "verify"])]
    pub check: bool,

    /// Sync a directory tree: regular files (each by the delta engine), directories and symlinks
    /// (recreated as links, never followed), with permissions and mtimes, and owners when the
    /// receiving end runs as root. As in rsync, `SRC/` copies the contents of SRC into DST and
    /// `SRC` copies it to DST/SRC. Fifos, sockets and devices inside the tree are skipped with a
    /// warning unless -D, --specials or --devices (or -a) asks for them. When some entries fail
    /// the others are still synced, and the exit code is 23.
    #[arg(short = 'r', long)]
    pub recursive: bool,

    /// rsync's -a: -r -D (-rlptgo are what -r keeps anyway). Owners and groups are set when the
    /// receiving end runs as root.
    #[arg(short = 'a', long)]
    pub archive: bool,

    /// With -r: keep hard links: files of the source that are one inode become one inode at the
    /// destination (the first name, sorted, is sent; the others are linked to it).
    #[arg(short = 'H', long)]
    pub hard_links: bool,

    /// With -r: copy extended attributes, making each entry's exactly the source's: user.*, and
    /// where both ends run as root also trusted.* and security.* (SELinux labels included).
    /// Refused for a single-file SRC.
    #[arg(short = 'X', long)]
    pub xattrs: bool,

    /// With -r: copy POSIX ACLs (access and default), by numeric user and group ids. Refused for
    /// a single-file SRC.
    #[arg(short = 'A', long)]
    pub acls: bool,

    /// With -r: the same as --devices --specials.
    #[arg(short = 'D')]
    pub devices_specials: bool,

    /// With -r: recreate character and block device nodes (as root; as another user each one
    /// fails, and the exit code is 23).
    #[arg(long)]
    pub devices: bool,

    /// With -r: recreate fifos and sockets.
    #[arg(long)]
    pub specials: bool,

    /// With -r: do not cross filesystem boundaries: a mount point inside the tree is created,
    /// what is mounted there is not copied.
    #[arg(short = 'x', long)]
    pub one_file_system: bool,

    /// With -r: delete destination entries that the source lacks, once every copy succeeded
    /// (nothing is deleted when anything failed); excluded entries are kept.
    #[arg(long, conflicts_with = "check", visible_aliases = ["delete-after", "delete-delay"])]
    pub delete: bool,

    /// With -r: include entries matching GLOB (repeatable; see --exclude).
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,

    /// With -r: leave out entries matching GLOB (repeatable). --include and --exclude rules are
    /// tried in the order given and the first match decides. GLOB is matched against the path
    /// relative to the tree: `*` does not cross `/`, `**` does; a GLOB without `/` matches a
    /// name at any depth, one ending in `/` only directories. An excluded directory is not
    /// entered, and excluded destination entries are never deleted.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,

    /// With -r: read --include patterns from FILE, one per line (blank lines and lines starting
    /// with # or ; are skipped; - is stdin), in the place of this option among the others.
    #[arg(long, value_name = "FILE")]
    pub include_from: Vec<std::path::PathBuf>,

    /// With -r: read --exclude patterns from FILE (see --include-from).
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<std::path::PathBuf>,

    /// With -r: sync only the paths listed in FILE (one per line, relative to SRC; - is stdin),
    /// with the directories leading to them; a listed directory comes with all it holds.
    /// --delete then deletes only among the listed paths.
    #[arg(long, value_name = "FILE")]
    pub files_from: Option<std::path::PathBuf>,

    /// --include, --exclude, --include-from and --exclude-from in command-line order (filled by
    /// [`parse`]).
    #[arg(skip)]
    pub filters: Vec<FilterArg>,

    /// After writing, re-read the destination from disk and compare it with the source before
    /// committing it (exit 6 on mismatch).
    #[arg(long)]
    pub verify: bool,

    /// Compare and report what a sync would send (bytes, chunks); write nothing.
    #[arg(short = 'n', long, conflicts_with = "check")]
    pub dry_run: bool,

    /// Another file on the receiving side to take chunks from (repeatable), e.g. the golden
    /// image a VM disk was cloned from, so a clone's first copy sends only what differs.
    /// Paths are on the destination's host. Seeds are only read.
    #[arg(long, value_name = "FILE")]
    pub seed: Vec<std::ffi::OsString>,

    /// With --check: compare only slice K of N interleaved slices of the file (e.g. 3/7), so
    /// running K = 1..N (one per night) checks every byte once per cycle.
    #[arg(long, value_name = "K/N", requires = "check")]
    pub sample: Option<String>,

    /// Commit the destination even if the source changed while it was read (a running VM),
    /// instead of failing with exit 7; the result is then a copy of a moving target, as a
    /// crash would leave it, and the summary says so.
    #[arg(long)]
    pub allow_changing_source: bool,

    /// Read a point-in-time reflink clone of the source (FICLONE: milliseconds) instead of the
    /// live file, so a running VM gives a crash-consistent copy and the run never fails because
    /// the source changed. The clone is kept (hidden, beside the source:
    /// .NAME.vmsync-snapshot) as the next run's base: then only the ranges whose blocks changed
    /// since are read and sent, when the destination still is the copy of that clone. Needs a
    /// reflink filesystem (XFS, btrfs); elsewhere the run fails before sending anything. Applies
    /// on whichever host the source is.
    #[arg(long)]
    pub snapshot: bool,

    /// With --snapshot: keep the clones in DIR (on the source's filesystem) instead of beside
    /// the source. Local sources only.
    #[arg(long, value_name = "DIR", requires = "snapshot")]
    pub snapshot_dir: Option<std::path::PathBuf>,

    /// With --snapshot: re-read 1/N of what a run skips as unchanged (a different slice each
    /// run, so every byte once per N runs) and compare it with the destination; a mismatch is
    /// a loud warning and the run re-syncs with a full read. 0 turns it off. Default: 30.
    #[arg(long, value_name = "N", requires = "snapshot")]
    pub snapshot_verify: Option<u16>,

    /// With --snapshot: run CMD (with /bin/sh, VMSYNC_SOURCE set to the source path) just
    /// before the clone, e.g. 'virsh domfsfreeze DOMAIN', for a filesystem-consistent copy.
    /// The --thaw command runs right after the clone, whatever happened. For a remote source,
    /// give them to the remote's --server (in its authorized_keys command).
    #[arg(long, value_name = "CMD")]
    pub freeze: Option<String>,

    /// With --snapshot: run CMD right after the clone (and after a failed --freeze), e.g.
    /// 'virsh domfsthaw DOMAIN'.
    #[arg(long, value_name = "CMD")]
    pub thaw: Option<String>,

    /// How an existing destination is written (a new one is always written beside it, then
    /// renamed): auto, clone, journal, copy or unsafe-inplace.
    ///
    /// auto (the default): clone where the destination's filesystem supports reflinks (XFS,
    /// btrfs), else journal; a block device is always journaled (unless unsafe-inplace).
    /// clone: readers and a crash see the old or the new file, never a mix; writes and extra
    /// space cost about the changed bytes. journal: a crash leaves the old file, or a journal
    /// that the next run (or --recover) completes; readers may see a partly applied file while
    /// it is applied; writes cost about twice the changed bytes. copy: the old or the new
    /// file, never a mix, on any filesystem; writes and extra space cost a whole copy.
    /// unsafe-inplace: straight into the destination like rsync --inplace: a crash leaves a
    /// file that is neither version.
    #[arg(long, value_name = "MODE", value_parser = parse_write_mode, conflicts_with = "inplace")]
    pub write_mode: Option<crate::wire::WriteMode>,

    /// Write into the existing destination, journaled: the same as --write-mode journal
    /// (rsync's unjournaled --inplace is --write-mode unsafe-inplace).
    #[arg(long)]
    pub inplace: bool,

    /// Where the receiving host keeps the journals of block-device destinations (a regular
    /// file's journal sits beside it). Default: /var/lib/vmsync. Passed on to a remote
    /// receiver.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,

    /// Finish an interrupted journaled write of PATH (a file, or a block device) and exit: a
    /// committed journal is applied, so PATH holds the new version; an uncommitted one is left
    /// for the next sync to resume from (PATH holds the old version). A damaged journal, or one
    /// for another file, is refused (exit 9). Every sync and --check does this on its own.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["src", "dst", "server"])]
    pub recover: Option<OsString>,

    /// Do not resume from, nor leave behind, the partial file of an interrupted run.
    ///
    /// By default an interrupted or failed sync keeps what it received in a hidden
    /// `.NAME.vmsync-partial` beside the destination, and the next run picks up from it.
    #[arg(long)]
    pub no_partial: bool,

    /// Always compare contents: skip the quick check that treats a destination with the
    /// source's size and modification time as up to date.
    #[arg(short = 'c', long)]
    pub checksum: bool,

    /// zstd compression level for chunk data: 1 (fast) to 19 (small); 0 turns it off. On a first
    /// copy it is a ceiling: the level goes down (to 1 at least) while compressing is slower than
    /// the link, and back up while the link is slower.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u8).range(0..=19))]
    pub compress_level: u8,

    /// Compress chunk data: always on (level 3, see --compress-level), so this does nothing; as
    /// in rsync it takes no value.
    #[arg(short = 'z', long, help_heading = RSYNC)]
    pub compress: bool,

    /// Average chunk size: a power of two from 4K to 1M (minimum is a quarter of it, maximum
    /// four times). Both ends use the sender's value.
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    pub chunk_size: String,

    /// Cut into fixed-size blocks at aligned offsets instead of content-defined chunks (a power
    /// of two from 4K to 4M). Scans faster; finds unchanged data only where it has not moved,
    /// which suits raw disk images; content-defined chunks also follow data that shifted.
    #[arg(long, value_name = "SIZE", conflicts_with = "chunk_size")]
    pub block_size: Option<String>,

    /// Remote shell command used instead of `ssh` (split on white space; quotes group words).
    #[arg(short = 'e', long, value_name = "CMD", default_value = "ssh")]
    pub rsh: String,

    /// Path of the vmsync binary on the remote host.
    #[arg(long, value_name = "PATH", default_value = "vmsync")]
    pub remote_path: String,

    /// Give up with exit code 4 when the other end sends nothing for SECONDS (1 to 86400).
    ///
    /// Both ends send keepalives while they are busy (indexing, fsync, verifying), so only a
    /// peer that is gone or stuck trips it; the remote vmsync also exits when the client
    /// has been silent that long. Default: wait forever, as rsync does.
    #[arg(long, value_name = "SECONDS",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::wire::MAX_TIMEOUT)))]
    pub timeout: Option<u32>,

    /// Cap the rate at which each end sends, in bytes on the wire (after compression).
    ///
    /// A bare number is KiB/s, as in rsync; K, M and G suffixes are binary (`10M` = 10 MiB/s);
    /// 0 means no limit.
    #[arg(long, value_name = "RATE")]
    pub bwlimit: Option<String>,

    /// At the end of the run, write Prometheus metrics for this destination (last run and
    /// last success time, exit code, duration, bytes) into PATH, for node_exporter's textfile
    /// collector. Other destinations' series in the file are kept; the file is replaced
    /// atomically.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<std::path::PathBuf>,

    /// Append a timestamped record of the run (its phases and outcome) to PATH, whatever -v
    /// says.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<std::path::PathBuf>,

    /// Print a completion script for SHELL on stdout and exit (e.g. `vmsync --completions
    /// bash > /etc/bash_completion.d/vmsync`).
    #[arg(long, value_name = "SHELL", exclusive = true)]
    pub completions: Option<clap_complete::Shell>,

    /// Print a summary: sizes, bytes reused, sent and on the wire, time, speed-up.
    #[arg(long)]
    pub stats: bool,

    /// Print the result as one JSON object on stdout (implies no progress bar).
    #[arg(long)]
    pub json: bool,

    /// Say what each phase does and how long it takes, on stderr (-vv: more detail).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// No progress bar and no messages except errors.
    #[arg(short, long)]
    pub quiet: bool,

    /// Print help (rsync's habit: -h alone is help; with other options it is
    /// --human-readable, which vmsync always is).
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,

    /// rsync's --itemize-changes: one line per changed entry on stdout, e.g. `>f.st......
    /// disk.img` (a file sent: size and time changed), `cd+++++++++ images/` (a directory made),
    /// `*deleting old.img`.
    #[arg(short = 'i', long, help_heading = RSYNC)]
    pub itemize_changes: bool,

    /// rsync's --info=FLAGS, comma-separated: progress2 or progress1 (a progress bar for the
    /// whole run, which is the default on a terminal), progress0 (no bar), stats1 or stats2
    /// (--stats), stats0.
    #[arg(long, value_name = "FLAGS", help_heading = RSYNC)]
    pub info: Vec<String>,

    /// rsync's --progress: progress bars are drawn on a terminal anyway (with -r one for the
    /// whole run), so this does nothing.
    #[arg(long, help_heading = RSYNC)]
    pub progress: bool,

    /// rsync's -P (--partial --progress): what vmsync does anyway.
    #[arg(short = 'P', help_heading = RSYNC)]
    pub partial_progress: bool,

    /// rsync's --partial: an interrupted sync's partial file is kept and resumed from anyway
    /// (see --no-partial).
    #[arg(long, help_heading = RSYNC, conflicts_with = "no_partial")]
    pub partial: bool,

    /// rsync's --sparse: holes are always kept, and zero runs written as holes, so this does
    /// nothing.
    #[arg(short = 'S', long, help_heading = RSYNC)]
    pub sparse: bool,

    /// rsync's -l, -p, -t, -g, -o and --numeric-ids: what -r keeps anyway.
    #[arg(short = 'l', long, hide = true)]
    pub links: bool,
    #[arg(short = 'p', long, hide = true)]
    pub perms: bool,
    #[arg(short = 't', long, hide = true)]
    pub times: bool,
    #[arg(short = 'g', long, hide = true)]
    pub group: bool,
    #[arg(short = 'o', long, hide = true)]
    pub owner: bool,
    #[arg(long, hide = true)]
    pub numeric_ids: bool,
    /// rsync's -h: vmsync's numbers are human-readable anyway.
    #[arg(short = 'h', long, hide = true)]
    pub human_readable: bool,
    /// rsync's -I: the same as --checksum (never skip a file for its size and time).
    #[arg(short = 'I', long, hide = true)]
    pub ignore_times: bool,

    /// rsync options vmsync refuses, each with what to use instead
    /// ([`crate::app::config`]).
    #[arg(short = 'W', long, hide = true)]
    pub whole_file: bool,
    #[arg(short = 'b', long, hide = true)]
    pub backup: bool,
    #[arg(long, value_name = "DIR", hide = true)]
    pub backup_dir: Option<std::path::PathBuf>,
    #[arg(long, value_name = "PROGRAM", hide = true)]
    pub rsync_path: Option<String>,
    #[arg(long, hide = true)]
    pub append: bool,
    #[arg(long, hide = true)]
    pub append_verify: bool,
    #[arg(short = 'u', long, hide = true)]
    pub update: bool,

    /// Serve the protocol on stdin/stdout (started by the other end over ssh).
    #[arg(long, hide = true)]
    pub server: bool,

    /// With --server: serve only paths beneath DIR, after resolving symlinks and `..` (for a
    /// forced command in authorized_keys: command="vmsync --server --root /srv/images").
    #[arg(
        long,
        value_name = "DIR",
        requires = "server",
        help_heading = "Server options"
    )]
    pub root: Option<std::path::PathBuf>,

    /// With --server: refuse to write; only send files and answer --check.
    #[arg(long, requires = "server", help_heading = "Server options")]
    pub read_only: bool,
}

/// `--write-mode`: one of [`crate::wire::WriteMode::ALL`]'s names.
fn parse_write_mode(s: &str) -> Result<crate::wire::WriteMode, String> {
    crate::wire::WriteMode::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = crate::wire::WriteMode::ALL
            .iter()
            .map(|m| m.name())
            .collect();
        format!("unknown write mode '{s}': one of {}", names.join(", "))
    })
}
