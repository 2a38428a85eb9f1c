//! `send-gateway quota top`: the fleet view (`GET /v1/usage`) as a table.

use serde_json::Value;

use super::{Config, ConfigError, QuotaError, TopArgs, admin_and_token, call_admin};

/// Runs `quota top`.
pub(super) fn run(
    t: &TopArgs,
    config: impl FnOnce() -> Result<Config, ConfigError>,
) -> Result<String, QuotaError> {
    if !t.min.is_finite() || t.min < 0.0 {
        return Err(QuotaError::Usage(
            "--min must be a number, 0 or more".into(),
        ));
    }
    if !(1..=1000).contains(&t.limit) {
        return Err(QuotaError::Usage("--limit must be from 1 to 1000".into()));
    }
    let (admin, token, trust) = admin_and_token(&t.to, config)?;
    let mut base = admin.clone();
    base.path_segments_mut()
        .map_err(|()| QuotaError::Usage(format!("--admin: {admin} cannot be a base URL")))?
        .pop_if_empty()
        .extend(["v1", "usage"]);
    // A page can come back short, even empty, with a cursor (stale entries it lowered on
    // the way): follow it until the rows asked for are in, or the fleet ends.
    let mut data: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut url = base.clone();
        let mut query = format!("min_utilization={}&limit={}", t.min, t.limit - data.len());
        if let Some(c) = &cursor {
            query.push_str(&format!("&cursor={c}"));
        }
        url.set_query(Some(&query));
        let body = call_admin(&admin, url, false, token.as_deref(), trust.as_deref())?;
        let v: Value = serde_json::from_str(&body).map_err(|e| {
            QuotaError::Failed(format!(
                "the admin API at {admin} answered with bad JSON: {e}"
            ))
        })?;
        data.extend(v["data"].as_array().cloned().unwrap_or_default());
        cursor = v["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() || data.len() >= t.limit {
            break;
        }
    }
    let v = serde_json::json!({ "data": data, "next_cursor": cursor });
    if t.to.json {
        return Ok(format!("{v}\n"));
    }
    Ok(render(&v, t.min))
}

/// Pages one `quota top` reads at most.
const MAX_PAGES: usize = 50;

/// One line per scope: how full, what, under which profile, and the fullest window.
fn render(v: &Value, min: f64) -> String {
    let rows: Vec<[String; 5]> = v["data"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(row)
        .collect();
    if rows.is_empty() && v["next_cursor"].is_string() {
        return "nothing found yet: the fleet index holds many stale entries; run it again\n"
            .into();
    }
    if rows.is_empty() {
        return format!("nothing is at or above {:.0} % of a limit\n", min * 100.0);
    }
    let head = ["USED", "SCOPE", "ID", "PROFILE", "FULLEST"].map(String::from);
    let mut widths = [0usize; 5];
    for r in std::iter::once(&head).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&head).chain(&rows) {
        let line = format!(
            "{:>w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if v["next_cursor"].is_string() {
        out.push_str("(more: raise --limit, or page with GET /v1/usage?cursor=...)\n");
    }
    out
}

fn row(e: &Value) -> [String; 5] {
    let text = |k: &str| e[k].as_str().unwrap_or("?").to_owned();
    let pct = e["utilization"]
        .as_f64()
        .map_or("?".into(), |u| format!("{:.1} %", u * 100.0));
    [pct, text("scope"), text("id"), text("profile"), fullest(e)]
}

/// `24h recipients 950/1000 (+20 scheduled)` for the metric nearest its limit.
fn fullest(e: &Value) -> String {
    let mut best: Option<(f64, String)> = None;
    for w in e["windows"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        for metric in ["messages", "recipients", "bytes"] {
            let m = &w[metric];
            let (Some(limit), Some(used)) = (m["limit"].as_u64(), m["used"].as_u64()) else {
                continue;
            };
            let scheduled = m["scheduled"].as_u64().unwrap_or(0);
            let share = (used + scheduled) as f64 / limit.max(1) as f64;
            if best.as_ref().is_none_or(|(b, _)| share > *b) {
                let period = w["period"].as_str().unwrap_or("?");
                let mut text = format!("{period} {metric} {used}/{limit}");
                if scheduled > 0 {
                    text.push_str(&format!(" (+{scheduled} scheduled)"));
                }
                best = Some((share, text));
            }
        }
    }
    best.map(|(_, t)| t).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_fullest_metric_of_each_scope() {
        let v = serde_json::json!({
            "data": [{
                "scope": "grant", "id": "g1", "profile": "icloud", "utilization": 0.95,
                "windows": [{
                    "period": "24h",
                    "messages": { "limit": 1000, "used": 10, "scheduled": 0, "remaining": 990 },
                    "recipients": { "limit": 1000, "used": 930, "scheduled": 20, "remaining": 50 }
                }]
            }],
            "next_cursor": "ab"
        });
        let out = render(&v, 0.8);
        let line = out.lines().nth(1).unwrap();
        assert!(line.starts_with("95.0 %  grant  g1"), "{out}");
        assert!(
            line.ends_with("24h recipients 930/1000 (+20 scheduled)"),
            "{out}"
        );
        assert!(out.contains("(more:"), "{out}");
    }

    #[test]
    fn says_when_nothing_is_that_full() {
        let v = serde_json::json!({ "data": [], "next_cursor": null });
        assert_eq!(render(&v, 0.8), "nothing is at or above 80 % of a limit\n");
    }
}
