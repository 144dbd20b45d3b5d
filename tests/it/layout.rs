//! The source tree's shape, checked on every test run (issue 11): folders are
//! concerns, imports point down the layers only, no file imports one that
//! (through others) imports it back, files stay small enough to read, and
//! `unsafe` stays rare.
//!
//! The layers, top to bottom (a file may use its own layer and the ones
//! below; `lib.rs` only declares modules):
//!
//! | rank | where | what |
//! |---|---|---|
//! | 0 | `main.rs` | parse, run, map the outcome to an exit code |
//! | 1 | `app/` | cli, config validation, report, metrics |
//! | 2 | `client/`, `server.rs` | the invoking end, the `--server` loop |
//! | 3 | `roles/` | the two ends' state machines, tree list/apply |
//! | 4 | `dest/`, `source/` | how the destination is touched, the source's snapshot |
//! | 5 | `wire/` | how bytes travel |
//! | 6 | `content/` | what bytes are |
//! | 7 | `sys/` | thin wrappers over kernel calls |
//! | 8 | `error`, `units`, `log`, `signals`, `progress`, `filter` | leaves |

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILES_IN_SRC: usize = 10;
const MIN_FOLDERS: usize = 5;
/// Lines of a file outside its `#[cfg(test)] mod tests`.
const MAX_LINES: usize = 900;
const MAX_UNSAFE: usize = 12;

type Module = Vec<String>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, by module path (`wire/frame.rs` is
/// `["wire", "frame"]`, `wire/mod.rs` is `["wire"]`, `lib.rs` is `[]`).
fn modules() -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src(), &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(src()).unwrap().with_extension("");
            let mut m: Module = rel
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if m.last().is_some_and(|l| l == "mod") {
                m.pop();
            }
            if m == ["lib"] || m == ["main"] {
                m = if m == ["main"] {
                    vec!["main".into()]
                } else {
                    vec![]
                };
            }
            (m, p)
        })
        .collect()
}

/// The source without comments, string and char literals (so a path in a
/// doc comment or a message is no import).
fn code_of(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'r' if b.get(i + 1) == Some(&b'#')
                || (b.get(i + 1) == Some(&b'"') && !ident(b, i)) =>
            {
                // Raw string r"…" or r#"…"#.
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == b'"'
                        && b[j + 1..].iter().take(hashes).all(|&c| c == b'#')
                        && b.len() >= j + 1 + hashes
                    {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                out.push_str("\"\"");
                i = j;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' => {
                // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
                let close = if b.get(i + 1) == Some(&b'\\') {
                    b[i + 2..]
                        .iter()
                        .position(|&c| c == b'\'')
                        .map(|p| i + 2 + p)
                } else if b.get(i + 2) == Some(&b'\'') {
                    Some(i + 2)
                } else {
                    None
                };
                match close {
                    Some(c) => {
                        out.push_str("' '");
                        i = c + 1;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

fn ident(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// Expands a `use` tree (`crate::a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if tree.is_empty() {
        return;
    }
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let mut p = prefix.to_vec();
        p.extend(head);
        let body = &tree[open + 1..tree.rfind('}').unwrap()];
        let (mut depth, mut start) = (0, 0);
        for (k, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&body[start..k], &p, out);
                    start = k + 1;
                }
                _ => {}
            }
        }
        expand(&body[start..], &p, out);
    } else {
        let path = tree.split(" as ").next().unwrap();
        let mut p = prefix.to_vec();
        p.extend(
            path.split("::")
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
        out.push(p);
    }
}

/// The paths a file refers to: `use` trees and inline `crate::…`/`super::…`.
fn references(code: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(k) = rest.find("use ") {
        let before_ok = k == 0 || !ident(rest.as_bytes(), k);
        let after = &rest[k + 4..];
        let end = after.find(';').unwrap_or(after.len());
        let tree = after[..end].trim();
        if before_ok {
            // `use child::X` in a folder's mod.rs names a child module: the
            // caller resolves it against the file's own module path.
            let mut paths = Vec::new();
            expand(tree, &[], &mut paths);
            let at = code.len() - rest.len() + k;
            out.extend(paths.into_iter().map(|p| (at, p)));
        }
        rest = &rest[k + 4..];
    }
    for root in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(k) = code[from..].find(root) {
            let at = from + k;
            from = at + root.len();
            if at > 0 && ident(code.as_bytes(), at) {
                continue;
            }
            let tail: String = code[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if code[at + tail.len()..].starts_with('{') {
                continue; // `crate::x::{…}`: a use tree, read whole above
            }
            out.push((
                at,
                tail.split("::")
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            ));
        }
    }
    out
}

/// A file without its `#[cfg(test)] mod tests` (kept at the end of the
/// file by convention): tests may use what they like, and their
/// `use super::*` means the file itself.
fn outside_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(k) => &text[..k],
        None => text,
    }
}

