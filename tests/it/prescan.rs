//! A pushed file's scan starts while the other end is still starting up
//! (`sender::Prescan`): ssh's handshake and the remote binary's start
//! overlap with reading the source instead of preceding it.

use crate::common::*;

/// The relay holds back the client's first byte until the client has read
/// half the source, and gives up after 30 s. Without the prescan the client
/// reads nothing of its source before the receiver answers, which it cannot
/// do before it has the first byte: the marker would say "none".
#[test]
fn the_source_is_scanned_before_the_other_end_answers() {
    let pair = Pair::new();
    let data = random_bytes(301, (64 * MIB) as usize);
    pair.write_src(&data);
    run(&[&pair.src, &pair.dst]).assert_ok();
    // Touched: the receiver will want the manifest, which is what the
    // prescan produces.
    set_mtime_ns(&pair.src, SOURCE_MTIME_NS + 1_000_000_000);

    let marker = pair.tmp.path().join("read-before-first-byte");
    let script = pair.tmp.path().join("wait-for-reads.sh");
    // `exec`, so that $PPID is the relay; the relay's parent is the client.
    // /proc/PID/io counts the reads of all the client's threads.
    write_file(
        &script,
        format!(
            "client=$(cut -d' ' -f4 /proc/$PPID/stat)\n\
             i=0\n\
             while [ $i -lt 3000 ]; do\n\
             \x20 r=$(awk '/^rchar/ {{print $2}}' /proc/$client/io)\n\
             \x20 if [ \"$r\" -ge {half} ]; then echo \"$r\" > {m}; exit 0; fi\n\
             \x20 i=$((i+1)); sleep 0.01\n\
             done\n\
             echo none > {m}\n",
            half = 32 * MIB,
            m = marker.display()
        )
        .as_bytes(),
    );
    let relay = Relay::new(
        pair.tmp.path(),
        &format!(
            "--run-before-byte 0 --run-direction up --run 'exec sh {}'",
            script.display()
        ),
    );
    let (r, v) = vmsync()
        .args(["-e", &relay.rsh(), "--remote-path"])
        .arg(bin())
        .arg(&pair.src)
        .arg(format!("127.0.0.1:{}", pair.dst.display()))
        .run_json();
    relay.wait_server_gone();
    r.assert_ok();
    pair.assert_synced();
    assert_eq!(json_u64(&v, "literal_bytes"), 0, "{v}");
    let read: String = std::fs::read_to_string(&marker).unwrap();
    let read: u64 = read.trim().parse().unwrap_or_else(|_| {
        panic!("the client read under 32 MiB before its first byte was sent: {read:?}")
    });
    assert!(read >= 32 * MIB, "{read}");
}

/// A destination found up to date drops the scan under way: nothing is
/// sent but the handshake, and the file is untouched.
#[test]
fn an_up_to_date_destination_drops_the_scan() {
    let pair = Pair::new();
    pair.write_src(&random_bytes(302, (48 * MIB) as usize));
    run(&[&pair.src, &pair.dst]).assert_ok();
    let ino = inode(&pair.dst);
    let (r, v) = run_json(&[&pair.src, &pair.dst]);
    r.assert_ok();
    assert!(json_bool(&v, "up_to_date"), "{v}");
    assert!(json_u64(&v, "wire_bytes") < 1024, "{v}");
    assert_eq!(inode(&pair.dst), ino);
    pair.assert_synced();
}
