//! The command-line options that change how the server plays its role, and
//! their bits in `OPEN`'s flags word.
//!
//! One table (`FIELDS`) says which option sits in which bits, so the
//! client's encoding ([`Options::to_bits`]) and the server's decoding
//! ([`Options::from_bits`]) cannot drift apart. The client builds an
//! [`Options`] once from its configuration; the server reads one once from
//! `OPEN`.
//!
//! | bits | option                    | server behaviour                                   |
//! |------|---------------------------|----------------------------------------------------|
//! | 0    | `--check`                 | compare and report, write nothing                  |
//! | 1    | (retired: `--inplace` of protocol v2)   | refused                              |
//! | 2    | `--checksum`              | no quick check: always compare content             |
//! | 3    | `--verify`                | re-read what was written before committing it      |
//! | 4    | `--no-partial`            | drop an interrupted temporary file                 |
//! | 5–6  | `-v` (level 0–3)          | the server's log level                             |
//! | 7    | `-n`, `--dry-run`         | count what would change, write nothing             |
//! | 8    | `--allow-changing-source` | commit a source that changed while it was read     |
//! | 9–11 | `--write-mode` ([`WriteMode`]) | how the destination is written: 0 auto, 1 clone, 2 journal, 3 copy, 4 unsafe-inplace; 5–7 refused |
//! | 12   | `--snapshot`              | a sending server reads a reflink clone of its file, kept beside it as the next run's base |
//! | 13–22 | `--snapshot-verify N` (0–1023) | a sending server re-reads 1/N of what a delta run skips; 0 = none |
//! | 23   | (a re-run after a verify mismatch) | a sending server reads all of its snapshot, offering no base |
//!
//! A bit outside the table is refused: a newer client asking for something
//! this server cannot do must not be half-served.

use std::fmt;

/// The bits, by name. Their values are the protocol: never renumber one.
pub mod flags {
    pub const CHECK: u32 = 1;
    // Bit 1 was `--inplace` in protocol v2; `WRITE_MODE` replaced it.
    pub const CHECKSUM: u32 = 4;
    pub const VERIFY: u32 = 8;
    pub const NO_PARTIAL: u32 = 16;
    /// Two bits: the client's `-v` level, for the server's log lines.
    pub const VERBOSE_SHIFT: u32 = 5;
    pub const VERBOSE: u32 = 3 << VERBOSE_SHIFT;
    /// `-n`: compare and count, write nothing.
    pub const DRY_RUN: u32 = 1 << 7;
    /// `--allow-changing-source`: commit a source that changed while read.
    pub const ALLOW_CHANGING: u32 = 1 << 8;
    /// Three bits: the [`super::WriteMode`].
    pub const WRITE_MODE: u32 = 7 << 9;
    pub const SNAPSHOT: u32 = 1 << 12;
    /// Ten bits: `--snapshot-verify N`.
    pub const SNAPSHOT_VERIFY: u32 = 1023 << 13;
    pub const SNAPSHOT_FULL: u32 = 1 << 23;
    /// Every bit the table defines.
    pub const ALL: u32 = super::all_bits();
}

/// The options of one run, as the server needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub check: bool,
    pub write_mode: WriteMode,
    pub checksum: bool,
    pub verify: bool,
    pub no_partial: bool,
    pub dry_run: bool,
    pub allow_changing: bool,
    /// `-v` level; only 0 to 3 travel.
    pub verbose: u8,
    /// `--snapshot`, for a sending server.
    pub snapshot: bool,
    /// `--snapshot-verify N`; only 0 to 1023 travel.
    pub snapshot_verify: u16,
    /// Read all of the snapshot: the last delta's verify slice differed.
    pub snapshot_full: bool,
}

/// One option's place in the flags word.
struct Field {
    /// Its bits (contiguous); the value is shifted to the lowest of them.
    mask: u32,
    /// How a user asks for it, for messages.
    option: &'static str,
    get: fn(&Options) -> u32,
    set: fn(&mut Options, u32),
}

