//! How the destination is touched: the writer, the lock, the manifest cache, confinement under --root.

pub mod cache;
pub mod confine;
pub mod journal;
pub mod lock;
pub mod paths;
pub mod recover;
pub mod sparse;
pub mod writer;
