//! The Debian package (issue 14): `deploy/deb/build.sh` packages the binary
//! under test with cargo-deb; dpkg-deb shows the files, control fields and
//! conffiles it must have; `dpkg -i` installs it on this machine (a CI
//! machine, as root), and the installed files are used: `/usr/bin/vmsync`
//! syncs over the real sshd with the installed binary on both ends, the
//! job script of the `vmsync@` units syncs and checks (and fails on a copy
//! that differs), `systemd-analyze verify` accepts every installed unit, the
//! man page and the completions are the current ones. A guard purges the
//! package afterwards, also when the test fails.
//!
//! Not being root, or a missing cargo-deb, dpkg or systemd-analyze, is a
//! skip, and a failure under `VMSYNC_REQUIRE_LOOP=1` (CI). A vmsync package
//! that was installed before is a failure: the test would purge it.
//!
//! Other tests in this binary run `target/release/vmsync`, never
//! `/usr/bin/vmsync`, so installing is safe while they run. Two runs of this
//! test (from two checkouts) take turns on a lock file of their own, and
//! each dpkg call waits for dpkg's frontend lock, as apt takes it.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::common::*;
use crate::prom;

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Held while this test has the package installed.
const OWN_LOCK: &str = "/run/lock/vmsync-package-test.lock";
/// dpkg's and apt's lock: whoever holds it may run dpkg.
const DPKG_FRONTEND_LOCK: &str = "/var/lib/dpkg/lock-frontend";
const UNIT_DIRS: &[&str] = &["/usr/lib/systemd/system/", "/lib/systemd/system/"];

/// Every file of the package, and its mode as `dpkg-deb -c` prints it.
const FILES: &[(&str, &str)] = &[
    ("/usr/bin/vmsync", "-rwxr-xr-x"),
    ("/usr/share/man/man1/vmsync.1.gz", "-rw-r--r--"),
    (
        "/usr/share/bash-completion/completions/vmsync",
        "-rw-r--r--",
    ),
    ("/usr/share/zsh/vendor-completions/_vmsync", "-rw-r--r--"),
    (
        "/usr/share/fish/vendor_completions.d/vmsync.fish",
        "-rw-r--r--",
    ),
    ("/usr/lib/systemd/system/vmsync@.service", "-rw-r--r--"),
    ("/usr/lib/systemd/system/vmsync@.timer", "-rw-r--r--"),
    ("/usr/lib/vmsync/vmsync-job", "-rwxr-xr-x"),
    ("/etc/vmsync/example.env", "-rw-r--r--"),
    ("/usr/share/doc/vmsync/README.md", "-rw-r--r--"),
    ("/usr/share/doc/vmsync/changelog.gz", "-rw-r--r--"),
    ("/usr/share/doc/vmsync/changelog.Debian.gz", "-rw-r--r--"),
    ("/usr/share/doc/vmsync/copyright", "-rw-r--r--"),
    ("/usr/share/doc/vmsync/examples/README.md", "-rw-r--r--"),
    (
        "/usr/share/doc/vmsync/examples/nightly-backup.sh",
        "-rw-r--r--",
    ),
    (
        "/usr/share/doc/vmsync/examples/authorized_keys.example",
        "-rw-r--r--",
    ),
    (
        "/usr/share/doc/vmsync/examples/systemd/vmsync-backup.service",
        "-rw-r--r--",
    ),
    (
        "/usr/share/doc/vmsync/examples/systemd/vmsync-backup.timer",
        "-rw-r--r--",
    ),
];

#[test]
fn package_builds_installs_syncs_over_ssh_and_purges() {
    if !can_run() {
        return;
    }
    let tmp = tempdir();
    let deb = build(tmp.path());
    inspect(&deb);

    let installed = Installed::install(&deb);
    assert_eq!(
        run_ok(Command::new("/usr/bin/vmsync").arg("--version")),
        format!("vmsync {VERSION}\n"),
        "the installed binary's version"
    );
    man_page_and_completions_are_current();
    units_verify();
    if let Some(sshd) = Sshd::start() {
        installed_binary_syncs_over_ssh(&sshd, tmp.path());
        job_syncs_checks_and_fails_on_a_difference(&sshd, tmp.path());
    }
    installed.purge();
    assert!(
        !Path::new("/usr/bin/vmsync").exists(),
        "dpkg --purge vmsync left /usr/bin/vmsync"
    );
    assert!(
        !Path::new("/etc/vmsync/example.env").exists(),
        "dpkg --purge vmsync left its conffile"
    );
}

