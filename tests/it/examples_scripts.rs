//! The admin examples under `examples/`: the nightly backup script, driven
//! against a stub `vmsync` that records its arguments, and the syntax of the
//! systemd units and the `authorized_keys` example.
//!
//! The stubs live in a temporary directory put first on `PATH`: `vmsync`
//! (appends its argv to a file, exits with `$STUB_EXIT`, or `$STUB_CHECK_EXIT`
//! and a JSON line for `--check`), `logger` (appends its arguments to a file)
//! and `date` (prints `$STUB_DOW` for `+%u`, so the weekly check day is under
//! the test's control).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DEST: &str = "backup@backup.example.org:/srv/images/";
/// Separates the recorded invocations of the stub vmsync.
const END: &str = "@@END@@";

fn script() -> PathBuf {
    Path::new(ROOT).join("examples/nightly-backup.sh")
}

fn read(rel: &str) -> String {
    let p = Path::new(ROOT).join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// Writes an executable script. The executable itself is written by a `cp`
/// child, never through a descriptor of this (multi-threaded) process: a
/// child forked meanwhile by another test would inherit that descriptor and
/// make executing the file fail with ETXTBSY.
fn write_exe(path: &Path, text: &str) {
    let src = path.with_extension("src");
    fs::write(&src, text).unwrap();
    let st = Command::new("cp").arg(&src).arg(path).status().unwrap();
    assert!(st.success(), "cp {}: {st}", src.display());
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

const STUB_VMSYNC: &str = r#"#!/bin/sh
for a in "$@"; do printf '%s\n' "$a"; done >>"$STUB_ARGV"
printf '%s\n' '@@END@@' >>"$STUB_ARGV"
case " $* " in
    *" --check "*)
        code=${STUB_CHECK_EXIT:-0}
        if [ "$code" = 1 ]; then identical=false; else identical=true; fi
        printf '{"identical":%s,"differing_bytes":4096,"difference_count":1,"exit_code":%s}\n' \
            "$identical" "$code"
        exit "$code"
        ;;
esac
exit "${STUB_EXIT:-0}"
"#;

const STUB_LOGGER: &str = r#"#!/bin/sh
printf '%s\n' "$*" >>"$STUB_SYSLOG"
"#;

const STUB_DATE: &str = r#"#!/bin/sh
case "$1" in
    +%u) printf '%s\n' "${STUB_DOW:?}" ;;
    *) echo "stub date: unexpected arguments: $*" >&2; exit 99 ;;
esac
"#;

/// A temporary directory with the stubs, two images and an ssh key.
struct Fixture {
    dir: tempfile::TempDir,
    images: Vec<PathBuf>,
}

