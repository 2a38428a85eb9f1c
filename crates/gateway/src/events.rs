//! Threshold events: when a send takes a grant's window to 80 % or 100 % of a limit, once
//! per window and level: a log line, `sendgw_threshold_crossings_total{level}`, and an
//! optional JSON `POST` to `[events] webhook_url`, signed with `[events] webhook_secret`
//! and retried with backoff (see [`delivery`]).
//!
//! "Once" holds across replicas: the first to record the crossing in the store (a
//! set-if-absent that lasts the window's length) reports it. Only a send that actually
//! crosses a level asks the store, so ordinary sends cost nothing extra; the webhook is
//! posted in the background.
//! Crossings are computed from what a send finally kept (see `lease`), never from a charge
//! that was given back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use limits::{Cost, QuotaStore, Usage};
use serde_json::json;

use crate::config::EventsConfig;
use crate::metrics::Metrics;
use crate::scope::Scope;

pub mod delivery;

pub use delivery::{MAX_IN_FLIGHT, SIGNATURE, backoff, signature};

/// The levels reported, in percent.
pub const LEVELS: [u64; 2] = [80, 100];

/// A crossing to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// The window's id (stable) and label (`24h`).
    pub window_id: String,
    /// The window's label.
    pub window: String,
    /// The metric.
    pub metric: &'static str,
    /// 80 or 100.
    pub level: u64,
    /// Used after the send.
    pub used: u64,
    /// The limit.
    pub limit: u64,
    /// How long the crossing is remembered: the window's length, or for a calendar window
    /// (whose id carries an `@`) until its period ends, so the next day's or month's
    /// crossing is reported again.
    pub remember: Duration,
}

/// The levels that `charge` took `usage` (usage after the charge) across.
pub fn crossings(usage: &Usage, charge: Cost) -> Vec<Crossing> {
    let mut out = Vec::new();
    for w in &usage.windows {
        for m in &w.metrics {
            let before = m.used.saturating_sub(charge.get(m.metric));
            for level in LEVELS {
                // used >= limit * level / 100, in integers without rounding down the bar.
                let reached =
                    |u: u64| u128::from(u) * 100 >= u128::from(m.limit) * u128::from(level);
                if reached(m.used) && !reached(before) {
                    out.push(Crossing {
                        window_id: w.window_id.to_string(),
                        window: w.label.to_string(),
                        metric: m.metric.as_str(),
                        level,
                        used: m.used,
                        limit: m.limit,
                        remember: remember(w),
                    });
                }
            }
        }
    }
    out
}

fn remember(w: &limits::WindowUsage) -> Duration {
    let length = Duration::from_secs(w.seconds);
    match w.next_free {
        // A calendar period ends at `next_free` (it is only absent when nothing is used).
        Some(end) if w.window_id.contains('@') => end.clamp(Duration::from_millis(1), length),
        _ => length,
    }
}

/// Reports threshold crossings: the log line, the metric and the webhook.
#[derive(Debug, Clone)]
pub struct Reporter {
    store: Arc<dyn QuotaStore>,
    metrics: Arc<Metrics>,
    /// Posts event webhooks (to any URL the operator configured, unlike the upstream),
    /// following no redirects.
    delivery: delivery::Delivery,
}

impl Reporter {
    /// A reporter that records crossings in `store` and counts them in `metrics`.
    ///
    /// # Errors
    /// The HTTP client cannot start.
    pub fn new(store: Arc<dyn QuotaStore>, metrics: Arc<Metrics>) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Reporter {
            delivery: delivery::Delivery::new(client, Arc::clone(&metrics), MAX_IN_FLIGHT),
            store,
            metrics,
        })
    }

    /// Reports `crossings` of `grant`, each at most once per window across replicas.
    pub async fn report(
        &self,
        config: &EventsConfig,
        grant: &str,
        scope: &Scope,
        crossings: Vec<Crossing>,
    ) {
        for c in crossings {
            let name = format!("threshold:{}:{}:{}", c.window_id, c.metric, c.level);
            let first = match self
                .store
                .meta_set_new(scope.as_str(), &name, "1", c.remember)
                .await
            {
                Ok(first) => first,
                Err(e) => {
                    // Better a duplicate event than a missed one.
                    tracing::warn!(grant, error = %e, "could not record a threshold crossing; reporting it anyway");
                    true
                }
            };
            if first {
                self.announce(config, grant, &c);
            }
        }
    }

    fn announce(&self, config: &EventsConfig, grant: &str, c: &Crossing) {
        let level = if c.level >= 100 { "100" } else { "80" };
        self.metrics.threshold(level);
        tracing::warn!(
            grant,
            window = %c.window,
            metric = c.metric,
            level = c.level,
            used = c.used,
            limit = c.limit,
            "quota threshold crossed"
        );
        let Some(plan) = delivery::Plan::from_config(config) else {
            return;
        };
        let body = json!({
            "event": "quota_threshold",
            "grant_id": grant,
            "window": c.window,
            "metric": c.metric,
            "level": c.level,
            "used": c.used,
            "limit": c.limit,
            "at": jiff::Timestamp::now().to_string(),
        });
        // The bytes signed are the bytes sent: serialized once, here.
        let body = Bytes::from(body.to_string());
        self.delivery.post(plan, body, grant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use limits::{MemoryStore, ProfileSpec, QuotaStore, WindowSpec};

    #[tokio::test]
    async fn each_level_is_crossed_once_on_the_send_that_reaches_it() {
        let store = MemoryStore::new();
        let p = ProfileSpec::default()
            .window(
                WindowSpec::rolling(Duration::from_secs(3600))
                    .messages(10)
                    .recipients(5),
            )
            .build("p")
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..10 {
            let d = store
                .reserve("g", &p, Cost::new(1, 0, 0), None)
                .await
                .unwrap();
            seen.extend(
                crossings(d.usage(), Cost::new(1, 0, 0))
                    .into_iter()
                    .map(|c| (c.metric, c.level, c.used)),
            );
        }
        assert_eq!(seen, [("messages", 80, 8), ("messages", 100, 10)]);
        // One send can cross both levels at once.
        let d = store
            .reserve("h", &p, Cost::new(1, 5, 0), None)
            .await
            .unwrap();
        let levels: Vec<_> = crossings(d.usage(), Cost::new(1, 5, 0))
            .into_iter()
            .map(|c| (c.metric, c.level))
            .collect();
        assert_eq!(levels, [("recipients", 80), ("recipients", 100)]);
    }

    #[tokio::test]
    async fn a_calendar_crossing_is_remembered_until_its_period_ends_only() {
        let store = MemoryStore::new();
        let p = ProfileSpec::default()
            .window(WindowSpec::rolling(Duration::from_secs(3600)).messages(1))
            .window(WindowSpec::calendar(limits::CalendarUnit::Day, "UTC").messages(1))
            .build("p")
            .unwrap();
        let d = store
            .reserve("g", &p, Cost::new(1, 0, 0), None)
            .await
            .unwrap();
        let c = crossings(d.usage(), Cost::new(1, 0, 0));
        assert_eq!(c.len(), 4);
        assert!(
            c[..2]
                .iter()
                .all(|c| c.remember == Duration::from_secs(3600))
        );
        let day_end = d.usage().windows[1].next_free.unwrap();
        assert!(day_end <= Duration::from_secs(86_400));
        assert!(c[2..].iter().all(|c| c.remember == day_end));
    }
}
