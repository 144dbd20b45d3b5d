//! The monitoring in `deploy/` (issue 14, item 3), checked with the real
//! promtool: the alert rules pass `promtool check rules` and their unit
//! tests; every alert has a severity, a test that fires it and a healthy
//! fleet that keeps it silent (proven by running the tests against rules
//! that never and always fire); every dashboard query is valid PromQL; the
//! metrics table of `deploy/README.md` matches what vmsync writes and what
//! the rules read; and the files that real vmsync runs write fire nothing
//! when healthy and the minor alert after a failed run.
//!
//! Without promtool the promtool tests say `SKIPPED` and pass, unless
//! `VMSYNC_REQUIRE_LOOP=1` (CI), where they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use crate::prom;

const RULES: &str = "prometheus/vmsync.rules.yml";
const TESTS: [&str; 2] = [
    "prometheus/vmsync.rules.test.yml",
    "prometheus/vmsync.rules.long.test.yml",
];
const DASHBOARD: &str = "grafana/vmsync-dashboard.json";
const SEVERITIES: [&str; 3] = ["warning", "minor", "major"];
/// The restore drill's families (the metric contract; the drill script
/// writes them, not vmsync).
const DRILL_FAMILIES: [&str; 5] = [
    "vmsync_drill_last_run_timestamp_seconds",
    "vmsync_drill_last_success_timestamp_seconds",
    "vmsync_drill_last_exit_code",
    "vmsync_drill_duration_seconds",
    "vmsync_drill_restored_bytes",
];

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether promtool runs here; if not, a skip with the reason, or a panic
/// under `VMSYNC_REQUIRE_LOOP=1`.
fn have_promtool(test: &str) -> bool {
    let why = match Command::new("promtool").arg("--version").output() {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!("promtool --version failed: {}", o.status),
        Err(e) => format!("no promtool ({e})"),
    };
    if std::env::var("VMSYNC_REQUIRE_LOOP").as_deref() == Ok("1") {
        panic!("{test}: promtool is required (VMSYNC_REQUIRE_LOOP=1), but {why}");
    }
    eprintln!("SKIPPED {test}: {why}; install the prometheus package");
    false
}

/// Runs `promtool ARGS` in `dir`: (success, stdout and stderr).
fn promtool(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// ---------------------------------------------------------------------------
// A reader for the YAML of our own two formats, written in a fixed style
// (block mappings, one key per line, flow style only for one-line silent
// tests). promtool reads the real YAML; this only needs to find what the
// coverage checks ask about, and the counts are cross-checked with promtool.
// ---------------------------------------------------------------------------

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The value of `key:` in `block` (the first line with that key): its inline
/// text, plus the lines indented deeper below it (a block scalar).
fn value_of(block: &[&str], key: &str) -> Option<String> {
    let at = block.iter().position(|l| {
        let t = l.trim_start().trim_start_matches("- ");
        t.starts_with(key) && t[key.len()..].starts_with(':')
    })?;
    let line = block[at];
    let t = line.trim_start().trim_start_matches("- ");
    // The key's column: after the "- " of a list item.
    let column = line.len() - t.len();
    let mut value = t[key.len() + 1..].trim().to_string();
    for l in &block[at + 1..] {
        if !l.trim().is_empty() && indent(l) <= column {
            break;
        }
        value.push('\n');
        value.push_str(l.trim());
    }
    Some(value)
}

/// One `- alert:` rule of the rules file.
#[derive(Debug)]
struct Alert {
    name: String,
    /// Every `severity:` value in its block (exactly one is right).
    severities: Vec<String>,
    expr: String,
    summary: String,
    description: String,
}

fn alerts(rules: &str) -> Vec<Alert> {
    let lines: Vec<&str> = rules.lines().collect();
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| {
            let t = lines[i].trim_start();
            t.starts_with("- alert:") || t.starts_with("- record:") || t.starts_with("- name:")
        })
        .chain([lines.len()])
        .collect();
    starts
        .windows(2)
        .filter(|w| lines[w[0]].trim_start().starts_with("- alert:"))
        .map(|w| {
            let block = &lines[w[0]..w[1]];
            let get = |k| value_of(block, k).unwrap_or_default();
            Alert {
                name: get("alert"),
                severities: block
                    .iter()
                    .filter_map(|l| l.trim().strip_prefix("severity:"))
                    .map(|s| s.trim().to_string())
                    .collect(),
                expr: get("expr"),
                summary: get("summary"),
                description: get("description"),
            }
        })
        .collect()
}