/// What one run of the script did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stderr: String,
    /// The stub vmsync's argv, one entry per invocation.
    calls: Vec<Vec<String>>,
    /// The stub logger's lines.
    syslog: String,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        write_exe(&bin.join("vmsync"), STUB_VMSYNC);
        write_exe(&bin.join("logger"), STUB_LOGGER);
        write_exe(&bin.join("date"), STUB_DATE);
        let img_dir = dir.path().join("images");
        fs::create_dir(&img_dir).unwrap();
        // A space in a name: the script must quote every expansion.
        let images = vec![img_dir.join("web.qcow2"), img_dir.join("db one.raw")];
        for img in &images {
            fs::write(img, b"disk image").unwrap();
        }
        fs::write(dir.path().join("key"), b"not really a key").unwrap();
        fs::create_dir(dir.path().join("metrics")).unwrap();
        Fixture { dir, images }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn metrics(&self) -> String {
        self.path("metrics/vmsync.prom").display().to_string()
    }

    fn key(&self) -> String {
        self.path("key").display().to_string()
    }

    /// The images as VMSYNC_IMAGES holds them: one per line, with a comment
    /// and a blank line that the script must skip.
    fn image_lines(&self) -> String {
        let mut s = String::from("# the VMs\n\n");
        for img in &self.images {
            s.push_str(&format!("  {}\n", img.display()));
        }
        s
    }

    fn dest_of(&self, img: &Path) -> String {
        format!("{DEST}{}", img.file_name().unwrap().to_str().unwrap())
    }

    /// Runs the script under `shell` with the stub vmsync exiting `stub_exit`;
    /// `vars` add to or override the defaults (a Wednesday, images, dest,
    /// metrics file and key of this fixture).
    fn run_with(&self, shell: &str, stub_exit: i32, vars: &[(&str, &str)]) -> Run {
        let argv_file = self.path("argv");
        let syslog_file = self.path("syslog");
        let _ = fs::remove_file(&argv_file);
        let _ = fs::remove_file(&syslog_file);
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        let mut cmd = Command::new(shell);
        cmd.arg(script());
        // Nothing from the caller's environment steers the script.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("VMSYNC_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("PATH", path)
            .env("STUB_ARGV", &argv_file)
            .env("STUB_SYSLOG", &syslog_file)
            .env("STUB_EXIT", stub_exit.to_string())
            .env("STUB_DOW", "3")
            .env("VMSYNC_IMAGES", self.image_lines())
            .env("VMSYNC_DEST", DEST)
            .env("VMSYNC_METRICS", self.metrics())
            .env("VMSYNC_SSH_KEY", self.key());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {shell}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.is_empty(),
            "the script prints nothing on stdout, got {stdout:?}"
        );
        let recorded = fs::read_to_string(&argv_file).unwrap_or_default();
        let mut calls = Vec::new();
        let mut cur = Vec::new();
        for line in recorded.lines() {
            if line == END {
                calls.push(std::mem::take(&mut cur));
            } else {
                cur.push(line.to_string());
            }
        }
        assert!(cur.is_empty(), "unterminated record: {recorded:?}");
        Run {
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            calls,
            syslog: fs::read_to_string(&syslog_file).unwrap_or_default(),
        }
    }

    fn run(&self, stub_exit: i32, vars: &[(&str, &str)]) -> Run {
        self.run_with("sh", stub_exit, vars)
    }
}

/// The value that follows `flag` in `args`.
fn value_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

fn has(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| a == flag)
}

/// Asserts one sync call: options, then `--`, the source and the destination.
fn assert_sync_call(f: &Fixture, call: &[String], img: &Path) {
    assert!(has(call, "-q"), "{call:?}");
    assert_eq!(value_of(call, "--timeout"), Some("600"), "{call:?}");
    assert_eq!(
        value_of(call, "--metrics-file"),
        Some(f.metrics().as_str()),
        "{call:?}"
    );
    let rsh = value_of(call, "-e").unwrap_or_else(|| panic!("no -e in {call:?}"));
    assert!(rsh.starts_with("ssh "), "{rsh}");
    assert!(rsh.contains(&format!("-i '{}'", f.key())), "{rsh}");
    assert!(!has(call, "--check"), "{call:?}");
    let n = call.len();
    assert!(n >= 3, "{call:?}");
    assert_eq!(call[n - 3], "--", "{call:?}");
    assert_eq!(call[n - 2], img.display().to_string(), "{call:?}");
    assert_eq!(call[n - 1], f.dest_of(img), "{call:?}");
}

#[test]
fn script_parses_with_bash_n() {
    let st = Command::new("bash")
        .arg("-n")
        .arg(script())
        .status()
        .unwrap();
    assert!(st.success(), "bash -n: {st}");
}

#[test]
fn script_parses_with_sh_n() {
    // The script is POSIX sh (#!/bin/sh): it must parse under dash too.
    let first = read("examples/nightly-backup.sh");
    assert!(first.starts_with("#!/bin/sh\n"), "shebang changed");
    let st = Command::new("sh").arg("-n").arg(script()).status().unwrap();
    assert!(st.success(), "sh -n: {st}");
}

#[test]
fn script_is_executable() {
    let mode = fs::metadata(script()).unwrap().permissions().mode();
    assert!(mode & 0o111 != 0, "mode {mode:o}");
}

