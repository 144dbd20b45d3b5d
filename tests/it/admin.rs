//! What cron jobs and monitoring rely on (issue 5): `--metrics-file` writes
//! a Prometheus textfile that parses, keeps the last success across a
//! failure and merges destinations; `--bwlimit` really caps the rate.

use std::time::Duration;

use crate::common::*;
use crate::prom;

fn metrics(path: &std::path::Path) -> Vec<prom::Sample> {
    let text = std::fs::read_to_string(path).expect("metrics file written");
    prom::parse(&text).unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{text}"))
}

#[test]
fn metrics_file_records_success_then_failure_per_destination() {
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(41, (6 * MIB) as usize));
    let prom_path = pair.tmp.path().join("vmsync.prom");
    let dst = pair.dst.display().to_string();
    let labels = [("destination", dst.as_str()), ("mode", "sync")];

    let (first, v) = run_json(&[&"--metrics-file", &prom_path, &pair.src, &pair.dst]);
    first.assert_ok();
    let m = metrics(&prom_path);
    let get = |m: &[prom::Sample], name: &str| prom::get(m, name, &labels);
    assert_eq!(get(&m, "vmsync_last_exit_code"), Some(0.0));
    assert_eq!(
        get(&m, "vmsync_wire_bytes"),
        Some(json_u64(&v, "wire_bytes") as f64)
    );
    assert_eq!(get(&m, "vmsync_source_bytes"), Some((6 * MIB) as f64));
    assert_eq!(
        get(&m, "vmsync_literal_bytes"),
        Some(json_u64(&v, "literal_bytes") as f64)
    );
    let success = get(&m, "vmsync_last_success_timestamp_seconds").expect("success time");
    assert_eq!(get(&m, "vmsync_last_run_timestamp_seconds"), Some(success));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - success).abs() < 3600.0,
        "timestamp {success} is not now ({now})"
    );

    // The next night the source is gone: the run fails with exit 3, and the
    // file says so while keeping the last success for the staleness alert.
    std::fs::rename(&pair.src, pair.tmp.path().join("moved.img")).unwrap();
    let failed = run(&[&"--metrics-file", &prom_path, &pair.src, &pair.dst]);
    failed.assert_code(exit::IO);
    let m = metrics(&prom_path);
    assert_eq!(get(&m, "vmsync_last_exit_code"), Some(3.0));
    assert_eq!(
        get(&m, "vmsync_last_success_timestamp_seconds"),
        Some(success)
    );
    assert!(get(&m, "vmsync_last_run_timestamp_seconds").unwrap() >= success);

    // A --check of another destination adds its own series beside.
    std::fs::rename(pair.tmp.path().join("moved.img"), &pair.src).unwrap();
    let other = pair.tmp.path().join("other.img");
    std::fs::copy(&pair.src, &other).unwrap();
    let checked = run(&[&"--check", &"--metrics-file", &prom_path, &pair.src, &other]);
    checked.assert_ok();
    let m = metrics(&prom_path);
    let other_s = other.display().to_string();
    let check = [("destination", other_s.as_str()), ("mode", "check")];
    assert_eq!(prom::get(&m, "vmsync_last_exit_code", &check), Some(0.0));
    assert_eq!(prom::get(&m, "vmsync_differing_bytes", &check), Some(0.0));
    assert_eq!(
        get(&m, "vmsync_last_exit_code"),
        Some(3.0),
        "first series kept"
    );
}

#[test]
fn an_unwritable_metrics_file_is_a_warning_not_a_failed_sync() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(42, 100_000));
    let prom_path = pair.tmp.path().join("no-such-dir/vmsync.prom");
    let run = run(&[&"--metrics-file", &prom_path, &pair.src, &pair.dst]);
    run.assert_ok();
    assert!(
        run.stderr.contains("warning") && run.stderr.contains("no-such-dir"),
        "{run}"
    );
    pair.assert_synced();
}

