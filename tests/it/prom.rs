//! A strict parser of the Prometheus text exposition format (0.0.4), for
//! tests of `--metrics-file`.
//!
//! Strict where node_exporter's textfile collector (or the Prometheus
//! registry behind it) would reject a file or silently misread it, so a test
//! that parses our output also proves the collector accepts it:
//!
//! * metric and label names are valid, and no label name is reserved (`__`);
//! * label values use only the escapes `\\`, `\"` and `\n`, HELP text only
//!   `\\` and `\n`;
//! * every sample's family has a `# TYPE` line before its first sample,
//!   HELP and TYPE appear at most once per family and before its samples,
//!   and a family's samples form one group;
//! * no series (name and label set) appears twice, no sample has a
//!   timestamp (the textfile collector refuses them), and every value
//!   parses as a float;
//! * the last line ends with a line feed.
//!
//! `tests/it/main.rs` declares it (`crate::prom`); `src/app/metrics/` includes
//! it with `#[path]` for its unit tests too.

use std::collections::{HashMap, HashSet};

/// One sample line: its metric name, its labels in file order, its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

const TYPES: &[&str] = &["counter", "gauge", "histogram", "summary", "untyped"];

/// Parses `text`, or says which line breaks which rule.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the last line does not end with a line feed".into());
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut with_samples: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut series: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
    let mut samples = Vec::new();
    for (i, line) in text.split_terminator('\n').enumerate() {
        let at = |msg: String| format!("line {}: {msg}: {line:?}", i + 1);
        if line.trim_matches([' ', '\t']).is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let Some((kind, name, rest)) = descriptor(rest).map_err(at)? else {
                continue;
            };
            if with_samples.contains(&name) {
                return Err(at(format!("{kind} for {name} after its samples")));
            }
            if kind == "HELP" {
                unescape_help(rest).map_err(at)?;
                if !helps.insert(name.clone()) {
                    return Err(at(format!("second HELP for {name}")));
                }
            } else {
                let t = rest.trim_matches([' ', '\t']);
                if !TYPES.contains(&t) {
                    return Err(at(format!("unknown type {t:?}")));
                }
                if types.insert(name.clone(), t.to_string()).is_some() {
                    return Err(at(format!("second TYPE for {name}")));
                }
            }
            continue;
        }
        let sample = sample(line).map_err(at)?;
        let family = family_of(&sample.name, &types)
            .ok_or_else(|| at(format!("no TYPE line before {}", sample.name)))?;
        if current.as_deref() != Some(family.as_str()) {
            if with_samples.contains(&family) {
                return Err(at(format!("samples of {family} are not one group")));
            }
            current = Some(family.clone());
        }
        with_samples.insert(family);
        let mut key = sample.labels.clone();
        key.sort();
        if !series.insert((sample.name.clone(), key)) {
            return Err(at("the same series appears twice".into()));
        }
        samples.push(sample);
    }
    Ok(samples)
}

/// The value of the sample named `name` whose labels are exactly `labels`
/// (in any order).
pub fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(&str, &str)> = labels.to_vec();
    want.sort();
    samples
        .iter()
        .find(|s| {
            let mut have: Vec<(&str, &str)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            have.sort();
            s.name == name && have == want
        })
        .map(|s| s.value)
}

/// A `# HELP` or `# TYPE` line as (kind, metric name, rest of the line);
/// `None` for any other comment, which the format ignores.
fn descriptor(after_hash: &str) -> Result<Option<(&'static str, String, &str)>, String> {
    let s = after_hash.trim_start_matches([' ', '\t']);
    let (kind, rest) = if let Some(r) = s.strip_prefix("HELP") {
        ("HELP", r)
    } else if let Some(r) = s.strip_prefix("TYPE") {
        ("TYPE", r)
    } else {
        return Ok(None);
    };
    if !rest.starts_with([' ', '\t']) {
        // "# HELPFUL remark" is a plain comment.
        return Ok(None);
    }
    let rest = rest.trim_start_matches([' ', '\t']);
    let end = rest.find([' ', '\t']).unwrap_or(rest.len());
    let name = &rest[..end];
    if !is_metric_name(name) {
        return Err(format!("invalid metric name {name:?} in {kind}"));
    }
    let rest = rest[end..].trim_start_matches([' ', '\t']);
    Ok(Some((kind, name.to_string(), rest)))
}

fn unescape_help(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some(c) => return Err(format!("invalid escape \\{c} in HELP")),
            None => return Err("a backslash at the end of HELP".into()),
        }
    }
    Ok(out)
}

/// The family a sample belongs to: its own name, or for `_bucket`, `_sum`
/// and `_count` the histogram or summary it is part of.
fn family_of(name: &str, types: &HashMap<String, String>) -> Option<String> {
    if types.contains_key(name) {
        return Some(name.to_string());
    }
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| kinds.contains(&t.as_str())) {
                return Some(base.to_string());
            }
        }
    }
    None
}

fn sample(line: &str) -> Result<Sample, String> {
    let b = line.as_bytes();
    let name_end = b
        .iter()
        .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b':'))
        .unwrap_or(b.len());
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels: Vec<(String, String)> = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = parse_labels(r, &mut labels)?;
    }
    if !rest.starts_with([' ', '\t']) {
        return Err("expected blanks before the value".into());
    }
    let mut fields = rest.split([' ', '\t']).filter(|f| !f.is_empty());
    let value = fields.next().ok_or("no value")?;
    if fields.next().is_some() {
        return Err("a timestamp or trailing text after the value".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value: parse_float(value)?,
    })
}

/// Parses the labels after `{` into `out`, returning the text after `}`.
fn parse_labels<'a>(mut s: &'a str, out: &mut Vec<(String, String)>) -> Result<&'a str, String> {
    loop {
        s = s.trim_start_matches([' ', '\t']);
        if let Some(r) = s.strip_prefix('}') {
            return Ok(r);
        }
        let end = s.find(['=', ' ', '\t']).ok_or("unterminated label set")?;
        let name = &s[..end];
        if !is_label_name(name) {
            return Err(format!("invalid label name {name:?}"));
        }
        if out.iter().any(|(k, _)| k == name) {
            return Err(format!("label {name} appears twice"));
        }
        s = s[end..].trim_start_matches([' ', '\t']);
        s = s.strip_prefix('=').ok_or("expected = after a label name")?;
        s = s.trim_start_matches([' ', '\t']);
        s = s
            .strip_prefix('"')
            .ok_or("expected \" to open a label value")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let close = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => return Err(format!("invalid escape \\{c} in a label value")),
                    None => return Err("unterminated label value".into()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        out.push((name.to_string(), value));
        s = s[close + 1..].trim_start_matches([' ', '\t']);
        if let Some(r) = s.strip_prefix(',') {
            s = r;
        } else if !s.starts_with('}') {
            return Err("expected , or } after a label value".into());
        }
    }
}

/// A value as Go's `ParseFloat` reads it, with `NaN`, `+Inf` and `-Inf`
/// spelled as the format specifies (Rust would also take "inf", "nan").
fn parse_float(s: &str) -> Result<f64, String> {
    match s {
        "NaN" => return Ok(f64::NAN),
        "+Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    let plain = s
        .bytes()
        .all(|c| c.is_ascii_digit() || matches!(c, b'+' | b'-' | b'.' | b'e' | b'E'));
    match s.parse::<f64>() {
        Ok(v) if plain => Ok(v),
        _ => Err(format!("value {s:?} is not a float")),
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    !s.starts_with("__")
        && b.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}
