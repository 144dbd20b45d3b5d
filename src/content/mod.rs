//! What bytes are: chunks, scans, hashes, manifests, refinement, compression, samples, verification.

pub mod chunk;
pub mod compress;
pub mod hash;
pub mod manifest;
pub mod ranges;
pub mod refine;
pub mod sample;
pub mod scan;
pub mod verify;
