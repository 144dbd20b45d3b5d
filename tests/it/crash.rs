//! Crash safety of the write modes (issue 12) under real crashes: the
//! receiver kills itself with SIGKILL at a named point
//! (`VMSYNC_CRASH_AT=NAME[:N]`, `src/sys/crash.rs`) on a real loop-mounted
//! file system ([`Scratch`]), and the test looks at what the disk holds:
//! * right after the crash the destination is byte-for-byte (and mtime) the
//!   OLD or the NEW version, except in the middle of applying a committed
//!   journal (`apply-record`), which whatever reads it next finishes first;
//! * after recovery (the next sync, `--check` alone, `--recover`) it is NEW
//!   when the crash came after the commit point (the journal's COMMIT
//!   record, the rename) and OLD before it;
//! * the next sync ends with NEW and sends only what is still missing;
//! * the process really died by SIGKILL there (a misspelt point never
//!   crashes, and a test that did not check would pass silently).
//!
//! Journal mode on ext4 at every journal point, each recovered three ways;
//! clone mode (XFS, btrfs) and copy mode (ext4) around the rename; a pull
//! through the relay (the client is the receiver); a block device (journal
//! in `--state-dir`); random change sets at random points; damaged,
//! truncated and foreign journals (exit 9, nothing written); and the
//! sending side of a `--snapshot` run (issue 13) killed after its clone,
//! after the destination committed, and between keeping the clone and
//! writing its state. The `common`
//! builder sets no environment, so crashing runs use [`run_env`].

use std::cell::Cell;
use std::ffi::OsStr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use proptest::prelude::{any, prop_oneof, Just, ProptestConfig, Strategy};
use proptest::test_runner::TestRunner;
use serde_json::Value;

use crate::common::fs::{shared_bytes, Fs, Scratch};
use crate::common::*;

/// The variable that arms a crash point (`crate::sys::crash::ENV`).
const CRASH_ENV: &str = "VMSYNC_CRASH_AT";
/// Journal points before the COMMIT record is durable: recovery keeps OLD.
const BEFORE_COMMIT: &[&str] = &["journal-record", "journal-synced"];

// ---------------------------------------------------------------------------
// Running with a crash point armed
// ---------------------------------------------------------------------------

/// Runs the binary with `env` set, like `common::Vmsync::run` (own process
/// group, the test cache dir, a timeout that kills the group).
fn run_env(env: &[(&str, &str)], args: &[&OsStr]) -> Run {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .env("VMSYNC_CACHE_DIR", cache_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let start = Instant::now();
    let child = cmd.spawn().expect("start vmsync");
    let pgid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.expect("wait for vmsync"),
        Err(_) => {
            // SAFETY: plain syscall on the group this test started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            panic!("vmsync {args:?} with {env:?} did not finish within 120 s");
        }
    };
    let signal = out.status.signal();
    Run {
        code: out
            .status
            .code()
            .unwrap_or_else(|| 128 + signal.unwrap_or(0)),
        signal,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        args: args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        elapsed: start.elapsed(),
    }
}

/// A local sync (`--json` first) whose receiver, the `vmsync --server`
/// child, must die by SIGKILL at `point`: the client exits 4 and says so.
#[track_caller]
fn crash_local(point: &str, args: &[&OsStr]) -> Run {
    let mut all: Vec<&OsStr> = vec!["--json".as_ref()];
    all.extend_from_slice(args);
    let run = run_env(&[(CRASH_ENV, point)], &all);
    run.assert_code(exit::CONNECTION);
    assert!(
        run.stderr.contains("killed by signal 9"),
        "the receiver did not die by SIGKILL at {point}\n{run}"
    );
    let v: Value = serde_json::from_str(run.stdout.trim()).expect("one JSON object");
    assert_json_contract(&run, &v);
    run
}

// ---------------------------------------------------------------------------
// OLD or NEW
// ---------------------------------------------------------------------------

/// What reads a destination, and so first finishes (or refuses) its journal.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Reader {
    Recover,
    Check,
    Sync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Is {
    Old,
    New,
}

/// A destination `dst` (named `disk.img`) and source `src` in `dir`, with
/// the OLD and NEW bytes: the source always holds NEW (mtime
/// [`SOURCE_MTIME_NS`]), the destination starts as OLD ([`OLD_MTIME_NS`]).
struct Case {
    dir: PathBuf,
    src: PathBuf,
    dst: PathBuf,
    old: Vec<u8>,
    new: Vec<u8>,
}

