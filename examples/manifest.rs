//! Cut a file into chunks the way vmsync does and print its manifest
//! summary: chunk count, size spread, zero bytes, and the file digest that
//! both ends of a sync compare.
//!
//! ```sh
//! cargo run --release --example manifest -- disk.img [AVG_CHUNK_SIZE]
//! ```

use std::fs::File;

use anyhow::{Context, Result};
use vmsync::content::chunk::{ChunkParams, Cutter};
use vmsync::content::manifest::{Builder, Kind};
use vmsync::content::scan::{scan, Extents};
use vmsync::units::{bytes, parse_size};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: manifest FILE [AVG_CHUNK_SIZE]")?;
    let avg = match args.next() {
        Some(s) => parse_size(&s).map_err(anyhow::Error::msg)?,
        None => 64 * 1024,
    };
    let params = ChunkParams::new(avg)?;
    let file = File::open(&path).with_context(|| format!("open {path}"))?;
    let size = file.metadata()?.len();
    let mut extents = Extents::of(&file, size);
    let data_bytes = extents.data_bytes();

    let mut builder = Builder::default();
    let mut entries = Vec::new();
    scan(&file, size, &mut extents, &Cutter::new(params), |recs| {
        for r in &recs {
            builder.push(r, &mut entries);
        }
        Ok(())
    })?;
    let (count, digest) = builder.finish(&mut entries);

    let (mut data_chunks, mut zero) = (0u64, 0u64);
    let (mut min, mut max) = (u64::MAX, 0u64);
    for e in &entries {
        match e.kind {
            Kind::Data { len, .. } => {
                data_chunks += 1;
                min = min.min(len.into());
                max = max.max(len.into());
            }
            Kind::Zero { len } => zero += len,
        }
    }
    println!("file          {path}");
    println!(
        "size          {} (allocated data extents: {})",
        bytes(size),
        bytes(data_bytes)
    );
    println!(
        "chunking      FastCDC avg {} (min {}, max {})",
        bytes(avg),
        bytes(params.min().into()),
        bytes(params.max().into())
    );
    println!(
        "entries       {count} ({data_chunks} data chunks, {} zero runs)",
        count - data_chunks
    );
    if let Some(mean) = (size - zero).checked_div(data_chunks) {
        println!(
            "chunk sizes   {} .. {}, mean {}",
            bytes(min),
            bytes(max),
            bytes(mean)
        );
    }
    println!("zero bytes    {} (never sent)", bytes(zero));
    println!("digest        {digest}");
    Ok(())
}
