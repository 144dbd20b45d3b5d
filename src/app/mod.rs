//! The invoking end's outer layer: command line, validated settings, reports, metrics.

pub mod cli;
pub mod config;
pub mod metrics;
pub mod report;
