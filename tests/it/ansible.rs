//! The Ansible role (`deploy/ansible`, issue 14 item 2), run for real with
//! `ansible-playbook -c local` against this machine, which is both the
//! backup host and the hypervisor. Everything it installs goes to a
//! temporary directory (binary, units, keys, copies, textfile), except the
//! two throwaway system accounts it creates, which a guard removes.
//!
//! The test proves what the role promises, from outside: the authorized_keys
//! line byte for byte, the units (and `systemd-analyze verify` on each), a
//! second run that changes nothing; then, through the real sshd of
//! `tests/it/common` reading the role's authorized_keys, that the key syncs
//! an image under the root and is refused outside it or for writing, and
//! that the units' own command lines (parsed from the files and run as
//! their `User=`) pull, record the drill digest, check and drill, writing
//! the metrics the alerts read.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::*;
use crate::prom;

fn site_yml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ansible/site.yml")
}

/// Whether this test can run here: root (it creates accounts) and the
/// tools. Otherwise a skip with the reason, or a failure under
/// `VMSYNC_REQUIRE_LOOP=1`.
fn can_run(test: &str) -> bool {
    // SAFETY: plain syscall.
    let root = unsafe { libc::geteuid() } == 0;
    let missing = ["ansible-playbook", "systemd-analyze", "setpriv"]
        .into_iter()
        .find(|tool| {
            !Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    let why = match (root, missing) {
        (false, _) => "it creates system accounts, which needs root".to_string(),
        (true, Some(tool)) => format!("{tool} is not installed"),
        (true, None) => return true,
    };
    assert!(
        std::env::var_os("VMSYNC_REQUIRE_LOOP").is_none(),
        "{test}: required (VMSYNC_REQUIRE_LOOP is set), but {why}"
    );
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// Removes the accounts the role created, whatever happened.
struct Accounts(Vec<String>);

impl Drop for Accounts {
    fn drop(&mut self) {
        for name in &self.0 {
            // userdel also drops the account's own group, where it can.
            let _ = Command::new("userdel")
                .arg(name)
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("groupdel")
                .arg(name)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The fields of an account's line in a `getent` database.
fn getent(db: &str, name: &str) -> Vec<String> {
    let out = Command::new("getent").args([db, name]).output().unwrap();
    assert!(out.status.success(), "no {db} entry {name}");
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .split(':')
        .map(String::from)
        .collect()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// One playbook run's exit code, output and the recap's `changed=`.
struct Play {
    code: i32,
    output: String,
}

impl Play {
    #[track_caller]
    fn changed(&self) -> u32 {
        let recap = self
            .output
            .lines()
            .rev()
            .find(|l| l.starts_with("localhost") && l.contains("changed="))
            .unwrap_or_else(|| panic!("no PLAY RECAP line:\n{}", self.output));
        recap
            .split_whitespace()
            .find_map(|w| w.strip_prefix("changed="))
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// Runs `site.yml` on localhost with a connection of type local and the
/// variables in `vars`; Ansible's own state stays in `tmp`.
fn playbook(tmp: &Path, vars: &serde_json::Value) -> Play {
    let inventory = tmp.join("inventory");
    write_file(
        &inventory,
        b"[vmsync_backup]\nlocalhost\n[vmsync_hypervisors]\nlocalhost\n",
    );
    let vars_file = tmp.join("vars.json");
    write_file(&vars_file, vars.to_string().as_bytes());
    let out = Command::new("timeout")
        .arg("300")
        .arg("ansible-playbook")
        .arg("-i")
        .arg(&inventory)
        .args(["-c", "local"])
        .arg("-e")
        .arg(format!("@{}", vars_file.display()))
        .arg(site_yml())
        .current_dir(tmp)
        .env("ANSIBLE_HOME", tmp.join("ansible/home"))
        .env("ANSIBLE_LOCAL_TEMP", tmp.join("ansible/local"))
        .env("ANSIBLE_REMOTE_TEMP", tmp.join("ansible/remote"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .env_remove("ANSIBLE_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run ansible-playbook");
    Play {
        code: out.status.code().unwrap_or(-1),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

// ---------------------------------------------------------------------------
// Reading the units the role wrote
// ---------------------------------------------------------------------------

/// The `[Service]` settings of a unit file, in order, continuation lines
/// joined (`KEY=VALUE` pairs; comments dropped).
fn service_settings(text: &str) -> Vec<(String, String)> {
    let mut joined = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        if pending.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                pending.push_str(part);
                pending.push(' ');
            }
            None => {
                pending.push_str(line);
                joined.push(std::mem::take(&mut pending));
            }
        }
    }
    let mut in_service = false;
    let mut out = Vec::new();
    for line in joined {
        let line = line.trim();
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if let (true, Some((k, v))) = (in_service, line.split_once('=')) {
            out.push((k.to_string(), v.trim().to_string()));
        }
    }
    out
}

/// Splits a systemd command line into words: blanks separate, double or
/// single quotes group (with backslash escapes inside double quotes). The
/// role writes neither specifiers (`%`) nor variables (`$`), and this test
/// holds it to that, so they need no expansion here.
fn command_words(line: &str) -> Vec<String> {
    assert!(
        !line.contains('%') && !line.contains('$'),
        "unexpected specifier or variable in {line:?}"
    );
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        let mut word = String::new();
        if first == '"' || first == '\'' {
            chars.next();
            loop {
                match chars.next() {
                    Some(c) if c == first => break,
                    Some('\\') if first == '"' => word.extend(chars.next()),
                    Some(c) => word.push(c),
                    None => panic!("unterminated quote in {line:?}"),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        words.push(word);
    }
    words
}

/// A unit file, read back.
struct Unit {
    name: String,
    text: String,
    settings: Vec<(String, String)>,
}

impl Unit {
    fn read(dir: &Path, name: &str) -> Unit {
        let text = fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("unit {name} not written: {e}"));
        Unit {
            name: name.to_string(),
            settings: service_settings(&text),
            text,
        }
    }

    /// Every value of a `[Service]` setting.
    fn all(&self, key: &str) -> Vec<&str> {
        self.settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[track_caller]
    fn one(&self, key: &str) -> &str {
        match self.all(key)[..] {
            [v] => v,
            ref vs => panic!("{}: {key}= {vs:?}, not one value\n{}", self.name, self.text),
        }
    }

    /// Runs one of the unit's command lines (ExecStart=, ExecStartPost=) as
    /// systemd would: as its User= and Group=, in /, with its Environment=
    /// and the few variables systemd itself sets.
    fn exec(&self, key: &str, home: &Path) -> Run {
        let words = command_words(self.one(key));
        let user = self.one("User");
        let group = self.one("Group");
        let mut cmd = Command::new("timeout");
        cmd.arg("120")
            .arg("setpriv")
            .arg(format!("--reuid={user}"))
            .arg(format!("--regid={group}"))
            .arg("--clear-groups")
            .arg("--")
            .args(&words)
            .current_dir("/")
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", home)
            .env("USER", user)
            .env("LOGNAME", user)
            .stdin(Stdio::null());
        for env in self.all("Environment") {
            let (k, v) = env.split_once('=').expect("Environment=KEY=value");
            cmd.env(k, v);
        }
        let start = std::time::Instant::now();
        let out = cmd.output().expect("run setpriv");
        Run {
            code: out.status.code().unwrap_or(-1),
            signal: None,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            args: words,
            elapsed: start.elapsed(),
        }
    }
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// The directory of the harness sshd's files: its client key's, from
/// `-i KEY` in its `-e` command. Its `authorized_keys` there is read
/// afresh on every connection, and `host_ed25519.pub` is its host key.
fn sshd_dir(sshd: &Sshd) -> PathBuf {
    let rsh = sshd.rsh();
    let mut words = rsh.split_whitespace();
    words.find(|w| *w == "-i").expect("-i in the sshd's rsh");
    let key = words.next().unwrap().trim_matches('\'');
    Path::new(key).parent().unwrap().to_path_buf()
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn metrics(path: &Path) -> Vec<prom::Sample> {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("metrics file {}: {e}", path.display()));
    prom::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn the_role_sets_up_a_restricted_scheduled_and_monitored_pull() {
    let test = "the_role_sets_up_a_restricted_scheduled_and_monitored_pull";
    if !can_run(test) {
        return;
    }
    let Some(sshd) = Sshd::start() else { return };
    let tmp = tempdir();
    let t = tmp.path();
    // The accounts walk through it to their homes, images and copies.
    chmod(t, 0o755);
    let pid = std::process::id();
    let (server, backup) = (format!("vmsynct{pid}h"), format!("vmsynct{pid}b"));
    let _accounts = Accounts(vec![server.clone(), backup.clone()]);

    let sshd_dir = sshd_dir(&sshd);
    let authorized_keys = sshd_dir.join("authorized_keys");
    // Only the role's line: no unrestricted test key beside it.
    write_file(&authorized_keys, b"");
    let images = t.join("images");
    let outside = t.join("outside");
    fs::create_dir(&images).unwrap();
    fs::create_dir(&outside).unwrap();
    let image = images.join("disk.img");
    let data = mixed_bytes(71, (3 * MIB + 4321) as usize);
    write_file(&image, &data);
    let secret = outside.join("secret.img");
    write_file(&secret, &random_bytes(72, 64 * KIB as usize));
    for f in [&image, &secret] {
        chmod(f, 0o644);
    }

    let p = |rel: &str| t.join(rel).display().to_string();
    let vmsync_bin = p("bin/vmsync");
    let units = t.join("units");
    let vars = serde_json::json!({
        "vmsync_install": "binary",
        "vmsync_binary_src": bin(),
        "vmsync_bin": vmsync_bin,
        "vmsync_libexec_dir": p("libexec"),
        "vmsync_server_user": server,
        "vmsync_server_home": p("server-home"),
        "vmsync_server_root": images,
        "vmsync_authorized_keys_file": authorized_keys,
        "vmsync_ssh_address": "127.0.0.1",
        "vmsync_ssh_port": sshd.port(),
        "vmsync_host_key_file": sshd_dir.join("host_ed25519.pub"),
        "vmsync_images": [{
            "name": "disk",
            "hypervisor": "localhost",
            "path": image,
            "on_calendar": "*-*-* 03:15",
            "sample_slices": 5,
        }],
        "vmsync_backup_user": backup,
        "vmsync_backup_home": p("backup-home"),
        "vmsync_backup_dir": p("backup"),
        "vmsync_known_hosts_file": p("etc/known_hosts"),
        "vmsync_textfile_dir": p("textfile"),
        "vmsync_cache_dir": p("cache"),
        "vmsync_unit_dir": units,
        "vmsync_systemd": false,
        "vmsync_timeout": 120,
        "vmsync_bwlimit": "50M",
        "vmsync_drill": true,
        "vmsync_drill_script": p("bin/vmsync-restore-drill"),
        "vmsync_drill_scratch": p("scratch"),
        "vmsync_drill_digests": p("digests"),
    });

    let play = playbook(t, &vars);
    assert_eq!(play.code, 0, "first run:\n{}", play.output);
    assert!(play.changed() > 0, "{}", play.output);

    // The hypervisor's key line, byte for byte.
    let pubkey = fs::read_to_string(t.join("backup-home/.ssh/id_ed25519.pub")).unwrap();
    let pubkey = pubkey.trim();
    assert!(pubkey.starts_with("ssh-ed25519 "), "{pubkey}");
    assert_eq!(
        fs::read_to_string(&authorized_keys).unwrap(),
        format!(
            "command=\"{vmsync_bin} --server --root {} --read-only\",restrict {pubkey}\n",
            images.display()
        )
    );
    // The hypervisor's host key, pinned for its port.
    let host_key = fs::read_to_string(sshd_dir.join("host_ed25519.pub")).unwrap();
    let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
    let known_hosts = fs::read_to_string(t.join("etc/known_hosts")).unwrap();
    let pinned: Vec<&str> = known_hosts
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert_eq!(
        pinned,
        [format!(
            "[127.0.0.1]:{} {}",
            sshd.port(),
            host_key.join(" ")
        )]
    );

    // The units.
    let mut names = dir_entries(&units);
    names.sort();
    assert_eq!(
        names,
        [
            "vmsync-check-disk.service",
            "vmsync-check-disk.timer",
            "vmsync-drill.service",
            "vmsync-drill.timer",
            "vmsync-pull-disk.service",
            "vmsync-pull-disk.timer",
        ]
    );
    let pull = Unit::read(&units, "vmsync-pull-disk.service");
    let check = Unit::read(&units, "vmsync-check-disk.service");
    let drill = Unit::read(&units, "vmsync-drill.service");
    let dest = p("backup/localhost/disk.img");
    let src = format!("{server}@127.0.0.1:{}", image.display());
    let metrics_file = p("textfile/vmsync.prom");
    let rsh = format!(
        "ssh -F none -p {} -i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes \
         -o BatchMode=yes -o IdentitiesOnly=yes -o ConnectTimeout=30",
        sshd.port(),
        p("backup-home/.ssh/id_ed25519"),
        p("etc/known_hosts")
    );
    let common = [
        "-q",
        "--timeout",
        "120",
        "--bwlimit",
        "50M",
        "-e",
        &rsh,
        "--metrics-file",
        &metrics_file,
        "--",
        &src,
        &dest,
    ];
    let want: Vec<&str> = [vmsync_bin.as_str()].into_iter().chain(common).collect();
    assert_eq!(command_words(pull.one("ExecStart")), want, "{}", pull.text);
    let sampled = p("libexec/vmsync-sampled-check");
    let want: Vec<&str> = [sampled.as_str(), "5", vmsync_bin.as_str()]
        .into_iter()
        .chain(common)
        .collect();
    assert_eq!(
        command_words(check.one("ExecStart")),
        want,
        "{}",
        check.text
    );
    assert_eq!(
        command_words(pull.one("ExecStartPost")),
        [p("bin/vmsync-restore-drill").as_str(), "--record", &dest]
    );
    assert_eq!(
        command_words(drill.one("ExecStart")),
        [p("bin/vmsync-restore-drill").as_str(), &dest]
    );
    for unit in [&pull, &check, &drill] {
        assert_eq!(unit.one("User"), backup, "{}", unit.text);
        assert_eq!(unit.one("Type"), "oneshot");
        assert_eq!(unit.one("ProtectSystem"), "strict");
    }
    let timer = |name: &str| fs::read_to_string(units.join(name)).unwrap();
    for (name, calendar) in [
        ("vmsync-pull-disk.timer", "*-*-* 03:15"),
        ("vmsync-check-disk.timer", "*-*-* 05:00"),
        ("vmsync-drill.timer", "Sat *-*-01..07 10:00"),
    ] {
        let text = timer(name);
        assert!(
            text.contains(&format!("\n[Timer]\nOnCalendar={calendar}\n"))
                && text.contains("\nPersistent=true\n")
                && text.contains("\nWantedBy=timers.target\n"),
            "{name}:\n{text}"
        );
    }

    // The same run again changes nothing.
    let again = playbook(t, &vars);
    assert_eq!(again.code, 0, "second run:\n{}", again.output);
    assert_eq!(again.changed(), 0, "second run:\n{}", again.output);

    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(names.iter().map(|n| units.join(n)))
        .output()
        .expect("run systemd-analyze");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {out:?}"
    );

    // What the timers would start, run as their User=.
    let home = t.join("backup-home");
    let before = now();
    let run = pull.exec("ExecStart", &home);
    assert_eq!(
        run.code,
        0,
        "the pull unit's command\n{run}\nsshd:\n{}",
        sshd.log()
    );
    assert_content(Path::new(&dest), &data);
    let m = metrics(Path::new(&metrics_file));
    let sync = [("destination", dest.as_str()), ("mode", "sync")];
    assert_eq!(prom::get(&m, "vmsync_last_exit_code", &sync), Some(0.0));
    let ok =
        prom::get(&m, "vmsync_last_success_timestamp_seconds", &sync).expect("a success timestamp");
    assert!(ok >= before.floor() && ok <= now().ceil(), "{ok}");
    assert_eq!(
        prom::get(&m, "vmsync_source_bytes", &sync),
        Some(data.len() as f64)
    );

    let run = pull.exec("ExecStartPost", &home);
    assert_eq!(run.code, 0, "the digest record\n{run}");
    let record = fs::read_to_string(format!("{}{dest}.sha256", p("digests"))).unwrap();
    let sum = Command::new("sha256sum").arg(&image).output().unwrap();
    let sum = String::from_utf8(sum.stdout).unwrap();
    assert!(
        record.contains(&format!("\nsha256 {}\n", &sum[..64])),
        "{record}"
    );

    let run = check.exec("ExecStart", &home);
    assert_eq!(run.code, 0, "the check unit's command\n{run}");
    let m = metrics(Path::new(&metrics_file));
    let checked = [("destination", dest.as_str()), ("mode", "check")];
    assert_eq!(prom::get(&m, "vmsync_last_exit_code", &checked), Some(0.0));
    assert_eq!(prom::get(&m, "vmsync_differing_bytes", &checked), Some(0.0));
    if let Some(n) = prom::get(&m, "vmsync_check_sample_slices", &checked) {
        assert_eq!(n, 5.0, "--sample K/5");
    }

    let run = drill.exec("ExecStart", &home);
    assert_eq!(run.code, 0, "the drill unit's command\n{run}");
    let m = metrics(&t.join("textfile/vmsync-drill.prom"));
    let copy = [("destination", dest.as_str())];
    assert_eq!(
        prom::get(&m, "vmsync_drill_last_exit_code", &copy),
        Some(0.0)
    );
    assert_eq!(
        prom::get(&m, "vmsync_drill_restored_bytes", &copy),
        Some(data.len() as f64)
    );
    assert!(prom::get(&m, "vmsync_drill_last_success_timestamp_seconds", &copy).is_some());
    assert_eq!(dir_entries(&t.join("scratch")), Vec::<String>::new());

    // The key can do nothing else: not read outside the root, not write
    // anywhere, not run a command.
    let at = |path: &Path| format!("{server}@127.0.0.1:{}", path.display());
    let back = t.join("back.img");
    let run = vmsync()
        .args(["-e", &rsh])
        .arg(at(&secret))
        .arg(&back)
        .run();
    run.assert_code(exit::USAGE);
    assert!(run.stderr.contains("outside the directory"), "{run}");
    assert!(!back.exists());
    // A write is refused before its path is even resolved: read-only.
    for target in [
        images.join("new.img"),
        image.clone(),
        outside.join("new.img"),
    ] {
        let run = vmsync()
            .args(["-e", &rsh])
            .arg(&secret)
            .arg(at(&target))
            .run();
        run.assert_code(exit::USAGE);
        assert!(run.stderr.contains("this server is read-only"), "{run}");
    }
    assert_content(&image, &data);
    assert_eq!(dir_entries(&images), ["disk.img"]);
    assert_eq!(dir_entries(&outside), ["secret.img"]);
    let words = command_words(&rsh);
    let out = Command::new("timeout")
        .arg("60")
        .args(&words)
        .arg(format!("{server}@127.0.0.1"))
        .args(["cat", "/etc/passwd"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("root:"),
        "a shell command ran through the key: {out:?}"
    );
    // sshd runs the forced command through the account's shell, and
    // without PAM refuses a locked ('!') account.
    assert_eq!(getent("passwd", &server)[6], "/bin/sh");
    assert_eq!(getent("shadow", &server)[1], "*");
}

#[test]
fn a_bad_image_entry_is_refused_before_anything_changes() {
    let test = "a_bad_image_entry_is_refused_before_anything_changes";
    if !can_run(test) {
        return;
    }
    let tmp = tempdir();
    let t = tmp.path();
    let pid = std::process::id();
    let (server, backup) = (format!("vmsynct{pid}x"), format!("vmsynct{pid}y"));
    let _accounts = Accounts(vec![server.clone(), backup.clone()]);
    let vars = serde_json::json!({
        "vmsync_install": "binary",
        "vmsync_binary_src": bin(),
        "vmsync_bin": t.join("bin/vmsync"),
        "vmsync_server_user": server,
        "vmsync_backup_user": backup,
        "vmsync_unit_dir": t.join("units"),
        "vmsync_systemd": false,
        "vmsync_images": [{
            "name": "disk",
            "hypervisor": "localhost",
            "path": "/var/lib/libvirt/images/my disk.img",
        }],
    });
    let play = playbook(t, &vars);
    assert_ne!(play.code, 0, "{}", play.output);
    assert!(
        play.output.contains("vmsync_images entry") && play.output.contains("my disk.img"),
        "names the entry:\n{}",
        play.output
    );
    for user in [&server, &backup] {
        let st = Command::new("id")
            .arg(user)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(!st.unwrap().success(), "account {user} was created");
    }
    assert!(!t.join("bin").exists() && !t.join("units").exists());
}