impl Case {
    fn new(dir: PathBuf, old: Vec<u8>, new: Vec<u8>) -> Case {
        std::fs::create_dir_all(&dir).unwrap();
        let case = Case {
            src: dir.join("src.img"),
            dst: dir.join("disk.img"),
            dir,
            old,
            new,
        };
        case.write_src();
        case.write_dst();
        case
    }

    fn write_src(&self) {
        write_file(&self.src, &self.new);
        set_mtime_ns(&self.src, SOURCE_MTIME_NS);
    }

    /// Puts OLD back into the destination (same inode), after checking that
    /// the last run left nothing behind.
    fn write_dst(&self) {
        assert_eq!(self.hidden(), Vec::<String>::new(), "leftovers");
        write_file(&self.dst, &self.old);
        set_mtime_ns(&self.dst, OLD_MTIME_NS);
    }

    fn journal(&self) -> PathBuf {
        self.dir.join(".disk.img.vmsync-journal")
    }

    fn partial(&self) -> PathBuf {
        self.dir.join(".disk.img.vmsync-partial")
    }

    /// vmsync's hidden files beside the destination.
    fn hidden(&self) -> Vec<String> {
        dir_entries(&self.dir)
            .into_iter()
            .filter(|n| n.starts_with('.') && n.contains("vmsync"))
            .collect()
    }

    /// Which version the destination is (bytes and mtime), or why neither.
    fn which(&self) -> Result<Is, String> {
        which(&self.dst, &self.old, &self.new)
    }

    #[track_caller]
    fn assert_is(&self, want: Is, when: &str) {
        match self.which() {
            Ok(is) if is == want => {}
            Ok(is) => panic!("{when}: the destination is {is:?}, not {want:?}"),
            Err(why) => panic!("{when}: {why}, not {want:?}"),
        }
    }

    fn crash(&self, point: &str, extra: &[&str]) -> Run {
        let mut args: Vec<&OsStr> = extra.iter().map(OsStr::new).collect();
        args.extend([self.src.as_os_str(), self.dst.as_os_str()]);
        crash_local(point, &args)
    }

    fn sync(&self, extra: &[&str]) -> (Run, Value) {
        let (run, v) = vmsync()
            .args(extra)
            .arg(&self.src)
            .arg(&self.dst)
            .run_json();
        assert_json_contract(&run, &v);
        (run, v)
    }

    /// A sync that must succeed and leave NEW with nothing beside it.
    #[track_caller]
    fn sync_ok(&self, when: &str) -> Value {
        let (run, v) = self.sync(&[]);
        run.assert_ok();
        self.assert_is(Is::New, when);
        assert_eq!(self.hidden(), Vec::<String>::new(), "{when}: leftovers");
        v
    }

    /// Runs `reader` on `dst` (the destination, or another file).
    fn read(&self, reader: Reader, dst: &Path) -> (Run, Value) {
        let (run, v) = match reader {
            Reader::Recover => return vmsync().arg("--recover").arg(dst).run_json(),
            Reader::Check => vmsync().arg("--check").arg(&self.src).arg(dst),
            Reader::Sync => vmsync().arg(&self.src).arg(dst),
        }
        .run_json();
        assert_json_contract(&run, &v);
        (run, v)
    }

    /// `literal_bytes` of an uninterrupted sync (with `extra`) of a copy of
    /// OLD (beside the destination, then removed), which must have used
    /// `mode`.
    fn baseline(&self, extra: &[&str], mode: &str) -> u64 {
        let base = self.dir.join("base.img");
        write_file(&base, &self.old);
        let (run, v) = vmsync().args(extra).arg(&self.src).arg(&base).run_json();
        run.assert_ok();
        assert_eq!(v["write_mode"], mode, "an uninterrupted run\n{v}");
        assert_eq!(which(&base, &self.old, &self.new), Ok(Is::New));
        std::fs::remove_file(&base).unwrap();
        let literal = json_u64(&v, "literal_bytes");
        assert!(literal > 0, "{v}");
        literal
    }
}

/// Whether `path` holds exactly `old` (with [`OLD_MTIME_NS`]) or `new`
/// (with [`SOURCE_MTIME_NS`]), or a description of how it is neither.
fn which(path: &Path, old: &[u8], new: &[u8]) -> Result<Is, String> {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mtime = mtime_ns(path);
    let first_diff = |want: &[u8]| {
        (0..got.len().min(want.len()))
            .find(|&i| got[i] != want[i])
            .unwrap_or(got.len().min(want.len()))
    };
    let is = if got == new {
        Is::New
    } else if got == old {
        Is::Old
    } else {
        return Err(format!(
            "{} ({} bytes) is neither version: it differs from OLD ({} bytes) at {} and from \
             NEW ({} bytes) at {}",
            path.display(),
            got.len(),
            old.len(),
            first_diff(old),
            new.len(),
            first_diff(new)
        ));
    };
    let want = match is {
        Is::Old => OLD_MTIME_NS,
        Is::New => SOURCE_MTIME_NS,
    };
    if mtime != want {
        return Err(format!(
            "{} holds the {is:?} bytes but mtime {mtime}, not {want}",
            path.display()
        ));
    }
    Ok(is)
}

