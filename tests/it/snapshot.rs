//! `--snapshot` (issue 13): the sending side reads a reflink clone of the
//! source, keeps it beside the source as the base of the next run, and then
//! reads only the blocks whose physical mapping moved since (FIEMAP).
//!
//! Every test runs with the source on a fresh loop-mounted XFS (reflink=1)
//! and btrfs (`common::fs::Scratch`; skipped where loop devices are missing,
//! a failure instead under `VMSYNC_REQUIRE_LOOP=1`), with a manifest cache of
//! its own (`common::live::Runner`: the cache decides whether a delta is
//! allowed), and checks from outside:
//!
//! * a live writer (this test binary re-run as [`live_writer_child`], writing
//!   numbered, checksummed records in a tight loop): `--snapshot` copies one
//!   point in time of it, with `--freeze`/`--thaw` stopping it (SIGSTOP) and
//!   without; a plain run of the same exits 7;
//! * on a 2 GiB image, a second run reads the rewritten 4 KiB blocks and
//!   (with the default `--snapshot-verify 30`) a thirtieth of the rest, not
//!   the whole image, and the copy is byte-identical;
//! * every documented fallback to a full read (kept snapshot deleted, state
//!   damaged, destination replaced, size changed) ends byte-identical with
//!   the documented reason, and the run after it is a delta again;
//! * a file system without reflinks (ext4, tmpfs) fails before sending;
//!   `--check` and `--dry-run` leave the kept snapshot alone;
//! * a destination changed behind the file system's back (its disk block
//!   overwritten on the loop device, so its stat and the cache still say
//!   "the copy") is caught by the verify slice and repaired in the same run;
//! * pull and push over a real sshd keep the snapshot on the sending side;
//! * `--freeze`/`--thaw`: order, environment, a failing freeze, SIGTERM
//!   while the freeze command blocks; the usage errors of the contract.
//!
//! The snapshot's JSON object is checked against the contract on every run
//! ([`snapshot_report`]): read + skipped = size, a reason exactly when the
//! read was full.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::common::fs::{extents, Fs, Scratch, SCRATCH_SIZE};
use crate::common::live::Runner;
use crate::common::*;
use crate::prom;

const BLOCK: u64 = 4096;
/// The file systems whose reflinks `--snapshot` is for.
const REFLINK_FS: [Fs; 2] = [Fs::Xfs, Fs::Btrfs];

// ---------------------------------------------------------------------------
// Helpers: files, the kept snapshot, the JSON object
// ---------------------------------------------------------------------------

/// The kept snapshot of `src` (`DIR/.NAME.vmsync-snapshot`) with `suffix`
/// (`""`, `".state"`, `".new"`).
fn kept(src: &Path, suffix: &str) -> PathBuf {
    let name = src.file_name().unwrap().to_string_lossy();
    src.with_file_name(format!(".{name}.vmsync-snapshot{suffix}"))
}

/// After a committed `--snapshot` run: the kept snapshot and its state are
/// beside `src`, the clone being made (`.new`) is not.
#[track_caller]
fn assert_kept(src: &Path, what: &str) {
    for suffix in ["", ".state"] {
        assert!(
            kept(src, suffix).is_file(),
            "{what}: no {} (entries: {:?})",
            kept(src, suffix).display(),
            dir_entries(src.parent().unwrap())
        );
    }
    assert!(
        !kept(src, ".new").exists(),
        "{what}: {} left behind",
        kept(src, ".new").display()
    );
}

/// Writes `from..to` of `path` (which exists) with data that has no zero
/// and no repeated 4 KiB block: one random MiB, each block of it stamped
/// with its index and `seed`, in 1 MiB writes (fast even for GiBs).
fn fill_range(path: &Path, from: u64, to: u64, seed: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let mut buf = random_bytes(seed, MIB as usize);
    let mut off = from;
    while off < to {
        let len = MIB.min(to - off) as usize;
        for (i, b) in buf[..len].chunks_mut(BLOCK as usize).enumerate() {
            let index = (off / BLOCK + i as u64) ^ (seed << 40);
            b[..8].copy_from_slice(&index.to_le_bytes());
        }
        f.write_all_at(&buf[..len], off).unwrap();
        off += len as u64;
    }
    f.sync_all().unwrap();
}

/// A new `size`-byte image at `path` (see [`fill_range`]), durable.
fn fill_image(path: &Path, size: u64, seed: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
    fill_range(path, 0, size, seed);
}

/// Rewrites `n` distinct random 4 KiB blocks of `path` among the blocks
/// `within`, with new random bytes, and fsyncs; the bytes rewritten.
fn rewrite_blocks(path: &Path, n: u64, seed: u64, within: std::ops::Range<u64>) -> u64 {
    let mut rng = Rng::new(seed);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < n {
        picked.insert(rng.range(within.start, within.end));
    }
    let f = OpenOptions::new().write(true).open(path).unwrap();
    for (i, &b) in picked.iter().enumerate() {
        let data = random_bytes(seed * 100_000 + i as u64, BLOCK as usize);
        f.write_all_at(&data, b * BLOCK).unwrap();
    }
    f.sync_all().unwrap();
    n * BLOCK
}

