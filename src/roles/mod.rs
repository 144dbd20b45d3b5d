//! The two ends' state machines: send, receive, and the tree roles.

pub mod apply;
pub mod list;
pub mod receive;
pub mod sender;
