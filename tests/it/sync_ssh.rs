//! Syncs over a real OpenSSH server on 127.0.0.1 (see `common::Sshd`), with
//! `-e <ssh command>` and `--remote-path <this vmsync>`: push, pull, `--check`
//! both ways, `user@host:` operands, and connection failures (missing remote
//! vmsync, nothing listening). These tests fail when sshd is missing, unless
//! `VMSYNC_SKIP_SSH=1`.

use crate::common::*;

/// Starts sshd or returns from the test when SSH tests are skipped.
macro_rules! sshd {
    () => {
        match Sshd::start() {
            Some(s) => s,
            None => return,
        }
    };
}

fn over_ssh(sshd: &Sshd, extra: &[&str], src: &str, dst: &str) -> (Run, serde_json::Value) {
    let (run, v) = vmsync()
        .args(sshd.args())
        .args(extra)
        .args([src, dst])
        .run_json();
    assert_no_panic(&run);
    if run.code != exit::OK && run.code != exit::DIFFERENT {
        eprintln!("sshd log:\n{}", sshd.log());
    }
    (run, v)
}

fn local(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[test]
fn push_creates_then_updates_the_remote_copy() {
    let sshd = sshd!();
    let pair = Pair::new();
    let old = mixed_bytes(1, (32 * MIB) as usize);
    pair.write_src(&old);

    let (run, v) = over_ssh(&sshd, &[], &local(&pair.src), &sshd.remote(&pair.dst));
    run.assert_ok();
    assert_json_contract(&run, &v);
    pair.assert_synced();

    let mut new = old.clone();
    new[(20 * MIB) as usize..(20 * MIB + 4096) as usize].copy_from_slice(&random_bytes(11, 4096));
    pair.write_src(&new);
    set_mtime_ns(&pair.src, SOURCE_MTIME_NS + 1);

    let (run, v) = over_ssh(
        &sshd,
        &["--verify"],
        &local(&pair.src),
        &sshd.remote(&pair.dst),
    );
    run.assert_ok();
    pair.assert_synced();
    assert_accounting(&v);
    assert!(json_u64(&v, "literal_bytes") < MIB, "{v}");
    assert!(json_u64(&v, "wire_bytes") < 2 * MIB, "{v}");
}

#[test]
fn pull_updates_a_shifted_local_copy() {
    let sshd = sshd!();
    let pair = Pair::new();
    let new = mixed_bytes(2, (32 * MIB) as usize);
    let mut old = new.clone();
    old.splice((MIB as usize)..(MIB as usize), *b"shifted");
    pair.write_src(&new);
    pair.write_dst(&old);

    let (run, v) = over_ssh(&sshd, &[], &sshd.remote(&pair.src), &local(&pair.dst));

    run.assert_ok();
    assert_json_contract(&run, &v);
    pair.assert_synced();
    assert!(json_u64(&v, "literal_bytes") < 2 * MIB, "{v}");
}

#[test]
fn check_over_ssh_exits_0_when_identical_and_1_when_different() {
    let sshd = sshd!();
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(3, (8 * MIB) as usize));
    over_ssh(&sshd, &[], &local(&pair.src), &sshd.remote(&pair.dst))
        .0
        .assert_ok();

    let (run, v) = over_ssh(
        &sshd,
        &["--check"],
        &local(&pair.src),
        &sshd.remote(&pair.dst),
    );
    run.assert_code(exit::OK);
    assert!(json_bool(&v, "identical"), "{v}");

    let offset = 5 * MIB + 3;
    let mut data = std::fs::read(&pair.dst).unwrap();
    data[offset as usize] ^= 1;
    write_file(&pair.dst, &data);
    set_mtime_ns(&pair.dst, OLD_MTIME_NS);

    for (src, dst) in [
        (local(&pair.src), sshd.remote(&pair.dst)),
        (sshd.remote(&pair.dst), local(&pair.src)),
    ] {
        let (run, v) = over_ssh(&sshd, &["--check"], &src, &dst);
        run.assert_code(exit::DIFFERENT);
        assert!(!json_bool(&v, "identical"), "{v}");
        let diffs = json_differences(&v);
        assert!(
            diffs.iter().any(|&(o, l)| o <= offset && offset < o + l),
            "offset {offset} not covered by {diffs:?}"
        );
    }
    assert_content(&pair.dst, &data); // --check changed nothing
}

#[test]
fn user_at_host_operand_works() {
    let sshd = sshd!();
    let pair = Pair::new();
    pair.write_src(&random_bytes(4, 500_000));

    let (run, _) = over_ssh(
        &sshd,
        &["-q"],
        &local(&pair.src),
        &sshd.remote_with_user(&pair.dst),
    );

    run.assert_ok();
    pair.assert_synced();
}

#[test]
fn missing_remote_vmsync_exits_4_naming_the_host() {
    let sshd = sshd!();
    let pair = Pair::new();
    pair.write_src(&random_bytes(5, 1000));

    let (run, v) = vmsync()
        .args(["-e", &sshd.rsh(), "--remote-path", "/nonexistent/vmsync"])
        .arg(&pair.src)
        .arg(sshd.remote(&pair.dst))
        .run_json();

    run.assert_code(exit::CONNECTION);
    assert_json_contract(&run, &v);
    assert!(run.stderr.contains("127.0.0.1"), "name the host: {run}");
    assert!(!pair.dst.exists());
    // The remote shell's complaint is forwarded, prefixed by the host.
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("127.0.0.1") && l.contains("/nonexistent/vmsync")),
        "remote stderr should be shown with the host: {run}"
    );
}

#[test]
fn missing_remote_source_exits_3_naming_the_path() {
    let sshd = sshd!();
    let pair = Pair::new();
    let missing = pair.tmp.path().join("src/not-there.img");

    let (run, v) = over_ssh(&sshd, &[], &sshd.remote(&missing), &local(&pair.dst));

    run.assert_code(exit::IO);
    assert_json_contract(&run, &v);
    assert!(run.stderr.contains("not-there.img"), "{run}");
    assert!(!pair.dst.exists());
}

#[test]
fn nothing_listening_exits_4() {
    // Uses only the ssh client: a port on 127.0.0.1 with no server.
    let sshd = sshd!();
    let port = sshd.port();
    drop(sshd);
    let pair = Pair::new();
    pair.write_src(b"data");
    let rsh = format!(
        "ssh -F /dev/null -p {port} -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5"
    );

    let run = vmsync()
        .args(["-e", &rsh, "--remote-path"])
        .arg(bin())
        .arg(&pair.src)
        .arg(format!("127.0.0.1:{}", pair.dst.display()))
        .run();

    run.assert_code(exit::CONNECTION);
    assert!(!pair.dst.exists());
}