/// 24 MiB of incompressible data at 8 MiB/s cannot take less than about
/// 3 s (the bucket starts empty; allow 2.5 s). Only a lower bound: the
/// machine may be slower, never faster.
#[test]
fn bwlimit_caps_the_rate_in_both_directions() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(43, (24 * MIB) as usize));
    let (run, v) = vmsync()
        .args(["--bwlimit", "8M"])
        .arg(&pair.src)
        .arg(&pair.dst)
        .timeout(Duration::from_secs(120))
        .run_json();
    run.assert_ok();
    pair.assert_synced();
    assert!(json_u64(&v, "wire_bytes") > 24 * MIB);
    assert!(
        run.elapsed >= Duration::from_millis(2500),
        "24 MiB at 8 MiB/s took only {:?}",
        run.elapsed
    );

    // Pull: the limit travels to the sending server in OPEN.
    let back = pair.tmp.path().join("back.img");
    let relay = Relay::new(pair.tmp.path(), "");
    let run = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .args(["--bwlimit", "8192"]) // bare number: KiB/s, as in rsync
        .arg(format!("127.0.0.1:{}", pair.src.display()))
        .arg(&back)
        .timeout(Duration::from_secs(120))
        .run();
    relay.wait_server_gone();
    run.assert_ok();
    assert_same_content(&pair.src, &back);
    assert!(
        run.elapsed >= Duration::from_millis(2500),
        "pull of 24 MiB at 8 MiB/s took only {:?}",
        run.elapsed
    );
}

#[test]
fn bad_bwlimit_and_timeout_values_are_usage_errors() {
    let pair = Pair::new();
    pair.write_src(b"x");
    for args in [
        ["--bwlimit", "fast"],
        ["--bwlimit=-5M", "-q"],
        ["--timeout", "0"],
        ["--timeout", "86401"],
        ["--timeout", "soon"],
    ] {
        let run = vmsync().args(args).arg(&pair.src).arg(&pair.dst).run();
        run.assert_code(exit::USAGE);
        assert!(
            run.stderr.contains(args[0].split('=').next().unwrap()),
            "{run}"
        );
        assert!(!pair.dst.exists());
    }
}

#[test]
fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let run = vmsync().args(["--completions", shell]).run();
        run.assert_ok();
        for flag in ["check", "timeout", "bwlimit", "metrics-file"] {
            assert!(run.stdout.contains(flag), "{shell} completions lack {flag}");
        }
        if shell == "bash" {
            let dir = tempdir();
            let script = dir.path().join("vmsync.bash");
            std::fs::write(&script, &run.stdout).unwrap();
            let st = std::process::Command::new("bash")
                .arg("-n")
                .arg(&script)
                .status()
                .unwrap();
            assert!(st.success(), "bash -n rejects the completion script");
        }
    }
    vmsync()
        .args(["--completions", "tcsh"])
        .run()
        .assert_code(exit::USAGE);
}

#[test]
fn log_file_records_each_run_and_its_outcome() {
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(44, (2 * MIB) as usize));
    let log = pair.tmp.path().join("vmsync.log");
    run(&[&"-q", &"--log-file", &log, &pair.src, &pair.dst]).assert_ok();
    let missing = pair.tmp.path().join("missing.img");
    run(&[&"-q", &"--log-file", &log, &missing, &pair.dst]).assert_code(exit::IO);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let starts: Vec<&&str> = lines.iter().filter(|l| l.contains("] start: ")).collect();
    assert_eq!(starts.len(), 2, "one start line per run:\n{text}");
    let ok = lines
        .iter()
        .find(|l| l.contains("exit 0: synced"))
        .unwrap_or_else(|| panic!("no success line:\n{text}"));
    assert!(ok.contains("2.00 MiB"), "{ok}");
    let failed = lines
        .iter()
        .find(|l| l.contains("exit 3: error:"))
        .unwrap_or_else(|| panic!("no failure line:\n{text}"));
    assert!(failed.contains("missing.img"), "{failed}");
    // Phase lines are there without -v; every line is stamped (UTC, pid).
    assert!(lines.len() > 4, "phase lines missing:\n{text}");
    for l in &lines {
        assert!(
            l.len() > 26 && l.as_bytes()[4] == b'-' && l[..24].ends_with('Z'),
            "unstamped line {l:?}"
        );
    }
}