/// `old` of `len` bytes and a `new` that differs from it by `count` writes
/// of 8 KiB at random 4 KiB-aligned offsets, and two 64 KiB ranges zeroed.
fn scattered(seed: u64, len: usize, count: usize) -> (Vec<u8>, Vec<u8>) {
    let old = mixed_bytes(seed, len);
    let mut new = old.clone();
    let mut rng = Rng::new(seed ^ 0xc0ffee);
    for _ in 0..count {
        let at = rng.below((len - 8192) as u64 / 4096) as usize * 4096;
        rng.fill(&mut new[at..at + 8192]);
    }
    for k in [1, 3] {
        let at = len / 4 * k;
        new[at..at + 65536].fill(0);
    }
    (old, new)
}

fn ext4(size: u64, test: &str) -> Option<Scratch> {
    Scratch::new(Fs::Ext4, size, test)
}

// ---------------------------------------------------------------------------
// 1. Journal mode on ext4
// ---------------------------------------------------------------------------

/// 32 MiB with about 3 MiB changed in 8 KiB pieces: around 280 journal
/// records of some 3 MiB in all (the records are buffered 1 MiB at a time),
/// well under half the file, so the run stays journaled.
const J_SIZE: usize = 32 << 20;
const J_CHANGES: usize = 384;
/// A record count that the journal reaches after its buffer was written
/// out at least once (checked: the journal on disk is at least 1 MiB).
const J_RECORD_N: &str = "journal-record:200";
/// A record in the middle of the apply.
const J_APPLY_MID: &str = "apply-record:140";

