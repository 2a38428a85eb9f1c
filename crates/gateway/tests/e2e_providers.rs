//! End to end: profiles that follow the grant's provider, per-grant overrides through the
//! admin API, provider throttling (cool-downs) and threshold events, on one gateway and on
//! two replicas sharing one Redis.

mod common;

use common::{
    Gateway, TOKEN, client, config, eventually, fake, gateway_error, metric_value, redis_store,
    simple,
};
use fake_nylas::{FakeNylas, Grant, Recorded, Rule};
use serde_json::{Value, json};
use testkit::RedisServer;

/// The gateway's own Nylas key in these tests (the callers present [`TOKEN`]).
const API_KEY: &str = "nyk_gateway_own_key";
const ADMIN_TOKEN: &str = "admin-secret";

/// One send of [`simple`] for `grant` through `gw`.
async fn send(gw: &Gateway, grant: &str) -> reqwest::Response {
    gw.send_json(&client(), grant, &simple())
        .send()
        .await
        .expect("an answer from the gateway")
}

/// Sends `n` messages that must all pass.
async fn send_ok(gw: &Gateway, grant: &str, n: usize) {
    for i in 0..n {
        let resp = send(gw, grant).await;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 200, "send {} of {n} for {grant}: {body}", i + 1);
    }
}

/// A send that must be refused by a window's quota; returns `error.quota`.
async fn send_denied(gw: &Gateway, grant: &str) -> Value {
    let body = gateway_error(send(gw, grant).await, 429, "quota_exceeded").await;
    body["error"]["quota"].clone()
}

/// The provider look-ups the fake received for `grant`: `GET /v3/grants/{grant}`.
fn lookups(nylas: &FakeNylas, grant: &str) -> Vec<Recorded> {
    let path = format!("/v3/grants/{grant}");
    nylas
        .requests()
        .into_iter()
        .filter(|r| r.method == http::Method::GET && r.path == path)
        .collect()
}

/// A profile table: `messages` per rolling 24 h.
fn profile(name: &str, messages: u64) -> String {
    format!(
        "[profiles.{name}]\n[[profiles.{name}.windows]]\nperiod = \"24h\"\nmessages = {messages}\n"
    )
}

fn provider_config(nylas: &FakeNylas, store: &str, api_key: Option<&str>) -> String {
    let key = api_key.map_or(String::new(), |k| format!("api_key = \"{k}\"\n"));
    config(
        &nylas.url(),
        &format!(
            "{key}{store}
[grants]
default_profile = \"roomy\"
resolve_provider = true

[grants.provider_profiles]
google = \"tight_google\"
icloud = \"tight_icloud\"

{}{}{}",
            profile("tight_google", 2),
            profile("tight_icloud", 3),
            profile("roomy", 10),
        ),
    )
}

