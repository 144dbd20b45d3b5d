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
//! | 1    | `--inplace`               | write into the destination, no temporary file      |
//! | 2    | `--checksum`              | no quick check: always compare content             |
//! | 3    | `--verify`                | re-read what was written before committing it      |
//! | 4    | `--no-partial`            | drop an interrupted temporary file                 |
//! | 5–6  | `-v` (level 0–3)          | the server's log level                             |
//! | 7    | `-n`, `--dry-run`         | count what would change, write nothing             |
//! | 8    | `--allow-changing-source` | commit a source that changed while it was read     |
//!
//! A bit outside the table is refused: a newer client asking for something
//! this server cannot do must not be half-served.

use std::fmt;

/// The bits, by name. Their values are the protocol: never renumber one.
pub mod flags {
    pub const CHECK: u32 = 1;
    pub const INPLACE: u32 = 2;
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
    /// Every bit the table defines.
    pub const ALL: u32 = super::all_bits();
}

/// The options of one run, as the server needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub check: bool,
    pub inplace: bool,
    pub checksum: bool,
    pub verify: bool,
    pub no_partial: bool,
    pub dry_run: bool,
    pub allow_changing: bool,
    /// `-v` level; only 0 to 3 travel.
    pub verbose: u8,
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
        mask: flags::INPLACE,
        option: "--inplace",
        get: |o| o.inplace.into(),
        set: |o, v| o.inplace = v != 0,
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
];

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
        // The wire values of the protocol's version 2.
        assert_eq!(flags::ALL, 0x1ff);
    }

    #[test]
    fn every_option_round_trips_through_its_bits() {
        let all = Options {
            check: true,
            inplace: true,
            checksum: true,
            verify: true,
            no_partial: true,
            dry_run: true,
            allow_changing: true,
            verbose: 3,
        };
        assert_eq!(all.to_bits(), flags::ALL);
        assert_eq!(Options::from_bits(flags::ALL), Ok(all));
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
        assert_eq!(Options::from_bits(1 << 9), Err(1 << 9));
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
