//! Posting threshold events to `[events] webhook_url`: signed, retried with backoff, and
//! bounded in number.
//!
//! - **Signed** with `[events] webhook_secret` when set: `Send-Gateway-Signature:
//!   t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, the scheme receivers already
//!   know from Stripe's webhooks. The timestamp inside the signed text lets a receiver refuse
//!   a replay; each attempt is signed afresh, so a retry is not mistaken for one.
//! - **Retried** on a connection error, a timeout or a non-2xx answer, up to
//!   `webhook_attempts` in all, waiting `webhook_backoff`, then twice that, and so on, each
//!   wait lengthened by up to a quarter at random so replicas that failed together do not
//!   retry together. Then the event is given up: a log line and
//!   `sendgw_event_webhooks_total{result="failed"}`.
//! - **Bounded**: at most [`MAX_IN_FLIGHT`] events are being delivered (or waiting to retry)
//!   at once; beyond that an event is dropped with a log line and
//!   `sendgw_event_webhooks_total{result="dropped"}` rather than held in memory.
//!
//! Everything runs on spawned tasks: a send never waits for the webhook. Neither the URL
//! (its query or user info may carry a secret), the secret nor the body is ever logged.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::Url;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::Semaphore;

use crate::config::{EventsConfig, Secret};
use crate::metrics::Metrics;

/// The signature header.
pub const SIGNATURE: &str = "send-gateway-signature";

/// Most events being delivered at once, on one replica.
pub const MAX_IN_FLIGHT: usize = 256;

/// `Send-Gateway-Signature`'s value for `body` posted at `t` (unix seconds):
/// `t=<t>,v1=<lowercase hex HMAC-SHA256 of "<t>.<body>" keyed by secret>`.
///
/// # Examples
/// ```
/// let header = gateway::events::signature(b"whsec", 1_700_000_000, b"{}");
/// assert!(header.starts_with("t=1700000000,v1="));
/// assert_eq!(header.len(), "t=1700000000,v1=".len() + 64);
/// ```
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(format!("{t}.").as_bytes());
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = format!("t={t},v1=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The wait after `failures` failed attempts (1 for the first retry): `base` doubled for
/// each earlier failure, lengthened by `jitter` (0 to 1) times a quarter of it.
pub fn backoff(base: Duration, failures: u32, jitter: f64) -> Duration {
    let doubled = base.saturating_mul(1 << failures.clamp(1, 16).saturating_sub(1));
    doubled.saturating_add(doubled.mul_f64(jitter.clamp(0.0, 1.0) / 4.0))
}

/// What one event's delivery follows, taken from the configuration when it was reported.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    url: Url,
    secret: Option<Secret>,
    timeout: Duration,
    attempts: u32,
    backoff: Duration,
}

impl Plan {
    /// The plan `config` gives; `None` when no webhook is configured.
    pub(super) fn from_config(config: &EventsConfig) -> Option<Plan> {
        Some(Plan {
            url: config.webhook_url.clone()?,
            secret: config.webhook_secret.clone(),
            timeout: config.timeout,
            attempts: config.webhook_attempts.max(1),
            backoff: config.webhook_backoff,
        })
    }
}

/// Posts events in the background, at most a fixed number at once.
#[derive(Debug, Clone)]
pub(super) struct Delivery {
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    cap: usize,
    random: SystemRandom,
}

impl Delivery {
    /// Deliveries through `client`, at most `cap` at once.
    pub(super) fn new(client: reqwest::Client, metrics: Arc<Metrics>, cap: usize) -> Self {
        Delivery {
            client,
            metrics,
            slots: Arc::new(Semaphore::new(cap)),
            cap,
            random: SystemRandom::new(),
        }
    }

