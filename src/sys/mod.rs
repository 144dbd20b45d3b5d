//! Thin safe wrappers over the kernel calls vmsync needs.
//!
//! The calls come from `rustix`, which has them without `unsafe`; what is
//! added here is what every caller would otherwise repeat: `O_CLOEXEC`,
//! retrying `EINTR`, never following a symlink unless asked, and errors as
//! `std::io::Error` so callers keep testing `raw_os_error()`.

pub mod crash;
pub mod dirfd;
pub mod fsxattr;
