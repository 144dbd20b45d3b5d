//! Property tests of the decoders that read what an untrusted peer sends:
//! `Msg::decode` and `FrameReader`, `manifest::Validator`, and
//! `compress::StreamDecoder`. The same properties, with far more inputs,
//! are the cargo-fuzz targets in `fuzz/`.

use proptest::collection::vec;
use proptest::prelude::*;

use vmsync::content::chunk::ChunkParams;
use vmsync::content::compress::{StreamDecoder, StreamEncoder};
use vmsync::content::hash::{ChunkHash, FileDigest};
use vmsync::content::manifest::{encode_batch, Entry, Kind, Validator, MAX_BATCH};
use vmsync::content::refine::MAX_BLOCKS;
use vmsync::error::{exit_code_of, Exit};
use vmsync::wire::{
    flags, ChunkMsg, FileInfo, FrameReader, FrameWriter, Msg, Open, Role, StartMode, Summary,
    WriteMode, MAX_PATH,
};

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

fn arb_open() -> impl Strategy<Value = Open> {
    (
        any::<bool>(),
        any::<u32>(),
        any::<u8>(),
        any::<u32>(),
        vec(any::<u8>(), 0..64),
        vec(any::<u8>(), 0..32),
        any::<bool>(),
        (0..=vmsync::wire::MAX_TIMEOUT, any::<u64>()),
        (
            proptest::option::of((1u32..=100, 0u32..=100)),
            vec(vec(any::<u8>(), 0..16), 0..4),
        ),
    )
        .prop_map(
            |(
                send,
                f,
                level,
                chunking,
                path,
                name,
                long,
                (timeout_secs, bwlimit),
                (sample, seeds),
            )| {
                let mut path = path;
                if long {
                    path.resize(MAX_PATH, b'p');
                }
                Open {
                    role: if send { Role::Send } else { Role::Receive },
                    // A write mode code past the last mode is refused.
                    flags: match (f & flags::WRITE_MODE) >> 9 {
                        0..=4 => f & flags::ALL,
                        _ => f & flags::ALL & !flags::WRITE_MODE,
                    },
                    compress_level: level,
                    chunking,
                    path,
                    source_name: name,
                    timeout_secs,
                    bwlimit,
                    // K ≤ N by construction.
                    sample: sample.map(|(k, extra)| (k, k + extra)),
                    seeds,
                }
            },
        )
}