/// Whether the test can run here; else it says why, and fails instead when
/// `VMSYNC_REQUIRE_LOOP=1`.
fn can_run() -> bool {
    // SAFETY: plain syscall.
    let root = unsafe { libc::geteuid() } == 0;
    let why = if !root {
        Some("not root (dpkg -i)".to_string())
    } else {
        [
            (
                cargo(),
                &["deb", "--version"][..],
                "cargo-deb (cargo install --locked cargo-deb --version 3.8.0)",
            ),
            ("dpkg".into(), &["--version"][..], "dpkg"),
            ("dpkg-deb".into(), &["--version"][..], "dpkg-deb"),
            (
                "systemd-analyze".into(),
                &["--version"][..],
                "systemd-analyze (apt-get install systemd)",
            ),
        ]
        .into_iter()
        .find(|(cmd, args, _)| !succeeds(Command::new(cmd).args(*args)))
        .map(|(_, _, what)| format!("{what} is missing"))
    };
    let Some(why) = why else { return true };
    if std::env::var_os("VMSYNC_REQUIRE_LOOP").is_some_and(|v| v == "1") {
        panic!("the package test is required (VMSYNC_REQUIRE_LOOP=1), but {why}");
    }
    eprintln!("package test skipped: {why}");
    false
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd`, which must succeed; its stdout.
#[track_caller]
fn run_ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", describe(&out));
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[track_caller]
fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// The package of the binary under test: `build.sh --no-build` against its
/// target directory, so nothing is compiled again.
fn build(out_dir: &Path) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = bin().parent().and_then(Path::parent).expect("target dir");
    let printed = run_ok(
        Command::new("sh")
            .arg(manifest.join("deploy/deb/build.sh"))
            .args(["--no-build", "--fast", "--output"])
            .arg(out_dir)
            .env("CARGO_TARGET_DIR", target)
            .current_dir(manifest),
    );
    let deb = PathBuf::from(printed.trim_end());
    let arch = run_ok(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(
        deb,
        out_dir.join(format!("vmsync_{VERSION}-1_{}.deb", arch.trim())),
        "build.sh prints the path of the package"
    );
    assert!(deb.is_file(), "{} is not a file", deb.display());
    deb
}

/// Control fields, conffiles, maintainer scripts and the file list.
fn inspect(deb: &Path) {
    let field = |name: &str| {
        run_ok(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name))
            .trim_end()
            .to_string()
    };
    assert_eq!(field("Package"), "vmsync");
    assert_eq!(
        field("Version"),
        format!("{VERSION}-1"),
        "Cargo.toml's version"
    );
    let depends = field("Depends");
    assert!(depends.starts_with("libc6 (>="), "Depends: {depends}");
    assert_eq!(field("Recommends"), "openssh-client");
    assert_eq!(
        run_ok(
            Command::new("dpkg-deb")
                .arg("--info")
                .arg(deb)
                .arg("conffiles")
        ),
        "/etc/vmsync/example.env\n"
    );
    for script in ["postinst", "postrm"] {
        let text = run_ok(Command::new("dpkg-deb").arg("--info").arg(deb).arg(script));
        assert!(text.starts_with("#!/bin/sh\n"), "{script}:\n{text}");
    }

    let listing = run_ok(Command::new("dpkg-deb").arg("--contents").arg(deb));
    // "-rw-r--r-- 0/0 4852 2026-12-03 00:00 ./usr/share/…": mode and path.
    let mut files: Vec<(String, String)> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cols.len(), 6, "dpkg-deb -c line: {l}");
            (
                cols[5].trim_start_matches('.').to_string(),
                cols[0].to_string(),
            )
        })
        .collect();
    files.sort();
    let mut want: Vec<(String, String)> = FILES
        .iter()
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect();
    want.sort();
    assert_eq!(files, want, "the package's files and modes:\n{listing}");
}

/// The installed man page is `man/vmsync.1` (which `man::` keeps current),
/// and the completions are the installed binary's own; bash loads its file.
fn man_page_and_completions_are_current() {
    let page = "/usr/share/man/man1/vmsync.1.gz";
    if succeeds(Command::new("man").arg("--version")) {
        assert_eq!(
            run_ok(Command::new("man").args(["-w", "vmsync"])),
            format!("{page}\n")
        );
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        run_ok(Command::new("gzip").args(["-dc", page])).as_bytes()
            == std::fs::read(manifest.join("man/vmsync.1")).unwrap(),
        "{page} is not man/vmsync.1"
    );
    for (shell, path) in [
        ("bash", "/usr/share/bash-completion/completions/vmsync"),
        ("zsh", "/usr/share/zsh/vendor-completions/_vmsync"),
        ("fish", "/usr/share/fish/vendor_completions.d/vmsync.fish"),
    ] {
        let generated = run_ok(Command::new("/usr/bin/vmsync").args(["--completions", shell]));
        assert!(
            std::fs::read_to_string(path).unwrap() == generated,
            "{path} is not `vmsync --completions {shell}`"
        );
    }
    let complete = run_ok(Command::new("bash").args([
        "--norc",
        "-c",
        "source /usr/share/bash-completion/completions/vmsync && complete -p vmsync",
    ]));
    assert!(
        complete.starts_with("complete ") && complete.trim_end().ends_with(" vmsync"),
        "complete -p vmsync: {complete}"
    );
}

/// `systemd-analyze verify` on every unit file the package installed: exit
/// 0, and no complaint about a vmsync unit (others' noise is only shown).
fn units_verify() {
    let listed = run_ok(Command::new("dpkg").args(["-L", "vmsync"]));
    let units: Vec<&str> = listed
        .lines()
        .filter(|l| {
            UNIT_DIRS
                .iter()
                .any(|d| l.starts_with(d) && l.len() > d.len())
        })
        .collect();
    assert_eq!(units.len(), 2, "unit files installed: {units:?}");
    let out = output(Command::new("systemd-analyze").arg("verify").args(&units));
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("systemd-analyze verify {units:?}:\n{stderr}");
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let about_ours: Vec<&str> = stderr.lines().filter(|l| l.contains("vmsync")).collect();
    assert!(
        about_ours.is_empty(),
        "systemd-analyze verify warns: {about_ours:?}"
    );
}

/// `/usr/bin/vmsync` pushes a file through the real sshd to `/usr/bin/vmsync
/// --server`.
fn installed_binary_syncs_over_ssh(sshd: &Sshd, tmp: &Path) {
    let src = tmp.join("push-src.img");
    let dst = tmp.join("push-dst.img");
    let data = mixed_bytes(1401, (3 * MIB) as usize);
    write_file(&src, &data);
    let out = output(
        Command::new("/usr/bin/vmsync")
            .args(["--timeout", "60", "-e"])
            .arg(sshd.rsh())
            .args(["--remote-path", "/usr/bin/vmsync", "--"])
            .arg(&src)
            .arg(sshd.remote(&dst))
            .env("VMSYNC_CACHE_DIR", tmp.join("cache")),
    );
    assert!(
        out.status.success(),
        "the installed vmsync failed ({}): {}\nsshd's log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        sshd.log()
    );
    assert_content(&dst, &data);
}

/// `/usr/lib/vmsync/vmsync-job FILE`, what `vmsync@NAME.service` runs, on a
/// settings file like `/etc/vmsync/example.env`: a sync and a full sampled
/// check, both in the metrics; a destination that differs behind an
/// unchanged size and mtime (so the sync finds it up to date) fails the
/// job's check with exit 1; a file without VMSYNC_DEST runs nothing (2).
fn job_syncs_checks_and_fails_on_a_difference(sshd: &Sshd, tmp: &Path) {
    let src = tmp.join("job-src.img");
    let dst = tmp.join("job-dst.img");
    let data = mixed_bytes(1402, (2 * MIB) as usize);
    write_file(&src, &data);
    write_file(&dst, &mixed_bytes(1403, (2 * MIB) as usize));
    let metrics = tmp.join("vmsync.prom");
    let dest = sshd.remote(&dst);
    let env = tmp.join("job.env");
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let settings = format!(
        "# as in /etc/vmsync/example.env\n\
         VMSYNC_SOURCE={}\nVMSYNC_DEST={}\nVMSYNC_SSH={}\n\
         VMSYNC_REMOTE_PATH=/usr/bin/vmsync\nVMSYNC_TIMEOUT=60\nVMSYNC_METRICS={}\n\
         VMSYNC_OPTIONS=\"--no-partial\"\nVMSYNC_CHECK_SLICES=1\n",
        quote(&src.to_string_lossy()),
        quote(&dest),
        quote(&sshd.rsh()),
        quote(&metrics.to_string_lossy()),
    );
    write_file(&env, settings.as_bytes());
    let job = |env: &Path| {
        output(
            Command::new("/usr/lib/vmsync/vmsync-job")
                .arg(env)
                .env("VMSYNC_CACHE_DIR", tmp.join("cache")),
        )
    };
    let explain =
        |out: &Output| format!("vmsync-job: {}\nsshd's log:\n{}", describe(out), sshd.log());

    let out = job(&env);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_content(&dst, &data);
    let (text, m) = read_metrics(&metrics);
    for mode in ["sync", "check"] {
        let labels = [("destination", dest.as_str()), ("mode", mode)];
        assert_eq!(
            prom::get(&m, "vmsync_last_exit_code", &labels),
            Some(0.0),
            "{mode}:\n{text}"
        );
    }

    // One byte changed in place, size and mtime put back: the sync's quick
    // check sees the copy as current, only the check reads the difference.
    let mtime = mtime_ns(&dst);
    patch_file(&dst, MIB + 7, &[!data[(MIB + 7) as usize]]);
    set_mtime_ns(&dst, mtime);
    let out = job(&env);
    assert_eq!(
        out.status.code(),
        Some(exit::DIFFERENT),
        "{}",
        explain(&out)
    );
    let (text, m) = read_metrics(&metrics);
    let labels = [("destination", dest.as_str()), ("mode", "check")];
    let differing = prom::get(&m, "vmsync_differing_bytes", &labels);
    assert!(
        differing.is_some_and(|b| b > 0.0),
        "a check that found the changed byte:\n{text}"
    );
    assert_eq!(
        prom::get(&m, "vmsync_last_exit_code", &labels),
        Some(1.0),
        "{text}"
    );

    let bad = tmp.join("bad.env");
    write_file(
        &bad,
        settings.replace("VMSYNC_DEST=", "#VMSYNC_DEST=").as_bytes(),
    );
    let out = job(&bad);
    assert_eq!(out.status.code(), Some(exit::USAGE), "{}", explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("VMSYNC_DEST is not set"),
        "{}",
        explain(&out)
    );
}

/// The metrics file's text and samples.
fn read_metrics(path: &Path) -> (String, Vec<prom::Sample>) {
    let text = std::fs::read_to_string(path).expect("the job wrote metrics");
    let samples = prom::parse(&text).unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{text}"));
    (text, samples)
}

/// The package installed by this test, purged on drop (a failed assertion
/// too). Holds [`OWN_LOCK`] meanwhile.
struct Installed {
    purged: bool,
    _own: File,
}

impl Installed {
    fn install(deb: &Path) -> Installed {
        let own = lock(Path::new(OWN_LOCK));
        let status = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", "vmsync"]));
        let status = String::from_utf8_lossy(&status.stdout);
        assert!(
            !status.contains("installed"),
            "a vmsync package is installed on this machine ({status}): remove it \
             (dpkg --purge vmsync) before the package test, which purges it"
        );
        // From here on, whatever happens, the guard purges.
        let installed = Installed {
            purged: false,
            _own: own,
        };
        let out = dpkg(&[OsStr::new("-i"), deb.as_os_str()]);
        assert!(
            out.status.success(),
            "dpkg -i {}: {}",
            deb.display(),
            describe(&out)
        );
        installed
    }

    /// Purges the package: a failure of the test that got this far.
    fn purge(mut self) {
        self.purged = true;
        let out = purge();
        assert!(
            out.status.success(),
            "dpkg --purge vmsync: {}",
            describe(&out)
        );
    }
}

fn purge() -> Output {
    dpkg(&["--purge".as_ref(), "vmsync".as_ref()])
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.purged {
            let out = purge();
            if !out.status.success() {
                eprintln!("cleanup: dpkg --purge vmsync: {}", describe(&out));
            }
        }
    }
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n---- stdout:\n{}\n---- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// dpkg ARGS, once dpkg's frontend lock is ours: waiting for an apt or dpkg
/// run that holds it, where dpkg itself would give up at once.
fn dpkg(args: &[&OsStr]) -> Output {
    let _frontend = lock(Path::new(DPKG_FRONTEND_LOCK));
    Command::new("dpkg")
        .args(args)
        .env("DPKG_FRONTEND_LOCKED", "1")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .expect("run dpkg")
}

/// Waits for a write lock on all of `path` (fcntl, as dpkg and apt lock),
/// held until the returned file is dropped.
fn lock(path: &Path) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: an all-zero flock is a valid value (a lock of the whole file
    // from offset 0); the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    loop {
        // SAFETY: fcntl on an open descriptor with a valid flock.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLKW, &fl) } == 0 {
            return file;
        }
        let err = std::io::Error::last_os_error();
        assert!(
            err.kind() == std::io::ErrorKind::Interrupted,
            "lock {}: {err}",
            path.display()
        );
    }
}
