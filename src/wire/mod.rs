//! How bytes travel between the two ends: the hello and frames
//! ([`frame`]), the messages in them ([`messages`], built on [`codec`]),
//! the option bits of `OPEN` ([`options`]), the pipe wrappers that count
//! bytes and notice a silent peer ([`pipe`]), and the bandwidth limit
//! ([`bwlimit`]).
//!
//! Nothing here trusts the peer: every length is checked against a hard
//! limit before anything is allocated for it ([`MAX_FRAME`] for a frame),
//! and a message must decode exactly. Starting the peer (ssh or a local
//! child) is the client's business ([`crate::client::spawn`]).
//!
//! The items below are the public face: `crate::wire::Msg`,
//! `crate::wire::FrameReader`, and so on.

pub(crate) mod bwlimit;
pub(crate) mod codec;
pub mod frame;
pub mod messages;
pub mod options;
pub(crate) mod pipe;

pub use frame::{FrameReader, FrameWriter, LOCAL_PEER, MAGIC, MAX_FRAME, PROTOCOL_VERSION};
pub use messages::{
    attrs, is_device, list_flags, valid_rel_path, valid_xattrs, xattr_in_play, xattr_name_ok,
    ChunkMsg, EntryKind, FileInfo, FilterRule, ListEntry, Msg, Op, OpResult, Open, Role, StartMode,
    Summary, Xattrs, ACL_NAMES, MAX_ENTRIES, MAX_LIST_BATCH, MAX_MESSAGE, MAX_OPS, MAX_OP_MESSAGE,
    MAX_PATH, MAX_PATTERN, MAX_PIECE_REFS, MAX_RANGES, MAX_REQUEST, MAX_RULES, MAX_SAMPLE,
    MAX_SEEDS, MAX_TIMEOUT, MAX_XATTRS, MAX_XATTR_BYTES, MAX_XATTR_NAME, MAX_XATTR_VALUE,
};
pub use options::{flags, Options, WriteMode};
pub use pipe::{keepalive_interval, Counted, Silence, Watched};