/// The one table of options and bits.
const FIELDS: &[Field] = &[
    Field {
        mask: flags::CHECK,
        option: "--check",
        get: |o| o.check.into(),
        set: |o, v| o.check = v != 0,
    },
    Field {
        mask: flags::CHECKSUM,
        option: "--checksum",
        get: |o| o.checksum.into(),
        set: |o, v| o.checksum = v != 0,
    },
    Field {
        mask: flags::VERIFY,
        option: "--verify",
        get: |o| o.verify.into(),
        set: |o, v| o.verify = v != 0,
    },
    Field {
        mask: flags::NO_PARTIAL,
        option: "--no-partial",
        get: |o| o.no_partial.into(),
        set: |o, v| o.no_partial = v != 0,
    },
    Field {
        mask: flags::VERBOSE,
        option: "-v",
        get: |o| o.verbose.min(3).into(),
        set: |o, v| o.verbose = v as u8,
    },
    Field {
        mask: flags::DRY_RUN,
        option: "--dry-run",
        get: |o| o.dry_run.into(),
        set: |o, v| o.dry_run = v != 0,
    },
    Field {
        mask: flags::ALLOW_CHANGING,
        option: "--allow-changing-source",
        get: |o| o.allow_changing.into(),
        set: |o, v| o.allow_changing = v != 0,
    },
    Field {
        mask: flags::SNAPSHOT,
        option: "--snapshot",
        get: |o| o.snapshot.into(),
        set: |o, v| o.snapshot = v != 0,
    },
    Field {
        mask: flags::SNAPSHOT_VERIFY,
        option: "--snapshot-verify",
        get: |o| o.snapshot_verify.min(1023).into(),
        set: |o, v| o.snapshot_verify = v as u16,
    },
    Field {
        mask: flags::SNAPSHOT_FULL,
        option: "--snapshot (full re-read)",
        get: |o| o.snapshot_full.into(),
        set: |o, v| o.snapshot_full = v != 0,
    },
    Field {
        mask: flags::WRITE_MODE,
        option: "--write-mode",
        get: |o| o.write_mode as u32,
        set: |o, v| o.write_mode = WriteMode::from_code(v).unwrap_or(WriteMode::Auto),
    },
];

/// How the receiver writes a destination that already exists (a new one
/// is always written as a partial file and renamed). Each mode's guarantee,
/// in the words `--help` and the README use, is [`WriteMode::guarantee`].
///
/// The discriminants are the protocol's values (bits 9–11 of `OPEN`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WriteMode {
    /// `clone` where the destination's filesystem makes reflinks, else
    /// `journal`.
    #[default]
    Auto = 0,
    /// A reflink clone of the destination, changed where the source differs,
    /// renamed over it. Refused where the filesystem cannot clone.
    Clone = 1,
    /// Changes go to a redo journal first, then into the destination.
    Journal = 2,
    /// A complete new copy beside the destination, renamed over it.
    Copy = 3,
    /// Straight into the destination, like `rsync --inplace`.
    UnsafeInplace = 4,
}

impl WriteMode {
    /// Every mode, in the order `--help` lists them.
    pub const ALL: [WriteMode; 5] = [
        WriteMode::Auto,
        WriteMode::Clone,
        WriteMode::Journal,
        WriteMode::Copy,
        WriteMode::UnsafeInplace,
    ];

    /// Its name on the command line and in `--json` (`write_mode`).
    pub fn name(self) -> &'static str {
        match self {
            WriteMode::Auto => "auto",
            WriteMode::Clone => "clone",
            WriteMode::Journal => "journal",
            WriteMode::Copy => "copy",
            WriteMode::UnsafeInplace => "unsafe-inplace",
        }
    }

    /// What a reader of the destination, and a crash, can see: one sentence.
    pub fn guarantee(self) -> &'static str {
        match self {
            WriteMode::Auto => "clone where the destination's filesystem supports reflinks (XFS, btrfs), else journal",
            WriteMode::Clone => "readers and a crash see the old or the new file, never a mix; writes and extra space cost about the changed bytes",
            WriteMode::Journal => "a crash leaves the old file, or a journal that the next run (or --recover) completes; readers may see a partly applied file while the journal is applied; writes cost about twice the changed bytes",
            WriteMode::Copy => "readers and a crash see the old or the new file, never a mix; writes and extra space cost a whole copy",
            WriteMode::UnsafeInplace => "written straight into the destination: a crash or kill leaves a file that is neither version (rsync --inplace)",
        }
    }

    pub fn from_name(s: &str) -> Option<WriteMode> {
        WriteMode::ALL.into_iter().find(|m| m.name() == s)
    }

    pub fn from_code(v: u32) -> Option<WriteMode> {
        WriteMode::ALL.into_iter().find(|m| *m as u32 == v)
    }
}

const fn all_bits() -> u32 {
    let mut all = 0;
    let mut i = 0;
    while i < FIELDS.len() {
        all |= FIELDS[i].mask;
        i += 1;
    }
    all
}

