//! `GET /v1/quota/{grant}/explain`: whether a send of a given shape would be admitted now,
//! and why, read from the grant's usage; nothing is charged.
//!
//! The answer walks the checks a send goes through, in order: the profile's per-message
//! caps, a provider cool-down, then every window and limited metric, which admits the send
//! only when what it asks is at most the window's `remaining` (the figure a reserve checks:
//! the limit less the fullest any window holding now gets, scheduled sends included). The
//! binding window is the first that refuses, or, when all admit, the one left with the
//! least room.
//!
//! When it would fit comes from the store itself: [`limits::QuotaStore::probe_at`] judges
//! the send as a reserve would, charging nothing, and gives the earliest instant it would
//! be admitted (`fits_at`). A scheduled send (`send_at`) is explained from that probe
//! alone: the windows that would hold its instant, sends scheduled around it included.

use limits::{Denial, Metric, Probe, Profile, Usage};
use serde_json::{Value, json};

/// The send to explain: recipients and bytes as the gateway would count them.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Unique recipients.
    pub recipients: u64,
    /// Size in bytes as the provider sees it.
    pub bytes: u64,
    /// When it goes out, in unix seconds; `None` for now.
    pub send_at: Option<u64>,
}

impl Shape {
    /// What the send charges.
    pub fn cost(self) -> limits::Cost {
        limits::Cost::new(1, self.recipients, self.bytes)
    }
}

impl Shape {
    fn asks(self, metric: Metric) -> u64 {
        match metric {
            Metric::Messages => 1,
            Metric::Recipients => self.recipients,
            Metric::Bytes => self.bytes,
        }
    }
}

/// The decision and its reasons, as the admin API answers it.
pub fn explain(
    profile: &Profile,
    usage: &Usage,
    cooldown_secs: Option<u64>,
    shape: Shape,
) -> Value {
    if let Some(refusal) = early_refusal(profile, cooldown_secs, shape) {
        return refusal;
    }
    // (room left after the send, window, metric usage): the least room binds.
    let mut tightest: Option<(i128, Value)> = None;
    for w in &usage.windows {
        for m in &w.metrics {
            let asks = shape.asks(m.metric);
            let binding = json!({
                "window": &*w.label,
                "metric": m.metric.as_str(),
                "limit": m.limit,
                "used": m.used,
                "scheduled": m.scheduled,
                "remaining": m.remaining,
                "requested": asks,
                "next_unit_frees_in_seconds": w.next_free.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
            });
            if asks > m.remaining {
                let reason = if asks > m.limit {
                    never(m.metric)
                } else {
                    m.metric.as_str()
                };
                return json!({ "admitted": false, "reason": reason, "binding": binding });
            }
            let left = i128::from(m.remaining) - i128::from(asks);
            if tightest.as_ref().is_none_or(|(l, _)| left < *l) {
                tightest = Some((left, binding));
            }
        }
    }
    json!({ "admitted": true, "reason": "within_quota", "binding": tightest.map(|(_, b)| b) })
}

/// The decision for a send at `shape.send_at`, from the store's probe at that instant.
pub fn explain_scheduled(
    profile: &Profile,
    probe: &Probe,
    cooldown_secs: Option<u64>,
    shape: Shape,
) -> Value {
    if let Some(refusal) = early_refusal(profile, cooldown_secs, shape) {
        return refusal;
    }
    match probe {
        // Which window has the least room at a later instant is not known without a
        // charge: only a refusal names one.
        Probe::Fits(_) => json!({ "admitted": true, "reason": "within_quota", "binding": null }),
        Probe::Refused(d) => {
            let mut v = refusal(d);
            v["fits_at"] = json!(d.fits_at.map(|ms| ms.div_ceil(1000)));
            v
        }
    }
}

/// When a refused send would fit, from the store's probe: `fits_at` (unix seconds) and
/// `retry_after_seconds` (for a send now); null when waiting never helps.
pub fn add_fits_at(answer: &mut Value, probe: &Probe) {
    if answer["admitted"] == Value::Bool(true) || answer.get("binding").is_none() {
        return;
    }
    let refused = match probe {
        Probe::Refused(d) => Some(d),
        Probe::Fits(_) => None,
    };
    answer["fits_at"] = json!(refused.and_then(|d| d.fits_at).map(|ms| ms.div_ceil(1000)));
    // As the 429's Retry-After: at least 1.
    let retry = refused
        .and_then(|d| d.retry_after)
        .map(|r| r.as_secs().max(1));
    answer["retry_after_seconds"] = json!(retry);
}

fn refusal(d: &Denial) -> Value {
    let reason = if d.requested > d.limit {
        never(d.metric)
    } else {
        d.metric.as_str()
    };
    json!({
        "admitted": false,
        "reason": reason,
        "binding": {
            "window": &*d.window,
            "metric": d.metric.as_str(),
            "limit": d.limit,
            "used": d.used,
            "requested": d.requested,
        },
    })
}

fn early_refusal(profile: &Profile, cooldown_secs: Option<u64>, shape: Shape) -> Option<Value> {
    if let Some(refusal) = per_message(profile, shape) {
        return Some(refusal);
    }
    cooldown_secs.map(|secs| {
        json!({
            "admitted": false,
            "reason": "provider_throttled",
            "retry_after_seconds": secs,
        })
    })
}

/// A send more than a window's whole limit: no wait ever lets it through.
fn never(metric: Metric) -> &'static str {
    match metric {
        Metric::Bytes => "message_too_large",
        Metric::Recipients => "too_many_recipients",
        Metric::Messages => "messages",
    }
}

fn per_message(profile: &Profile, shape: Shape) -> Option<Value> {
    let refused = |reason: &str, limit: u64, requested: u64| {
        Some(json!({ "admitted": false, "reason": reason, "limit": limit, "requested": requested }))
    };
    if let Some(max) = profile.max_recipients_per_message()
        && shape.recipients > max.get()
    {
        return refused("too_many_recipients", max.get(), shape.recipients);
    }
    if let Some(max) = profile.max_message_size()
        && shape.bytes > max.get()
    {
        return refused("message_too_large", max.get(), shape.bytes);
    }
    None
}
