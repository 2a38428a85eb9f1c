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
use prometheus_client::registry::{Metric, Registry};

mod process;

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
    /// In shadow (`[enforcement] mode = "shadow"`, or a profile's `shadow = true`): it
    /// would have been refused, and was forwarded and counted instead.
    ShadowDenied,
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
            Outcome::ShadowDenied => "shadow_denied",
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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    client: String,
    outcome: &'static str,
}

/// The gateway's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The `process_*` metrics, unprefixed as every client library names them.
    process: Registry,
    decisions: Family<DecisionLabels, Counter>,
    units: Family<MetricLabel, Counter>,
    settled: Family<OutcomeLabel, Counter>,
    corrections: Family<MetricLabel, Counter>,
    scheduled: Family<EventLabel, Counter>,
    webhooks: Family<WebhookLabels, Counter>,
    store_duration: Family<OpLabel, Histogram>,
    upstream_duration: Histogram,
    upstream_responses: Family<ClassLabel, Counter>,
    in_flight: Gauge,
    thresholds: Family<LevelLabel, Counter>,
    event_webhooks: Family<ResultLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
    clients: Family<ClientLabels, Counter>,
    store: StoreFamilies,
    server: ServerFamilies,
}

/// The families that watch the listeners: connections open, sends shed.
#[derive(Debug, Clone)]
struct ServerFamilies {
    connections: Family<ListenerLabel, Gauge>,
    shed: Counter,
}