/// The `"snapshot"` object of a successful `--snapshot` run of a `size`-byte
/// source, after checking its shape against the contract.
#[track_caller]
fn snapshot_report(v: &Value, size: u64, what: &str) -> Value {
    let s = v.get("snapshot").cloned().unwrap_or(Value::Null);
    assert!(s.is_object(), "{what}: no \"snapshot\" object in {v}");
    let read = s["read"].as_str();
    assert!(
        matches!(read, Some("delta") | Some("full")),
        "{what}: snapshot.read is not \"delta\" or \"full\": {s}"
    );
    match read {
        Some("delta") => assert!(s["reason"].is_null(), "{what}: a delta with a reason: {s}"),
        _ => assert!(
            s["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{what}: a full read without a reason: {s}"
        ),
    }
    for key in [
        "source_read_bytes",
        "source_skipped_bytes",
        "verify_bytes",
        "verify_mismatch_bytes",
    ] {
        json_u64(&s, key);
    }
    assert_eq!(
        json_u64(&s, "source_read_bytes") + json_u64(&s, "source_skipped_bytes"),
        size,
        "{what}: source_read_bytes + source_skipped_bytes != the size: {s}"
    );
    assert!(
        s["snapshot_ms"].as_f64().is_some_and(|t| t >= 0.0),
        "{what}: snapshot_ms is not a number: {s}"
    );
    assert!(
        s["frozen_ms"].is_null() || s["frozen_ms"].as_f64().is_some_and(|t| t >= 0.0),
        "{what}: frozen_ms is neither null nor a number: {s}"
    );
    s
}

/// Runs `body` on a fresh XFS and then on a fresh btrfs of `size` bytes,
/// with `test` and the file system's name for its messages.
fn on_reflink_fs(test: &str, size: u64, body: impl Fn(&Scratch, &str)) {
    for fs in REFLINK_FS {
        let what = format!("{test} ({fs})");
        let Some(s) = Scratch::new(fs, size, &what) else {
            return;
        };
        body(&s, &what);
    }
}

/// Asserts `snapshot.read` and `snapshot.reason`.
#[track_caller]
fn assert_read(s: &Value, read: &str, reason: Option<&str>, what: &str) {
    assert_eq!(s["read"].as_str(), Some(read), "{what}: {s}");
    assert_eq!(s["reason"].as_str(), reason, "{what}: {s}");
}

/// A source in its own directory on a [`Scratch`] and a destination in a
/// plain temporary directory, synced with a cache of their own.
struct Case {
    runner: Runner,
    src: PathBuf,
    dst: PathBuf,
    _dst_dir: tempfile::TempDir,
    /// For the test's other files (metrics, logs, markers).
    aux: tempfile::TempDir,
    size: u64,
    what: String,
}

impl Case {
    /// `name` is the source's directory on `s`; the source is a new image of
    /// `size` bytes.
    fn new(s: &Scratch, name: &str, size: u64, seed: u64) -> Case {
        let dir = s.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("disk.img");
        fill_image(&src, size, seed);
        let dst_dir = tempdir();
        Case {
            runner: Runner::new(),
            src,
            dst: dst_dir.path().join("disk.img"),
            _dst_dir: dst_dir,
            aux: tempdir(),
            size,
            what: format!("{name} ({})", s.fs),
        }
    }

    /// A local sync with `args` before the operands; the JSON contract
    /// holds.
    fn sync(&self, args: &[&str]) -> (Run, Value) {
        let mut all: Vec<&dyn AsRef<OsStr>> = args.iter().map(|a| a as &dyn AsRef<OsStr>).collect();
        all.push(&self.src);
        all.push(&self.dst);
        self.run(&all)
    }

    fn run(&self, args: &[&dyn AsRef<OsStr>]) -> (Run, Value) {
        let (run, v) = self.runner.run_json(args);
        assert_json_contract(&run, &v);
        (run, v)
    }

    /// A successful `--snapshot` sync with `args`; its snapshot object.
    fn snap(&self, args: &[&str], what: &str) -> Value {
        let mut all = vec!["--snapshot"];
        all.extend_from_slice(args);
        let (run, v) = self.sync(&all);
        run.assert_ok();
        self.assert_synced(what);
        snapshot_report(&v, self.size, &format!("{} {what}", self.what))
    }

    /// The destination equals the source (bytes, size, mtime), is alone in
    /// its directory, and the kept snapshot is in place.
    #[track_caller]
    fn assert_synced(&self, what: &str) {
        assert_same_content(&self.src, &self.dst);
        assert_same_meta(&self.src, &self.dst);
        assert_eq!(
            dir_entries(self.dst.parent().unwrap()),
            ["disk.img"],
            "{} {what}: leftovers beside the destination",
            self.what
        );
        assert_kept(&self.src, &format!("{} {what}", self.what));
    }
}

// ---------------------------------------------------------------------------
// 1. A live writer
// ---------------------------------------------------------------------------

/// Size of one record of the live writer.
const RECORD: u64 = 4096;
/// The live image: big enough that reading and hashing it takes far longer
/// than the file system's timestamp granularity, so a plain run certainly
/// sees the writer move its mtime.
const LIVE_IMAGE: u64 = 256 * MIB;
/// The writer's records cycle through the first 32 MiB (8192 slots); the
/// rest of the image is static data.
const LIVE_REGION: u64 = 32 * MIB;
/// Tells [`live_writer_child`] which file to write (and that it was started
/// as the writer, not by a plain `--ignored` run).
const WRITER_ENV: &str = "VMSYNC_TEST_LIVE_WRITER";
const WRITER_READY: &str = "live-writer: first record written";

/// Record number `seq`: the number, bytes derived from it, and the first 8
/// bytes of the BLAKE3 of all that.
fn record(seq: u64) -> Vec<u8> {
    let mut r = vec![0u8; RECORD as usize];
    r[..8].copy_from_slice(&seq.to_le_bytes());
    Rng::new(seq).fill(&mut r[8..RECORD as usize - 8]);
    let sum = blake3::hash(&r[..RECORD as usize - 8]);
    r[RECORD as usize - 8..].copy_from_slice(&sum.as_bytes()[..8]);
    r
}

/// Checks that `region` is the writer's region at one point in time: every
/// record whole (checksum), in its slot (`seq % slots`), and the state after
/// records `0..=m` for one `m`: each slot holds the last record up to `m`
/// that maps to it, or zeros if none did. `Ok(Some(m))`, `Ok(None)` when
/// nothing was written.
fn point_in_time(region: &[u8]) -> Result<Option<u64>, String> {
    let slots = region.len() as u64 / RECORD;
    let mut seqs = Vec::with_capacity(slots as usize);
    for (slot, r) in region.chunks(RECORD as usize).enumerate() {
        if r.iter().all(|&b| b == 0) {
            seqs.push(None);
            continue;
        }
        let seq = u64::from_le_bytes(r[..8].try_into().unwrap());
        if r != record(seq).as_slice() {
            return Err(format!(
                "slot {slot} holds a torn or foreign record (it claims number {seq})"
            ));
        }
        if seq % slots != slot as u64 {
            return Err(format!(
                "slot {slot} holds record {seq}, which belongs elsewhere"
            ));
        }
        seqs.push(Some(seq));
    }
    let Some(m) = seqs.iter().flatten().copied().max() else {
        return Ok(None);
    };
    for (slot, &got) in seqs.iter().enumerate() {
        let slot = slot as u64;
        let want = (m >= slot).then(|| m - (m - slot) % slots);
        if got != want {
            return Err(format!(
                "slot {slot} holds record {got:?} but a copy of the moment record {m} \
                 was written would hold {want:?}: a mix of two moments"
            ));
        }
    }
    Ok(Some(m))
}

/// The live writer itself, run as a separate process by [`Writer::start`]
/// (this test binary with `--exact snapshot::live_writer_child --ignored`):
/// writes record `seq` into slot `seq % slots` of the file named by
/// [`WRITER_ENV`], for ever, in a tight loop; says so on stdout after the
/// first record. Stops when its parent (the test) is gone.
#[test]
#[ignore = "the live writer process of the live_writer tests, started by them"]
fn live_writer_child() {
    let Ok(path) = std::env::var(WRITER_ENV) else {
        return;
    };
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let slots = LIVE_REGION / RECORD;
    // SAFETY: plain syscall.
    let parent = unsafe { libc::getppid() };
    for seq in 0u64.. {
        f.write_all_at(&record(seq), seq % slots * RECORD).unwrap();
        if seq == 0 {
            let mut out = std::io::stdout();
            writeln!(out, "{WRITER_READY}").unwrap();
            out.flush().unwrap();
        }
        // SAFETY: plain syscall.
        if seq % 1024 == 0 && unsafe { libc::getppid() } != parent {
            return;
        }
    }
}

/// The running live writer; killed (also when stopped) on drop.
struct Writer {
    child: Child,
}

impl Writer {
    /// Starts the writer on `path` and returns once it has written its
    /// first record.
    fn start(path: &Path) -> Writer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "snapshot::live_writer_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the live writer");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads to EOF, so the writer never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.contains(WRITER_READY) {
                    let _ = tx.send(());
                }
            }
        });
        let writer = Writer { child };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!("the live writer did not report its first record (see its stderr above)");
        }
        writer
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its state letter in `/proc/PID/stat` (`T` when stopped).
    fn state(&self) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = stat.rsplit(')').next().unwrap();
        after.trim().chars().next().unwrap()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dst` is a point-in-time copy of the live image `src`: the record region
/// passes [`point_in_time`] with at least the first record written, the
/// static rest equals the source's.
#[track_caller]
fn assert_point_in_time(src: &Path, dst: &Path, what: &str) -> u64 {
    assert_eq!(file_len(dst), LIVE_IMAGE, "{what}: size of the copy");
    let mut region = vec![0u8; LIVE_REGION as usize];
    File::open(dst)
        .unwrap()
        .read_exact_at(&mut region, 0)
        .unwrap();
    let m = match point_in_time(&region) {
        Ok(Some(m)) => m,
        Ok(None) => panic!("{what}: no record in the copy, though one was written before"),
        Err(e) => panic!("{what}: not a point-in-time copy: {e}"),
    };
    let (fs, fd) = (File::open(src).unwrap(), File::open(dst).unwrap());
    let (mut a, mut b) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut off = LIVE_REGION;
    while off < LIVE_IMAGE {
        fs.read_exact_at(&mut a, off).unwrap();
        fd.read_exact_at(&mut b, off).unwrap();
        assert!(
            a == b,
            "{what}: the static data differs in the MiB at {off}"
        );
        off += MIB;
    }
    m
}

#[test]
fn live_writer_snapshot_copies_one_point_in_time() {
    on_reflink_fs(
        "live_writer_snapshot_copies_one_point_in_time",
        GIB,
        live_writer,
    );
}

// The kept snapshot and the writer's copy-on-write keep up to two
// images' worth of blocks.
fn live_writer(s: &Scratch, test: &str) {
    let src = s.path("disk.img");
    File::create(&src).unwrap().set_len(LIVE_IMAGE).unwrap();
    fill_range(&src, LIVE_REGION, LIVE_IMAGE, 1);
    let out = tempdir();
    let runner = Runner::new();
    let writer = Writer::start(&src);

    // Frozen: the writer is stopped around the clone.
    let what = format!("{test} --freeze/--thaw");
    let dst = out.path().join("frozen.img");
    let freeze = format!("kill -STOP {}", writer.pid());
    let thaw = format!("kill -CONT {}", writer.pid());
    let (run, v) = runner.run_json(&[
        &"--snapshot",
        &"--freeze",
        &freeze,
        &"--thaw",
        &thaw,
        &src,
        &dst,
    ]);
    run.assert_ok();
    assert_json_contract(&run, &v);
    let snap = snapshot_report(&v, LIVE_IMAGE, &what);
    assert!(snap["frozen_ms"].as_f64().is_some(), "{what}: {snap}");
    assert_ne!(writer.state(), 'T', "{what}: the writer is still stopped");
    let m = assert_point_in_time(&src, &dst, &what);
    eprintln!("{what}: the copy holds records 0..={m}");

    // Plain: the same run reads the moving file and must refuse it.
    let what = format!("{test} without --snapshot");
    let plain = out.path().join("plain.img");
    let (run, v) = runner.run_json(&[&src, &plain]);
    run.assert_code(exit::SOURCE_CHANGED);
    assert_json_contract(&run, &v);
    assert!(v["snapshot"].is_null(), "{what}: {v}");
    assert!(
        !plain.exists(),
        "{what}: a copy of a moving source was committed"
    );

    // Not frozen: the clone alone is atomic against the writer's writes.
    let what = format!("{test} --snapshot alone");
    let dst = out.path().join("clone.img");
    let (run, v) = runner.run_json(&[&"--snapshot", &src, &dst]);
    run.assert_ok();
    assert_json_contract(&run, &v);
    let snap = snapshot_report(&v, LIVE_IMAGE, &what);
    assert!(snap["frozen_ms"].is_null(), "{what}: {snap}");
    let m2 = assert_point_in_time(&src, &dst, &what);
    assert!(
        m2 > m,
        "{what}: record {m2} is not after {m}: not a new clone"
    );
    assert_kept(&src, &what);
    drop(writer);
}

// ---------------------------------------------------------------------------
// 2. Changed extents only
// ---------------------------------------------------------------------------

const BIG_IMAGE: u64 = 2 * GIB;
/// Scattered 4 KiB blocks rewritten between runs.
const REWRITTEN: u64 = 200;

#[test]
fn second_run_reads_only_the_changed_blocks() {
    on_reflink_fs(
        "second_run_reads_only_the_changed_blocks",
        6 * GIB,
        changed_extents,
    );
}

fn changed_extents(s: &Scratch, test: &str) {
    let c = Case::new(s, "big", BIG_IMAGE, 2);
    let blocks = BIG_IMAGE / BLOCK;

    let snap = c.snap(&[], "first run");
    assert_read(&snap, "full", Some("no previous snapshot"), test);
    assert_eq!(
        json_u64(&snap, "source_read_bytes"),
        BIG_IMAGE,
        "{test}: {snap}"
    );
    let first = inode(&kept(&c.src, ""));

    // Without the verify slice: exactly the rewritten blocks (aligned).
    let changed = rewrite_blocks(&c.src, REWRITTEN, 3, 0..blocks);
    let prom_path = c.aux.path().join("vmsync.prom");
    let snap = c.snap(
        &[
            "--snapshot-verify",
            "0",
            "--metrics-file",
            prom_path.to_str().unwrap(),
        ],
        "delta without verify",
    );
    let what = format!("{test}: --snapshot-verify 0");
    assert_read(&snap, "delta", None, &what);
    let read = json_u64(&snap, "source_read_bytes");
    assert!(
        (changed..=changed + changed / 10).contains(&read),
        "{what}: read {read} bytes for {changed} rewritten: {snap}"
    );
    assert_eq!(json_u64(&snap, "verify_bytes"), 0, "{what}: {snap}");
    assert_ne!(
        inode(&kept(&c.src, "")),
        first,
        "{what}: the kept snapshot was not replaced by the new clone"
    );
    let text = std::fs::read_to_string(&prom_path).expect("metrics file written");
    let m = prom::parse(&text).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"));
    let dst = c.dst.display().to_string();
    let labels = [("destination", dst.as_str()), ("mode", "sync")];
    for (name, want) in [
        ("vmsync_snapshot_delta", 1.0),
        ("vmsync_source_read_bytes", read as f64),
        ("vmsync_source_skipped_bytes", (BIG_IMAGE - read) as f64),
        ("vmsync_snapshot_verify_mismatch_bytes", 0.0),
    ] {
        assert_eq!(
            prom::get(&m, name, &labels),
            Some(want),
            "{what}: {name}\n{text}"
        );
    }

    // The default verify slice: a thirtieth of the skipped bytes on top.
    let changed = rewrite_blocks(&c.src, REWRITTEN, 4, 0..blocks);
    let snap = c.snap(&[], "delta with the default verify slice");
    let what = format!("{test}: default --snapshot-verify");
    assert_read(&snap, "delta", None, &what);
    let read = json_u64(&snap, "source_read_bytes");
    let verify = json_u64(&snap, "verify_bytes");
    let slice = (BIG_IMAGE - changed) / 30;
    assert!(
        verify > 0 && verify <= slice + slice / 10 + MIB,
        "{what}: verify_bytes {verify}, a thirtieth is {slice}: {snap}"
    );
    assert!(
        read >= changed + verify && read <= changed + changed / 10 + verify,
        "{what}: read {read} bytes for {changed} rewritten and {verify} verified: {snap}"
    );
    assert_eq!(
        json_u64(&snap, "verify_mismatch_bytes"),
        0,
        "{what}: {snap}"
    );
}

// ---------------------------------------------------------------------------
// 3. Fallbacks
// ---------------------------------------------------------------------------

const SMALL_IMAGE: u64 = 16 * MIB;

#[derive(Clone, Copy, Debug)]
enum Damage {
    SnapshotDeleted,
    StateFlipped,
    DestinationReplaced,
    SizeChanged,
}

impl Damage {
    fn reason(self) -> &'static str {
        match self {
            Damage::SnapshotDeleted => "no previous snapshot",
            Damage::StateFlipped => "previous snapshot state damaged",
            Damage::DestinationReplaced => "destination is not the copy of the previous snapshot",
            Damage::SizeChanged => "size changed",
        }
    }

    fn apply(self, c: &Case, tmp: &Path) -> u64 {
        match self {
            Damage::SnapshotDeleted => std::fs::remove_file(kept(&c.src, "")).unwrap(),
            Damage::StateFlipped => {
                let state = kept(&c.src, ".state");
                let mut bytes = std::fs::read(&state).unwrap();
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x10;
                write_file(&state, &bytes);
            }
            Damage::DestinationReplaced => {
                let other = tmp.join("other.img");
                fill_image(&other, c.size, 99);
                let st = Command::new("cp").arg(&other).arg(&c.dst).status().unwrap();
                assert!(st.success(), "cp over the destination");
            }
            Damage::SizeChanged => {
                let f = OpenOptions::new().write(true).open(&c.src).unwrap();
                f.set_len(c.size + MIB).unwrap();
                drop(f);
                fill_range(&c.src, c.size, c.size + MIB, 98);
                return c.size + MIB;
            }
        }
        c.size
    }
}

#[test]
fn fallbacks_read_everything_and_say_why() {
    on_reflink_fs(
        "fallbacks_read_everything_and_say_why",
        SCRATCH_SIZE,
        fallbacks,
    );
}

fn fallbacks(s: &Scratch, test: &str) {
    let tmp = tempdir();
    for (i, damage) in [
        Damage::SnapshotDeleted,
        Damage::StateFlipped,
        Damage::DestinationReplaced,
        Damage::SizeChanged,
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("{damage:?}");
        let mut c = Case::new(s, &name, SMALL_IMAGE, 10 + i as u64);
        let what = format!("{test} {damage:?}");
        c.snap(&[], "first run");
        rewrite_blocks(&c.src, 8, 20 + i as u64, 0..SMALL_IMAGE / BLOCK);
        c.size = damage.apply(&c, tmp.path());
        let snap = c.snap(&[], "after the damage");
        assert_read(&snap, "full", Some(damage.reason()), &what);
        assert_eq!(
            json_u64(&snap, "source_read_bytes"),
            c.size,
            "{what}: {snap}"
        );
        // The full run made a sound base again.
        let changed = rewrite_blocks(&c.src, 8, 30 + i as u64, 0..SMALL_IMAGE / BLOCK);
        let snap = c.snap(&["--snapshot-verify", "0"], "the run after");
        assert_read(&snap, "delta", None, &format!("{what}, the run after"));
        assert!(
            json_u64(&snap, "source_read_bytes") <= changed + changed / 10,
            "{what}, the run after: {snap}"
        );
    }
}

#[test]
fn snapshot_without_reflinks_fails_before_sending() {
    let test = "snapshot_without_reflinks_fails_before_sending";
    let ext4 = Scratch::new(Fs::Ext4, 64 * MIB, test);
    let Some(ext4) = ext4 else {
        return;
    };
    let tmpfs = Tmpfs::mount(64 * MIB);
    if tmpfs.is_none() && std::env::var("VMSYNC_REQUIRE_LOOP").as_deref() == Ok("1") {
        panic!("{test}: cannot mount a tmpfs");
    }
    let mut dirs = vec![("ext4", ext4.path("src"))];
    if let Some(t) = &tmpfs {
        dirs.push(("tmpfs", t.path().join("src")));
    }
    for (fs, dir) in dirs {
        let what = format!("{test} ({fs})");
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("disk.img");
        fill_image(&src, 4 * MIB, 40);
        let runner = Runner::new();
        let out = tempdir();

        let dst = out.path().join("new.img");
        let (run, v) = runner.run_json(&[&"--snapshot", &src, &dst]);
        run.assert_code(exit::IO);
        assert_json_contract(&run, &v);
        assert!(
            run.stderr.contains("--snapshot") && run.stderr.to_lowercase().contains("reflink"),
            "{what}: the message does not name --snapshot and reflinks\n{run}"
        );
        assert!(!dst.exists(), "{what}: the destination was created");

        let old = out.path().join("old.img");
        write_file(&old, &random_bytes(41, (4 * MIB) as usize));
        set_mtime_ns(&old, OLD_MTIME_NS);
        let (run, _) = runner.run_json(&[&"--snapshot", &src, &old]);
        run.assert_code(exit::IO);
        assert_content(&old, &random_bytes(41, (4 * MIB) as usize));
        assert_eq!(mtime_ns(&old), OLD_MTIME_NS, "{what}: destination touched");
        assert_eq!(dir_entries(out.path()), ["old.img"], "{what}: leftovers");
        assert_eq!(
            dir_entries(&dir),
            ["disk.img"],
            "{what}: files beside the source"
        );
    }
}

#[test]
fn check_and_dry_run_leave_the_kept_snapshot_alone() {
    on_reflink_fs(
        "check_and_dry_run_leave_the_kept_snapshot_alone",
        SCRATCH_SIZE,
        check_and_dry_run,
    );
}

fn check_and_dry_run(s: &Scratch, test: &str) {
    let c = Case::new(s, "check", SMALL_IMAGE, 50);
    c.snap(&[], "first run");
    let ino = inode(&kept(&c.src, ""));
    let state = std::fs::read(kept(&c.src, ".state")).unwrap();
    let untouched = |what: &str| {
        assert_kept(&c.src, what);
        assert_eq!(
            inode(&kept(&c.src, "")),
            ino,
            "{what}: kept snapshot replaced"
        );
        assert_eq!(
            std::fs::read(kept(&c.src, ".state")).unwrap(),
            state,
            "{what}: state rewritten"
        );
    };

    let what = format!("{test}: --check of an up-to-date copy");
    let (run, v) = c.sync(&["--snapshot", "--check"]);
    run.assert_ok();
    assert!(json_bool(&v, "identical"), "{what}: {v}");
    let snap = snapshot_report(&v, SMALL_IMAGE, &what);
    assert_eq!(snap["read"].as_str(), Some("full"), "{what}: {snap}");
    untouched(&what);

    rewrite_blocks(&c.src, 4, 51, 0..SMALL_IMAGE / BLOCK);
    let dst_before = std::fs::read(&c.dst).unwrap();
    let what = format!("{test}: --check of an outdated copy");
    let (run, v) = c.sync(&["--snapshot", "--check"]);
    run.assert_code(exit::DIFFERENT);
    assert!(!json_bool(&v, "identical"), "{what}: {v}");
    untouched(&what);

    let what = format!("{test}: --dry-run");
    let (run, v) = c.sync(&["--snapshot", "--dry-run"]);
    run.assert_ok();
    let snap = snapshot_report(&v, SMALL_IMAGE, &what);
    assert_eq!(snap["read"].as_str(), Some("full"), "{what}: {snap}");
    untouched(&what);
    assert!(
        std::fs::read(&c.dst).unwrap() == dst_before,
        "{what}: destination changed"
    );

    // Neither spoiled the delta state.
    let snap = c.snap(&["--snapshot-verify", "0"], "sync after --check/--dry-run");
    assert_read(&snap, "delta", None, &format!("{test}: the sync after"));
}

#[test]
fn snapshot_dir_keeps_the_snapshot_there() {
    on_reflink_fs(
        "snapshot_dir_keeps_the_snapshot_there",
        SCRATCH_SIZE,
        snapshot_dir,
    );
}

fn snapshot_dir(s: &Scratch, test: &str) {
    let c = Case::new(s, "src", SMALL_IMAGE, 60);
    let state_dir = s.path("state");
    std::fs::create_dir(&state_dir).unwrap();
    let sd = state_dir.to_str().unwrap();
    let run_in = |what: &str| {
        let (run, v) = c.sync(&["--snapshot", "--snapshot-dir", sd]);
        run.assert_ok();
        assert_same_content(&c.src, &c.dst);
        assert_eq!(
            dir_entries(c.src.parent().unwrap()),
            ["disk.img"],
            "{test} {what}: the snapshot went beside the source"
        );
        let names = dir_entries(&state_dir);
        let snapshot = names.iter().find(|n| {
            n.strip_prefix("disk.img.")
                .and_then(|r| r.strip_suffix(".vmsync-snapshot"))
                .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        });
        let snapshot = snapshot.unwrap_or_else(|| {
            panic!("{test} {what}: no disk.img.<16 hex>.vmsync-snapshot in {names:?}")
        });
        assert!(
            names.contains(&format!("{snapshot}.state")),
            "{test} {what}: no state file in {names:?}"
        );
        assert!(
            !names.iter().any(|n| n.ends_with(".new")),
            "{test} {what}: a .new left in {names:?}"
        );
        snapshot_report(&v, SMALL_IMAGE, what)
    };
    let snap = run_in("first run");
    assert_read(&snap, "full", Some("no previous snapshot"), test);
    rewrite_blocks(&c.src, 4, 61, 0..SMALL_IMAGE / BLOCK);
    let snap = run_in("second run");
    assert_read(&snap, "delta", None, test);

    // Elsewhere than the source's file system: refused, nothing sent.
    let other = tempdir();
    let dst = other.path().join("never.img");
    let (run, _) = c.runner.run_json(&[
        &"--snapshot",
        &"--snapshot-dir",
        &other.path(),
        &c.src,
        &dst,
    ]);
    assert!(
        run.code == exit::USAGE || run.code == exit::IO,
        "{test}: --snapshot-dir on another file system: exit {}\n{run}",
        run.code
    );
    assert!(
        !dst.exists(),
        "{test}: sent despite the refused --snapshot-dir"
    );
}

// ---------------------------------------------------------------------------
// 4. The verify slice
// ---------------------------------------------------------------------------

/// Overwrites the 4 KiB at each of `offsets` of `path` with new random
/// bytes on `device` (the block device of `path`'s file system, a loop
/// device over `image`), behind the file system's back: the stat of `path`
/// stays the same (so the receiver's cache still calls it the copy), and
/// after dropping the page cache a read of `path` returns the garbage.
fn corrupt_behind_fs(path: &Path, device: &Path, image: &Path, offsets: &[u64]) {
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    let map = extents(path);
    // Where the kernel refuses writes to a mounted device
    // (CONFIG_BLK_DEV_WRITE_MOUNTED=n), the loop device's backing file
    // does the same: the loop driver reads through it.
    let target = match OpenOptions::new().write(true).open(device) {
        Ok(dev) => dev,
        Err(_) => OpenOptions::new().write(true).open(image).unwrap(),
    };
    let garbage: Vec<Vec<u8>> = (0..offsets.len())
        .map(|i| random_bytes(7000 + i as u64, BLOCK as usize))
        .collect();
    for (&offset, bytes) in offsets.iter().zip(&garbage) {
        let &(logical, physical, _) = map
            .iter()
            .find(|&&(l, _, len)| l <= offset && offset + BLOCK <= l + len)
            .unwrap_or_else(|| panic!("no extent of {} holds offset {offset}", path.display()));
        target
            .write_all_at(bytes, physical + offset - logical)
            .unwrap();
    }
    target.sync_all().unwrap();
    drop(target);
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").expect("drop the page cache");
    let f = File::open(path).unwrap();
    let mut now = vec![0u8; BLOCK as usize];
    for (&offset, bytes) in offsets.iter().zip(&garbage) {
        f.read_exact_at(&mut now, offset).unwrap();
        assert!(
            &now == bytes,
            "the write to {} did not change {} at {offset}",
            device.display(),
            path.display()
        );
    }
}

/// A delta-capable `--snapshot` copy of a `size`-byte image on its own ext4
/// (`d`), whose bytes at `offsets` were then changed behind the file
/// system's back, and a few rewritten source blocks (so the next run is
/// no quick-check no-op).
fn diverged(s: &Scratch, d: &Scratch, size: u64, offsets: &[u64]) -> Case {
    let mut c = Case::new(s, "verify", size, 70);
    std::fs::create_dir(d.path("dst")).unwrap();
    c.dst = d.path("dst/disk.img");
    c.snap(&[], "first run");
    corrupt_behind_fs(&c.dst, d.device(), d.image(), offsets);
    rewrite_blocks(&c.src, 4, 72, 0..size / BLOCK / 8);
    c
}

/// The run after a verify slice mismatch: the warning, the mismatch in
/// the JSON, and (checked first, as what matters most) a destination that
/// equals the source again.
#[track_caller]
fn assert_resynced(c: &Case, run: &Run, v: &Value, what: &str) {
    run.assert_ok();
    if let Some(off) = first_difference(&c.src, &c.dst) {
        panic!(
            "{what}: after the run the destination still differs from the source at {off}\n\
             snapshot: {}\n{run}",
            v["snapshot"]
        );
    }
    assert_same_meta(&c.src, &c.dst);
    assert_kept(&c.src, what);
    assert!(
        run.stderr.contains("verify slice mismatch"),
        "{what}: no warning\n{run}"
    );
    let snap = snapshot_report(v, c.size, what);
    assert!(
        json_u64(&snap, "verify_mismatch_bytes") > 0,
        "{what}: {snap}"
    );
    assert_read(&snap, "full", Some("verify slice mismatch"), what);
}

#[test]
fn verify_slice_catches_a_destination_changed_behind_the_cache() {
    on_reflink_fs(
        "verify_slice_catches_a_destination_changed_behind_the_cache",
        SCRATCH_SIZE,
        verify_slice,
    );
}

fn verify_slice(s: &Scratch, test: &str) {
    let Some(d) = Scratch::new(Fs::Ext4, 64 * MIB, test) else {
        return;
    };
    let c = diverged(s, &d, SMALL_IMAGE, &[3 * SMALL_IMAGE / 4]);
    let what = format!("{test}: --snapshot-verify 1");
    let (run, v) = c.sync(&["--snapshot", "--snapshot-verify", "1"]);
    assert_resynced(&c, &run, &v, &what);

    // The repaired copy is a sound base again.
    rewrite_blocks(&c.src, 4, 73, 0..SMALL_IMAGE / BLOCK);
    let snap = c.snap(&["--snapshot-verify", "1"], "the run after");
    assert_read(&snap, "delta", None, &format!("{what}, the run after"));
    assert_eq!(
        json_u64(&snap, "verify_mismatch_bytes"),
        0,
        "{what}: {snap}"
    );
}

/// With the default slice (a thirtieth), a mismatch in it must repair what
/// lies outside it too: "syncing again with a full read". The destination
/// differs every 16 KiB, so whichever 1 MiB stripes this run's slice
/// holds find a mismatch, and most of the damage lies outside the slice.
#[test]
fn verify_slice_mismatch_resyncs_the_whole_destination() {
    on_reflink_fs(
        "verify_slice_mismatch_resyncs_the_whole_destination",
        SCRATCH_SIZE,
        |s, test| {
            let Some(d) = Scratch::new(Fs::Ext4, 256 * MIB, test) else {
                return;
            };
            let size = 64 * MIB;
            let offsets: Vec<u64> = (0..size / (16 * KIB)).map(|i| i * 16 * KIB).collect();
            let c = diverged(s, &d, size, &offsets);
            let what = format!("{test}: default --snapshot-verify");
            let (run, v) = c.sync(&["--snapshot"]);
            assert_resynced(&c, &run, &v, &what);
        },
    );
}

// ---------------------------------------------------------------------------
// 5. Over ssh
// ---------------------------------------------------------------------------

#[test]
fn pull_and_push_over_ssh_keep_the_snapshot_on_the_sending_side() {
    let Some(sshd) = Sshd::start() else {
        return;
    };
    let test = "pull_and_push_over_ssh_keep_the_snapshot_on_the_sending_side";
    on_reflink_fs(test, SCRATCH_SIZE, |s, test| {
        for pull in [true, false] {
            let what = format!("{test} {}", if pull { "pull" } else { "push" });
            let c = Case::new(s, if pull { "pull" } else { "push" }, SMALL_IMAGE, 80);
            // The receiver's cache: local for a pull, the remote server's
            // (given through the remote command) for a push.
            let remote_path = format!(
                "VMSYNC_CACHE_DIR={} {}",
                c.runner.cache().display(),
                sshd.remote_path()
            );
            let (src, dst) = if pull {
                (sshd.remote(&c.src), c.dst.display().to_string())
            } else {
                (c.src.display().to_string(), sshd.remote(&c.dst))
            };
            let rsh = sshd.rsh();
            let sync = |round: &str| {
                let (run, v) = c.run(&[
                    &"-e",
                    &rsh,
                    &"--remote-path",
                    &remote_path,
                    &"--snapshot",
                    &src,
                    &dst,
                ]);
                if run.code != exit::OK {
                    eprintln!("sshd log:\n{}", sshd.log());
                }
                run.assert_ok();
                c.assert_synced(round);
                snapshot_report(&v, SMALL_IMAGE, &format!("{what} {round}"))
            };
            let snap = sync("first run");
            assert_read(&snap, "full", Some("no previous snapshot"), &what);
            rewrite_blocks(&c.src, 4, 81, 0..SMALL_IMAGE / BLOCK);
            let snap = sync("second run");
            assert_read(&snap, "delta", None, &format!("{what} second run"));
        }
    });
}

// ---------------------------------------------------------------------------
// 6. Freeze and thaw
// ---------------------------------------------------------------------------

/// `'...'` for `/bin/sh`.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[test]
fn freeze_and_thaw_bracket_the_clone() {
    on_reflink_fs(
        "freeze_and_thaw_bracket_the_clone",
        SCRATCH_SIZE,
        |s, test| {
            let c = Case::new(s, "freeze", 4 * MIB, 90);
            let log = c.aux.path().join("freeze.log");
            // The clone is made into `.new`, which may exist (empty) before the
            // freeze, so the frozen window holds the FICLONE alone: `test -s`.
            let new = sh_quote(&kept(&c.src, ".new"));
            let freeze = format!(
            "test -s {new} && echo clone-before-freeze >> {log}; echo \"freeze $VMSYNC_SOURCE\" >> {log}",
            log = sh_quote(&log)
        );
            let thaw = format!(
                "test -s {new} && echo clone-made >> {log}; echo \"thaw $VMSYNC_SOURCE\" >> {log}",
                log = sh_quote(&log)
            );
            let snap = c.snap(&["--freeze", &freeze, "--thaw", &thaw], "frozen run");
            assert!(snap["frozen_ms"].as_f64().is_some(), "{test}: {snap}");
            let src = c.src.display();
            assert_eq!(
                std::fs::read_to_string(&log).unwrap(),
                format!("freeze {src}\nclone-made\nthaw {src}\n"),
                "{test}: what the freeze and thaw commands saw"
            );
        },
    );
}

#[test]
fn a_failing_freeze_is_thawed_and_sends_nothing() {
    on_reflink_fs(
        "a_failing_freeze_is_thawed_and_sends_nothing",
        SCRATCH_SIZE,
        |s, test| {
            let c = Case::new(s, "freeze", 4 * MIB, 91);
            let marker = c.aux.path().join("thawed");
            let thaw = format!("touch {}", sh_quote(&marker));
            let (run, v) = c.sync(&["--snapshot", "--freeze", "false", "--thaw", &thaw]);
            run.assert_code(exit::IO);
            assert!(
                run.stderr.contains("freeze command") && run.stderr.contains("failed"),
                "{test}: the message does not say the freeze command failed\n{run}"
            );
            assert!(v["error"].is_string(), "{test}: {v}");
            assert!(marker.exists(), "{test}: the thaw command did not run");
            assert!(!c.dst.exists(), "{test}: the destination was created");
            assert_eq!(
                dir_entries(c.src.parent().unwrap()),
                ["disk.img"],
                "{test}: a clone was left beside the source"
            );
        },
    );
}

#[test]
fn sigterm_while_the_freeze_command_blocks_still_thaws() {
    on_reflink_fs(
        "sigterm_while_the_freeze_command_blocks_still_thaws",
        SCRATCH_SIZE,
        sigterm_during_freeze,
    );
}

fn sigterm_during_freeze(s: &Scratch, test: &str) {
    let c = Case::new(s, "freeze", 4 * MIB, 92);
    let tmp = tempdir();
    let fifo = tmp.path().join("frozen.fifo");
    let marker = tmp.path().join("thawed");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success(), "mkfifo");
    // Says it is frozen, then blocks (as a hung guest agent would), with
    // its output away from vmsync's pipes.
    let freeze = format!(
        "echo frozen > {}; exec sleep 60 </dev/null >/dev/null 2>&1",
        sh_quote(&fifo)
    );
    let thaw = format!("touch {}", sh_quote(&marker));
    let mut bg = c.runner.spawn(&[
        &"--json",
        &"--snapshot",
        &"--freeze",
        &freeze,
        &"--thaw",
        &thaw,
        &c.src,
        &c.dst,
    ]);
    let (tx, rx) = mpsc::channel();
    let reader_fifo = fifo.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let ok = File::open(&reader_fifo)
            .map(|f| BufReader::new(f).read_line(&mut line))
            .is_ok();
        let _ = tx.send(ok && line.trim() == "frozen");
    });
    // Until the freeze command speaks, or vmsync exits without running it.
    let mut frozen = Err(mpsc::RecvTimeoutError::Timeout);
    for _ in 0..600 {
        frozen = rx.recv_timeout(Duration::from_millis(100));
        if frozen.is_ok() || bg.has_exited() {
            break;
        }
    }
    if frozen != Ok(true) {
        // Unblock the reader thread (if it is still opening the fifo).
        let _ = OpenOptions::new().write(true).open(&fifo);
        let run = bg.wait();
        panic!("{test}: the freeze command never said it was frozen\n{run}");
    }
    let signalled = std::time::Instant::now();
    bg.signal(libc::SIGTERM);
    let run = bg.wait();
    let after = signalled.elapsed();
    run.assert_code(exit::SIGTERM);
    assert!(
        marker.exists(),
        "{test}: the thaw command did not run\n{run}"
    );
    assert!(
        after < Duration::from_secs(20),
        "{test}: took {after:?} after SIGTERM: it waited for the freeze command\n{run}"
    );
    assert!(!c.dst.exists(), "{test}: the destination was created");
    assert_eq!(
        dir_entries(c.src.parent().unwrap()),
        ["disk.img"],
        "{test}: an interrupted run left a clone beside the source"
    );
}

#[test]
fn snapshot_usage_errors() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(100, 64 * KIB as usize));
    let runner = Runner::new();
    let dir = tempdir();
    let src_dir = pair.tmp.path().join("src");
    let dst_dir = dir.path().to_path_buf();
    let cases: Vec<(&str, Vec<&dyn AsRef<OsStr>>)> = vec![
        (
            "--snapshot with -r",
            vec![&"--snapshot", &"-r", &src_dir, &dst_dir],
        ),
        (
            "--freeze without --snapshot",
            vec![&"--freeze", &"true", &pair.src, &pair.dst],
        ),
        (
            "--thaw without --snapshot",
            vec![&"--thaw", &"true", &pair.src, &pair.dst],
        ),
        (
            "--freeze with a remote source",
            vec![
                &"-e",
                &"false",
                &"--snapshot",
                &"--freeze",
                &"true",
                &"127.0.0.1:/nonexistent/disk.img",
                &pair.dst,
            ],
        ),
    ];
    for (what, args) in cases {
        let run = runner.run(&args);
        assert_no_panic(&run);
        assert_eq!(
            run.code,
            exit::USAGE,
            "snapshot_usage_errors {what}: exit code\n{run}"
        );
        assert!(
            !pair.dst.exists(),
            "snapshot_usage_errors {what}: sent anyway"
        );
        assert!(
            dir_entries(dir.path()).is_empty(),
            "snapshot_usage_errors {what}: wrote into the destination directory"
        );
    }
}
