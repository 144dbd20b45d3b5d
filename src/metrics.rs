//! Placeholder: `--metrics-file` support is being written.