/// Crashes a journaled sync at `point` three times, recovering once by the
/// next sync, once by `--check` alone and once by `--recover`, with every
/// state in between checked.
fn journal_point(point: &str, test: &str) {
    let Some(s) = ext4(256 * MIB, test) else {
        return;
    };
    let (old, new) = scattered(12, J_SIZE, J_CHANGES);
    let case = Case::new(s.path("j"), old, new);
    let first = case.baseline(&[], "journal");
    let name = point.split(':').next().unwrap();
    let committed = !BEFORE_COMMIT.contains(&name);

    for how in [Reader::Sync, Reader::Check, Reader::Recover] {
        let when = format!("{point}, recovered by {how:?}");
        case.write_dst();
        // Default write mode: auto is journal on ext4 (the baseline said so).
        case.crash(point, &[]);

        // Right after the crash.
        assert!(case.journal().exists(), "{when}: no journal");
        match name {
            "journal-record" => {
                case.assert_is(Is::Old, &when);
                let len = file_len(&case.journal());
                assert!(
                    len >= MIB,
                    "{when}: a {len}-byte journal: nothing written out yet"
                );
            }
            // Proves the crash came mid-apply: recovery has work to do.
            "apply-record" if point == J_APPLY_MID => {
                assert!(case.which().is_err(), "{when}: not a mix mid-apply")
            }
            "apply-record" => {}
            "applied" => case.assert_is(Is::New, &when),
            _ => case.assert_is(Is::Old, &when),
        }
        let allowed = [".disk.img.vmsync-journal", ".disk.img.vmsync-partial"];
        let hidden = case.hidden();
        assert!(
            hidden.iter().all(|n| allowed.contains(&n.as_str())),
            "{when}: left beside the destination: {hidden:?}"
        );

        let want = if committed { Is::New } else { Is::Old };
        match how {
            Reader::Sync => {}
            Reader::Check => {
                let (run, v) = case.read(how, &case.dst);
                run.assert_code(if committed { exit::OK } else { exit::DIFFERENT });
                assert_eq!(v["identical"], committed, "{when}\n{v}");
                case.assert_is(want, &format!("{when}: after --check"));
                assert_eq!(
                    case.journal().exists(),
                    !committed,
                    "{when}: a committed journal is removed once applied, an uncommitted one kept"
                );
            }
            Reader::Recover => {
                let (run, v) = case.read(how, &case.dst);
                run.assert_ok();
                let state = if committed { "applied" } else { "uncommitted" };
                assert_eq!(v["state"], state, "{when}\n{v}");
                assert_eq!(v["exit_code"], 0, "{v}");
                assert_eq!(v["journal"], case.journal().to_str().unwrap(), "{v}");
                assert!(json_u64(&v, "records") > 0, "{when}\n{v}");
                if committed {
                    assert!(json_u64(&v, "data_bytes") > 0, "{when}\n{v}");
                }
                case.assert_is(want, &format!("{when}: after --recover"));
                assert_eq!(case.journal().exists(), !committed, "{when}");
            }
        }

        // The next sync: NEW, and only what is still missing is sent.
        let v = case.sync_ok(&format!("{when}: after the next sync"));
        let literal = json_u64(&v, "literal_bytes");
        if committed {
            assert!(json_bool(&v, "up_to_date"), "{when}: not up to date\n{v}");
            assert_eq!(literal, 0, "{when}\n{v}");
        } else if name == "journal-record" {
            assert!(
                literal < first,
                "{when}: sent {literal} bytes, as many as a fresh run ({first}): no record reused\n{v}"
            );
            assert_eq!(v["write_mode"], "journal", "{v}");
        } else {
            // Every record was durable: all of them are reused.
            assert!(
                literal <= first / 20,
                "{when}: sent {literal} of a fresh run's {first} bytes\n{v}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 2, 3. Clone mode on XFS and btrfs, copy mode on ext4
// ---------------------------------------------------------------------------

/// Crashes a partial-file sync (`mode`: clone or copy) just before and
/// just after its rename.
fn partial_points(fs: Fs, mode: &str, test: &str) {
    let Some(s) = Scratch::new(fs, 512 * MIB, test) else {
        return;
    };
    let (old, new) = scattered(21, 16 << 20, 96);
    let case = Case::new(s.path("p"), old, new);
    let args = ["--write-mode", mode];
    // Clone is what auto picks here; copy must be asked for.
    let first = case.baseline(if mode == "clone" { &[] } else { &args }, mode);

    // before-rename: the destination is untouched, the complete new file
    // waits beside it, and the re-run only has to rename it.
    case.write_dst();
    case.crash("before-rename", &args);
    case.assert_is(Is::Old, "before-rename");
    assert_eq!(
        which(&case.partial(), &case.old, &case.new),
        Ok(Is::New),
        "before-rename: the partial file"
    );
    if mode == "clone" {
        let (shared, mapped) = shared_bytes(&case.partial());
        assert!(
            shared >= mapped / 2,
            "before-rename: the partial file shares {shared} of {mapped} bytes: not a clone"
        );
    }
    let (run, v) = case.read(Reader::Check, &case.dst);
    run.assert_code(exit::DIFFERENT);
    assert_eq!(v["identical"], false);
    case.assert_is(Is::Old, "before-rename: after --check");
    let (run, v) = case.sync(&args);
    run.assert_ok();
    case.assert_is(Is::New, "before-rename: after the re-run");
    assert_eq!(case.hidden(), Vec::<String>::new());
    let literal = json_u64(&v, "literal_bytes");
    assert!(
        literal <= first / 20,
        "before-rename: the re-run sent {literal} of {first} bytes\n{v}"
    );

    // after-rename: the destination is NEW; nothing is left to do.
    case.write_dst();
    case.crash("after-rename", &args);
    case.assert_is(Is::New, "after-rename");
    assert!(
        !case.partial().exists(),
        "after-rename: the partial is the destination"
    );
    let v = case.sync_ok("after-rename: after the re-run");
    assert!(json_bool(&v, "up_to_date"), "{v}");
    assert_eq!(json_u64(&v, "literal_bytes"), 0, "{v}");
}

/// One test per crash point, named after what it proves.
macro_rules! crash_tests {
    ($($name:ident => $run:expr;)*) => {$(
        #[test]
        fn $name() {
            $run(stringify!($name));
        }
    )*};
}

crash_tests! {
    journal_crash_after_some_records_keeps_old_and_reuses_them => |t| journal_point(J_RECORD_N, t);
    journal_crash_after_the_records_sync_keeps_old_and_reuses_all =>
        |t| journal_point("journal-synced", t);
    journal_crash_after_the_commit_recovers_new => |t| journal_point("journal-committed", t);
    journal_crash_after_the_first_applied_record_recovers_new =>
        |t| journal_point("apply-record:1", t);
    journal_crash_in_the_middle_of_the_apply_recovers_new => |t| journal_point(J_APPLY_MID, t);
    journal_crash_after_the_apply_recovers_new => |t| journal_point("applied", t);
    clone_crash_around_the_rename_on_xfs => |t| partial_points(Fs::Xfs, "clone", t);
    clone_crash_around_the_rename_on_btrfs => |t| partial_points(Fs::Btrfs, "clone", t);
    copy_crash_around_the_rename_on_ext4 => |t| partial_points(Fs::Ext4, "copy", t);
}

// ---------------------------------------------------------------------------
// 4. A pull: the client is the receiver
// ---------------------------------------------------------------------------

/// `-e RELAY --remote-path BIN 127.0.0.1:SRC DST` (the paths are UTF-8).
fn pull_args(relay: &Relay, case: &Case) -> Vec<String> {
    let remote = format!("127.0.0.1:{}", case.src.display());
    let (bin, dst) = (bin().display().to_string(), case.dst.display().to_string());
    vec![
        "-e".into(),
        relay.rsh(),
        "--remote-path".into(),
        bin,
        remote,
        dst,
    ]
}

#[test]
fn pull_crash_of_the_receiving_client_is_recovered_by_the_next_pull() {
    let Some(s) = ext4(256 * MIB, "pull_crash_of_the_receiving_client") else {
        return;
    };
    let (old, new) = scattered(31, 16 << 20, 96);
    let case = Case::new(s.path("pull"), old, new);
    let first = case.baseline(&[], "journal");
    let books = tempdir();

    for (point, committed) in [("journal-synced", false), ("apply-record:10", true)] {
        case.write_dst();
        let relay = Relay::new(books.path(), "");
        let args = pull_args(&relay, &case);
        let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        args.insert(0, "--json".as_ref());
        let run = run_env(&[(CRASH_ENV, point)], &args);
        relay.wait_server_gone();
        assert_no_panic(&run);
        assert_eq!(
            run.signal,
            Some(libc::SIGKILL),
            "the pulling client did not die by SIGKILL at {point}\n{run}"
        );
        assert!(case.journal().exists(), "{point}: no journal\n{run}");
        if !committed {
            case.assert_is(Is::Old, point);
        }

        let relay = Relay::new(books.path(), "");
        let (run, v) = vmsync().args(pull_args(&relay, &case)).run_json();
        relay.wait_server_gone();
        run.assert_ok();
        assert_json_contract(&run, &v);
        case.assert_is(Is::New, &format!("{point}: after the next pull"));
        assert_eq!(case.hidden(), Vec::<String>::new(), "{point}: leftovers");
        let literal = json_u64(&v, "literal_bytes");
        if committed {
            assert!(json_bool(&v, "up_to_date"), "{point}\n{v}");
            assert_eq!(literal, 0, "{point}\n{v}");
        } else {
            assert!(
                literal <= first / 20,
                "{point}: re-sent {literal} of {first}\n{v}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 5. A block device: the journal lives in --state-dir
// ---------------------------------------------------------------------------

#[test]
fn device_crash_after_the_commit_keeps_the_journal_in_the_state_dir() {
    let test = "device_crash_after_the_commit";
    let (old, new) = scattered(41, 16 << 20, 96);
    let var = tempfile::Builder::new()
        .prefix("vmsync-crash-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let backing = var.path().join("dev.img");
    write_file(&backing, &old);
    let src = var.path().join("src.img");
    write_file(&src, &new);
    let Some(dev) = crate::common::fs::LoopDev::attach(&backing, test) else {
        return;
    };
    let state = tempdir();
    let sd: [&OsStr; 2] = ["--state-dir".as_ref(), state.path().as_os_str()];
    let sync_args = [sd[0], sd[1], src.as_os_str(), dev.0.as_os_str()];
    let journals = || dir_entries(&state.path().join("journal"));
    let assert_dev = |want: &[u8], when: &str| {
        assert!(dev.read() == want, "the device is not as expected {when}");
        let stray: Vec<String> = dir_entries(Path::new("/dev"))
            .into_iter()
            .filter(|n| n.contains("vmsync"))
            .collect();
        assert!(stray.is_empty(), "vmsync left files in /dev: {stray:?}");
    };

    // Crash with the commit durable: nothing on the device yet (OLD), the
    // journal in the state directory; the next sync applies it.
    crash_local("journal-committed", &sync_args);
    assert_dev(&old, "(OLD) before the commit was applied");
    let found = journals();
    assert!(
        found.len() == 1 && found[0].ends_with(".vmsync-journal"),
        "journals in the state dir: {found:?}"
    );
    let (run, v) = vmsync().args(sync_args).run_json();
    run.assert_ok();
    assert_json_contract(&run, &v);
    assert_dev(&new, "(NEW) after the next sync");
    assert_eq!(journals(), Vec::<String>::new(), "the journal is left");
    assert_eq!(json_u64(&v, "literal_bytes"), 0, "{v}");

    // Mid-apply, then --recover with the same state directory.
    dev.write(&old);
    crash_local("apply-record:10", &sync_args);
    assert_eq!(journals().len(), 1);
    let (run, v) = vmsync().arg("--recover").arg(&dev.0).args(sd).run_json();
    run.assert_ok();
    assert_eq!(v["state"], "applied", "{v}");
    assert_dev(&new, "(NEW) after --recover");
    assert_eq!(journals(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------
// 6. Random change sets, random journal crash points
// ---------------------------------------------------------------------------

const P_SIZE: usize = 8 << 20;
/// The journal points, in order; from `journal-committed` on, the commit is
/// durable. The counted ones get `:N` with N at most 3, and every drawn
/// change set touches at least 3 chunks far apart (3 or more records).
const P_POINTS: &[&str] = &[
    "journal-record",
    "journal-synced",
    "journal-committed",
    "apply-record",
    "applied",
];

#[derive(Clone, Debug)]
struct Draw {
    seed: u64,
    /// (offset in its slot, length, zeros instead of random bytes)
    changes: Vec<(u64, usize, bool)>,
    /// Bytes added (random) or cut at the end.
    resize: i64,
    point: usize,
    nth: u64,
    by_check: bool,
}

fn draws() -> impl Strategy<Value = Draw> {
    (
        any::<u64>(),
        proptest::collection::vec((0u64..1 << 20, 512usize..65536, any::<bool>()), 3..7),
        prop_oneof![2 => Just(0i64), 1 => -(1i64 << 20)..(1i64 << 20)],
        0..P_POINTS.len(),
        1u64..=3,
        any::<bool>(),
    )
        .prop_map(|(seed, changes, resize, point, nth, by_check)| Draw {
            seed,
            changes,
            resize,
            point,
            nth,
            by_check,
        })
}

impl Draw {
    /// OLD, and NEW: one change per slot of the first 6 MiB (so they are in
    /// different chunks, each a record), then the size change.
    fn versions(&self) -> (Vec<u8>, Vec<u8>) {
        let old = random_bytes(self.seed, P_SIZE);
        let mut new = old.clone();
        let mut rng = Rng::new(self.seed ^ 0x5eed);
        let slot = (6 << 20) / self.changes.len();
        for (i, &(off, len, zero)) in self.changes.iter().enumerate() {
            let at = i * slot + off as usize % (slot - len);
            if zero {
                new[at..at + len].fill(0);
            } else {
                rng.fill(&mut new[at..at + len]);
            }
        }
        if self.resize >= 0 {
            new.extend(random_bytes(self.seed ^ 0xa11, self.resize as usize));
        } else {
            new.truncate(P_SIZE - self.resize.unsigned_abs() as usize);
        }
        (old, new)
    }

    fn point(&self) -> String {
        match P_POINTS[self.point] {
            p @ ("journal-record" | "apply-record") => format!("{p}:{}", self.nth),
            p => p.to_string(),
        }
    }
}

#[test]
fn proptest_random_changes_crashed_at_random_journal_points() {
    let Some(s) = ext4(256 * MIB, "proptest_random_changes_crashed") else {
        return;
    };
    let mut config = ProptestConfig::with_cases(8);
    config.failure_persistence = None;
    config.max_shrink_iters = 16;
    let mut runner = TestRunner::new(config);
    let n = Cell::new(0);
    let result = runner.run(&draws(), |d| {
        n.set(n.get() + 1);
        let (old, new) = d.versions();
        let case = Case::new(s.path(&format!("prop{}", n.get())), old, new);
        let point = d.point();
        let committed = d.point >= 2;
        case.crash(&point, &[]);
        match P_POINTS[d.point] {
            "apply-record" => {}
            "applied" => case.assert_is(Is::New, &point),
            _ => case.assert_is(Is::Old, &point),
        }
        let want = if committed { Is::New } else { Is::Old };
        if d.by_check {
            let (run, _) = case.read(Reader::Check, &case.dst);
            run.assert_code(if committed { exit::OK } else { exit::DIFFERENT });
            case.assert_is(want, &format!("{point}: after --check"));
        } else {
            let (run, _) = case.sync(&[]);
            run.assert_ok();
            case.assert_is(Is::New, &format!("{point}: after a sync"));
        }
        let v = case.sync_ok(&format!("{point}: after the final sync"));
        if committed {
            assert_eq!(json_u64(&v, "literal_bytes"), 0, "{point}\n{v}");
        }
        std::fs::remove_dir_all(&case.dir).unwrap();
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------
// 7. Damaged and foreign journals
// ---------------------------------------------------------------------------

const READERS: [Reader; 3] = [Reader::Recover, Reader::Check, Reader::Sync];

#[test]
fn a_damaged_or_foreign_journal_is_refused_and_nothing_is_written() {
    let Some(s) = ext4(256 * MIB, "a_damaged_or_foreign_journal") else {
        return;
    };
    let (old, new) = scattered(51, 16 << 20, 96);
    let case = Case::new(s.path("d"), old, new);
    case.crash("journal-committed", &[]);
    case.assert_is(Is::Old, "journal-committed");
    let committed = std::fs::read(case.journal()).unwrap();
    let journal_name = case.journal().display().to_string();

    // (c) Moved beside another file of the same name: not applied there.
    let other_dir = s.path("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = other_dir.join("disk.img");
    write_file(&other, &case.old);
    set_mtime_ns(&other, OLD_MTIME_NS);
    let moved = other_dir.join(".disk.img.vmsync-journal");
    std::fs::rename(case.journal(), &moved).unwrap();
    for reader in READERS {
        let (run, v) = case.read(reader, &other);
        run.assert_code(9);
        assert_eq!(v["exit_code"], 9, "{v}");
        assert!(
            run.stderr.contains(&moved.display().to_string()) && run.stderr.contains("not for"),
            "the error should name the journal and say it is not for this file\n{run}"
        );
        assert_eq!(which(&other, &case.old, &case.new), Ok(Is::Old), "{run}");
        assert!(
            std::fs::read(&moved).unwrap() == committed,
            "journal changed"
        );
    }
    case.assert_is(Is::Old, "the journal moved away");
    std::fs::remove_file(&moved).unwrap();

    // (a) One byte flipped in the middle: refused by every reader.
    let mut flipped = committed.clone();
    flipped[committed.len() / 2] ^= 0x10;
    write_file(&case.journal(), &flipped);
    for reader in READERS {
        let (run, v) = case.read(reader, &case.dst);
        run.assert_code(9);
        assert_eq!(v["exit_code"], 9, "{v}");
        assert!(
            run.stderr.contains(&journal_name),
            "name the journal\n{run}"
        );
        case.assert_is(Is::Old, &format!("a damaged journal\n{run}"));
        assert!(
            std::fs::read(case.journal()).unwrap() == flipped,
            "journal changed"
        );
    }

    // (b) Cut short by a few bytes (its COMMIT record torn): refused, or
    // taken as uncommitted; never even partly applied.
    write_file(&case.journal(), &committed[..committed.len() - 5]);
    let mut refused = false;
    for reader in READERS {
        let (run, v) = case.read(reader, &case.dst);
        if run.code == 9 {
            assert!(run.stderr.contains(&journal_name), "{run}");
            refused = true;
        } else {
            assert!(!refused, "refused once, then not\n{run}");
        }
        match reader {
            _ if refused => case.assert_is(Is::Old, &format!("a truncated journal\n{run}")),
            Reader::Recover => {
                run.assert_ok();
                assert_eq!(v["state"], "uncommitted", "{v}");
                case.assert_is(Is::Old, "a truncated journal, --recover");
            }
            Reader::Check => {
                run.assert_code(exit::DIFFERENT);
                case.assert_is(Is::Old, "a truncated journal, --check");
            }
            Reader::Sync => {
                // It resumed from the records: NEW, sending next to nothing.
                run.assert_ok();
                case.assert_is(Is::New, "a truncated journal, then a sync");
                assert_eq!(case.hidden(), Vec::<String>::new());
                let literal = json_u64(&v, "literal_bytes");
                assert!(literal <= 64 * KIB, "re-sent {literal} bytes\n{v}");
            }
        }
    }
    if refused {
        std::fs::remove_file(case.journal()).unwrap();
        case.sync_ok("after removing the truncated journal");
    }
}

// ---------------------------------------------------------------------------
// --snapshot: the sending side killed around its clone's lifecycle
// ---------------------------------------------------------------------------

/// Syncs `src` to `dst` with `--snapshot --snapshot-verify 0`, `extra`
/// first; returns the run and its `snapshot` object.
fn snapshot_sync(env: &[(&str, &str)], src: &Path, dst: &Path) -> (Run, Value) {
    let args: Vec<&OsStr> = vec![
        "--json".as_ref(),
        "--snapshot".as_ref(),
        "--snapshot-verify".as_ref(),
        "0".as_ref(),
        src.as_os_str(),
        dst.as_os_str(),
    ];
    let run = run_env(env, &args);
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap_or(Value::Null);
    (run, v["snapshot"].clone())
}

/// `path` holds exactly `want`; else where they first differ.
#[track_caller]
fn assert_same(path: &Path, want: &[u8], when: &str) {
    let got = std::fs::read(path).unwrap();
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{}: {} bytes, {} expected, first difference at {at:?}; {when}",
            path.display(),
            got.len(),
            want.len()
        );
    }
}

/// Rewrites one random 4 KiB block of `src` (whose bytes are `bytes`) in
/// place, as a guest would: only that block is copied on write.
fn rewrite_block(src: &Path, bytes: &mut [u8], rng: &mut Rng) {
    use std::os::unix::fs::FileExt;
    let at = rng.below((bytes.len() as u64 - 4096) / 4096) as usize * 4096;
    rng.fill(&mut bytes[at..at + 4096]);
    let f = std::fs::OpenOptions::new().write(true).open(src).unwrap();
    f.write_all_at(&bytes[at..at + 4096], at as u64).unwrap();
    f.sync_all().unwrap();
}

/// A sender killed at each point of a `--snapshot` run: after the clone,
/// after the destination committed, and between keeping the clone and
/// writing its state. The next run must end byte-identical, read only what
/// changed when nothing had moved yet (the first point), read everything
/// when the two ends no longer agree on the base (the others), and leave
/// no clone being taken behind.
#[test]
fn snapshot_sender_killed_at_each_point_recovers_on_the_next_run() {
    snapshot_points(Fs::Xfs);
}

#[test]
fn snapshot_sender_killed_at_each_point_recovers_on_the_next_run_btrfs() {
    snapshot_points(Fs::Btrfs);
}

/// The source on `fs` (it must clone; ext4 cannot, and `--snapshot`
/// refuses it before anything happens: `snapshot.rs` tests that).
fn snapshot_points(fs: Fs) {
    let test = format!("snapshot crash points ({fs})");
    let Some(s) = Scratch::new(fs, 256 * MIB, &test) else {
        return;
    };
    let dst_dir = tempdir();
    let dst = dst_dir.path().join("disk.img");
    let src = s.path("disk.img");
    let mut new = mixed_bytes(41, 8 << 20);
    std::fs::write(&src, &new).unwrap();
    let (run, snap) = snapshot_sync(&[], &src, &dst);
    run.assert_ok();
    assert_eq!(snap["read"], "full", "{run}");
    let new_clone = s.path(".disk.img.vmsync-snapshot.new");
    for (k, (point, reason)) in [
        ("snapshot-taken", Value::Null),
        (
            "snapshot-sent",
            "destination is not the copy of the previous snapshot".into(),
        ),
        ("snapshot-kept", "previous snapshot state damaged".into()),
    ]
    .into_iter()
    .enumerate()
    {
        // A new change each round, so every run has something to send.
        let mut rng = Rng::new(k as u64);
        rewrite_block(&src, &mut new, &mut rng);
        let (run, _) = snapshot_sync(&[(CRASH_ENV, point)], &src, &dst);
        assert_eq!(
            run.signal,
            Some(libc::SIGKILL),
            "not killed at {point}\n{run}"
        );
        // Changed again, so that the next run is not merely up to date
        // (after the destination committed it would be).
        rewrite_block(&src, &mut new, &mut rng);
        let (run, snap) = snapshot_sync(&[], &src, &dst);
        run.assert_ok();
        assert_same(&dst, &new, &format!("after a crash at {point}\n{run}"));
        assert!(
            !new_clone.exists(),
            "{} left after {point}",
            new_clone.display()
        );
        assert_eq!(snap["reason"], reason, "after a crash at {point}\n{run}");
        let delta = reason.is_null();
        assert_eq!(snap["read"], if delta { "delta" } else { "full" }, "{run}");
        if delta {
            assert!(json_u64(&snap, "source_read_bytes") <= 2 * 4096, "{snap}");
        }
        // And the chain holds again: the next change is read alone.
        rewrite_block(&src, &mut new, &mut rng);
        let (run, snap) = snapshot_sync(&[], &src, &dst);
        run.assert_ok();
        assert_eq!(
            snap["read"], "delta",
            "after recovering from {point}\n{run}"
        );
        assert_same(
            &dst,
            &new,
            &format!("the run after recovering from {point}"),
        );
    }
}