fn arb_summary() -> impl Strategy<Value = Summary> {
    (
        any::<[bool; 6]>(),
        any::<[u64; 6]>(),
        vec(any::<(u64, u64)>(), 0..16),
        0u64..1000,
        (0usize..=WriteMode::ALL.len(), any::<u64>()),
    )
        .prop_map(|(b, n, ranges, extra, (mode, written))| Summary {
            up_to_date: b[0],
            identical: b[1],
            verified: b[2],
            basis_cached: b[3],
            source_changed: b[4],
            dry_run: b[5],
            source_bytes: n[0],
            reused_bytes: n[1],
            literal_bytes: n[2],
            zero_bytes: n[3],
            differing_bytes: n[4],
            checked_bytes: n[5],
            range_count: ranges.len() as u64 + extra,
            ranges,
            // Auto is what a client asks for, never what ran: index 0 and
            // past the end both stand for "nothing written".
            write_mode: WriteMode::ALL
                .get(mode)
                .copied()
                .filter(|m| *m != WriteMode::Auto),
            dest_written_bytes: written,
            verify_mismatch_bytes: extra * 4096,
            snapshot: None,
        })
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        arb_open().prop_map(Msg::Open),
        (any::<u8>(), "\\PC{0,64}").prop_map(|(exit, message)| Msg::Error { exit, message }),
        any::<(u64, i64, u32, u32)>().prop_map(|(size, mtime_sec, mtime_nsec, mode)| {
            Msg::FileInfo(FileInfo {
                size,
                mtime_sec,
                mtime_nsec,
                mode,
            })
        }),
        prop_oneof![
            Just(StartMode::Manifest),
            Just(StartMode::UpToDate),
            Just(StartMode::Inline)
        ]
        .prop_map(Msg::Start),
        vec(any::<u8>(), 0..256).prop_map(Msg::Manifest),
        (any::<u64>(), any::<[u8; 32]>(), any::<bool>()).prop_map(|(count, d, changed)| {
            Msg::ManifestEnd {
                count,
                digest: ChunkHash(d),
                source_changed: changed,
            }
        }),
        vec(any::<u64>(), 1..64).prop_map(Msg::Request),
        vec(any::<u64>(), 1..64).prop_map(Msg::BlockRequest),
        (
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            vec(any::<u8>(), 0..256)
        )
            .prop_map(|(index, raw_len, compressed, pieces, changed, payload)| {
                Msg::Chunk(ChunkMsg {
                    index,
                    raw_len,
                    compressed,
                    pieces,
                    // Both at once is malformed: pieces are checked against
                    // the manifest's hashes, a changed chunk has none.
                    changed: changed && !pieces,
                    payload,
                })
            }),
        arb_summary().prop_map(Msg::Done),
        (any::<u64>(), vec(any::<[u8; 8]>(), 1..=MAX_BLOCKS))
            .prop_map(|(index, hashes)| Msg::BlockHashes { index, hashes }),
        (any::<u64>(), 1..=MAX_BLOCKS as u32, any::<u64>()).prop_map(|(index, count, seed)| {
            let bitmap = (0..(count as usize).div_ceil(8))
                .map(|i| (seed.rotate_left(i as u32 * 7) & 0xff) as u8)
                .collect();
            Msg::BlockFetch {
                index,
                count,
                bitmap,
            }
        }),
        Just(Msg::KeepAlive),
        vec(any::<[u8; 16]>(), 0..64).prop_map(Msg::Pieces),
        any::<u32>().prop_map(Msg::ManifestRef),
    ]
}

