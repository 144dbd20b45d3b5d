//! Micro-benchmarks of vmsync's hot paths, on 16 MiB of mixed data
//! (`tests/it/common`'s `mixed_bytes`: random, text, records and zero runs);
//! `scan/file-256m` scans 256 MiB of it, many segments.
//!
//! ```text
//! cargo bench --bench micro                 # all
//! cargo bench --bench micro -- scan         # those whose name contains "scan"
//! cargo bench --bench micro -- --quick      # criterion's shorter sampling
//! ```
//!
//! Throughput is in bytes of input, so criterion prints MiB/s (GiB/s): the
//! numbers compare directly with disk and network speeds. For the manifest
//! benches the input is the encoded manifest batch.

// Shared with the integration tests, which lint it (and own it): its lints
// are theirs to fix, so they do not fail the benches too. A bench uses a
// small part of it, hence dead_code.
#[allow(clippy::all, dead_code)]
#[path = "../tests/it/common/mod.rs"]
mod common;

use std::fs::File;
use std::hint::black_box;
use std::io::Write;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use vmsync::content::chunk::{ChunkParams, Cutter};
use vmsync::content::compress::{StreamDecoder, StreamEncoder};
use vmsync::content::hash::ChunkHash;
use vmsync::content::manifest::{encode_batch, Builder, Entry, Kind, Validator, MAX_BATCH};
use vmsync::content::scan::{self, ChunkRec, Content, Extents};

/// Bytes of input for the data benches.
const LEN: usize = 16 << 20;
/// Bytes of the larger scan bench, many segments long.
const BIG_SCAN: usize = 256 << 20;
/// Chunk size for the hash and compression benches: the default average.
const CHUNK: usize = 64 << 10;

fn data() -> Vec<u8> {
    common::mixed_bytes(42, LEN)
}