/// The `vmsync_*` metric names an expression reads.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let code: String = expr
        .lines()
        .map(|l| l.split('#').next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("vmsync_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.insert(name);
    }
    out
}

/// One `alert_rule_test` case of a test file.
#[derive(Debug)]
struct Case {
    group: String,
    alertname: String,
    eval_time: String,
    /// `exp_alerts` lists alerts (else it is `[]`: the alert must be silent).
    firing: bool,
}

fn cases(tests: &str) -> Vec<Case> {
    let lines: Vec<&str> = tests.lines().collect();
    let mut group = String::new();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if indent(line) == 2 && t.starts_with("- name:") {
            group = t["- name:".len()..].trim().to_string();
        } else if let Some(flow) = t.strip_prefix("- {eval_time:") {
            let flow = format!("eval_time:{flow}");
            let fields: BTreeMap<&str, &str> = flow
                .trim_end_matches('}')
                .split(", ")
                .map(|kv| kv.split_once(": ").expect("key: value"))
                .map(|(k, v)| (k.trim(), v.trim()))
                .collect();
            assert_eq!(
                fields.get("exp_alerts"),
                Some(&"[]"),
                "one-line tests are silent ones: {line}"
            );
            out.push(Case {
                group: group.clone(),
                alertname: fields["alertname"].to_string(),
                eval_time: fields["eval_time"].to_string(),
                firing: false,
            });
        } else if t.starts_with("- eval_time:") {
            let end = lines[i + 1..]
                .iter()
                .position(|l| !l.trim().is_empty() && indent(l) <= indent(line))
                .map_or(lines.len(), |p| i + 1 + p);
            let block = &lines[i..end];
            let exp = value_of(block, "exp_alerts").expect("exp_alerts");
            out.push(Case {
                group: group.clone(),
                alertname: value_of(block, "alertname").expect("alertname"),
                eval_time: value_of(block, "eval_time").unwrap(),
                firing: exp != "[]" && block.iter().any(|l| l.trim().starts_with("- exp_labels:")),
            });
        }
    }
    out
}

/// (group, alertname) of every failed alert test in promtool's report.
fn failures(report: &str) -> BTreeSet<(String, String)> {
    let mut group = String::new();
    let mut out = BTreeSet::new();
    for line in report.lines() {
        let t = line.trim();
        if let Some(g) = t.strip_prefix("name: ") {
            group = g.trim_end_matches(',').to_string();
        } else if let Some(a) = t.strip_prefix("alertname: ") {
            out.insert((group.clone(), a.split(',').next().unwrap().to_string()));
        }
    }
    out
}

