//! Thin safe wrappers over the kernel calls vmsync needs.
//!
//! The calls come from `rustix`, which has them without `unsafe`; what is
//! added here is what every caller would otherwise repeat: `O_CLOEXEC`,
//! retrying `EINTR`, never following a symlink unless asked, and errors as
//! `std::io::Error` so callers keep testing `raw_os_error()`. The ioctls
//! rustix lacks are the exception, raw `libc::ioctl` calls with their
//! `// SAFETY:` arguments:
//! * `crash`: named points at which a test has the process SIGKILLed;
//! * `dirfd`: descriptor-relative lookups for tree walks and `--root`;
//! * `fiemap`: which disk blocks hold a file (`FS_IOC_FIEMAP`);
//! * `fsxattr`: XFS's copy-on-write extent size hint;
//! * `xattr`: extended attributes and ACLs of an `O_PATH` descriptor's entry.

pub mod crash;
pub mod dirfd;
pub mod fiemap;
pub mod fsxattr;
pub mod xattr;
