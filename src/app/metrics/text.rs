//! The text exposition format of the metrics file: reading the samples of
//! an existing file, and writing them back.
//!
//! Only what vmsync itself writes is read back (see [`parse`]); the format
//! is Prometheus' text format 0.0.4, which node_exporter's textfile
//! collector reads: `# HELP` and `# TYPE` lines, then one line per sample,
//! `name{label="value",...} value`, without timestamps.

use std::fmt::Write as _;

use super::families::{Key, Samples, FAMILIES, SLICE_SUCCESS};

/// The samples of our families with exactly the labels `destination` and
/// `mode` (and `slice`, a number from 1 to [`crate::wire::MAX_SAMPLE`], for
/// the one family that has it); `None` if any line is malformed. Comments
/// (HELP, TYPE) carry nothing we need: they are rewritten from [`FAMILIES`].
pub(super) fn parse(text: &str) -> Option<Samples> {
    let mut samples = Samples::new();
    for line in text.lines() {
        let line = line.trim_matches([' ', '\t']);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return None;
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            rest = parse_labels(r, &mut labels)?;
        }
        // A timestamp or anything else after the value makes the line
        // malformed: the collector refuses files with timestamps anyway.
        let value = rest.trim_matches([' ', '\t']);
        if value.contains([' ', '\t']) {
            return None;
        }
        let number: f64 = value.parse().ok()?;
        // Rust also reads "inf" and "nan", which the format spells otherwise.
        let value = if number.is_finite() {
            value.to_string()
        } else {
            seconds(number)
        };
        let Some(family) = FAMILIES.iter().position(|(n, _)| *n == name) else {
            continue;
        };
        if let Some(key) = key_of(family, &labels) {
            samples.insert(key, value);
        }
    }
    Some(samples)
}

/// Parses the labels after `{` into `out`, returning the text after `}`.
fn parse_labels<'a>(mut s: &'a str, out: &mut Vec<(String, String)>) -> Option<&'a str> {
    loop {
        s = s.trim_start_matches([' ', '\t']);
        if let Some(r) = s.strip_prefix('}') {
            return Some(r);
        }
        let (name, r) = s.split_once('=')?;
        let name = name.trim_end_matches([' ', '\t']);
        if name.is_empty() || !is_metric_name(name) || name.contains(':') {
            return None;
        }
        s = r.trim_start_matches([' ', '\t']).strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let close = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    _ => return None,
                },
                (_, c) => value.push(c),
            }
        };
        out.push((name.to_string(), value));
        s = s[close + 1..].trim_start_matches([' ', '\t']);
        match s.strip_prefix(',') {
            Some(r) => s = r,
            None if s.starts_with('}') => {}
            None => return None,
        }
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// The key of a sample of `family` with `labels`, if they are exactly the
/// labels vmsync writes for it.
fn key_of(family: usize, labels: &[(String, String)]) -> Option<Key> {
    let (mut destination, mut mode, mut slice) = (None, None, None);
    for (k, v) in labels {
        match k.as_str() {
            "destination" => destination = Some(v),
            "mode" => mode = Some(v),
            "slice" if family == SLICE_SUCCESS => {
                slice = v
                    .parse::<u32>()
                    .ok()
                    .filter(|s| (1..=crate::wire::MAX_SAMPLE).contains(s))
            }
            _ => return None,
        }
    }
    if family == SLICE_SUCCESS && slice.is_none() {
        return None;
    }
    // A label given twice is malformed to the collector; here it leaves
    // fewer distinct names than labels.
    let expected = 2 + usize::from(slice.is_some());
    match (destination, mode) {
        (Some(d), Some(m)) if labels.len() == expected => Some(Key {
            family,
            destination: d.clone(),
            mode: m.clone(),
            slice,
        }),
        _ => None,
    }
}

/// Rounds to milliseconds, unless that would overflow.
pub(super) fn round_ms(x: f64) -> f64 {
    let r = (x * 1000.0).round() / 1000.0;
    if r.is_finite() {
        r
    } else {
        x
    }
}

/// Rust's `Display` for f64 is the shortest text that reads back as the
/// same value and never uses exponents; only the non-finite values need
/// the format's own spelling.
pub(super) fn seconds(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        x.to_string()
    }
}

fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The file's text. A family without samples gets no HELP or TYPE either.
pub(super) fn render(samples: &Samples) -> String {
    let mut out = String::new();
    let mut family = None;
    for (key, value) in samples {
        let (name, help) = FAMILIES[key.family];
        if family != Some(key.family) {
            family = Some(key.family);
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        }
        let slice = key
            .slice
            .map_or_else(String::new, |s| format!(",slice=\"{s}\""));
        let _ = writeln!(
            out,
            "{name}{{destination=\"{}\",mode=\"{}\"{slice}}} {value}",
            escape(&key.destination),
            escape(&key.mode)
        );
    }
    out
}