#[tokio::test]
async fn grants_on_different_providers_get_their_own_limits_and_each_replica_asks_once() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let google = nylas.add_grant(Grant::new("g@corp.example").with_provider("google"));
    let icloud = nylas.add_grant(Grant::new("i@corp.example").with_provider("icloud"));
    let yahoo = nylas.add_grant(Grant::new("y@corp.example").with_provider("yahoo"));
    let toml = provider_config(&nylas, &redis_store(&redis), Some(API_KEY));
    let a = Gateway::start(&toml).await;
    let b = Gateway::start(&toml).await;

    // google: tight_google, 2 a day.
    send_ok(&a, &google.id, 2).await;
    let q = send_denied(&a, &google.id).await;
    assert_eq!(
        (q["limit"].as_u64(), q["used"].as_u64()),
        (Some(2), Some(2)),
        "{q}"
    );
    // icloud: tight_icloud, 3 a day.
    send_ok(&a, &icloud.id, 3).await;
    let q = send_denied(&a, &icloud.id).await;
    assert_eq!(
        (q["limit"].as_u64(), q["used"].as_u64()),
        (Some(3), Some(3)),
        "{q}"
    );
    // A provider with no mapping: default_profile.
    send_ok(&a, &yahoo.id, 3).await;
    assert_eq!(nylas.sends().len(), 8);

    for (grant, profile, source, provider) in [
        (&google, "tight_google", "provider", "google"),
        (&icloud, "tight_icloud", "provider", "icloud"),
        (&yahoo, "roomy", "default", "yahoo"),
    ] {
        for gw in [&a, &b] {
            let q = gw.quota(&grant.id).await;
            assert_eq!(q["profile"], profile, "{q}");
            assert_eq!(q["profile_source"], source, "{q}");
            assert_eq!(q["provider"], provider, "{q}");
        }
    }
    assert_eq!(
        a.quota(&yahoo.id).await["windows"][0]["messages"]["limit"],
        10
    );

    // Replica B learns the providers from the store: its sends are judged under the same
    // profiles and it never asks Nylas.
    let q = send_denied(&b, &google.id).await;
    assert_eq!(q["limit"], 2, "{q}");
    let q = send_denied(&b, &icloud.id).await;
    assert_eq!(q["limit"], 3, "{q}");
    send_ok(&b, &yahoo.id, 1).await;
    assert_eq!(
        b.quota(&yahoo.id).await["windows"][0]["messages"]["used"],
        4
    );

    // Per grant and replica, one look-up with the caller's credentials (the check that
    // Nylas knows the grant and accepts the caller, before anything is charged; its answer
    // names the provider, so learning it costs no second one), and one with the gateway's
    // key (the quota API's check that the grant exists). Each is cached.
    for grant in [&google, &icloud, &yahoo] {
        let seen = lookups(&nylas, &grant.id);
        for key in [TOKEN, API_KEY] {
            let bearer = format!("Bearer {key}");
            let with = seen
                .iter()
                .filter(|r| r.header("authorization") == Some(&*bearer));
            assert_eq!(with.count(), 2, "look-ups of {} with {key}", grant.provider);
        }
        assert_eq!(
            seen.len(),
            4,
            "look-ups of {} ({})",
            grant.id,
            grant.provider
        );
    }

    // An override beats the provider's profile.
    let resp = client()
        .put(format!("{}/v1/grants/{}/profile", a.admin, google.id))
        .json(&json!({ "profile": "roomy" }))
        .send()
        .await
        .expect("admin answer");
    assert_eq!(resp.status(), 200);
    send_ok(&b, &google.id, 1).await;
    let q = b.quota(&google.id).await;
    assert_eq!(q["profile"], "roomy", "{q}");
    assert_eq!(q["profile_source"], "override", "{q}");
    assert_eq!(q["provider"], "google", "{q}");
    assert_eq!(
        lookups(&nylas, &google.id).len(),
        4,
        "cached: no more look-ups"
    );
}

#[tokio::test]
async fn without_an_api_key_the_callers_credentials_look_the_provider_up() {
    let nylas = fake().await;
    let icloud = nylas.add_grant(Grant::new("i@corp.example").with_provider("icloud"));
    let gw = Gateway::start(&provider_config(&nylas, "", None)).await;
    send_ok(&gw, &icloud.id, 3).await;
    send_denied(&gw, &icloud.id).await;
    let seen = lookups(&nylas, &icloud.id);
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}

#[tokio::test]
async fn without_resolve_provider_no_provider_look_up_is_made() {
    let nylas = fake().await;
    let icloud = nylas.add_grant(Grant::new("i@corp.example").with_provider("icloud"));
    let toml = provider_config(&nylas, "", Some(API_KEY))
        .replace("resolve_provider = true", "resolve_provider = false");
    let gw = Gateway::start(&toml).await;
    send_ok(&gw, &icloud.id, 4).await;
    let q = gw.quota(&icloud.id).await;
    assert_eq!(q["profile"], "roomy", "{q}");
    assert_eq!(q["profile_source"], "default", "{q}");
    // Only the checks that Nylas knows the grant, once per credential (then cached): the
    // sends' and the quota API's.
    assert_eq!(lookups(&nylas, &icloud.id).len(), 2);
}

