//! Manifest pieces (see `manifest`'s module doc): a destination the
//! receiver wrote before has its manifest cached, and the sender sends the
//! parts of its manifest the receiver holds as short references. A touched
//! but unchanged image, the nightly case, then costs about a kilobyte.

use crate::common::*;

fn wire(v: &serde_json::Value) -> u64 {
    json_u64(v, "wire_bytes")
}

#[test]
fn an_unchanged_destination_costs_about_a_kilobyte_not_its_manifest() {
    let pair = Pair::new();
    // 64 MiB of incompressible data: 1024 chunks, a 37 KiB manifest.
    let data = random_bytes(91, (64 * MIB) as usize);
    pair.write_src(&data);
    run(&[&pair.src, &pair.dst]).assert_ok();

    // Touched: newer mtime, same bytes (scenario 5 of the bench).
    set_mtime_ns(&pair.src, SOURCE_MTIME_NS + 1_000_000_000);
    let (r, v) = run_json(&[&pair.src, &pair.dst]);
    r.assert_ok();
    pair.assert_synced();
    assert_eq!(json_u64(&v, "literal_bytes"), 0, "{v}");
    assert!(
        wire(&v) < 4096,
        "a touched 64 MiB file cost {} wire bytes",
        wire(&v)
    );

    // Two small edits: only the pieces around them are sent in full.
    let mut new = data.clone();
    new[(10 * MIB) as usize..(10 * MIB + 100) as usize].fill(7);
    new[(50 * MIB) as usize..(50 * MIB + 100) as usize].fill(9);
    pair.write_src(&new);
    set_mtime_ns(&pair.src, SOURCE_MTIME_NS + 2_000_000_000);
    let (r, v) = run_json(&[&pair.src, &pair.dst]);
    r.assert_ok();
    pair.assert_synced();
    assert!(
        wire(&v) < 24 * KIB,
        "two small edits cost {} wire bytes",
        wire(&v)
    );

    // Pushed and pulled through the relay: the same, with the cache on the
    // receiving end, whichever it is.
    for pull in [false, true] {
        set_mtime_ns(
            &pair.src,
            SOURCE_MTIME_NS + 3_000_000_000 + i128::from(pull),
        );
        let relay = Relay::new(pair.tmp.path(), "");
        let (src, dst) = if pull {
            (
                format!("127.0.0.1:{}", pair.src.display()),
                pair.dst.display().to_string(),
            )
        } else {
            (
                pair.src.display().to_string(),
                format!("127.0.0.1:{}", pair.dst.display()),
            )
        };
        let (r, v) = vmsync()
            .args(["-e", &relay.rsh(), "--remote-path"])
            .arg(bin())
            .args([&src, &dst])
            .run_json();
        relay.wait_server_gone();
        r.assert_ok();
        pair.assert_synced();
        assert!(wire(&v) < 4096, "pull {pull}: {} wire bytes", wire(&v));
    }
}

/// Without a cache entry (a destination vmsync did not write, or a
/// --checksum run after the file changed behind vmsync's back) the whole
/// manifest is sent, and the result is the same.
#[test]
fn without_a_cached_manifest_the_whole_manifest_is_sent() {
    let pair = Pair::new();
    let data = random_bytes(92, (16 * MIB) as usize);
    pair.write_src(&data);
    pair.write_dst(&data); // written by the test, not by vmsync: not cached
    let (r, v) = run_json(&[&pair.src, &pair.dst]);
    r.assert_ok();
    pair.assert_synced();
    // At least 64 chunks (the largest is 256 KiB) of 37 bytes each.
    let uncached = wire(&v);
    assert!(uncached > 64 * 37, "{v}");
    // That run recorded the manifest: the next touch costs far less.
    set_mtime_ns(&pair.src, SOURCE_MTIME_NS + 1_000_000_000);
    let (r, v) = run_json(&[&pair.src, &pair.dst]);
    r.assert_ok();
    assert!(
        wire(&v) * 2 < uncached,
        "cached {} vs uncached {uncached} wire bytes",
        wire(&v)
    );
}