/// The inline modules of a file (`mod flags { … }`): their byte spans in
/// `code`, outermost first, and names.
fn inline_modules(code: &str) -> Vec<(usize, usize, String)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(k) = code[from..].find("mod ") {
        let at = from + k;
        from = at + 4;
        if at > 0 && ident(b, at) {
            continue;
        }
        let name: String = code[at + 4..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let after = code[at + 4 + name.len()..].trim_start();
        if name.is_empty() || !after.starts_with('{') {
            continue; // `mod x;`: a file of its own
        }
        let open = code.len() - after.len();
        let mut depth = 0;
        let mut end = code.len();
        for (j, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + j;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push((open, end, name));
    }
    out
}

/// The import graph: each file → the files it uses.
fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let mods = modules();
    let mut g = BTreeMap::new();
    for (m, path) in &mods {
        let code = code_of(outside_tests(&std::fs::read_to_string(path).unwrap()));
        let mut deps = BTreeSet::new();
        let inline = inline_modules(&code);
        for (at, r) in references(&code) {
            // Paths are relative to the module they are written in: the
            // file's, or an inline `mod x { … }` inside it.
            let mut base = m.clone();
            base.extend(
                inline
                    .iter()
                    .filter(|(start, end, _)| (*start..*end).contains(&at))
                    .map(|(_, _, name)| name.clone()),
            );
            let mut r = r.as_slice();
            match r.first().map(String::as_str) {
                None => continue,
                Some("crate") => {
                    base.clear();
                    r = &r[1..];
                }
                Some("super" | "self") => {
                    while let Some(first) = r.first() {
                        match first.as_str() {
                            "super" => {
                                base.pop();
                            }
                            "self" => {}
                            _ => break,
                        }
                        r = &r[1..];
                    }
                }
                // A relative `use`: only a child module of this file counts
                // (std, external crates and local items are not ours).
                Some(first) => {
                    let mut child = m.clone();
                    child.push(first.to_string());
                    if !mods.contains_key(&child) {
                        continue;
                    }
                }
            }
            base.extend(r.iter().cloned());
            // The longest prefix that is a file of ours.
            for k in (1..=base.len()).rev() {
                if let Some((t, _)) = mods.get_key_value(&base[..k]) {
                    if t != m {
                        deps.insert(t.clone());
                    }
                    break;
                }
            }
        }
        g.insert(m.clone(), deps);
    }
    g
}

fn rank(m: &Module) -> Option<usize> {
    let first = m.first().map(String::as_str)?;
    Some(match first {
        "main" => 0,
        "app" => 1,
        "client" | "server" => 2,
        "roles" => 3,
        "dest" | "source" => 4,
        "wire" => 5,
        "content" => 6,
        "sys" => 7,
        "error" | "units" | "log" | "signals" | "progress" | "filter" => 8,
        other => panic!("src/{other}: a new top-level module needs a layer in tests/it/layout.rs"),
    })
}

fn show(m: &Module) -> String {
    if m.is_empty() {
        "lib".into()
    } else {
        m.join("::")
    }
}