/// `PUT`/`DELETE /v1/grants/{grant}/profile` on `gw`, with `token` when given.
async fn profile_call(
    gw: &Gateway,
    method: http::Method,
    grant: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> reqwest::Response {
    let mut req = client().request(method, format!("{}/v1/grants/{grant}/profile", gw.admin));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    req.send().await.expect("an admin answer")
}

#[tokio::test]
async fn an_override_set_on_one_replica_applies_on_the_other_at_once() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let grant = nylas.add_grant(Grant::new("o@corp.example")).id;
    let toml = config(
        &nylas.url(),
        &format!(
            "[server]\nadmin_token = \"{ADMIN_TOKEN}\"\n{}\n[grants]\ndefault_profile = \"roomy\"\n{}{}",
            redis_store(&redis),
            profile("roomy", 10),
            profile("tight", 2),
        ),
    );
    let a = Gateway::start(&toml).await;
    let b = Gateway::start(&toml).await;
    // Both replicas have charged the grant under the default (and cached "no override").
    send_ok(&a, &grant, 1).await;
    send_ok(&b, &grant, 1).await;
    assert_eq!(b.quota(&grant).await["profile_source"], "default");

    let put = http::Method::PUT;
    let tight = Some(json!({ "profile": "tight" }));
    let resp = profile_call(&a, put.clone(), &grant, tight.clone(), None).await;
    gateway_error(resp, 401, "unauthorized").await;
    let resp = profile_call(&a, put.clone(), &grant, tight.clone(), Some("wrong")).await;
    gateway_error(resp, 401, "unauthorized").await;
    let unknown = Some(json!({ "profile": "no_such_profile" }));
    let resp = profile_call(&a, put.clone(), &grant, unknown, Some(ADMIN_TOKEN)).await;
    gateway_error(resp, 400, "invalid_request_error").await;
    let resp = profile_call(&a, put.clone(), &grant, Some(json!({})), Some(ADMIN_TOKEN)).await;
    gateway_error(resp, 400, "invalid_request_error").await;
    // None of that changed anything.
    send_ok(&b, &grant, 1).await;
    assert_eq!(nylas.sends().len(), 3);

    let resp = profile_call(&a, put.clone(), &grant, tight, Some(ADMIN_TOKEN)).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["profile"], "tight", "{body}");
    assert_eq!(body["profile_source"], "override", "{body}");

    // B's very next send is judged under "tight" (2 a day, 3 used): refused, not forwarded.
    let q = send_denied(&b, &grant).await;
    assert_eq!(
        (q["limit"].as_u64(), q["used"].as_u64()),
        (Some(2), Some(3)),
        "{q}"
    );
    assert_eq!(nylas.sends().len(), 3);
    for gw in [&a, &b] {
        let q = gw.quota(&grant).await;
        assert_eq!(q["profile"], "tight", "{q}");
        assert_eq!(q["profile_source"], "override", "{q}");
        assert_eq!(q["windows"][0]["messages"]["limit"], 2, "{q}");
        assert_eq!(q["windows"][0]["messages"]["used"], 3, "{q}");
    }
    // A has the override cached too.
    send_denied(&a, &grant).await;

    let delete = http::Method::DELETE;
    let resp = profile_call(&b, delete.clone(), &grant, None, None).await;
    gateway_error(resp, 401, "unauthorized").await;
    send_denied(&b, &grant).await;
    let resp = profile_call(&a, delete, &grant, None, Some(ADMIN_TOKEN)).await;
    assert_eq!(resp.status(), 204);
    // Back to the default on both, B (which had "tight" cached) first.
    send_ok(&b, &grant, 1).await;
    send_ok(&a, &grant, 1).await;
    for gw in [&a, &b] {
        let q = gw.quota(&grant).await;
        assert_eq!(q["profile"], "roomy", "{q}");
        assert_eq!(q["profile_source"], "default", "{q}");
        assert_eq!(q["windows"][0]["messages"]["used"], 5, "{q}");
    }
    assert_eq!(nylas.sends().len(), 5);
}

