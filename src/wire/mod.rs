//! How bytes travel: frames and messages, the pipes to the peer, the bandwidth limit.

pub mod bwlimit;
pub mod protocol;
pub mod transport;