#[test]
fn script_is_shellcheck_clean_when_shellcheck_is_installed() {
    let out = match Command::new("shellcheck").arg(script()).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("shellcheck not available ({e}); skipped");
            return;
        }
    };
    assert!(
        out.status.success(),
        "shellcheck:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn sync_passes_the_expected_arguments_and_is_silent_on_success() {
    let f = Fixture::new();
    for shell in ["sh", "bash"] {
        let r = f.run_with(shell, 0, &[]);
        assert_eq!(r.code, Some(0), "{shell}: {r:?}");
        assert_eq!(r.calls.len(), 2, "{shell}: one call per image: {r:?}");
        for (call, img) in r.calls.iter().zip(&f.images) {
            assert_sync_call(&f, call, img);
        }
        // Success prints nothing, so cron sends no mail; syslog has a record.
        assert_eq!(r.stderr, "", "{shell}");
        assert!(r.syslog.contains("synced to"), "{shell}: {}", r.syslog);
        assert!(!has(&r.calls[0], "--bwlimit"), "{:?}", r.calls[0]);
        assert!(!has(&r.calls[0], "--remote-path"), "{:?}", r.calls[0]);
    }
}

#[test]
fn images_can_come_from_a_list_file() {
    let f = Fixture::new();
    let list = f.path("images.list");
    fs::write(&list, f.image_lines()).unwrap();
    let list = list.display().to_string();
    let r = f.run(0, &[("VMSYNC_IMAGES", ""), ("VMSYNC_IMAGE_LIST", &list)]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.calls.len(), 2, "{r:?}");
    for (call, img) in r.calls.iter().zip(&f.images) {
        assert_sync_call(&f, call, img);
    }
}