/// The `Retry-After` seconds of a response.
fn retry_after(resp: &reqwest::Response) -> u64 {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a numeric Retry-After: {:?}", resp.headers()))
}

/// A send that the gateway refuses because the grant is cooling down; returns its
/// `Retry-After`.
async fn send_throttled(gw: &Gateway, grant: &str) -> u64 {
    let resp = send(gw, grant).await;
    let secs = retry_after(&resp);
    gateway_error(resp, 429, "provider_throttled").await;
    secs
}

#[tokio::test]
async fn a_provider_throttle_cools_the_grant_down_on_every_replica() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let grant = nylas.add_grant(Grant::new("t@corp.example")).id;
    let other = nylas.add_grant(Grant::new("u@corp.example")).id;
    let toml = config(
        &nylas.url(),
        &format!(
            "{}\n[grants]\ndefault_profile = \"roomy\"\n{}",
            redis_store(&redis),
            profile("roomy", 10)
        ),
    );
    let a = Gateway::start(&toml).await;
    let b = Gateway::start(&toml).await;
    nylas
        .add_rule(Rule::rate_limited(30).path("/messages/send").times(1))
        .expect("rule");

    // Nylas's own answer reaches the client unchanged.
    let resp = send(&a, &grant).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(retry_after(&resp), 30);
    let body: Value = resp.json().await.expect("Nylas's JSON");
    assert_eq!(
        body["error"],
        json!({
            "type": "rate_limit_error",
            "message": "Too many requests to the provider",
            "provider_error": { "error": { "code": 429, "message": "User-rate limit exceeded" } },
        }),
        "{body}"
    );
    let request_id = body["request_id"].as_str().expect("Nylas's request id");
    assert!(!request_id.starts_with("sendgw-"), "{body}");
    assert_eq!(nylas.sends().len(), 1);
    // Nothing was sent: the reservation was given back.
    assert_eq!(a.used(&grant).await.0, 0);
    let m = a.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "sendgw_reservations_settled_total",
            "outcome=\"released\""
        ),
        1.0,
        "{m}"
    );

    // Every replica now refuses the grant's sends itself, until Retry-After.
    for gw in [&b, &a, &b] {
        let secs = send_throttled(gw, &grant).await;
        assert!((1..=30).contains(&secs), "Retry-After {secs}");
    }
    assert_eq!(nylas.sends().len(), 1, "no throttled send reached Nylas");
    assert_eq!(b.used(&grant).await.0, 0);
    let m = b.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "sendgw_decisions_total",
            "outcome=\"denied\",reason=\"provider_throttled\""
        ),
        2.0,
        "{m}"
    );
    // Only that grant cools down.
    send_ok(&b, &other, 1).await;
    assert_eq!(nylas.sends().len(), 2);
}

#[tokio::test]
async fn nylas_own_rate_limit_does_not_cool_down_and_a_bare_throttle_cools_60s() {
    let nylas = fake().await;
    let grant = nylas.add_grant(Grant::new("n@corp.example")).id;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;

    // Nylas's application rate limit: relayed, nothing remembered.
    nylas
        .add_rule(
            Rule::status(429)
                .error("nylas_rate_limit_exceeded", "Too many requests")
                .header("Retry-After", "30")
                .path("/messages/send")
                .times(1),
        )
        .expect("rule");
    let resp = send(&gw, &grant).await;
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["type"], "nylas_rate_limit_exceeded", "{body}");
    send_ok(&gw, &grant, 1).await;
    assert_eq!(nylas.sends().len(), 2);
    assert_eq!(gw.used(&grant).await.0, 1);

    // A provider throttle without Retry-After cools down for 60 s.
    nylas
        .add_rule(Rule::status(429).path("/messages/send").times(1))
        .expect("rule");
    let resp = send(&gw, &grant).await;
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    let secs = send_throttled(&gw, &grant).await;
    assert!((31..=60).contains(&secs), "Retry-After {secs}");
    assert_eq!(nylas.sends().len(), 3);
    assert_eq!(gw.used(&grant).await.0, 1);
}

