//! What bytes are: chunks, scans, hashes, manifests, refinement, compression, samples, verification.

pub mod chunk;
pub mod compress;
pub mod hash;
pub mod manifest;
pub(crate) mod ranges;
pub mod refine;
pub mod sample;
pub mod scan;
pub(crate) mod verify;
