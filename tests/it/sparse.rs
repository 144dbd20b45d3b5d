//! All-zero chunks are never sent and become holes: an 8 GiB sparse image
//! with a few MiB of data syncs quickly into a destination that stays small
//! on disk, zeroed regions of a dense file become holes, and regions that
//! were data in the old destination and are zero in the source read back as
//! zeros (with and without `--inplace`).

use crate::common::*;

const IMAGE: u64 = 8 * GIB;

/// Data extents of the sparse source: 4 MiB in total, including the very
/// first and very last MiB.
fn extents() -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, random_bytes(1, MIB as usize)),
        (3 * GIB + 12_345, random_bytes(2, (2 * MIB) as usize)),
        (IMAGE - MIB, random_bytes(3, MIB as usize)),
    ]
}

fn write_sparse_src(pair: &Pair, len: u64, extents: &[(u64, Vec<u8>)]) {
    let refs: Vec<(u64, &[u8])> = extents.iter().map(|(o, d)| (*o, d.as_slice())).collect();
    sparse_file(&pair.src, len, &refs);
    set_mtime_ns(&pair.src, SOURCE_MTIME_NS);
}

fn sync(pair: &Pair, opts: &[&str]) -> serde_json::Value {
    let (run, v) = vmsync().args(opts).arg(&pair.src).arg(&pair.dst).run_json();
    run.assert_ok();
    sync_file(&pair.dst);
    v
}

#[test]
fn sparse_8gib_image_copies_as_holes() {
    let pair = Pair::new();
    let ext = extents();
    let data: u64 = ext.iter().map(|(_, d)| d.len() as u64).sum();
    write_sparse_src(&pair, IMAGE, &ext);
    assert!(
        allocated_bytes(&pair.src) < 16 * MIB,
        "test setup: source is sparse"
    );

    let v = sync(&pair, &[]);

    pair.assert_synced();
    let allocated = allocated_bytes(&pair.dst);
    assert!(
        allocated < 64 * MIB,
        "destination allocates {allocated} bytes"
    );
    assert_eq!(json_u64(&v, "source_bytes"), IMAGE, "{v}");
    assert_accounting(&v);
    let zero = json_u64(&v, "zero_bytes");
    // Chunks that straddle a data/hole edge are sent whole; allow a few MiB.
    assert!(
        (IMAGE - data - 8 * MIB..=IMAGE - data).contains(&zero),
        "zero_bytes {zero} should be about {}: {v}",
        IMAGE - data
    );
    let literal = json_u64(&v, "literal_bytes");
    assert!(
        (data..=data + 8 * MIB).contains(&literal),
        "literal_bytes {literal}: {v}"
    );
    assert!(json_u64(&v, "wire_bytes") < 16 * MIB, "{v}");
}

#[test]
fn updating_a_sparse_image_keeps_it_sparse() {
    for inplace in [false, true] {
        let pair = Pair::new();
        let len = GIB;
        let mut ext = vec![
            (0, random_bytes(10, MIB as usize)),
            (len / 2, random_bytes(11, MIB as usize)),
        ];
        write_sparse_src(&pair, len, &ext);
        sync(&pair, &[]);
        pair.assert_synced();

        // New data in a former hole, and an old extent punched back to zeros.
        ext.push((len / 4, random_bytes(12, MIB as usize)));
        ext.remove(1);
        write_sparse_src(&pair, len, &ext);
        set_mtime_ns(&pair.src, SOURCE_MTIME_NS + 1_000_000_007); // defeat the quick check
        let opts: &[&str] = if inplace { &["--inplace"] } else { &[] };
        let v = sync(&pair, opts);

        pair.assert_synced();
        let allocated = allocated_bytes(&pair.dst);
        assert!(
            allocated < 16 * MIB,
            "inplace={inplace}: destination allocates {allocated} bytes"
        );
        let literal = json_u64(&v, "literal_bytes");
        assert!(
            (MIB..=2 * MIB).contains(&literal),
            "inplace={inplace}: only the new MiB (plus edges) is sent: {v}"
        );
    }
}

#[test]
fn written_zeros_in_a_dense_file_become_holes() {
    let pair = Pair::new();
    let mut data = random_bytes(20, (24 * MIB) as usize);
    data[(4 * MIB) as usize..(20 * MIB) as usize].fill(0);
    pair.write_src(&data);
    sync_file(&pair.src);
    assert!(
        allocated_bytes(&pair.src) >= 24 * MIB,
        "test setup: dense source"
    );

    let v = sync(&pair, &[]);

    pair.assert_synced();
    let zero = json_u64(&v, "zero_bytes");
    assert!(
        (15 * MIB..=16 * MIB).contains(&zero),
        "zero_bytes {zero}: {v}"
    );
    let allocated = allocated_bytes(&pair.dst);
    assert!(
        allocated <= 10 * MIB,
        "16 MiB of zeros should be a hole, destination allocates {allocated}"
    );
}

#[test]
fn data_replaced_by_zeros_reads_back_as_zeros() {
    for inplace in [false, true] {
        let pair = Pair::new();
        let old = random_bytes(30, (16 * MIB) as usize);
        let mut new = old.clone();
        new[(2 * MIB) as usize..(10 * MIB) as usize].fill(0);
        pair.write_src(&new);
        pair.write_dst(&old);
        let opts: &[&str] = if inplace { &["--inplace"] } else { &[] };

        let v = sync(&pair, opts);

        pair.assert_synced();
        assert!(
            json_u64(&v, "zero_bytes") >= 7 * MIB,
            "inplace={inplace}: {v}"
        );
        assert!(
            json_u64(&v, "literal_bytes") <= MIB,
            "inplace={inplace}: zeros are not sent: {v}"
        );
        let allocated = allocated_bytes(&pair.dst);
        assert!(
            allocated <= 10 * MIB,
            "inplace={inplace}: the zeroed 8 MiB should be a hole, {allocated} allocated"
        );
    }
}

#[test]
fn inplace_frees_blocks_where_the_source_became_zero() {
    // An old, fully allocated image; in the new one, zero 4 KiB blocks are
    // scattered through every chunk and a 4 MiB region is a hole.
    let pair = Pair::new();
    let old = random_bytes(71, (16 * MIB) as usize);
    pair.write_dst(&old);
    let mut new = random_bytes(72, (16 * MIB) as usize);
    for block in new.chunks_mut(64 * 1024) {
        block[8192..16384].fill(0);
    }
    new[(4 * MIB) as usize..(8 * MIB) as usize].fill(0);
    let extents: Vec<(u64, &[u8])> = vec![
        (0, &new[..(4 * MIB) as usize]),
        (8 * MIB, &new[(8 * MIB) as usize..]),
    ];
    sparse_file(&pair.src, 16 * MIB, &extents);

    let v = sync(&pair, &["--inplace"]);
    pair.assert_synced();
    assert!(json_u64(&v, "zero_bytes") >= 4 * MIB - 512 * KIB, "{v}");
    let (src, dst) = (allocated_bytes(&pair.src), allocated_bytes(&pair.dst));
    // The source has its zero blocks written out inside data; the
    // destination must not hold more than the source.
    assert!(dst <= src, "dst allocates {dst} bytes, src {src}");
    assert!(
        dst < 11 * MIB,
        "dst allocates {dst} bytes for ~10.5 MiB of data"
    );
}