/// The threshold events the fake received as a webhook, parsed.
fn hooks(nylas: &FakeNylas) -> Vec<(Recorded, Value)> {
    nylas
        .requests()
        .into_iter()
        .filter(|r| r.path == "/hooks/quota")
        .map(|r| {
            let v = r.body_json().expect("a JSON event");
            (r, v)
        })
        .collect()
}

fn crossings(m: &str, level: &str) -> f64 {
    metric_value(
        m,
        "sendgw_threshold_crossings_total",
        &format!("level=\"{level}\""),
    )
}

fn events_config(nylas: &FakeNylas, store: &str) -> String {
    config(
        &nylas.url(),
        &format!(
            "{store}\n[events]\nwebhook_url = \"{}/hooks/quota\"\ntimeout = \"2s\"\n# The fake answers 404: one attempt, so retries never reach the count.\nwebhook_attempts = 1\n\n[grants]\ndefault_profile = \"five\"\n{}",
            nylas.url(),
            profile("five", 5)
        ),
    )
}

#[tokio::test]
async fn threshold_crossings_are_counted_and_posted_once_per_level() {
    let nylas = fake().await;
    let grant = nylas.add_grant(Grant::new("e@corp.example")).id;
    let gw = Gateway::start(&events_config(&nylas, "")).await;

    send_ok(&gw, &grant, 3).await;
    let m = gw.metrics().await;
    assert_eq!(
        (crossings(&m, "80"), crossings(&m, "100")),
        (0.0, 0.0),
        "{m}"
    );
    send_ok(&gw, &grant, 1).await;
    let m = gw.metrics().await;
    assert_eq!(
        (crossings(&m, "80"), crossings(&m, "100")),
        (1.0, 0.0),
        "{m}"
    );
    send_ok(&gw, &grant, 1).await;
    let m = gw.metrics().await;
    assert_eq!(
        (crossings(&m, "80"), crossings(&m, "100")),
        (1.0, 1.0),
        "{m}"
    );
    // A denied send crosses nothing.
    send_denied(&gw, &grant).await;
    let m = gw.metrics().await;
    assert_eq!(
        (crossings(&m, "80"), crossings(&m, "100")),
        (1.0, 1.0),
        "{m}"
    );

    eventually("two threshold events posted", || async {
        hooks(&nylas).len() >= 2
    })
    .await;
    let mut events = hooks(&nylas);
    assert_eq!(events.len(), 2);
    events.sort_by_key(|(_, v)| v["level"].as_u64());
    for ((r, v), (level, used)) in events.iter().zip([(80, 4), (100, 5)]) {
        assert_eq!(r.method, http::Method::POST);
        assert!(
            r.header("content-type")
                .is_some_and(|ct| ct.starts_with("application/json")),
            "{:?}",
            r.headers
        );
        assert_eq!(
            r.header("authorization"),
            None,
            "no credentials to the webhook"
        );
        assert_eq!(v["grant_id"], grant.as_str(), "{v}");
        assert_eq!(v["window"], "24h", "{v}");
        assert_eq!(v["metric"], "messages", "{v}");
        assert_eq!(v["level"], level, "{v}");
        assert_eq!(v["used"], used, "{v}");
        assert_eq!(v["limit"], 5, "{v}");
    }
}

