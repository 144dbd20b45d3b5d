//! The two ends' state machines: send, receive, and the tree roles.

pub mod receive;
pub mod sender;
pub mod tree;