/// Both test files copied into a fresh directory beside a rules file of
/// the same alerts (name and severity) whose every expression is `expr`:
/// promtool's report on them.
fn test_against(alerts: &[Alert], expr: &str) -> String {
    let dir = tempdir();
    let mut rules = String::from("groups:\n  - name: mutated\n    rules:\n");
    for a in alerts {
        rules.push_str(&format!(
            "      - alert: {}\n        expr: {expr}\n        labels:\n          severity: {}\n",
            a.name, a.severities[0]
        ));
    }
    std::fs::write(dir.path().join("vmsync.rules.yml"), rules).unwrap();
    let mut names = Vec::new();
    for t in TESTS {
        let name = Path::new(t).file_name().unwrap().to_str().unwrap();
        std::fs::copy(deploy(t), dir.path().join(name)).unwrap();
        names.push(name);
    }
    let mut args = vec!["test", "rules"];
    args.extend(&names);
    let (ok, report) = promtool(dir.path(), &args);
    assert!(
        !ok,
        "the tests pass against rules that are all `{expr}`:\n{report}"
    );
    report
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    if !have_promtool("deploy_rules::rules_pass_promtool_check_and_their_unit_tests") {
        return;
    }
    let dir = deploy("prometheus");
    let (ok, out) = promtool(&dir, &["check", "rules", "vmsync.rules.yml"]);
    assert!(ok, "{out}");
    let n = alerts(&read(&deploy(RULES))).len();
    assert!(
        out.contains(&format!("SUCCESS: {n} rules found")),
        "promtool counts other rules than the {n} alerts found here:\n{out}"
    );
    let (ok, out) = promtool(
        &dir,
        &[
            "test",
            "rules",
            "vmsync.rules.test.yml",
            "vmsync.rules.long.test.yml",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(out.matches("SUCCESS").count(), 2, "{out}");
}

#[test]
fn every_alert_has_a_severity_a_test_that_fires_it_and_a_healthy_fleet_it_spares() {
    let rules = alerts(&read(&deploy(RULES)));
    assert!(rules.len() >= 10, "{rules:?}");
    let mut used = BTreeSet::new();
    for a in &rules {
        assert_eq!(a.severities.len(), 1, "{}: one severity label", a.name);
        assert!(
            SEVERITIES.contains(&a.severities[0].as_str()),
            "{}: severity {:?}",
            a.name,
            a.severities[0]
        );
        used.insert(a.severities[0].as_str());
        assert!(
            !metrics_in(&a.expr).is_empty(),
            "{}: expr {:?}",
            a.name,
            a.expr
        );
        for text in [&a.summary, &a.description] {
            assert!(
                text.contains("{{ $labels.destination }}"),
                "{}: an annotation without the destination: {text}",
                a.name
            );
        }
    }
    assert_eq!(used.len(), 3, "all three severities are used");
    let names: BTreeSet<&str> = rules.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names.len(), rules.len(), "alert names are unique");

    let all: Vec<Case> = TESTS
        .iter()
        .flat_map(|t| cases(&read(&deploy(t))))
        .collect();
    for c in &all {
        // A misspelt alertname would make a silent test pass for nothing.
        assert!(
            names.contains(c.alertname.as_str()),
            "test of an unknown alert: {c:?}"
        );
    }
    for name in &names {
        assert!(
            all.iter().any(|c| c.alertname == *name && c.firing),
            "no test makes {name} fire"
        );
        let healthy: BTreeSet<(&str, &str)> = all
            .iter()
            .filter(|c| c.alertname == *name && !c.firing && c.group.starts_with("healthy fleet"))
            .map(|c| (c.group.as_str(), c.eval_time.as_str()))
            .collect();
        assert!(
            healthy.len() >= 3,
            "{name} is asserted silent in a healthy fleet at {healthy:?} only"
        );
    }

    if !have_promtool("deploy_rules::every_alert_has_a_severity_a_test_that_fires_it_and_a_healthy_fleet_it_spares") {
        return;
    }
    // What the scan above found, proven by promtool: against rules that
    // never fire, a test of every alert fails (it expects the alert); against
    // rules that always fire, the healthy fleet fails for every alert.
    let (never, always) = std::thread::scope(|s| {
        let never = s.spawn(|| failures(&test_against(&rules, "vector(1) == 0")));
        let always = s.spawn(|| failures(&test_against(&rules, "vector(1)")));
        (never.join().unwrap(), always.join().unwrap())
    });
    for name in &names {
        assert!(
            never.iter().any(|(_, a)| a == name),
            "no unit test notices that {name} never fires: {never:?}"
        );
        assert!(
            always
                .iter()
                .any(|(g, a)| a == name && g.starts_with("healthy fleet")),
            "no healthy-fleet test notices that {name} always fires: {always:?}"
        );
    }
}

/// Grafana's variables in a panel query, replaced by values that make it
/// a query Prometheus can parse.
fn substitute(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        let braced = rest.starts_with('{');
        let body = rest.trim_start_matches('{');
        let name: String = body
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let value = match name.as_str() {
            "destination" => ".*",
            "__rate_interval" | "__interval" => "5m",
            "__range" => "1d",
            other => panic!("unknown Grafana variable ${other} in {expr}"),
        };
        out.push_str(value);
        rest = &body[name.len()..];
        if braced {
            rest = rest.strip_prefix('}').expect("closing brace");
        }
    }
    out + rest
}

