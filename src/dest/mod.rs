//! How the destination is touched: the writer, the lock, the manifest cache, confinement under --root.

pub mod cache;
pub mod confine;
// TEMP: used once roles/receive writes through the journal.
#[allow(dead_code, unused_imports)]
pub mod journal;
pub mod lock;
pub mod sparse;
pub mod writer;
