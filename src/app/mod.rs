//! The invoking end's outer layer: command line, validated settings, reports, metrics.

pub mod cli;
pub(crate) mod config;
pub(crate) mod metrics;
pub(crate) mod report;
pub mod rsync;
mod run;

pub use run::{main, start};
