//! The sending side's point-in-time source for `--snapshot`: the reflink
//! clone of the source that a run reads instead of the live file, the
//! state kept with it for the next run, which ranges changed since the
//! previous clone (so only those are read), and the freeze/thaw commands
//! that make the clone filesystem-consistent.

pub mod extents;
