//! Prometheus metrics, served on the admin listener. No per-grant labels: per-grant views
//! come from the quota API.
//!
//! `prometheus-client` is the Prometheus project's own Rust client: typed label sets, an
//! explicit registry (no globals, so tests can run several gateways in one process) and
//! the OpenMetrics text encoder.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Decision outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Charged and forwarded.
    Allowed,
    /// Refused by a window's quota.
    Denied,
    /// Refused by a per-message check (no store call).
    StaticRejected,
    /// The store failed and the send was refused.
    StoreError,
    /// The store failed and the send was forwarded uncounted (`on_unavailable = "allow"`).
    AllowedUncounted,
}

impl Outcome {
    /// The label value (`allowed`, `denied`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::StaticRejected => "static_rejected",
            Outcome::StoreError => "store_error",
            Outcome::AllowedUncounted => "allowed_uncounted",
        }
    }
}

/// How a reservation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Kept: the send went out, or may have.
    Kept,
    /// Given back: nothing was sent.
    Released,
    /// Its request ended before the outcome was known; the charge stays.
    Dropped,
}

impl Settlement {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Settlement::Kept => "kept",
            Settlement::Released => "released",
            Settlement::Dropped => "dropped",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MetricLabel {
    metric: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// The gateway's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    units: Family<MetricLabel, Counter>,
    settled: Family<OutcomeLabel, Counter>,
    corrections: Family<MetricLabel, Counter>,
    store_duration: Family<OpLabel, Histogram>,
    upstream_duration: Histogram,
    upstream_responses: Family<ClassLabel, Counter>,
    in_flight: Gauge,
    thresholds: Family<LevelLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LevelLabel {
    level: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        90.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sendgw");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Send decisions by outcome and reason",
            decisions.clone(),
        );
        let units = Family::<MetricLabel, Counter>::default();
        registry.register("units", "Units charged to quotas by metric", units.clone());
        let settled = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "reservations_settled",
            "Reservations kept or released after the upstream answered, or dropped unsettled (kept)",
            settled.clone(),
        );
        let corrections = Family::<MetricLabel, Counter>::default();
        registry.register(
            "charge_corrections",
            "Sends charged more after Nylas's answer listed more than was counted, by metric",
            corrections.clone(),
        );
        let store_duration =
            Family::<OpLabel, Histogram>::new_with_constructor(
                || Histogram::new(latency_buckets()),
            );
        registry.register(
            "store_duration_seconds",
            "Quota store call latency",
            store_duration.clone(),
        );
        let upstream_duration = Histogram::new(latency_buckets());
        registry.register(
            "upstream_duration_seconds",
            "Upstream send latency until response headers",
            upstream_duration.clone(),
        );
        let upstream_responses = Family::<ClassLabel, Counter>::default();
        registry.register(
            "upstream_responses",
            "Upstream responses to sends by status class",
            upstream_responses.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests being handled by the proxy",
            in_flight.clone(),
        );
        let thresholds = Family::<LevelLabel, Counter>::default();
        registry.register(
            "threshold_crossings",
            "Grants crossing 80 % or 100 % of a window, once per window and level",
            thresholds.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads by result",
            reloads.clone(),
        );
        Metrics {
            thresholds,
            reloads,
            registry,
            decisions,
            units,
            settled,
            corrections,
            store_duration,
            upstream_duration,
            upstream_responses,
            in_flight,
        }
    }
}

impl Metrics {
    /// Counts a decision.
    pub fn decision(&self, outcome: Outcome, reason: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                outcome: outcome.as_str(),
                reason,
            })
            .inc();
    }

    /// Counts charged units.
    pub fn units(&self, cost: limits::Cost) {
        for m in limits::Metric::ALL {
            self.units
                .get_or_create(&MetricLabel { metric: m.as_str() })
                .inc_by(cost.get(m));
        }
    }

    /// Counts a settlement.
    pub fn settled(&self, settlement: Settlement) {
        let outcome = settlement.as_str();
        self.settled.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts a charge corrected upwards for `metric` after Nylas's answer.
    pub fn correction(&self, metric: limits::Metric) {
        self.corrections
            .get_or_create(&MetricLabel {
                metric: metric.as_str(),
            })
            .inc();
    }

    /// Records a store call's latency.
    pub fn store_call(&self, op: &'static str, took: Duration) {
        self.store_duration
            .get_or_create(&OpLabel { op })
            .observe(took.as_secs_f64());
    }

    /// Records an upstream answer to a send (`status` 0 when there was none).
    pub fn upstream(&self, status: u16, took: Duration) {
        self.upstream_duration.observe(took.as_secs_f64());
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "error",
        };
        self.upstream_responses
            .get_or_create(&ClassLabel { class })
            .inc();
    }

    /// Counts a threshold crossing (`80` or `100`).
    pub fn threshold(&self, level: &'static str) {
        self.thresholds.get_or_create(&LevelLabel { level }).inc();
    }

    /// Counts a configuration reload (`success` or `failure`).
    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// Marks a request in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A fresh registry in which every family has one sample, so that its
    /// [`Metrics::render`] names every metric the gateway can expose (the exposition leaves
    /// out a family with no sample). For checking names against the registry, as the deploy
    /// tests do; never served. A new family needs a sample here too.
    pub fn with_every_family() -> Metrics {
        let m = Metrics::default();
        m.decision(Outcome::Allowed, "within_quota");
        m.units(limits::Cost::default());
        m.settled(Settlement::Kept);
        m.correction(limits::Metric::Recipients);
        m.store_call("reserve", Duration::ZERO);
        m.upstream(200, Duration::ZERO);
        m.threshold("80");
        m.reload(true);
        m
    }
}

/// Decrements the in-flight gauge when dropped.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