    /// Starts delivering `body` (JSON) to `plan`'s URL on a task of its own, or drops it
    /// when the cap is reached. `grant` names the event in log lines.
    pub(super) fn post(&self, plan: Plan, body: Bytes, grant: &str) {
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            self.metrics.event_webhook("dropped");
            tracing::warn!(
                grant,
                cap = self.cap,
                "too many threshold webhooks in flight; event dropped"
            );
            return;
        };
        let this = self.clone();
        let grant = grant.to_owned();
        tokio::spawn(async move {
            let _slot = slot;
            this.deliver(&plan, &body, &grant).await;
        });
    }

    async fn deliver(&self, plan: &Plan, body: &Bytes, grant: &str) {
        for attempt in 1..=plan.attempts {
            let error = match self.attempt(plan, body).await {
                Ok(()) => {
                    self.metrics.event_webhook("delivered");
                    return;
                }
                Err(error) => error,
            };
            if attempt == plan.attempts {
                self.metrics.event_webhook("failed");
                tracing::warn!(grant, attempts = attempt, %error, "threshold webhook failed; event given up");
                return;
            }
            let wait = backoff(plan.backoff, attempt, self.jitter());
            tracing::info!(grant, attempt, %error, retry_in = ?wait, "threshold webhook failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// One post, signed now. The error says what failed, without the URL.
    async fn attempt(&self, plan: &Plan, body: &Bytes) -> Result<(), String> {
        let mut request = self
            .client
            .post(plan.url.clone())
            .timeout(plan.timeout)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        if let Some(secret) = &plan.secret {
            request = request.header(SIGNATURE, signature(secret.as_bytes(), now(), body));
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("status {}", r.status().as_u16())),
            Err(e) => Err(describe(&e)),
        }
    }

    /// A number from 0 to 1; 0 if the system's randomness fails (the wait is then exact).
    fn jitter(&self) -> f64 {
        let mut bytes = [0u8; 2];
        match self.random.fill(&mut bytes) {
            Ok(()) => f64::from(u16::from_le_bytes(bytes)) / f64::from(u16::MAX),
            Err(_) => 0.0,
        }
    }
}

/// Unix seconds now.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A reqwest error's kind and innermost cause, without the URL.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "request"
    };
    format!("{kind}: {}", crate::upstream::innermost_cause(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_t_and_the_hmac_of_t_dot_body_in_lowercase_hex() {
        let header = signature(b"Jefe", 1_700_000_000, b"{\"event\":\"quota_threshold\"}");
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        let expected = hmac::sign(&key, b"1700000000.{\"event\":\"quota_threshold\"}");
        let hex: String = expected
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(header, format!("t=1700000000,v1={hex}"));
        let v1 = header.strip_prefix("t=1700000000,v1=").unwrap();
        assert_eq!(v1.len(), 64);
        assert!(v1.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    }

    #[test]
    fn the_signature_matches_known_vectors() {
        // Computed apart from ring, with Python's hmac module and with
        // `printf '0.' | openssl dgst -sha256 -hmac key`.
        assert_eq!(
            signature(b"key", 0, b""),
            "t=0,v1=85841b4efc3cd7776c3c8f9b7cca9e281c550e5d19889d78e9e669c6337f000d"
        );
        assert_eq!(
            signature(
                b"whsec_test",
                1_700_000_000,
                b"{\"event\":\"quota_threshold\"}"
            ),
            "t=1700000000,v1=8ee6bbbf3300aae98da500eaefdd51f5510d5c280d93cbee6030b0e1b4016e3a"
        );
    }

    #[test]
    fn the_signature_changes_with_secret_time_and_every_byte() {
        let base = signature(b"s", 10, b"body");
        assert_ne!(base, signature(b"t", 10, b"body"));
        assert_ne!(base, signature(b"s", 11, b"body"));
        assert_ne!(base, signature(b"s", 10, b"body "));
        // "1.0x" and "10.x" sign different texts though the concatenation could collide
        // without the dot.
        assert_ne!(signature(b"s", 1, b"0x"), signature(b"s", 10, b"x"));
    }

    #[tokio::test]
    async fn beyond_the_cap_an_event_is_dropped_and_counted() {
        // A receiver that accepts and never answers: the first delivery holds its slot.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/hook", silent.local_addr().unwrap())).unwrap();
        let metrics = Arc::new(Metrics::default());
        let delivery = Delivery::new(reqwest::Client::new(), Arc::clone(&metrics), 1);
        let plan = Plan {
            url,
            secret: None,
            timeout: Duration::from_secs(30),
            attempts: 1,
            backoff: Duration::from_secs(1),
        };
        delivery.post(plan.clone(), Bytes::from_static(b"{}"), "g");
        delivery.post(plan, Bytes::from_static(b"{}"), "g");
        let text = metrics.render();
        assert!(
            text.contains("sendgw_event_webhooks_total{result=\"dropped\"} 1"),
            "{text}"
        );
        // The first is still in flight: nothing has failed (the series exists, at zero).
        assert!(
            text.contains("sendgw_event_webhooks_total{result=\"failed\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn backoff_doubles_and_jitter_only_lengthens_by_a_quarter() {
        let s = Duration::from_secs(1);
        assert_eq!(backoff(s, 1, 0.0), s);
        assert_eq!(backoff(s, 2, 0.0), 2 * s);
        assert_eq!(backoff(s, 3, 0.0), 4 * s);
        assert_eq!(backoff(s, 1, 1.0), Duration::from_millis(1250));
        assert_eq!(backoff(s, 2, 0.5), Duration::from_millis(2250));
        // Out-of-range inputs stay bounded.
        assert_eq!(backoff(s, 0, 7.0), Duration::from_millis(1250));
        assert_eq!(backoff(s, 99, 0.0), backoff(s, 16, 0.0));
    }
}