impl ServerFamilies {
    fn new(registry: &mut Registry) -> Self {
        ServerFamilies {
            connections: registered(
                registry,
                "connections",
                "Connections open, by listener (proxy, admin, webhooks); a client stalled in its request head is closed after server.header_timeout",
                Family::<ListenerLabel, Gauge>::default(),
            ),
            shed: registered(
                registry,
                "sends_shed",
                "Sends answered 503 before any store call because server.max_in_flight_sends were in flight",
                Counter::default(),
            ),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

/// The families that watch the quota store.
#[derive(Debug, Clone)]
struct StoreFamilies {
    breaker: Gauge,
    local_admissions: Counter,
    reconciled: Family<MetricLabel, Counter>,
    persistence_off: Gauge,
    restarts: Counter,
    scopes: Gauge,
    scopes_refused: Counter,
}

impl StoreFamilies {
    fn new(registry: &mut Registry) -> Self {
        StoreFamilies {
            breaker: registered(
                registry,
                "store_breaker_state",
                "The quota store's breaker: 0 closed, 1 open (calls fail at once), 2 half open (probing)",
                Gauge::default(),
            ),
            local_admissions: registered(
                registry,
                "local_admissions",
                "Sends admitted from this replica's local budget while the store was down",
                Counter::default(),
            ),
            reconciled: registered(
                registry,
                "local_reconciled_units",
                "Units admitted locally and written back to the store once it answered, by metric",
                Family::<MetricLabel, Counter>::default(),
            ),
            persistence_off: registered(
                registry,
                "store_persistence_off",
                "1 when the quota store keeps nothing across its restart: Redis with neither AOF nor RDB on, or the memory store without store.path",
                Gauge::default(),
            ),
            restarts: registered(
                registry,
                "store_restarts",
                "Redis restarts seen (its run id changed): counts it had not persisted are lost",
                Counter::default(),
            ),
            scopes: registered(
                registry,
                "store_scopes",
                "Grants and domains the memory store holds counts for (capped by store.max_scopes)",
                Gauge::default(),
            ),
            scopes_refused: registered(
                registry,
                "store_scopes_refused",
                "Sends refused with 503 because the memory store held store.max_scopes accounts",
                Counter::default(),
            ),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    r#type: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
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
        let (decisions, units, settled, corrections, scheduled) = send_families(&mut registry);
        let store_duration = registered(
            &mut registry,
            "store_duration_seconds",
            "Quota store call latency",
            Family::<OpLabel, Histogram>::new_with_constructor(
                || Histogram::new(latency_buckets()),
            ),
        );
        let upstream_duration = registered(
            &mut registry,
            "upstream_duration_seconds",
            "Upstream send latency until response headers",
            Histogram::new(latency_buckets()),
        );
        let upstream_responses = registered(
            &mut registry,
            "upstream_responses",
            "Upstream responses to sends by status class",
            Family::<ClassLabel, Counter>::default(),
        );
        let in_flight = registered(
            &mut registry,
            "requests_in_flight",
            "Requests being handled by the proxy",
            Gauge::default(),
        );
        let (thresholds, event_webhooks, webhooks, reloads) = event_families(&mut registry);
        let store = StoreFamilies::new(&mut registry);
        let server = ServerFamilies::new(&mut registry);
        register_build_info(&mut registry);
        let m = Metrics {
            clients: client_family(&mut registry),
            store,
            server,
            thresholds,
            event_webhooks,
            reloads,
            registry,
            process: process_registry(),
            decisions,
            units,
            settled,
            corrections,
            scheduled,
            webhooks,
            store_duration,
            upstream_duration,
            upstream_responses,
            in_flight,
        };
        m.zero_known_series();
        m
    }
}

/// The families that count events: threshold crossings, their webhooks, Nylas's
/// webhooks, reloads.
type EventFamilies = (
    Family<LevelLabel, Counter>,
    Family<ResultLabel, Counter>,
    Family<WebhookLabels, Counter>,
    Family<ResultLabel, Counter>,
);

fn event_families(registry: &mut Registry) -> EventFamilies {
    let thresholds = registered(
        registry,
        "threshold_crossings",
        "Grants crossing 80 % or 100 % of a window, once per window and level",
        Family::<LevelLabel, Counter>::default(),
    );
    let event_webhooks = registered(
        registry,
        "event_webhooks",
        "Threshold event webhooks by result: delivered, failed (every attempt failed), dropped (too many in flight)",
        Family::<ResultLabel, Counter>::default(),
    );
    let webhooks = registered(
        registry,
        "webhooks",
        "Nylas webhook notifications by type and result",
        Family::<WebhookLabels, Counter>::default(),
    );
    let reloads = registered(
        registry,
        "config_reloads",
        "Configuration reloads by result",
        Family::<ResultLabel, Counter>::default(),
    );
    (thresholds, event_webhooks, webhooks, reloads)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

fn process_registry() -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(process::Process));
    registry
}

/// `sendgw_build_info{version} 1`: which build is running, for dashboards and alerts.
fn register_build_info(registry: &mut Registry) {
    let info = registered(
        registry,
        "build_info",
        "The running build: always 1, labelled with the gateway's version",
        Family::<VersionLabel, Gauge>::default(),
    );
    let version = env!("CARGO_PKG_VERSION");
    info.get_or_create(&VersionLabel { version }).set(1);
}

fn client_family(registry: &mut Registry) -> Family<ClientLabels, Counter> {
    registered(
        registry,
        "client_requests",
        "Proxy requests by configured client and outcome: authorized, unauthenticated (client \"-\"), forbidden",
        Family::<ClientLabels, Counter>::default(),
    )
}

/// The families that count sends: decisions, units, settlements, corrections, schedules.
type SendFamilies = (
    Family<DecisionLabels, Counter>,
    Family<MetricLabel, Counter>,
    Family<OutcomeLabel, Counter>,
    Family<MetricLabel, Counter>,
    Family<EventLabel, Counter>,
);

fn send_families(registry: &mut Registry) -> SendFamilies {
    let decisions = registered(
        registry,
        "decisions",
        "Send decisions by outcome and reason",
        Family::<DecisionLabels, Counter>::default(),
    );
    let units = registered(
        registry,
        "units",
        "Units charged to quotas by metric",
        Family::<MetricLabel, Counter>::default(),
    );
    let settled = registered(
        registry,
        "reservations_settled",
        "Reservations kept or released after the upstream answered, or dropped unsettled (kept)",
        Family::<OutcomeLabel, Counter>::default(),
    );
    let corrections = registered(
        registry,
        "charge_corrections",
        "Sends charged more after Nylas's answer listed more than was counted, by metric",
        Family::<MetricLabel, Counter>::default(),
    );
    let scheduled = registered(
        registry,
        "scheduled",
        "Scheduled sends by event: remembered, unconfirmed, cancelled, failed, sent",
        Family::<EventLabel, Counter>::default(),
    );
    (decisions, units, settled, corrections, scheduled)
}

/// Registers `metric` under `name` and hands it back, for the struct to keep.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
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

    /// Counts a proxy request of a configured client (`-` when none matched) by outcome.
    pub fn client_request(&self, client: &str, outcome: &'static str) {
        self.clients
            .get_or_create(&ClientLabels {
                client: client.to_owned(),
                outcome,
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

    /// Counts a scheduled send's event: `remembered`, `cancelled`, `failed`, `sent`, or
    /// `unconfirmed` (Nylas's answer named no schedule: counted now as well).
    pub fn scheduled(&self, event: &'static str) {
        self.scheduled.get_or_create(&EventLabel { event }).inc();
    }

    /// Counts a webhook notification: its type (`message.send_success`,
    /// `message.send_failed`, `other`, or `unknown` when its signature did not verify) and
    /// what became of it (`settled`, `unknown`,
    /// `duplicate`, `ignored`, `bad_signature`, `store_error`).
    pub fn webhook(&self, kind: &'static str, result: &'static str) {
        self.webhooks
            .get_or_create(&WebhookLabels {
                r#type: kind,
                result,
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

    /// Counts a threshold event webhook's end: `delivered`, `failed` or `dropped`.
    pub fn event_webhook(&self, result: &'static str) {
        self.event_webhooks
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts a configuration reload (`success` or `failure`).
    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// Records the breaker's state.
    pub fn breaker(&self, state: limits::BreakerState) {
        let v = match state {
            limits::BreakerState::Closed => 0,
            limits::BreakerState::Open => 1,
            limits::BreakerState::HalfOpen => 2,
        };
        self.store.breaker.set(v);
    }

    /// Counts a send admitted from the local budget.
    pub fn local_admission(&self) {
        self.store.local_admissions.inc();
    }

    /// Counts units written back from the local budget.
    pub fn reconciled(&self, cost: limits::Cost) {
        for m in limits::Metric::ALL {
            self.store
                .reconciled
                .get_or_create(&MetricLabel { metric: m.as_str() })
                .inc_by(cost.get(m));
        }
    }

    /// Records whether Redis runs without persistence.
    pub fn store_persistence_off(&self, off: bool) {
        self.store.persistence_off.set(i64::from(off));
    }

    /// Counts a Redis restart.
    pub fn store_restart(&self) {
        self.store.restarts.inc();
    }

    /// The memory store holds `n` scopes.
    pub fn store_scopes(&self, n: usize) {
        self.store.scopes.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A send was refused: the memory store is full.
    pub fn store_scope_refused(&self) {
        self.store.scopes_refused.inc();
    }

    /// A send was shed: `server.max_in_flight_sends` were in flight.
    pub fn send_shed(&self) {
        self.server.shed.inc();
    }

    /// Marks a connection of `listener` open until the guard drops.
    pub fn connection(&self, listener: &'static str) -> InFlight {
        let gauge = self
            .server
            .connections
            .get_or_create(&ListenerLabel { listener })
            .clone();
        gauge.inc();
        InFlight(gauge)
    }

    /// Marks a request in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &self.process);
        let _ = encode_eof(&mut out);
        out
    }

    /// The Prometheus text exposition (format 0.0.4), for scrapers that do not ask for
    /// OpenMetrics: the same samples, with a counter family named as its samples are
    /// (`x_total`), no `# UNIT` lines and no `# EOF`.
    pub fn render_text(&self) -> String {
        prometheus_text(&self.render())
    }

    /// Creates at zero every series whose labels are known in advance, so that a rate or
    /// an alert over them has a series from start-up (not only after the first event).
    fn zero_known_series(&self) {
        for m in limits::Metric::ALL {
            let metric = m.as_str();
            let _ = self.units.get_or_create(&MetricLabel { metric });
            let _ = self.corrections.get_or_create(&MetricLabel { metric });
        }
        for outcome in ["kept", "released", "dropped"] {
            let _ = self.settled.get_or_create(&OutcomeLabel { outcome });
        }
        for result in ["success", "failure"] {
            let _ = self.reloads.get_or_create(&ResultLabel { result });
        }
        for result in ["delivered", "failed", "dropped"] {
            let _ = self.event_webhooks.get_or_create(&ResultLabel { result });
        }
        for level in ["80", "100"] {
            let _ = self.thresholds.get_or_create(&LevelLabel { level });
        }
        self.zero_send_series();
    }

    /// The send path's series known in advance: the decisions an alert or a rollout
    /// watches (the store's failures, which `alerts.yaml` rates, and every shadow reason),
    /// scheduled-send events, upstream classes, listeners and store calls. Rarer reasons
    /// (a per-message refusal's error type, a draft's lock) appear with their first send.
    fn zero_send_series(&self) {
        self.zero_decisions();
        for event in ["remembered", "unconfirmed", "cancelled", "sent", "failed"] {
            let _ = self.scheduled.get_or_create(&EventLabel { event });
        }
        for class in ["2xx", "3xx", "4xx", "5xx", "error"] {
            let _ = self.upstream_responses.get_or_create(&ClassLabel { class });
        }
        for listener in ["proxy", "admin"] {
            let _ = self
                .server
                .connections
                .get_or_create(&ListenerLabel { listener });
        }
        for op in [
            "reserve", "release", "charge", "remember", "refund", "ping", "health",
        ] {
            let _ = self.store_duration.get_or_create(&OpLabel { op });
        }
        let webhook = |r#type, result| {
            let _ = self
                .webhooks
                .get_or_create(&WebhookLabels { r#type, result });
        };
        webhook("unknown", "bad_signature");
        webhook("other", "ignored");
        for kind in ["message.send_success", "message.send_failed"] {
            for result in ["settled", "unknown", "duplicate", "store_error"] {
                webhook(kind, result);
            }
        }
    }

    fn zero_decisions(&self) {
        const WINDOW: [&str; 3] = ["messages", "recipients", "bytes"];
        const PER_MESSAGE: [&str; 2] = ["too_many_recipients", "message_too_large"];
        const STORE: [&str; 5] = [
            "unavailable",
            "timeout",
            "protocol",
            "invalid",
            "store_full",
        ];
        let decided = |outcome: Outcome, reasons: &[&'static str]| {
            for &reason in reasons {
                let outcome = outcome.as_str();
                let _ = self
                    .decisions
                    .get_or_create(&DecisionLabels { outcome, reason });
            }
        };
        decided(Outcome::Allowed, &["within_quota", "deferred"]);
        for refused in [Outcome::Denied, Outcome::ShadowDenied] {
            decided(refused, &WINDOW);
            decided(refused, &["provider_throttled"]);
        }
        decided(Outcome::StaticRejected, &PER_MESSAGE);
        decided(Outcome::ShadowDenied, &PER_MESSAGE);
        decided(Outcome::StoreError, &STORE);
        decided(Outcome::AllowedUncounted, &STORE);
    }

    /// Creates at zero the requests series of the configured clients (and of callers with
    /// no client's token), so a rate over them exists before their first request.
    pub fn zero_clients<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut any = false;
        for client in names {
            any = true;
            for outcome in ["authorized", "forbidden"] {
                let labels = ClientLabels {
                    client: client.to_owned(),
                    outcome,
                };
                let _ = self.clients.get_or_create(&labels);
            }
        }
        if any {
            let labels = ClientLabels {
                client: "-".to_owned(),
                outcome: "unauthenticated",
            };
            let _ = self.clients.get_or_create(&labels);
        }
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
        m.scheduled("remembered");
        m.webhook("message.send_failed", "settled");
        m.store_call("reserve", Duration::ZERO);
        m.upstream(200, Duration::ZERO);
        m.threshold("80");
        m.event_webhook("delivered");
        m.reload(true);
        m.breaker(limits::BreakerState::Closed);
        m.local_admission();
        m.reconciled(limits::Cost::default());
        m.store_persistence_off(false);
        m.store_restart();
        m.store_scopes(0);
        m.store_scope_refused();
        m.client_request("-", "unauthenticated");
        m.send_shed();
        drop(m.connection("proxy"));
        m
    }
}

/// Decrements an in-flight gauge (requests, connections) when dropped.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Whether an `Accept` header's value asks for OpenMetrics rather than the text format
/// 0.0.4: `application/openmetrics-text` is acceptable (q above 0) and at least as
/// preferred as any range the text format matches (`text/plain`, `text/*`, `*/*`). What
/// names neither (no `Accept`, `application/json`) gets the text format, as Prometheus's
/// own clients answer.
pub fn wants_openmetrics(accept: &str) -> bool {
    let (mut om, mut text) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
        match media.as_str() {
            "application/openmetrics-text" => om = om.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    om > 0.0 && om >= text
}

/// OpenMetrics text as Prometheus text format 0.0.4 (see [`Metrics::render_text`]).
/// `prometheus-client` writes OpenMetrics only, and the two formats differ in just these
/// lines, so a converter is smaller than a second metrics library.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta.and_then(|(p, rest)| rest.split_once(' ').map(|(n, tail)| (p, n, tail))) {
            Some((p, name, tail)) if counters.contains(name) => {
                out.push_str(&format!("{p}{name}_total {tail}\n"));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::wants_openmetrics;

    #[test]
    fn accept_negotiation_follows_q_values() {
        // What Prometheus 2.x and 3.x send, then the text format preferred or OpenMetrics refused.
        for (accept, om) in [
            (
                "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1",
                true,
            ),
            (
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
                true,
            ),
            ("Application/OpenMetrics-Text", true),
            ("text/plain, application/openmetrics-text", true),
            ("text/plain;q=0.9,application/openmetrics-text;q=0.5", false),
            ("application/openmetrics-text;q=0", false),
            ("application/openmetrics-text;q=junk", false),
            ("*/*", false),
            ("", false),
            ("application/json", false),
        ] {
            assert_eq!(wants_openmetrics(accept), om, "{accept}");
        }
    }
}