#[test]
fn optional_settings_reach_vmsync() {
    let f = Fixture::new();
    let r = f.run(
        0,
        &[
            ("VMSYNC_BWLIMIT", "50M"),
            ("VMSYNC_REMOTE_PATH", "/opt/vmsync/bin/vmsync"),
            ("VMSYNC_TIMEOUT", "120"),
            ("VMSYNC_METRICS", ""),
            ("VMSYNC_SSH_KEY", ""),
            ("VMSYNC_DEST", "/mnt/backup"),
        ],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let call = &r.calls[0];
    assert_eq!(value_of(call, "--bwlimit"), Some("50M"), "{call:?}");
    assert_eq!(
        value_of(call, "--remote-path"),
        Some("/opt/vmsync/bin/vmsync"),
        "{call:?}"
    );
    assert_eq!(value_of(call, "--timeout"), Some("120"), "{call:?}");
    assert!(
        !has(call, "--metrics-file"),
        "empty VMSYNC_METRICS: {call:?}"
    );
    assert!(!value_of(call, "-e").unwrap().contains("-i"), "{call:?}");
    assert_eq!(call.last().unwrap(), "/mnt/backup/web.qcow2", "{call:?}");
}

#[test]
fn locked_destination_is_a_warning_not_a_failure() {
    let f = Fixture::new();
    let r = f.run(8, &[]);
    assert_eq!(r.code, Some(0), "exit 8 must not fail the run: {r:?}");
    assert_eq!(r.calls.len(), 2, "{r:?}");
    assert!(r.stderr.contains("warning"), "{}", r.stderr);
    assert!(r.stderr.contains("locked"), "{}", r.stderr);
    assert!(!r.stderr.contains(": err:"), "{}", r.stderr);
    assert!(r.syslog.contains("user.warning"), "{}", r.syslog);
}

#[test]
fn io_error_fails_the_run_after_trying_every_image() {
    let f = Fixture::new();
    for shell in ["sh", "bash"] {
        let r = f.run_with(shell, 3, &[]);
        assert_eq!(r.code, Some(1), "{shell}: {r:?}");
        assert_eq!(
            r.calls.len(),
            2,
            "{shell}: the second image is still tried: {r:?}"
        );
        assert!(r.stderr.contains("exit 3"), "{shell}: {}", r.stderr);
        assert!(r.stderr.contains("2 of 2"), "{shell}: {}", r.stderr);
        assert!(r.syslog.contains("user.err"), "{shell}: {}", r.syslog);
    }
}

#[test]
fn timeout_and_source_changed_are_failures() {
    let f = Fixture::new();
    for (code, says) in [(4, "silent"), (7, "snapshot")] {
        let r = f.run(code, &[]);
        assert_eq!(r.code, Some(1), "stub exit {code}: {r:?}");
        assert!(r.stderr.contains(says), "stub exit {code}: {}", r.stderr);
    }
}

#[test]
fn a_missing_image_fails_but_the_others_are_synced() {
    let f = Fixture::new();
    let gone = f.path("images/gone.raw");
    let lines = format!("{}\n{}\n", gone.display(), f.images[0].display());
    let r = f.run(0, &[("VMSYNC_IMAGES", &lines)]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert_eq!(r.calls.len(), 1, "{r:?}");
    assert_sync_call(&f, &r.calls[0], &f.images[0]);
    assert!(r.stderr.contains("gone.raw"), "{}", r.stderr);
}

#[test]
fn two_images_with_one_name_are_refused() {
    let f = Fixture::new();
    fs::create_dir(f.path("other")).unwrap();
    let twin = f.path("other/web.qcow2");
    fs::write(&twin, b"another disk").unwrap();
    let lines = format!("{}\n{}\n", f.images[0].display(), twin.display());
    let r = f.run(0, &[("VMSYNC_IMAGES", &lines)]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert_eq!(r.calls.len(), 1, "only the first is synced: {r:?}");
    assert!(r.stderr.contains("also named web.qcow2"), "{}", r.stderr);
}

#[test]
fn weekly_check_runs_on_the_check_day_only() {
    let f = Fixture::new();
    // Sunday, the default check day: sync then check, per image.
    let r = f.run(0, &[("STUB_DOW", "7")]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(r.calls.len(), 4, "{r:?}");
    for (pair, img) in r.calls.chunks(2).zip(&f.images) {
        assert_sync_call(&f, &pair[0], img);
        let check = &pair[1];
        assert!(has(check, "--check") && has(check, "--json"), "{check:?}");
        assert_eq!(value_of(check, "--timeout"), Some("600"), "{check:?}");
        assert_eq!(
            value_of(check, "--metrics-file"),
            Some(f.metrics().as_str()),
            "{check:?}"
        );
        assert_eq!(check[check.len() - 2], img.display().to_string());
        assert_eq!(check[check.len() - 1], f.dest_of(img));
    }
    assert_eq!(r.stderr, "", "identical copies print nothing");
    assert!(r.syslog.contains("is identical"), "{}", r.syslog);

    // Another check day, and the check switched off or forced.
    let r = f.run(0, &[("STUB_DOW", "7"), ("VMSYNC_CHECK_DAY", "1")]);
    assert_eq!(r.calls.len(), 2, "{r:?}");
    let r = f.run(0, &[("STUB_DOW", "7"), ("VMSYNC_CHECK", "never")]);
    assert_eq!(r.calls.len(), 2, "{r:?}");
    let r = f.run(0, &[("VMSYNC_CHECK", "always")]);
    assert_eq!(r.calls.len(), 4, "{r:?}");
    for call in r.calls.chunks(2).map(|p| &p[1]) {
        assert_eq!(value_of(call, "--sample"), None, "{call:?}");
    }

    // Sampled: every night, the day's seventh of each image.
    for dow in ["1", "5", "7"] {
        let r = f.run(0, &[("STUB_DOW", dow), ("VMSYNC_CHECK", "sampled")]);
        assert_eq!(r.code, Some(0), "{r:?}");
        assert_eq!(r.calls.len(), 4, "{r:?}");
        for pair in r.calls.chunks(2) {
            assert!(has(&pair[1], "--check"), "{pair:?}");
            assert_eq!(
                value_of(&pair[1], "--sample"),
                Some(format!("{dow}/7").as_str()),
                "{pair:?}"
            );
            assert_eq!(value_of(&pair[0], "--sample"), None, "{pair:?}");
        }
    }
}

#[test]
fn check_differences_are_logged_and_fail_the_run() {
    let f = Fixture::new();
    let r = f.run(0, &[("VMSYNC_CHECK", "always"), ("STUB_CHECK_EXIT", "1")]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert_eq!(r.calls.len(), 4, "{r:?}");
    assert!(
        r.syslog
            .contains("differs from the source in 4096 bytes (1 ranges)"),
        "{}",
        r.syslog
    );
    assert!(r.syslog.contains(r#""identical":false"#), "{}", r.syslog);
    assert!(r.stderr.contains("differs"), "{}", r.stderr);
}

#[test]
fn no_check_after_a_failed_sync() {
    let f = Fixture::new();
    let r = f.run(4, &[("VMSYNC_CHECK", "always")]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert_eq!(r.calls.len(), 2, "{r:?}");
    assert!(r.calls.iter().all(|c| !has(c, "--check")), "{r:?}");
}

#[test]
fn bad_settings_are_usage_errors_before_any_sync() {
    let f = Fixture::new();
    let missing_key = f.path("no-such-key").display().to_string();
    let cases: &[(&str, &str)] = &[
        ("VMSYNC_CHECK", "sometimes"),
        ("VMSYNC_CHECK_DAY", "0"),
        ("VMSYNC_TIMEOUT", "10m"),
        ("VMSYNC_IMAGES", "# nothing\n\n"),
        ("VMSYNC_SSH_KEY", &missing_key),
        ("VMSYNC_BIN", "vmsync-not-installed"),
    ];
    for (k, v) in cases {
        let r = f.run(0, &[(k, v)]);
        assert_eq!(r.code, Some(2), "{k}={v:?}: {r:?}");
        assert!(r.calls.is_empty(), "{k}={v:?}: {r:?}");
        assert!(!r.stderr.is_empty(), "{k}={v:?}: says why");
    }
}

/// Every line of a unit file is blank, a comment, `[Section]` or `Key=value`
/// (systemd has no trailing comments), and no key comes before a section.
fn assert_unit_syntax(name: &str, text: &str) {
    let mut section = None;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if t.starts_with('[') {
            assert!(
                t.ends_with(']') && t.len() > 2,
                "{name}:{n}: bad section {line:?}"
            );
            section = Some(t.to_string());
            continue;
        }
        let (key, value) = t
            .split_once('=')
            .unwrap_or_else(|| panic!("{name}:{n}: not Key=value: {line:?}"));
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "{name}:{n}: bad key {key:?}"
        );
        assert!(section.is_some(), "{name}:{n}: {key} outside a section");
        assert!(
            !value.contains(" #") && !value.ends_with('\\'),
            "{name}:{n}: trailing comment or continuation in {line:?}"
        );
    }
}

#[test]
fn systemd_service_is_a_hardened_oneshot() {
    let text = read("examples/systemd/vmsync-backup.service");
    assert_unit_syntax("vmsync-backup.service", &text);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for want in [
        "[Unit]",
        "[Service]",
        "Type=oneshot",
        "Nice=10",
        "IOSchedulingClass=idle",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
    ] {
        assert!(lines.contains(&want), "service lacks {want}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("ReadWritePaths=")),
        "service lacks ReadWritePaths="
    );
    // The script is installed where ExecStart looks for it.
    let exec = lines
        .iter()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    let readme = read("examples/README.md");
    assert!(
        readme.contains(&format!("examples/nightly-backup.sh {exec}")),
        "examples/README.md must install the script as {exec}"
    );
}

#[test]
fn systemd_timer_runs_nightly_and_catches_up() {
    let text = read("examples/systemd/vmsync-backup.timer");
    assert_unit_syntax("vmsync-backup.timer", &text);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for want in [
        "[Timer]",
        "OnCalendar=*-*-* 02:30",
        "RandomizedDelaySec=15m",
        "Persistent=true",
        "[Install]",
        "WantedBy=timers.target",
    ] {
        assert!(lines.contains(&want), "timer lacks {want}");
    }
    assert!(lines.iter().any(|l| l.starts_with("OnCalendar=")));
}

#[test]
fn unit_syntax_check_rejects_broken_lines() {
    for bad in [
        "[Service]\nType=oneshot # one run\n",
        "[Service]\njust words\n",
        "Type=oneshot\n[Service]\n",
        "[Service]\nExec Start=/bin/true\n",
    ] {
        let r = std::panic::catch_unwind(|| assert_unit_syntax("bad", bad));
        assert!(r.is_err(), "accepted {bad:?}");
    }
}

#[test]
fn authorized_keys_lines_are_restricted_forced_commands() {
    let text = read("examples/authorized_keys.example");
    let keys: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(keys.len() >= 2, "{keys:?}");
    for k in &keys {
        assert!(k.starts_with("command=\"vmsync --server --root /"), "{k}");
        assert!(k.contains("\",restrict ssh-ed25519 AAAA"), "{k}");
    }
    assert!(keys.iter().any(|k| !k.contains("--read-only")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("--read-only\"")), "{keys:?}");
}