fn panels(list: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    for p in list.as_array().expect("panels is a list") {
        if let Some(nested) = p.get("panels") {
            panels(nested, out);
        }
        out.push(p.clone());
    }
}

#[test]
fn every_dashboard_panel_query_is_valid_promql() {
    let text = read(&deploy(DASHBOARD));
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(
        dash["schemaVersion"].as_u64().unwrap() >= 36,
        "schemaVersion"
    );
    let ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let vars = dash["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let destination = var("destination");
    assert_eq!(destination["datasource"], ds);
    let definition = destination["definition"].as_str().unwrap();
    assert_eq!(destination["query"]["query"], definition);
    let (metric, label) = definition
        .strip_prefix("label_values(")
        .and_then(|d| d.strip_suffix(')'))
        .and_then(|d| d.split_once(", "))
        .expect("label_values(METRIC, LABEL)");
    assert_eq!(label, "destination");

    let mut all = Vec::new();
    panels(&dash["panels"], &mut all);
    // The variable's metric too, as the query Grafana's label_values makes.
    let mut exprs = vec![format!("count by ({label}) ({metric})")];
    let mut titles = Vec::new();
    for p in all.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap().to_string();
        assert_eq!(p["datasource"], ds, "{title}: the data source variable");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            assert_eq!(t["datasource"], ds, "{title}");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{title}: a target without expr");
            exprs.push(substitute(expr));
        }
        titles.push(title);
    }
    let ids: BTreeSet<u64> = all.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "panel ids are unique");
    // What the dashboard must show (issue 14): each by the metric behind it.
    let read_metrics: BTreeSet<String> = exprs.iter().flat_map(|e| metrics_in(e)).collect();
    for m in [
        "vmsync_last_success_timestamp_seconds",
        "vmsync_wire_bytes",
        "vmsync_literal_bytes",
        "vmsync_last_run_duration_seconds",
        "vmsync_last_exit_code",
        "vmsync_write_mode",
        "vmsync_snapshot_delta",
        "vmsync_source_read_bytes",
        "vmsync_differing_bytes",
        "vmsync_check_cycle_completed_timestamp_seconds",
        "vmsync_drill_last_success_timestamp_seconds",
    ] {
        assert!(read_metrics.contains(m), "no panel shows {m}: {titles:?}");
    }

    if !have_promtool("deploy_rules::every_dashboard_panel_query_is_valid_promql") {
        return;
    }
    // promtool parses a recording rule's expression as PromQL: one rule per
    // query. A JSON string is a YAML double-quoted scalar.
    let dir = tempdir();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        assert!(!e.contains('$'), "{e}");
        rules.push_str(&format!(
            "      - record: vmsync:panel_{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    std::fs::write(dir.path().join("panels.yml"), &rules).unwrap();
    let (ok, out) = promtool(dir.path(), &["check", "rules", "panels.yml"]);
    assert!(ok, "{out}\n{rules}");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}"
    );
}