fn chunking(c: &mut Criterion) {
    let data = data();
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(data.len() as u64));
    for avg in [16u64 << 10, 64 << 10, 1 << 20] {
        let cutter = Cutter::new(ChunkParams::new(avg).unwrap());
        g.bench_function(format!("cut/avg-{}k", avg >> 10), |b| {
            b.iter(|| {
                let data = black_box(&data[..]);
                let mut pos = 0;
                let mut n = 0usize;
                while pos < data.len() {
                    pos += cutter.cut(&data[pos..]);
                    n += 1;
                }
                n
            })
        });
    }
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let data = data();
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("blake3/64k-chunks", |b| {
        b.iter(|| {
            let mut acc = 0u8;
            for chunk in black_box(&data[..]).chunks(CHUNK) {
                acc ^= ChunkHash::of(chunk).0[0];
            }
            acc
        })
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let data = data();
    let chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
    let mut g = c.benchmark_group("zstd-stream");
    g.throughput(Throughput::Bytes(data.len() as u64));
    for level in [1u8, 3] {
        g.bench_function(format!("encode/level-{level}"), |b| {
            let mut out = Vec::new();
            b.iter_batched(
                || StreamEncoder::new(level).unwrap(),
                |mut enc| {
                    let mut wire = 0usize;
                    for chunk in &chunks {
                        enc.encode(black_box(chunk), &mut out).unwrap();
                        wire += out.len();
                    }
                    wire
                },
                BatchSize::LargeInput,
            )
        });
    }
    // Decoding what level 3 produced, chunk by chunk as the receiver does.
    let mut enc = StreamEncoder::new(3).unwrap();
    let mut payloads = Vec::new();
    for chunk in &chunks {
        let mut out = Vec::new();
        enc.encode(chunk, &mut out).unwrap();
        payloads.push(out);
    }
    let wire: usize = payloads.iter().map(Vec::len).sum();
    eprintln!(
        "zstd-stream: level 3 turns {} MiB of mixed data into {:.2} MiB ({:.2}:1)",
        LEN >> 20,
        wire as f64 / (1 << 20) as f64,
        LEN as f64 / wire as f64
    );
    g.bench_function("decode/level-3", |b| {
        let mut buf = vec![0u8; CHUNK];
        b.iter_batched(
            || StreamDecoder::new().unwrap(),
            |mut dec| {
                for (p, chunk) in payloads.iter().zip(&chunks) {
                    dec.decode(black_box(p), &mut buf[..chunk.len()]).unwrap();
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn scanning(c: &mut Criterion) {
    let dir = common::tempdir();
    // The file sits in the page cache: this is cut + zero check + hash, the
    // CPU side of a scan, not disk speed.
    bench_scan(c, &dir, "file/64k-avg", &data(), 100);
    // Many segments: reading and cutting one overlaps hashing the one
    // before, so this shows the whole pipeline, not one segment's cut and
    // hash back to back.
    bench_scan(
        c,
        &dir,
        "file-256m/64k-avg",
        &common::mixed_bytes(43, BIG_SCAN),
        10,
    );
}

/// Scans a file holding `data` with the default chunking, as `scan/NAME`.
fn bench_scan(c: &mut Criterion, dir: &tempfile::TempDir, name: &str, data: &[u8], samples: usize) {
    let path = dir.path().join(name.replace('/', "-"));
    File::create(&path).unwrap().write_all(data).unwrap();
    let file = File::open(&path).unwrap();
    let size = data.len() as u64;
    let cutter = Cutter::new(ChunkParams::default());
    let mut g = c.benchmark_group("scan");
    g.throughput(Throughput::Bytes(size));
    g.sample_size(samples);
    g.bench_function(name, |b| {
        b.iter(|| {
            let mut extents = Extents::of(&file, size);
            let mut n = 0usize;
            scan::scan(&file, size, &mut extents, &cutter, |recs| {
                n += recs.len();
                Ok(())
            })
            .unwrap();
            n
        })
    });
    g.finish();
}

fn manifest(c: &mut Criterion) {
    // One full batch of entries as a real scan makes them: data chunks of
    // the default sizes with the odd zero run, offsets contiguous.
    let params = ChunkParams::default();
    let mut rng = common::Rng::new(7);
    let mut builder = Builder::default();
    let mut entries: Vec<Entry> = Vec::new();
    let mut offset = 0u64;
    let mut i = 0u64;
    while entries.len() < MAX_BATCH {
        let len = rng.range(u64::from(params.min()), u64::from(params.max()) + 1) as u32;
        let content = if i % 50 == 49 {
            Content::Zero
        } else {
            let mut h = [0u8; 32];
            rng.fill(&mut h);
            Content::Data(ChunkHash(h))
        };
        builder.push(
            &ChunkRec {
                offset,
                len,
                content,
            },
            &mut entries,
        );
        offset += u64::from(len);
        i += 1;
    }
    entries.truncate(MAX_BATCH);
    let size = entries.last().map(Entry::end).unwrap();
    let zeros = entries
        .iter()
        .filter(|e| matches!(e.kind, Kind::Zero { .. }))
        .count();
    let mut encoded = Vec::new();
    encode_batch(&entries, &mut encoded);
    eprintln!(
        "manifest: {} entries ({zeros} zero runs) for {:.2} GiB of file, {} KiB encoded",
        entries.len(),
        size as f64 / (1u64 << 30) as f64,
        encoded.len() >> 10
    );

    let mut g = c.benchmark_group("manifest");
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("encode_batch", |b| {
        let mut buf = Vec::with_capacity(encoded.len());
        b.iter(|| {
            buf.clear();
            encode_batch(black_box(&entries), &mut buf);
            buf.len()
        })
    });
    g.bench_function("decode_batch", |b| {
        let mut out = Vec::with_capacity(entries.len());
        b.iter(|| {
            out.clear();
            let mut v = Validator::new(size, params);
            v.decode_batch(black_box(&encoded), &mut out).unwrap();
            v.covered()
        })
    });
    g.finish();
}

criterion_group!(benches, chunking, hashing, compression, scanning, manifest);
criterion_main!(benches);
