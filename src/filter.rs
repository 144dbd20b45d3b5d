//! `--include` / `--exclude`: which entries of a tree a recursive run
//! looks at.
//!
//! Rules are tried in the order given and the first whose pattern matches
//! decides; an entry no rule matches is included. Patterns are globs
//! (globset) matched against the path relative to the tree's root: `*` and
//! `?` never match `/`, `**` matches across directories. As in rsync, a
//! pattern without a `/` matches a name at any depth (`*.tmp` matches
//! `a/b/x.tmp`), one with a `/` is anchored at the root (`/` in front is
//! allowed and changes nothing), and one ending in `/` matches directories
//! only. An excluded directory is not descended into.
//!
//! The same rules are applied to both ends' listings (a remote end gets them
//! in `LIST`), so an excluded destination entry is never deleted.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::Result;
use globset::{GlobBuilder, GlobMatcher};

use crate::error::{fail, Exit};

/// Most `--include`/`--exclude` rules (a limit of `LIST` too).
pub const MAX_RULES: usize = 256;
/// Longest `--include`/`--exclude` pattern (a limit of `LIST` too).
pub const MAX_PATTERN: usize = 1024;

/// An `--include` or `--exclude` rule, as given and as sent in `LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRule {
    pub exclude: bool,
    pub pattern: String,
}

/// Compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    rules: Vec<Compiled>,
}

#[derive(Debug, Clone)]
struct Compiled {
    exclude: bool,
    dir_only: bool,
    glob: GlobMatcher,
}

impl Filter {
    /// Compiles `rules`; a bad pattern is a usage error naming it.
    pub fn new(rules: &[FilterRule]) -> Result<Filter> {
        if rules.len() > MAX_RULES {
            return Err(fail(
                Exit::Usage,
                format!("at most {MAX_RULES} --include/--exclude rules"),
            ));
        }
        let rules = rules.iter().map(compile).collect::<Result<Vec<_>>>()?;
        Ok(Filter { rules })
    }

    /// Whether the entry at `path` (relative to the root) is left out.
    pub fn excludes(&self, path: &[u8], is_dir: bool) -> bool {
        let p = Path::new(OsStr::from_bytes(path));
        self.rules
            .iter()
            .find(|r| (is_dir || !r.dir_only) && r.glob.is_match(p))
            .is_some_and(|r| r.exclude)
    }
}

fn compile(rule: &FilterRule) -> Result<Compiled> {
    let option = if rule.exclude {
        "--exclude"
    } else {
        "--include"
    };
    let bad = |why: String| fail(Exit::Usage, format!("{option} {:?}: {why}", rule.pattern));
    if rule.pattern.len() > MAX_PATTERN {
        return Err(bad(format!("longer than {MAX_PATTERN} bytes")));
    }
    let body = rule.pattern.trim_end_matches('/');
    let dir_only = body.len() != rule.pattern.len();
    let anchored = body.contains('/');
    let body = body.trim_start_matches('/');
    if body.is_empty() || body.contains('\0') {
        return Err(bad("matches nothing".into()));
    }
    let glob = if anchored {
        body.to_string()
    } else {
        format!("**/{body}")
    };
    let glob = GlobBuilder::new(&glob)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| bad(e.kind().to_string()))?
        .compile_matcher();
    Ok(Compiled {
        exclude: rule.exclude,
        dir_only,
        glob,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(rules: &[(bool, &str)]) -> Filter {
        Filter::new(
            &rules
                .iter()
                .map(|(exclude, p)| FilterRule {
                    exclude: *exclude,
                    pattern: p.to_string(),
                })
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn names_match_at_any_depth_and_slashes_anchor() {
        let f = filter(&[(true, "*.tmp")]);
        assert!(f.excludes(b"x.tmp", false));
        assert!(f.excludes(b"a/b/x.tmp", false));
        assert!(!f.excludes(b"x.tmp.img", false));
        let f = filter(&[(true, "/a/*.img")]);
        assert!(f.excludes(b"a/x.img", false));
        assert!(!f.excludes(b"a/b/x.img", false), "* does not cross /");
        assert!(!f.excludes(b"b/a/x.img", false), "anchored at the root");
        let f = filter(&[(true, "a/**/x.img")]);
        assert!(f.excludes(b"a/x.img", false));
        assert!(f.excludes(b"a/b/c/x.img", false));
    }

    #[test]
    fn first_match_wins_and_trailing_slash_means_directories() {
        let f = filter(&[(false, "keep.tmp"), (true, "*.tmp"), (true, "cache/")]);
        assert!(!f.excludes(b"keep.tmp", false));
        assert!(f.excludes(b"other.tmp", false));
        assert!(f.excludes(b"x/cache", true));
        assert!(!f.excludes(b"x/cache", false), "a file named cache stays");
        let f = filter(&[(false, "*.img"), (false, "*/"), (true, "*")]);
        assert!(!f.excludes(b"d/a.img", false));
        assert!(!f.excludes(b"d", true));
        assert!(f.excludes(b"d/notes.txt", false));
    }

    #[test]
    fn bad_patterns_are_usage_errors() {
        for p in ["/", "", "a/[b"] {
            let e = Filter::new(&[FilterRule {
                exclude: true,
                pattern: p.into(),
            }])
            .unwrap_err();
            assert_eq!(crate::error::exit_code_of(&e), Exit::Usage, "{p:?}");
        }
    }
}
