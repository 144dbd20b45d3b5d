//! The two ends' state machines, spoken over the wire: [`send`] (read the
//! source, stream its manifest, answer requests) and [`receive`] (index the
//! basis, plan requests, write, check, commit), and the server side of a
//! `-r` run: [`list`] (walk a tree) and [`apply`] (make its directories,
//! links, attributes and deletions).

pub mod apply;
pub mod list;
pub mod receive;
pub mod send;