#[test]
fn imports_point_down_the_layers() {
    let mut wrong = Vec::new();
    for (m, deps) in graph() {
        let Some(r) = rank(&m) else { continue };
        for d in deps {
            if rank(&d).is_some_and(|rd| rd < r) {
                wrong.push(format!("{} -> {}", show(&m), show(&d)));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports pointing up the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_import_cycle_between_files() {
    let g = graph();
    // Tarjan's strongly connected components.
    struct State<'a> {
        g: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on: BTreeSet<&'a Module>,
        cycles: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on.insert(v);
        for w in &s.g[v] {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on.remove(w);
                comp.push(show(w));
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.cycles.push(comp);
            }
        }
    }
    let mut s = State {
        g: &g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        cycles: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    let mut why = String::new();
    for comp in &s.cycles {
        for (m, deps) in &g {
            for d in deps {
                if comp.contains(&show(m)) && comp.contains(&show(d)) {
                    why.push_str(&format!("  {} -> {}\n", show(m), show(d)));
                }
            }
        }
    }
    assert!(
        s.cycles.is_empty(),
        "import cycles: {:?}\nedges in them:\n{why}",
        s.cycles
    );
}

/// The checker itself: a cycle and an upward edge in a tiny made-up tree are
/// found, and paths in comments and strings are not imports.
#[test]
fn the_parser_sees_imports_and_only_imports() {
    let code = code_of(
        "use crate::wire::{frame::{A, B}, messages as m};\n\
         // use crate::app::cli;\n\
         let s = \"crate::app::report\"; let c = '\"'; let t = crate::content::hash::of(x);\n\
         use super::sibling::X;",
    );
    let refs = references(&code);
    let joined: Vec<String> = refs.iter().map(|(_, r)| r.join("::")).collect();
    for want in [
        "crate::wire::frame::A",
        "crate::wire::frame::B",
        "crate::wire::messages",
        "crate::content::hash::of",
        "super::sibling::X",
    ] {
        assert!(
            joined.iter().any(|j| j == want),
            "{want} missing from {joined:?}"
        );
    }
    assert!(!joined.iter().any(|j| j.contains("app")), "{joined:?}");
}

#[test]
fn folders_and_file_sizes() {
    let mods = modules();
    let top_files = std::fs::read_dir(src())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "rs"))
        .count();
    let folders = std::fs::read_dir(src())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .count();
    assert!(
        top_files <= MAX_FILES_IN_SRC,
        "{top_files} files directly in src/"
    );
    assert!(folders >= MIN_FOLDERS, "{folders} folders in src/");
    let mut long = Vec::new();
    for path in mods.values() {
        let text = std::fs::read_to_string(path).unwrap();
        let lines = outside_tests(&text).lines().count();
        if lines > MAX_LINES {
            long.push(format!("{}: {lines} lines", path.display()));
        }
    }
    assert!(long.is_empty(), "files to split:\n{}", long.join("\n"));
}

#[test]
fn unsafe_is_rare_and_explained() {
    let mut sites = Vec::new();
    for path in modules().values() {
        let text = std::fs::read_to_string(path).unwrap();
        let code = code_of(&text);
        let n = code.matches("unsafe {").count() + code.matches("unsafe fn").count();
        if n > 0 {
            sites.push((path.clone(), n));
        }
        // Every unsafe block has its SAFETY comment on the lines above.
        let lines: Vec<&str> = text.lines().collect();
        for (k, line) in lines.iter().enumerate() {
            let l = line.trim_start();
            if l.starts_with("//") || !l.contains("unsafe {") {
                continue;
            }
            let above = &lines[k.saturating_sub(4)..=k];
            assert!(
                above.iter().any(|a| a.contains("SAFETY:")),
                "{}:{}: unsafe without a SAFETY: comment",
                path.display(),
                k + 1
            );
        }
    }
    let total: usize = sites.iter().map(|(_, n)| n).sum();
    assert!(
        total <= MAX_UNSAFE,
        "{total} unsafe sites (at most {MAX_UNSAFE}): {sites:?}"
    );
}