#[test]
fn the_metrics_table_documents_every_family_and_the_alerts_reading_it() {
    let readme = read(&deploy("README.md"));
    let section = &readme[readme.find("### Metrics").expect("a Metrics section")..];
    let mut table: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `vmsync_")) {
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(cells.len(), 5, "name, labels, type, meaning, alerts: {row}");
        assert!(cells[1].contains("destination"), "{row}");
        assert_eq!(cells[2], "gauge", "{row}");
        let alerts = cells[4]
            .split(", ")
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
        let name = cells[0].trim_matches('`').to_string();
        assert!(table.insert(name, alerts).is_none(), "twice: {row}");
    }

    // Every family vmsync writes (the names in the families' source) and
    // every family of the drill contract, and no other.
    let families = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/app/metrics/families.rs"));
    let mut written: BTreeSet<String> = families
        .split('"')
        .filter(|s| s.starts_with("vmsync_") && !s.contains(' '))
        .map(String::from)
        .collect();
    assert!(written.len() >= 21, "{written:?}");
    written.extend(DRILL_FAMILIES.map(String::from));
    let documented: BTreeSet<String> = table.keys().cloned().collect();
    assert_eq!(
        documented, written,
        "the table's metrics are what vmsync and the drill write"
    );

    // The alerts column says which rules read each metric; the rules read
    // documented metrics only (a misspelt one would never fire).
    let rules = alerts(&read(&deploy(RULES)));
    let mut readers: BTreeMap<String, BTreeSet<String>> = documented
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for a in &rules {
        for m in metrics_in(&a.expr) {
            readers
                .get_mut(&m)
                .unwrap_or_else(|| panic!("{} reads {m}, which is not in the table", a.name))
                .insert(a.name.clone());
        }
    }
    assert_eq!(table, readers, "the table's alerts column");

    // The alert table names each alert with its severity.
    let listed: BTreeSet<(String, String)> = readme
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            (cells.len() == 3 && SEVERITIES.contains(&cells[0]))
                .then(|| (cells[1].trim_matches('`').to_string(), cells[0].to_string()))
        })
        .collect();
    let actual: BTreeSet<(String, String)> = rules
        .iter()
        .map(|a| (a.name.clone(), a.severities[0].clone()))
        .collect();
    assert_eq!(listed, actual, "README's alert table");

    // And the dashboard reads documented metrics only.
    let dash = read(&deploy(DASHBOARD));
    for m in metrics_in(&dash) {
        assert!(
            documented.contains(&m),
            "the dashboard reads {m}, which is not in the table"
        );
    }
}

// ---------------------------------------------------------------------------
// Real runs
// ---------------------------------------------------------------------------

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{name}{{{}}}", labels.join(","))
}

/// An alert's labels, `alertname` included.
type Labels<'a> = Vec<(&'a str, &'a str)>;

/// A promtool test group of the samples of a metrics file, each held for
/// `hours` from 0h, with timestamps moved back by `base` seconds (promtool's
/// clock starts at 1970), and `ALERTS{alertstate="firing"}` expected to be
/// exactly `firing[t]` (alertname and labels) at each eval time t.
fn group(
    name: &str,
    file: &[prom::Sample],
    base: f64,
    hours: u32,
    firing: &[(u32, Vec<Labels>)],
) -> String {
    let mut g = format!("  - name: {name}\n    interval: 1h\n    input_series:\n");
    for s in file {
        let value = if s.name.ends_with("_timestamp_seconds") {
            s.value - base
        } else {
            s.value
        };
        assert!(value >= 0.0, "{s:?}");
        let labels: Vec<(&str, &str)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        g.push_str(&format!(
            "      - series: '{}'\n        values: '{value}x{hours}'\n",
            series(&s.name, &labels).replace('\'', "''")
        ));
    }
    g.push_str("    promql_expr_test:\n");
    for (hour, alerts) in firing {
        g.push_str(&format!(
            "      - expr: 'ALERTS{{alertstate=\"firing\"}}'\n        eval_time: {hour}h\n        exp_samples:{}\n",
            if alerts.is_empty() { " []" } else { "" }
        ));
        for labels in alerts {
            let mut labels = labels.clone();
            labels.push(("alertstate", "firing"));
            labels.sort();
            g.push_str(&format!(
                "          - labels: '{}'\n            value: 1\n",
                series("ALERTS", &labels).replace('\'', "''")
            ));
        }
    }
    g
}

