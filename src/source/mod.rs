//! The sending side's point-in-time source (`--snapshot`): the clone and
//! its lifecycle ([`snapshot`]), the state kept with it ([`state`]), which
//! ranges changed between two clones ([`extents`]), and the freeze/thaw
//! hooks around the clone ([`quiesce`]).

pub mod extents;
pub mod quiesce;
pub mod snapshot;
pub mod state;