#[tokio::test]
async fn two_replicas_report_a_crossing_once() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let grant = nylas.add_grant(Grant::new("r@corp.example")).id;
    let toml = events_config(&nylas, &redis_store(&redis));
    let a = Gateway::start(&toml).await;
    let b = Gateway::start(&toml).await;

    send_ok(&a, &grant, 3).await;
    // A's 4th send would cross 80 %, but Nylas refuses it, so it is given back: crossings
    // are reported after settlement, for what was kept, so nothing is reported...
    nylas
        .add_rule(Rule::status(422).path("/messages/send").times(1))
        .expect("rule");
    assert_eq!(send(&a, &grant).await.status(), 422);
    assert_eq!(a.used(&grant).await.0, 3);
    // ...and B's send is the one that crosses 80 %, then 100 %.
    send_ok(&b, &grant, 1).await;
    send_ok(&b, &grant, 1).await;
    send_denied(&a, &grant).await;
    send_denied(&b, &grant).await;
    // A crossing is a background report: read the metrics once both are in.
    eventually("both crossings counted", || async {
        let m = b.metrics().await;
        crossings(&m, "80") + crossings(&m, "100") >= 2.0
    })
    .await;

    let (ma, mb) = (a.metrics().await, b.metrics().await);
    assert_eq!(
        (crossings(&ma, "80"), crossings(&ma, "100")),
        (0.0, 0.0),
        "{ma}"
    );
    assert_eq!(
        (crossings(&mb, "80"), crossings(&mb, "100")),
        (1.0, 1.0),
        "{mb}"
    );
    eventually("two threshold events posted", || async {
        hooks(&nylas).len() >= 2
    })
    .await;
    let mut levels: Vec<_> = hooks(&nylas)
        .iter()
        .map(|(_, v)| v["level"].as_u64().unwrap_or(0))
        .collect();
    levels.sort_unstable();
    assert_eq!(levels, [80, 100]);
}

#[tokio::test]
async fn a_quota_query_without_credentials_does_not_hide_the_provider_from_sends() {
    let nylas = fake().await;
    let icloud = nylas.add_grant(Grant::new("q@corp.example").with_provider("icloud"));
    let gw = Gateway::start(&provider_config(&nylas, "", None)).await;
    // The admin API holds no Nylas credentials: it cannot learn the provider itself...
    let q = gw.quota(&icloud.id).await;
    assert_eq!(q["profile_source"], "default", "{q}");
    // ...and must not keep the first send from learning it with the caller's.
    send_ok(&gw, &icloud.id, 3).await;
    let q = send_denied(&gw, &icloud.id).await;
    assert_eq!(q["limit"], 3, "{q}");
    let q = gw.quota(&icloud.id).await;
    assert_eq!(q["profile"], "tight_icloud", "{q}");
    assert_eq!(q["provider"], "icloud", "{q}");
    let seen = lookups(&nylas, &icloud.id);
    assert!(
        seen.iter().all(|r| r.header("authorization").is_some()),
        "no look-up without credentials"
    );
}

#[tokio::test]
async fn a_refused_look_up_with_a_callers_bad_token_is_not_remembered() {
    let nylas = fake().await;
    let icloud = nylas.add_grant(Grant::new("b@corp.example").with_provider("icloud"));
    let other = nylas.add_grant(Grant::new("o@corp.example").with_provider("google"));
    // A token that belongs to another grant: Nylas refuses it on this grant's paths.
    nylas.add_access_token("wrong-grant-token", &other.id);
    let gw = Gateway::start(&provider_config(&nylas, "", None)).await;
    let resp = client()
        .post(format!("{}/v3/grants/{}/messages/send", gw.url, icloud.id))
        .bearer_auth("wrong-grant-token")
        .json(&simple())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "Nylas's own refusal comes back");
    // The next caller, with good credentials, learns the provider: its limits apply.
    send_ok(&gw, &icloud.id, 3).await;
    let q = send_denied(&gw, &icloud.id).await;
    assert_eq!(q["limit"], 3, "{q}");
    assert_eq!(
        lookups(&nylas, &icloud.id).len(),
        2,
        "refused once, then learnt once"
    );
}
