//! The two ends' state machines: send, receive, and the tree roles.

pub mod apply;
pub mod list;
pub mod receive;
pub mod sender;

/// TEMP alias: crate::roles::tree -> crate::client::tree (the client's run),
/// crate::roles::list (listing) and crate::roles::apply (applying).
pub mod tree {
    pub use super::apply::*; // TEMP alias: roles::tree -> roles::apply
    pub use super::list::*; // TEMP alias: roles::tree -> roles::list
    pub use crate::client::tree::*; // TEMP alias: roles::tree -> client::tree
}
