//! Placeholder until the extent comparison lands: extents not comparable.
use std::fs::File;

pub fn changed(_old: &File, _new: &File, _size: u64) -> anyhow::Result<Option<Vec<(u64, u64)>>> {
    Ok(None)
}
