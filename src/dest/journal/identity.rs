//! Which file or device a journal was written for, told apart from another
//! that took its place, and found again after a reboot.
//!
//! A journal must never be applied to anything but its target: that would
//! write one image's blocks into another. Path names are no proof (a file
//! can be replaced under its name, `/dev/sdb` can be another disk after a
//! reboot), and neither are device numbers alone (`st_dev` of a filesystem
//! and `st_rdev` of a device may change at a reboot). So a regular file is
//! its inode number and birth time (where the filesystem has one; else the
//! device number), and a block device is its size and a stable id from
//! sysfs: a device-mapper uuid, a WWID, a serial, a loop device's backing
//! file (where it has none of them, the device number).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Longest stable id of a device kept (it goes into the journal's header).
pub const MAX_STABLE_ID: usize = 255;
/// Where a block device's stable id is looked for, under
/// `/sys/dev/block/MAJ:MIN/`, best first.
const ID_SOURCES: &[&str] = &[
    "dm/uuid",
    "device/wwid",
    "wwid",
    "device/serial",
    "serial",
    "loop/backing_file",
];

/// What the journal was written for: found again after a reboot, told
/// apart from another file or device that took its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// A regular file: inode, and birth time where the filesystem has one
    /// (else the device number, which a reboot may change).
    File {
        dev: u64,
        ino: u64,
        btime: Option<(i64, u32)>,
    },
    /// A block device: its size, and a stable id from sysfs (else the
    /// device number, which a reboot may change). Empty when none.
    Device {
        rdev: u64,
        size: u64,
        stable_id: String,
    },
}

impl Identity {
    /// The identity of the open regular file or block device `file`.
    pub fn of(file: &File) -> std::io::Result<Identity> {
        use std::os::unix::fs::FileTypeExt;
        let meta = file.metadata()?;
        if meta.file_type().is_block_device() {
            let rdev = meta.rdev();
            let sys = format!(
                "/sys/dev/block/{}:{}",
                rustix::fs::major(rdev),
                rustix::fs::minor(rdev)
            );
            return Ok(Identity::Device {
                rdev,
                size: crate::content::scan::device_size(file)?,
                stable_id: stable_id_in(Path::new(&sys)),
            });
        }
        if !meta.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a journal's target is a regular file or a block device",
            ));
        }
        use rustix::fs::{AtFlags, StatxFlags};
        let btime = match rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::BTIME) {
            Ok(x) if x.stx_mask & StatxFlags::BTIME.bits() != 0 => {
                Some((x.stx_btime.tv_sec, x.stx_btime.tv_nsec))
            }
            Ok(_) => None,
            // No statx (old kernel, or a sandbox refusing it): no birth time.
            Err(e) if e == rustix::io::Errno::NOSYS || e == rustix::io::Errno::PERM => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Identity::File {
            dev: meta.dev(),
            ino: meta.ino(),
            btime,
        })
    }

    /// Why `now` is not the target this identity was taken of, or None when
    /// it is.
    pub fn mismatch(&self, now: &Identity) -> Option<String> {
        match (self, now) {
            (
                Identity::File {
                    dev: d0,
                    ino: i0,
                    btime: b0,
                },
                Identity::File {
                    dev: d1,
                    ino: i1,
                    btime: b1,
                },
            ) => {
                if i0 != i1 {
                    return Some(format!(
                        "it was written for inode {i0}, this file is inode {i1}"
                    ));
                }
                match (b0, b1) {
                    (Some(a), Some(b)) if a != b => Some(format!(
                        "it was written for a file created at {}.{:09}, this one was created at {}.{:09}",
                        a.0, a.1, b.0, b.1
                    )),
                    (Some(_), Some(_)) => None,
                    _ if d0 != d1 => Some(format!(
                        "it was written for inode {i0} on device {}, this file is on device {}",
                        dev_name(*d0),
                        dev_name(*d1)
                    )),
                    _ => None,
                }
            }
            (
                Identity::Device {
                    rdev: r0,
                    size: s0,
                    stable_id: id0,
                },
                Identity::Device {
                    rdev: r1,
                    size: s1,
                    stable_id: id1,
                },
            ) => {
                if s0 != s1 {
                    return Some(format!(
                        "it was written for a device of {s0} bytes, this one has {s1}"
                    ));
                }
                match (id0.is_empty(), id1.is_empty()) {
                    (false, false) if id0 == id1 => None,
                    (false, false) => Some(format!(
                        "it was written for the device {id0}, this one is {id1}"
                    )),
                    (true, true) if r0 == r1 => None,
                    (true, true) => Some(format!(
                        "it was written for device {}, this one is device {}",
                        dev_name(*r0),
                        dev_name(*r1)
                    )),
                    (false, true) => Some(format!(
                        "it was written for the device {id0}, this one has no stable id"
                    )),
                    (true, false) => Some(format!(
                        "it was written for a device without a stable id, this one is {id1}"
                    )),
                }
            }
            (Identity::File { .. }, Identity::Device { .. }) => {
                Some("it was written for a regular file, this is a block device".into())
            }
            (Identity::Device { .. }, Identity::File { .. }) => {
                Some("it was written for a block device, this is a regular file".into())
            }
        }
    }
}

