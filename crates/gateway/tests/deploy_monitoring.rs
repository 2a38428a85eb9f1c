//! `deploy/monitoring/` and every `sendgw_` metric name under `deploy/`: each is one the
//! gateway registers (read from its metrics registry), the Grafana dashboard shows every
//! registered metric, and the alert rules are well formed and cover the failure modes.

mod deploy_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use deploy_support::{
    Problems, arr_at, deploy_dir, exposed_names, metric_tokens, read, registered_metrics, str_at,
    workspace, yaml,
};
use serde_json::Value;

fn deploy_text_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read deploy dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if std::fs::read_to_string(&path).is_ok() {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy_dir(), &mut out);
    out.sort();
    out
}

#[test]
fn deploy_files_use_only_registered_metrics() {
    let known = exposed_names();
    let mut p = Problems::default();
    let mut used_anywhere = 0;
    for path in deploy_text_files() {
        for token in metric_tokens(&read(&path)) {
            used_anywhere += 1;
            p.check(known.contains(&token), || {
                format!(
                    "{} uses {token}, which the gateway does not expose (it exposes {known:?})",
                    path.strip_prefix(workspace()).unwrap_or(&path).display()
                )
            });
        }
    }
    p.check(used_anywhere > 0, || {
        "no sendgw_ metric is used under deploy/".into()
    });
    p.assert_none("metric names");
}

fn dashboard() -> Value {
    let path = deploy_dir().join("monitoring/grafana-dashboard.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn dashboard_shows_every_metric() {
    let d = dashboard();
    let mut p = Problems::default();
    p.check(str_at(&d, "/uid").is_some_and(|u| !u.is_empty()), || {
        "no uid".into()
    });
    p.check(str_at(&d, "/title").is_some_and(|u| !u.is_empty()), || {
        "no title".into()
    });
    p.check(
        arr_at(&d, "/templating/list")
            .iter()
            .any(|v| str_at(v, "/type") == Some("datasource")),
        || "no data source variable: the dashboard would be tied to one Prometheus".into(),
    );
    let mut ids = BTreeSet::new();
    let mut exprs = String::new();
    for panel in arr_at(&d, "/panels") {
        let id = panel.get("id").and_then(Value::as_u64);
        p.check(id.is_some_and(|i| ids.insert(i)), || {
            format!("panel id {id:?} missing or repeated")
        });
        p.check(panel.get("gridPos").is_some(), || {
            format!("panel {id:?} has no gridPos")
        });
        if str_at(panel, "/type") == Some("row") {
            continue;
        }
        let targets = arr_at(panel, "/targets");
        p.check(!targets.is_empty(), || format!("panel {id:?} has no query"));
        for t in targets {
            let expr = str_at(t, "/expr").unwrap_or("");
            p.check(!expr.is_empty(), || {
                format!("panel {id:?} has an empty query")
            });
            exprs.push_str(expr);
            exprs.push('\n');
        }
    }
    // Every registered metric family has a panel.
    let used = metric_tokens(&exprs);
    for (base, _) in registered_metrics() {
        p.check(
            used.iter()
                .any(|u| u == &base || u.strip_prefix(&base).is_some_and(|s| s.starts_with('_'))),
            || format!("no dashboard panel shows {base}"),
        );
    }
    // Latency as quantiles of the histograms.
    for h in [
        "sendgw_store_duration_seconds_bucket",
        "sendgw_upstream_duration_seconds_bucket",
    ] {
        p.check(
            exprs
                .lines()
                .any(|e| e.contains("histogram_quantile") && e.contains(h)),
            || format!("no histogram_quantile over {h}"),
        );
    }
    p.assert_none("deploy/monitoring/grafana-dashboard.json");
}

#[test]
fn alert_rules_cover_the_failure_modes() {
    let path = deploy_dir().join("monitoring/alerts.yaml");
    let rules_file = yaml(&read(&path), "deploy/monitoring/alerts.yaml");
    let mut p = Problems::default();
    let mut names = BTreeSet::new();
    let mut exprs = Vec::new();
    let groups = arr_at(&rules_file, "/groups");
    p.check(!groups.is_empty(), || "no rule groups".into());
    for group in groups {
        p.check(str_at(group, "/name").is_some(), || {
            "a group has no name".into()
        });
        for rule in arr_at(group, "/rules") {
            let name = str_at(rule, "/alert").unwrap_or("").to_owned();
            p.check(
                name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                    && name.chars().all(|c| c.is_ascii_alphanumeric()),
                || format!("alert name {name:?} is not CamelCase"),
            );
            p.check(names.insert(name.clone()), || {
                format!("alert {name} is repeated")
            });
            let expr = str_at(rule, "/expr").unwrap_or("").to_owned();
            p.check(!expr.trim().is_empty(), || format!("{name}: no expr"));
            if let Some(f) = str_at(rule, "/for") {
                let prometheus_duration = f
                    .strip_suffix(['s', 'm', 'h', 'd'])
                    .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
                p.check(prometheus_duration, || {
                    format!("{name}: for {f:?} is not like 5m")
                });
            }
            let severity = str_at(rule, "/labels/severity");
            p.check(
                severity.is_some_and(|s| ["critical", "warning", "info"].contains(&s)),
                || format!("{name}: severity {severity:?}"),
            );
            for a in ["summary", "description"] {
                p.check(str_at(rule, &format!("/annotations/{a}")).is_some(), || {
                    format!("{name}: no {a} annotation")
                });
            }
            exprs.push((name, expr));
        }
    }
    let covers = |needles: &[&str]| {
        exprs
            .iter()
            .any(|(_, e)| needles.iter().all(|n| e.contains(n)))
    };
    for (what, needles) in [
        (
            "store errors",
            &["sendgw_decisions_total", "outcome=\"store_error\""][..],
        ),
        (
            "sustained denials",
            &["sendgw_decisions_total", "outcome=\"denied\"", "/"][..],
        ),
        (
            "upstream errors",
            &["sendgw_upstream_responses_total", "5xx"][..],
        ),
        (
            "config reload failures",
            &["sendgw_config_reloads_total"][..],
        ),
    ] {
        p.check(covers(needles), || {
            format!("no alert on {what} ({needles:?})")
        });
    }
    p.assert_none("deploy/monitoring/alerts.yaml");
}
