//! Placeholder: `--bwlimit` support is being written.