fn dev_name(dev: u64) -> String {
    format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev))
}

/// The first readable, non-empty id of [`ID_SOURCES`] under the sysfs
/// directory `dir`, as `name=value` cut to [`MAX_STABLE_ID`] bytes; empty
/// when there is none.
pub(super) fn stable_id_in(dir: &Path) -> String {
    use std::io::Read;
    for name in ID_SOURCES {
        let mut raw = Vec::new();
        let read = File::open(dir.join(name)).and_then(|f| f.take(4096).read_to_end(&mut raw));
        if read.is_err() {
            continue;
        }
        let text = String::from_utf8_lossy(&raw);
        let value = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        if value.is_empty() {
            continue;
        }
        let mut id = format!("{name}={value}");
        let mut cut = id.len().min(MAX_STABLE_ID);
        while !id.is_char_boundary(cut) {
            cut -= 1;
        }
        id.truncate(cut);
        return id;
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn rw(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap()
    }

    #[test]
    fn identities_match_as_documented() {
        let file = |dev, ino, btime| Identity::File { dev, ino, btime };
        let dev = |rdev, size, id: &str| Identity::Device {
            rdev,
            size,
            stable_id: id.into(),
        };
        let bt = Some((5, 6));
        assert_eq!(file(1, 2, bt).mismatch(&file(1, 2, bt)), None);
        // After a reboot the device number may change; the birth time holds.
        assert_eq!(file(1, 2, bt).mismatch(&file(9, 2, bt)), None);
        assert!(file(1, 2, bt).mismatch(&file(1, 3, bt)).is_some());
        assert!(file(1, 2, bt).mismatch(&file(1, 2, Some((5, 7)))).is_some());
        // Without a birth time on both sides, the device number decides.
        assert_eq!(file(1, 2, None).mismatch(&file(1, 2, bt)), None);
        assert!(file(1, 2, None).mismatch(&file(9, 2, None)).is_some());
        assert!(file(1, 2, bt).mismatch(&file(9, 2, None)).is_some());

        assert_eq!(dev(1, 100, "wwid=x").mismatch(&dev(9, 100, "wwid=x")), None);
        assert!(dev(1, 100, "wwid=x")
            .mismatch(&dev(1, 100, "wwid=y"))
            .is_some());
        assert!(dev(1, 100, "wwid=x")
            .mismatch(&dev(1, 200, "wwid=x"))
            .is_some());
        assert_eq!(dev(1, 100, "").mismatch(&dev(1, 100, "")), None);
        assert!(dev(1, 100, "").mismatch(&dev(2, 100, "")).is_some());
        assert!(dev(1, 100, "").mismatch(&dev(1, 100, "serial=z")).is_some());
        assert!(dev(1, 100, "serial=z").mismatch(&dev(1, 100, "")).is_some());
        assert!(file(1, 2, None).mismatch(&dev(1, 2, "")).is_some());
        assert!(dev(1, 2, "").mismatch(&file(1, 2, None)).is_some());

        // A real file: its own identity matches, a new file's does not.
        let dir = tempfile::tempdir().unwrap();
        let a = rw(&dir.path().join("a"));
        let b = rw(&dir.path().join("b"));
        let ia = Identity::of(&a).unwrap();
        assert_eq!(ia.mismatch(&Identity::of(&a).unwrap()), None);
        assert!(ia.mismatch(&Identity::of(&b).unwrap()).is_some());
        assert!(Identity::of(&File::open(dir.path()).unwrap()).is_err());
    }

    #[test]
    fn a_device_stable_id_comes_from_the_first_source_that_has_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(stable_id_in(d), "");
        std::fs::create_dir_all(d.join("loop")).unwrap();
        std::fs::write(d.join("loop/backing_file"), "/var/img/a.raw\n").unwrap();
        assert_eq!(stable_id_in(d), "loop/backing_file=/var/img/a.raw");
        std::fs::write(d.join("serial"), "  \n").unwrap();
        assert_eq!(stable_id_in(d), "loop/backing_file=/var/img/a.raw");
        std::fs::create_dir_all(d.join("dm")).unwrap();
        let long = format!("LVM-{}", "é".repeat(200));
        std::fs::write(d.join("dm/uuid"), format!("{long}\n")).unwrap();
        let id = stable_id_in(d);
        assert!(
            id.len() <= MAX_STABLE_ID && id.len() >= MAX_STABLE_ID - 1,
            "{}",
            id.len()
        );
        assert!(id.starts_with("dm/uuid=LVM-éé"));
    }
}