/// Re-encoding a decoded message gives a frame that decodes to the same
/// message.
fn assert_reencodes(m: &Msg) -> Result<(), TestCaseError> {
    let mut again = Vec::new();
    m.encode(&mut again);
    prop_assert_eq!(&Msg::decode(&again).unwrap(), m);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Arbitrary bytes: never a panic; an error is always a protocol error.
    #[test]
    fn decode_of_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..300)) {
        match Msg::decode(&bytes) {
            Ok(m) => assert_reencodes(&m)?,
            Err(e) => prop_assert_eq!(exit_code_of(&e), Exit::Protocol, "{:#}", e),
        }
    }

    /// A known type byte followed by arbitrary bytes reaches every decoder.
    #[test]
    fn decode_of_each_type_with_arbitrary_payload_never_panics(
        t in 0u8..=14,
        payload in vec(any::<u8>(), 0..200),
    ) {
        let mut bytes = vec![t];
        bytes.extend_from_slice(&payload);
        match Msg::decode(&bytes) {
            Ok(m) => assert_reencodes(&m)?,
            Err(e) => prop_assert_eq!(exit_code_of(&e), Exit::Protocol, "{:#}", e),
        }
    }

    /// Generated messages survive encode → decode, and a frame →
    /// `FrameReader` round trip; every strict prefix of a message is
    /// rejected, never a panic.
    #[test]
    fn messages_round_trip(m in arb_msg()) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        prop_assert!(buf.len() <= vmsync::wire::MAX_FRAME);
        prop_assert_eq!(&Msg::decode(&buf).unwrap(), &m);
        // Every prefix of short messages; a spread of them (and the last
        // few) for long ones.
        let stride = (buf.len() / 256).max(1);
        let cuts = (0..buf.len()).step_by(stride).chain(buf.len().saturating_sub(16)..buf.len());
        for cut in cuts {
            if let Ok(short) = Msg::decode(&buf[..cut]) {
                // Only messages that end in "the rest of the frame" may
                // decode from a prefix, and then as a shorter one.
                prop_assert!(matches!(short, Msg::Manifest(_) | Msg::Chunk(_)), "{:?}", short);
            }
        }

        let mut wire = Vec::new();
        {
            let mut w = FrameWriter::new(&mut wire, "test");
            w.send_now(&m).unwrap();
            w.send_now(&Msg::Start(StartMode::Manifest)).unwrap();
        }
        let mut r = FrameReader::new(&wire[..], "test");
        match &m {
            // The reader turns the peer's ERROR into a failure with its code.
            Msg::Error { exit, message } => {
                let e = r.read_msg().unwrap_err();
                let expected = match exit {
                    0 | 1 => Exit::Protocol,
                    c => Exit::from_code(*c),
                };
                prop_assert_eq!(exit_code_of(&e), expected);
                prop_assert!(e.to_string().contains(message.as_str()));
            }
            // Keepalives are consumed by the reader, never returned.
            Msg::KeepAlive => {}
            _ => prop_assert_eq!(&r.read_msg().unwrap(), &m),
        }
        prop_assert_eq!(r.read_msg().unwrap(), Msg::Start(StartMode::Manifest));
        let e = r.read_msg().unwrap_err();
        prop_assert_eq!(exit_code_of(&e), Exit::Connection);
    }

    /// A `FrameReader` over arbitrary bytes: hello and frames end in an
    /// error, never a panic; a clean end of stream is a connection error.
    #[test]
    fn frame_reader_over_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..400)) {
        let _ = FrameReader::new(&bytes[..], "test").read_hello();
        let mut r = FrameReader::new(&bytes[..], "test");
        let mut n = 0;
        loop {
            match r.read_msg() {
                Ok(_) => n += 1,
                Err(_) => break,
            }
            prop_assert!(n <= bytes.len() / 5, "more frames than bytes allow");
        }
    }

    /// Arbitrary byte streams built from plausible frame headers.
    #[test]
    fn frame_reader_over_framed_garbage_never_panics(
        frames in vec((0u32..64, 0u8..=14, vec(any::<u8>(), 0..64)), 0..8),
    ) {
        let mut bytes = Vec::new();
        for (len, t, body) in &frames {
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.push(*t);
            bytes.extend_from_slice(body);
        }
        let mut r = FrameReader::new(&bytes[..], "test");
        for _ in 0..=frames.len() {
            if r.read_msg().is_err() {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------

fn params(sel: u8) -> ChunkParams {
    ChunkParams::new(4096u64 << (sel % 9)).unwrap()
}

/// The manifest rules, written out independently of `Validator`: whether
/// `e` (of length `len`, data or zero) may come at `offset` of a file of
/// `size` bytes.
fn model_accepts(offset: u64, len: u64, data: bool, size: u64, p: ChunkParams) -> bool {
    let (min, max) = (u64::from(p.min()), u64::from(p.max()));
    if len == 0 || (data && len > max) {
        return false;
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => len >= min || end == size,
        _ => false,
    }
}

/// Checks accepted entries: they tile `[0, covered)` without gaps or
/// overlaps, stay inside `size`, and obey the chunk limits.
fn check_tiling(all: &[Entry], size: u64, p: ChunkParams) -> Result<u64, TestCaseError> {
    let mut pos = 0u64;
    for e in all {
        prop_assert_eq!(e.offset, pos, "gap or overlap");
        let data = matches!(e.kind, Kind::Data { .. });
        prop_assert!(model_accepts(e.offset, e.len(), data, size, p), "{:?}", e);
        pos = e.end();
    }
    prop_assert!(pos <= size);
    Ok(pos)
}

/// An entry: data or zero, which kind of length (see [`pick_len`]; mostly
/// valid ones), and randomness for it.
fn arb_len() -> impl Strategy<Value = (bool, u8, u64)> {
    let sel = prop_oneof![
        6 => Just(0u8),
        2 => Just(1),
        2 => Just(2),
        1 => Just(3),
        1 => Just(4),
        1 => Just(5),
        1 => Just(6),
        1 => Just(7),
    ];
    (any::<bool>(), sel, any::<u64>())
}

fn pick_len(sel: u8, r: u64, p: ChunkParams, left: u64) -> u64 {
    let (min, max) = (u64::from(p.min()), u64::from(p.max()));
    match sel {
        0 => min + r % (max - min + 1),
        1 => left,
        2 => r % (min + 1),
        3 => max + 1 + r % 4,
        4 => 0,
        5 => u64::MAX - r % 1000,
        6 => left.saturating_add(1 + r % 3),
        _ => r,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Arbitrary batch bytes: never a panic; what is accepted tiles.
    #[test]
    fn validator_on_arbitrary_bytes_never_panics(
        size in prop_oneof![0u64..(1 << 22), any::<u64>()],
        sel in any::<u8>(),
        batches in vec(vec(any::<u8>(), 0..200), 1..4),
    ) {
        let p = params(sel);
        let mut v = Validator::new(size, p);
        let mut all = Vec::new();
        for b in &batches {
            let before = all.len();
            match v.decode_batch(b, &mut all) {
                Ok(()) => prop_assert!(all.len() > before),
                Err(e) => {
                    prop_assert_eq!(exit_code_of(&e), Exit::Protocol);
                    break;
                }
            }
        }
        check_tiling(&all, size, p)?;
    }

    /// Structured manifests with lengths around every limit: the validator
    /// accepts exactly what the rules allow, entries tile, never past the
    /// size, and `finish` succeeds exactly when they cover it with the
    /// right count and digest.
    #[test]
    fn validator_accepts_exactly_the_valid_manifests(
        size_sel in 0u8..5,
        size_r in any::<u64>(),
        sel in any::<u8>(),
        lens in vec(arb_len(), 1..40),
        split in 1usize..16,
    ) {
        let p = params(sel);
        let max = u64::from(p.max());
        // Size 0 is "exactly what the entries add up to": such manifests
        // end with whatever length the last entry has.
        let size = match size_sel {
            0 => 0,
            1 => size_r % (4 * max),
            2 => size_r % (64 * max),
            3 => size_r >> 1,
            _ => size_r,
        };
        let exact = size_sel == 0;
        let size = if exact { u64::MAX } else { size };
        // Build entries; lengths may be anything (the encoding allows it).
        let mut entries = Vec::new();
        let mut offset = 0u64;
        for (data, s, r) in lens {
            let len = pick_len(s, r, p, size.saturating_sub(offset));
            let kind = if data {
                Kind::Data { len: len.min(u64::from(u32::MAX)) as u32, hash: ChunkHash([s; 32]) }
            } else {
                Kind::Zero { len }
            };
            let e = Entry { offset, kind };
            offset = offset.wrapping_add(e.len());
            entries.push(e);
        }
        let size = if exact {
            entries.iter().fold(0u64, |a, e| a.saturating_add(e.len()))
        } else {
            size
        };
        // What the rules say: the longest valid prefix.
        let mut valid = 0;
        let mut pos = 0u64;
        for e in &entries {
            let data = matches!(e.kind, Kind::Data { .. });
            if !model_accepts(pos, e.len(), data, size, p) {
                break;
            }
            pos += e.len();
            valid += 1;
        }

        let mut v = Validator::new(size, p);
        let mut all = Vec::new();
        let mut failed = false;
        for part in entries.chunks(split.min(MAX_BATCH)) {
            let mut buf = Vec::new();
            encode_batch(part, &mut buf);
            if v.decode_batch(&buf, &mut all).is_err() {
                failed = true;
                break;
            }
        }
        let covered = check_tiling(&all, size, p)?;
        prop_assert_eq!(failed, valid < entries.len(), "accepted {} of {} (rules: {})", all.len(), entries.len(), valid);
        prop_assert_eq!(all.len(), valid, "entries kept");
        prop_assert_eq!(v.covered(), covered);
        if !failed {
            let mut d = FileDigest::default();
            for e in &all {
                match e.kind {
                    Kind::Data { len, hash } => d.add_data(u64::from(len), &hash),
                    Kind::Zero { len } => d.add_zero(len),
                }
            }
            let digest = d.finish();
            let n = all.len() as u64;
            prop_assert_eq!(v.finish(n, &digest).is_ok(), covered == size);
            prop_assert!(v.finish(n + 1, &digest).is_err());
            prop_assert!(v.finish(n, &ChunkHash([0xee; 32])).is_err());
        }
    }
}

// ---------------------------------------------------------------------------
// Decompression
// ---------------------------------------------------------------------------

const CANARY: u8 = 0xa5;
const GUARD: usize = 32;

/// Decodes into the middle of a canary-filled buffer; checks the canaries.
fn decode_guarded(
    d: &mut StreamDecoder,
    payload: &[u8],
    want: usize,
) -> Result<(anyhow::Result<()>, Vec<u8>), TestCaseError> {
    let mut buf = vec![CANARY; GUARD + want + GUARD];
    let r = d.decode(payload, &mut buf[GUARD..GUARD + want]);
    prop_assert!(
        buf[..GUARD].iter().all(|&b| b == CANARY),
        "wrote before the output"
    );
    prop_assert!(
        buf[GUARD + want..].iter().all(|&b| b == CANARY),
        "wrote past the output"
    );
    Ok((r, buf[GUARD..GUARD + want].to_vec()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Arbitrary payloads and output sizes: never a panic, never a byte
    /// outside the output; errors are protocol errors.
    #[test]
    fn stream_decoder_on_arbitrary_payloads_never_panics(
        chunks in vec((0usize..4096, vec(any::<u8>(), 0..512)), 1..4),
        zstd_header in any::<bool>(),
    ) {
        let mut d = StreamDecoder::new().unwrap();
        for (k, (want, payload)) in chunks.iter().enumerate() {
            let mut p = payload.clone();
            if zstd_header && k == 0 {
                // Start like a real zstd frame so the block parser is reached.
                let mut h = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38];
                h.extend_from_slice(&p);
                p = h;
            }
            let (r, _) = decode_guarded(&mut d, &p, *want)?;
            if let Err(e) = r {
                prop_assert_eq!(exit_code_of(&e), Exit::Protocol);
                break;
            }
        }
    }

    /// Real streams decode exactly; a length that lies (shorter or longer
    /// than the chunk) or a flipped bit is an error or a different chunk,
    /// never a byte past the output.
    #[test]
    fn stream_decoder_with_lying_lengths_and_flipped_bits(
        chunks in vec((vec(any::<u8>(), 1..3000), 0u8..4), 1..6),
        lie_at in any::<prop::sample::Index>(),
        lie in prop_oneof![Just(-1i64), Just(1), Just(-100), Just(1000), Just(0)],
        flip in any::<prop::sample::Index>(),
        level in 1u8..6,
    ) {
        let mut e = StreamEncoder::new(level).unwrap();
        let mut d = StreamDecoder::new().unwrap();
        let lie_at = lie_at.index(chunks.len());
        for (k, (raw, repeat)) in chunks.iter().enumerate() {
            // Some chunks repeat their bytes, to exercise matches.
            let data: Vec<u8> = raw.iter().cycle().take(raw.len() * (1 + *repeat as usize)).copied().collect();
            let mut wire = Vec::new();
            e.encode(&data, &mut wire).unwrap();
            if k != lie_at {
                let (r, out) = decode_guarded(&mut d, &wire, data.len())?;
                prop_assert!(r.is_ok(), "{:?}", r);
                prop_assert!(out == data);
                continue;
            }
            if lie == 0 {
                // A flip breaks the stream or changes the bytes (which the
                // receiver's hash check catches); either way, in bounds.
                let i = flip.index(wire.len());
                wire[i] ^= 1;
                let _ = decode_guarded(&mut d, &wire, data.len())?;
            } else {
                let want = (data.len() as i64 + lie).max(0) as usize;
                let (r, _) = decode_guarded(&mut d, &wire, want)?;
                prop_assert!(r.is_err(), "a chunk of {} bytes decoded into {}", data.len(), want);
            }
            break;
        }
    }
}

// ---------------------------------------------------------------------------
// Sampled manifests (`--check --sample K/N`)
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// A validator restricted to a slice's ranges accepts exactly the
    /// entries that tile those ranges in order (none crossing a range's
    /// end, short ones only at a range's end), places them at the right
    /// offsets across the gaps, and finishes only when every range is
    /// covered.
    #[test]
    fn sampled_validator_accepts_exactly_the_tiling_of_the_slice(
        size in 0u64..(12 << 20),
        n in 1u32..6,
        k_r in any::<u32>(),
        picks in vec((any::<bool>(), 0u8..8, any::<u64>()), 1..60),
        split in 1usize..8,
    ) {
        let p = params(0); // 4 KiB average: min 1 KiB, max 16 KiB
        let (min, max) = (u64::from(p.min()), u64::from(p.max()));
        let k = 1 + k_r % n;
        let ranges = vmsync::content::sample::ranges(size, k, n);
        // Entries chosen against the model's position: mostly valid.
        let mut entries = Vec::new();
        let mut expect = Vec::new(); // model offsets of the valid prefix
        let (mut r, mut pos) = (0usize, ranges.first().map_or(size, |x| x.0));
        let mut valid = true;
        for (data, sel, rnd) in picks {
            let end = ranges.get(r).map_or(size, |x| x.1);
            let left = end.saturating_sub(pos);
            let len = match sel {
                0 | 1 if !data => left, // rest of the range
                0 | 1 => left.min(min + rnd % (max - min + 1)), // a legal chunk
                2 => min + rnd % (max - min + 1),
                3 => left + 1 + rnd % 3,                       // crosses the end
                4 => rnd % min,                                 // short
                5 => 0,
                6 => left.saturating_sub(1 + rnd % min), // leaves a short tail
                _ => left,
            };
            let kind = if data {
                Kind::Data { len: len.min(u64::from(u32::MAX)) as u32, hash: ChunkHash([sel; 32]) }
            } else {
                Kind::Zero { len }
            };
            let e = Entry { offset: 0, kind };
            let l = e.len();
            let ok = valid
                && r < ranges.len()
                && l > 0
                && !(data && l > max)
                && l <= left
                && (l >= min || l == left);
            if ok {
                expect.push(pos);
                pos += l;
                if pos == end && r + 1 < ranges.len() {
                    r += 1;
                    pos = ranges[r].0;
                }
            } else {
                valid = false;
            }
            entries.push(e);
        }
        let complete = valid && (ranges.is_empty() || (r + 1 == ranges.len() && pos == ranges[r].1));

        let mut v = Validator::new(size, p).restrict(ranges.clone());
        let mut all = Vec::new();
        for part in entries.chunks(split) {
            let mut buf = Vec::new();
            encode_batch(part, &mut buf);
            if v.decode_batch(&buf, &mut all).is_err() {
                break;
            }
        }
        prop_assert_eq!(all.len(), expect.len(), "accepted prefix");
        for (e, want) in all.iter().zip(&expect) {
            prop_assert_eq!(e.offset, *want);
            prop_assert!(ranges.iter().any(|&(a, b)| a <= e.offset && e.end() <= b), "{:?} outside {:?}", e, ranges);
        }
        if all.len() == entries.len() {
            let mut d = FileDigest::default();
            for e in &all {
                match e.kind {
                    Kind::Data { len, hash } => d.add_data(u64::from(len), &hash),
                    Kind::Zero { len } => d.add_zero(len),
                }
            }
            prop_assert_eq!(v.finish(all.len() as u64, &d.finish()).is_ok(), complete);
        }
    }
}