impl Options {
    /// The flags word for `OPEN`.
    pub fn to_bits(&self) -> u32 {
        FIELDS.iter().fold(0, |bits, f| {
            bits | ((f.get)(self) << f.mask.trailing_zeros()) & f.mask
        })
    }

    /// Reads a flags word; `Err` holds the bits no option owns.
    pub fn from_bits(bits: u32) -> Result<Options, u32> {
        let mode = (bits & flags::WRITE_MODE) >> flags::WRITE_MODE.trailing_zeros();
        if WriteMode::from_code(mode).is_none() {
            return Err(bits & flags::WRITE_MODE);
        }
        match bits & !flags::ALL {
            0 => Ok(Options::from_known_bits(bits)),
            unknown => Err(unknown),
        }
    }

    /// Reads the bits the table knows, ignoring any other.
    pub fn from_known_bits(bits: u32) -> Options {
        let mut o = Options::default();
        for f in FIELDS {
            (f.set)(&mut o, (bits & f.mask) >> f.mask.trailing_zeros());
        }
        o
    }
}

/// The options as a user would type them (`--check -vv`), for log lines.
impl fmt::Display for Options {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for f in FIELDS {
            match (f.get)(self) {
                0 => continue,
                n if f.option == "-v" => write!(out, "{sep}-{}", "v".repeat(n as usize))?,
                _ if f.option == "--write-mode" => {
                    write!(out, "{sep}--write-mode {}", self.write_mode.name())?
                }
                _ => write!(out, "{sep}{}", f.option)?,
            }
            sep = " ";
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_one_owner_per_bit() {
        let mut seen = 0;
        for f in FIELDS {
            assert_eq!(seen & f.mask, 0, "{} overlaps", f.option);
            let run = f.mask >> f.mask.trailing_zeros();
            assert_eq!(run & (run + 1), 0, "{}: bits not contiguous", f.option);
            seen |= f.mask;
        }
        assert_eq!(seen, flags::ALL);
        // The wire values of the protocol's version 4.
        assert_eq!(flags::ALL, 0xff_fffd);
    }

    #[test]
    fn every_option_round_trips_through_its_bits() {
        let all = Options {
            check: true,
            write_mode: WriteMode::Auto,
            checksum: true,
            verify: true,
            no_partial: true,
            dry_run: true,
            allow_changing: true,
            verbose: 3,
            snapshot: true,
            snapshot_verify: 1023,
            snapshot_full: true,
        };
        assert_eq!(all.to_bits(), flags::ALL & !flags::WRITE_MODE);
        assert_eq!(Options::from_bits(all.to_bits()), Ok(all));
        for mode in WriteMode::ALL {
            let o = Options {
                write_mode: mode,
                ..all
            };
            assert_eq!(Options::from_bits(o.to_bits()), Ok(o));
            assert_eq!(WriteMode::from_name(mode.name()), Some(mode));
        }
        // Codes 5-7 name no mode: refused, not read as auto.
        assert_eq!(Options::from_bits(5 << 9), Err(5 << 9));
        for f in FIELDS {
            let mut o = Options::default();
            (f.set)(&mut o, 1);
            assert_eq!(o.to_bits(), 1 << f.mask.trailing_zeros(), "{}", f.option);
            assert_eq!(Options::from_bits(o.to_bits()), Ok(o));
        }
        let v2 = Options {
            verbose: 2,
            ..Options::default()
        };
        assert_eq!(v2.to_bits(), 2 << flags::VERBOSE_SHIFT);
        // A level above 3 travels as 3, never into the next bit.
        let v9 = Options {
            verbose: 9,
            ..Options::default()
        };
        assert_eq!(v9.to_bits(), flags::VERBOSE);
    }

    #[test]
    fn unknown_bits_are_refused() {
        assert_eq!(Options::from_bits(1 << 1), Err(1 << 1));
        assert_eq!(Options::from_bits(1 << 24), Err(1 << 24));
        assert_eq!(
            Options::from_bits(flags::CHECK | 0x8000_0000),
            Err(0x8000_0000)
        );
        assert!(Options::from_known_bits(flags::CHECK | 0x8000_0000).check);
    }

    #[test]
    fn shown_as_typed() {
        let o = Options::from_known_bits(flags::CHECK | flags::DRY_RUN | 2 << flags::VERBOSE_SHIFT);
        assert_eq!(o.to_string(), "--check -vv --dry-run");
        assert_eq!(Options::default().to_string(), "");
    }
}