#[test]
fn real_metrics_files_fire_nothing_when_healthy_and_the_minor_alert_after_a_failure() {
    let test = "deploy_rules::real_metrics_files_fire_nothing_when_healthy_and_the_minor_alert_after_a_failure";
    if !have_promtool(test) {
        return;
    }
    let pair = Pair::new();
    pair.write_src(&mixed_bytes(14, (3 * MIB) as usize));
    let healthy = pair.tmp.path().join("healthy.prom");
    run(&[&"--metrics-file", &healthy, &pair.src, &pair.dst]).assert_ok();
    // A sampled check cycle out of order, completed by slice 3, and the
    // first slice of the next cycle.
    for k in ["2/3", "1/3", "3/3", "1/3"] {
        run(&[
            &"--check",
            &"--sample",
            &k,
            &"--metrics-file",
            &healthy,
            &pair.src,
            &pair.dst,
        ])
        .assert_ok();
    }
    let failed = pair.tmp.path().join("failed.prom");
    std::fs::copy(&healthy, &failed).unwrap();
    let missing = pair.tmp.path().join("src/missing.img");
    run(&[&"--metrics-file", &failed, &missing, &pair.dst]).assert_code(exit::IO);

    let parse = |p: &Path| {
        let text = read(p);
        prom::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    };
    let (healthy, failed) = (parse(&healthy), parse(&failed));
    let dst = pair.dst.display().to_string();
    let check = [("destination", dst.as_str()), ("mode", "check")];
    let get = |name| prom::get(&healthy, name, &check);
    assert_eq!(get("vmsync_check_sample_slices"), Some(3.0));
    let started = get("vmsync_check_cycle_started_timestamp_seconds").expect("a cycle");
    assert_eq!(
        get("vmsync_check_cycle_completed_timestamp_seconds"),
        Some(started)
    );
    let slice1 = [
        ("destination", dst.as_str()),
        ("mode", "check"),
        ("slice", "1"),
    ];
    assert!(
        prom::get(
            &healthy,
            "vmsync_check_slice_success_timestamp_seconds",
            &slice1
        )
        .unwrap()
            >= started
    );
    assert_eq!(
        prom::get(
            &failed,
            "vmsync_last_exit_code",
            &[("destination", dst.as_str()), ("mode", "sync")]
        ),
        Some(3.0)
    );

    // The cycle started at 1h on promtool's clock: N = 3 gives it until 75h.
    let base = started.floor() - 3600.0;
    let stale = |mode| {
        vec![
            ("alertname", "VmsyncNoRecentSuccess"),
            ("destination", dst.as_str()),
            ("mode", mode),
            ("severity", "warning"),
        ]
    };
    let overdue = vec![
        ("alertname", "VmsyncCheckCycleOverdue"),
        ("destination", dst.as_str()),
        ("mode", "check"),
        ("severity", "major"),
    ];
    let run_failed = vec![
        ("alertname", "VmsyncRunFailed"),
        ("destination", dst.as_str()),
        ("mode", "sync"),
        ("severity", "minor"),
    ];
    let tests = format!(
        "rule_files:\n  - {}\nevaluation_interval: 1h\ntests:\n{}{}",
        serde_json::to_string(&deploy(RULES)).unwrap(),
        group(
            "healthy",
            &healthy,
            base,
            80,
            &[
                (2, vec![]),
                (25, vec![]),
                // No runs since: stale first, then the cycle overdue.
                (73, vec![stale("check"), stale("sync")]),
                (80, vec![overdue.clone(), stale("check"), stale("sync")]),
            ],
        ),
        group(
            "failed",
            &failed,
            base,
            30,
            &[(2, vec![run_failed.clone()]), (25, vec![run_failed])]
        ),
    );
    let path = pair.tmp.path().join("real.test.yml");
    std::fs::write(&path, &tests).unwrap();
    let (ok, out) = promtool(pair.tmp.path(), &["test", "rules", "real.test.yml"]);
    assert!(ok, "{out}\n{tests}");
}
