//! The two ends' state machines: send, receive, and the tree roles.

pub mod receive;
pub mod send;
pub mod tree;

pub use send as sender; // TEMP alias: crate::roles::sender -> crate::roles::send
