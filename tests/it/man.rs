//! `man/vmsync.1` is generated from the clap definitions plus the shared
//! exit-code and example tables, and this test fails when the checked-in
//! page is stale. Regenerate with:
//!
//! ```sh
//! VMSYNC_UPDATE_MAN=1 cargo test --release --test it man::
//! ```

use std::path::Path;

use clap::CommandFactory;

fn roff_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('-', "\\-")
        .replace('\'', "\\(aq")
}

fn section(out: &mut Vec<u8>, title: &str, body: &str) {
    out.extend_from_slice(format!(".SH {title}\n{body}").as_bytes());
}

fn render() -> String {
    let cmd = vmsync::app::cli::Cli::command();
    let man = clap_mangen::Man::new(cmd).date("2026-11");
    let mut out = Vec::new();
    man.render_title(&mut out).unwrap();
    man.render_name_section(&mut out).unwrap();
    man.render_synopsis_section(&mut out).unwrap();
    man.render_description_section(&mut out).unwrap();
    man.render_options_section(&mut out).unwrap();

    let mut exit = String::new();
    for (code, what) in vmsync::error::EXIT_CODES {
        exit.push_str(&format!(".TP\n.B {code}\n{}\n", roff_escape(what)));
    }
    section(&mut out, "EXIT STATUS", &exit);

    let mut ex = String::new();
    for (cmdline, what) in vmsync::app::cli::EXAMPLES {
        ex.push_str(&format!(
            ".TP\n.B {}\n{}\n",
            roff_escape(cmdline),
            roff_escape(what)
        ));
    }
    ex.push_str(&roff_escape(
        ".PP\nA nightly cron job: silent unless it fails, gives up on a dead link, and leaves a log and metrics for alerting:\n.PP\n.nf\n\
         0 2 * * * vmsync -q --timeout 600 --log-file /var/log/vmsync.log --metrics-file /var/lib/prometheus/node-exporter/vmsync.prom /var/lib/libvirt/images/db.img backup:/srv/images/\n.fi\n.PP\nexamples/nightly-backup.sh in the source tree is a complete script (with a weekly --check) for cron or a systemd timer.\n",
    ));
    section(&mut out, "EXAMPLES", &ex);

    let mut rsync = String::from(
        "Options rsync users type from habit: the same meaning (same), accepted because vmsync \
         behaves that way anyway (no-op), or refused with what to use instead (refused).\n",
    );
    for (flags, takes, what) in vmsync::app::rsync::RSYNC_OPTIONS {
        rsync.push_str(&format!(
            ".TP\n.B {}\n({}) {}\n",
            roff_escape(flags),
            takes.name(),
            roff_escape(what)
        ));
    }
    section(&mut out, "RSYNC OPTIONS", &rsync);

    section(
        &mut out,
        "SAFETY",
        &roff_escape(
            "By default the new file is written to a hidden temporary file in the destination's \
             directory, fsync'd, renamed over the destination, and the directory fsync'd: the \
             destination is at every moment either the complete old version or the complete new \
             one. Every chunk is checked against its BLAKE3 hash before it is written, whether it \
             came over the wire or from the old destination. With --inplace the destination is \
             modified as the sync runs; an interrupted in-place run leaves a mixed file that the \
             next run repairs.\n",
        ),
    );
    section(
        &mut out,
        "SECURITY",
        &roff_escape(
            "The remote end is started as `ssh [user@]host vmsync --server`; file paths travel \
             inside the protocol and never through a remote shell, so they need no quoting. \
             Host names starting with '-' are refused so they cannot be taken as ssh options. \
             Every length, count and offset received from the peer is checked against a hard \
             limit before memory is allocated for it, decompression is bounded, and a chunk whose \
             hash does not match is never written. The receiver does not follow a symlink at the \
             destination path: it replaces the link (or refuses, with --inplace).\n\
             .PP\n\
             To confine a backup key to one directory, make the server a forced command in the \
             backup host's authorized_keys:\n\
             .PP\n.nf\n\
             command=\"vmsync --server --root /srv/images\",restrict ssh-ed25519 AAAA... backup@vmhost\n\
             .fi\n.PP\n\
             Every client path is then resolved beneath /srv/images with openat2(2) and \
             RESOLVE_BENEATH, so '..', absolute paths elsewhere and symlinks leading out are \
             refused during the lookup itself (exit 2). Add --read-only for a key that may only \
             pull and --check. examples/authorized_keys.example has both lines.\n",
        ),
    );
    section(
        &mut out,
        "FILES",
        &roff_escape(
            ".TP\n.I .NAME.vmsync-partial\n\
             Beside the destination: the new file being assembled, kept after a failure or a \
             signal so the next run resumes from it (--no-partial removes it); also the file \
             whose lock makes a second sync of the same destination exit 8.\n\
             .TP\n.I $VMSYNC_CACHE_DIR, else $XDG_CACHE_HOME/vmsync, else ~/.cache/vmsync\n\
             The receiver's manifest cache: the chunk list of each destination it wrote, keyed \
             by device, inode, size, mtime and ctime, so the next run need not re-read an \
             unchanged destination. Safe to delete at any time.\n\
             .TP\n.I examples/\n\
             In the source tree: a nightly backup script for cron and systemd, authorized_keys \
             lines and a restore drill.\n\
             .TP\n.I deploy/\n\
             In the source tree: the Debian package build, systemd units, an Ansible role, \
             Prometheus alert rules for --metrics-file and a Grafana dashboard.\n",
        ),
    );
    section(
        &mut out,
        "ENVIRONMENT",
        &roff_escape(
            ".TP\n.B VMSYNC_CACHE_DIR\n\
             Where the receiver keeps its manifest cache (see FILES).\n",
        ),
    );
    section(
        &mut out,
        "SEE ALSO",
        ".BR rsync (1),\n.BR ssh (1),\n.BR b3sum (1)\n",
    );
    man.render_version_section(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn man_page_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("man/vmsync.1");
    let fresh = render();
    if std::env::var_os("VMSYNC_UPDATE_MAN").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "man/vmsync.1 is stale; regenerate it with: VMSYNC_UPDATE_MAN=1 cargo test --release --test it man::"
    );
    for needle in [
        "EXIT STATUS",
        "EXAMPLES",
        "SECURITY",
        "\\-\\-check",
        "\\-\\-inplace",
        "\\-\\-root",
        "\\-\\-timeout",
        "FILES",
    ] {
        assert!(fresh.contains(needle), "man page lacks {needle}");
    }
}

/// The README's table of rsync options is the one in `src/app/rsync.rs`
/// (rewritten with the man page by `VMSYNC_UPDATE_MAN=1`).
#[test]
fn readme_rsync_table_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let (begin, end) = ("<!-- rsync-options:begin", "<!-- rsync-options:end -->");
    let b = readme
        .find(begin)
        .expect("README has the rsync-options markers");
    let b = b + readme[b..].find('\n').unwrap() + 1;
    let e = readme
        .find(end)
        .expect("README has the rsync-options end marker");
    let fresh = vmsync::app::rsync::markdown_table();
    if std::env::var_os("VMSYNC_UPDATE_MAN").is_some() {
        let updated = format!("{}{fresh}{}", &readme[..b], &readme[e..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    assert!(
        readme[b..e] == fresh,
        "README's rsync table is stale; regenerate it with: VMSYNC_UPDATE_MAN=1 cargo test --release --test it man::"
    );
}

/// The README's exit-status table lists every code, with the same words.
#[test]
fn readme_lists_every_exit_code() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for (code, what) in vmsync::error::EXIT_CODES {
        let row = format!("| {code} | {what} |");
        assert!(
            readme.contains(&row),
            "README lacks the exit-status row: {row}"
        );
    }
}
