//! Clients (`[[clients]]`) end to end: a request without a configured client's token
//! reaches neither the store nor Nylas; Nylas only ever sees the gateway's own key; a
//! client limited to some grants is refused the others; a client with a profile of its own
//! is held to it; and a send for a grant Nylas does not know, or by a caller it refuses,
//! creates no store key.

mod common;

use common::*;
use fake_nylas::{DEMO_GRANT_ID, Grant};
use gateway::config::token_digest;
use gateway::scope::Scope;
use testkit::RedisServer;

/// The Nylas key the gateway holds; no application does.
const API_KEY: &str = "nyk_gateway_only";
/// The tokens of the two clients below.
const BILLING: &str = "billing-token-1";
const CRM: &str = "crm-token-2";

fn hex(token: &str) -> String {
    token_digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `api_key` under `[upstream]`, then two clients: `billing` (held to the grant
/// `allowed` and to the profile `small`: 2 messages a day) and `crm`, unrestricted.
fn with_clients(upstream: &str, allowed: &str, rest: &str) -> String {
    config(
        upstream,
        &format!(
            "api_key = \"{API_KEY}\"\n{rest}\n\
             [profiles.small]\n[[profiles.small.windows]]\nperiod = \"1d\"\nmessages = 2\n\
             [[clients]]\nname = \"billing\"\ntoken_sha256 = \"{}\"\n\
             grants = [\"{allowed}\"]\nprofile = \"small\"\n\
             [[clients]]\nname = \"crm\"\ntoken_sha256 = \"{}\"\n",
            hex(BILLING),
            hex(CRM)
        ),
    )
}

/// Messages the client `billing` used of its own quota, as the store holds them.
async fn billing_used(gw: &Gateway) -> u64 {
    let config = gw.state.config();
    let small = config.profile("small").unwrap();
    let scope = Scope::client("billing");
    let usage = gw.state.store.usage(scope.as_str(), small).await.unwrap();
    usage.windows[0].used.messages
}

/// A domain send of `mail.example` through `gw` with `token`.
fn domain_send(gw: &Gateway, token: &str) -> reqwest::RequestBuilder {
    client()
        .post(format!("{}/v3/domains/mail.example/messages/send", gw.url))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(simple().to_string())
}

fn send(gw: &Gateway, grant: &str, token: Option<&str>) -> reqwest::RequestBuilder {
    let req = client()
        .post(format!("{}/v3/grants/{grant}/messages/send", gw.url))
        .header("content-type", "application/json")
        .body(simple().to_string());
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

#[tokio::test]
async fn without_a_client_token_nothing_reaches_the_store_or_nylas() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let toml = with_clients(&nylas.url(), DEMO_GRANT_ID, &redis_store(&redis));
    let gw = Gateway::start(&toml).await;
    let c = client();
    let url = format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", gw.url);
    let attempts = [
        send(&gw, DEMO_GRANT_ID, None),
        send(&gw, DEMO_GRANT_ID, Some("wrong")),
        send(&gw, DEMO_GRANT_ID, Some(API_KEY)),
        send(&gw, DEMO_GRANT_ID, Some(&hex(BILLING))),
        c.post(&url).basic_auth("billing", Some(BILLING)),
        c.post(&url).header("authorization", BILLING),
        // Named in `Connection`, the token is a hop-by-hop header and goes.
        send(&gw, DEMO_GRANT_ID, Some(BILLING)).header("connection", "authorization"),
        c.get(format!("{}/v3/grants", gw.url)),
    ];
    let n = attempts.len();
    for req in attempts {
        let resp = req.send().await.unwrap();
        let challenge = resp.headers().get("www-authenticate").cloned();
        gateway_error(resp, 401, "unauthorized").await;
        assert_eq!(challenge.unwrap(), "Bearer realm=\"send-gateway\"");
    }
    assert!(nylas.requests().is_empty(), "{:?}", nylas.requests());
    assert_eq!(redis_keys(&redis), Vec::<String>::new(), "no store key");
    let metrics = gw.metrics().await;
    let labels = "client=\"-\",outcome=\"unauthenticated\"";
    let counted = metric_value(&metrics, "sendgw_client_requests_total", labels);
    assert_eq!(counted, n as f64, "{metrics}");
    // The configured clients' series exist from start-up, at zero.
    for client in ["billing", "crm"] {
        let series =
            format!("sendgw_client_requests_total{{client=\"{client}\",outcome=\"forbidden\"}} 0");
        assert!(
            metrics.lines().any(|l| l == series),
            "{series} in\n{metrics}"
        );
    }
}

#[tokio::test]
async fn nylas_sees_the_gateway_key_and_never_the_client_token() {
    let nylas = fake().await;
    nylas.set_api_key(Some(API_KEY.into()));
    let gw = Gateway::start(&with_clients(&nylas.url(), DEMO_GRANT_ID, "")).await;
    for token in [BILLING, CRM] {
        let resp = send(&gw, DEMO_GRANT_ID, Some(token)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    // Relayed requests too, and the scheme in any case.
    let resp = client()
        .get(format!("{}/v3/grants/{DEMO_GRANT_ID}/messages", gw.url))
        .header("authorization", format!("bearer {CRM}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let requests = nylas.requests();
    assert!(requests.len() >= 3, "{requests:?}");
    for r in &requests {
        assert_eq!(
            r.header("authorization"),
            Some(&*format!("Bearer {API_KEY}"))
        );
        let all = format!("{:?}", r.headers);
        assert!(!all.contains(BILLING) && !all.contains(CRM), "{all}");
    }
    assert_eq!(nylas.delivered().len(), 2);
    let metrics = gw.metrics().await;
    for (client, n) in [("billing", 1.0), ("crm", 2.0)] {
        let labels = format!("client=\"{client}\",outcome=\"authorized\"");
        let counted = metric_value(&metrics, "sendgw_client_requests_total", &labels);
        assert_eq!(counted, n, "{client}: {metrics}");
    }
}

#[tokio::test]
async fn a_client_limited_to_some_grants_is_refused_the_others() {
    let nylas = fake().await;
    let other = nylas.add_grant(Grant::new("other@corp.example")).id;
    // The allowed grant is configured by email; the requests name it by id.
    let demo_email = fake_nylas::DEMO_GRANT_EMAIL;
    let gw = Gateway::start(&with_clients(&nylas.url(), demo_email, "")).await;
    let resp = send(&gw, DEMO_GRANT_ID, Some(BILLING))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let upper = DEMO_GRANT_ID.to_ascii_uppercase();
    let resp = send(&gw, &upper, Some(BILLING)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "another spelling of the same grant");
    nylas.clear();
    for grant in [other.clone(), "other@corp.example".into()] {
        let resp = send(&gw, &grant, Some(BILLING)).send().await.unwrap();
        gateway_error(resp, 403, "forbidden").await;
    }
    // A path that reads as the allowed grant one way and as the other grant another way.
    let sneaky = format!("{DEMO_GRANT_ID}%2F..%2F..%2Fgrants%2F{other}");
    let resp = send(&gw, &sneaky, Some(BILLING)).send().await.unwrap();
    assert!([400, 403].contains(&resp.status().as_u16()), "{resp:?}");
    for path in [
        "/v3/grants",
        "/v3/webhooks",
        "/v3/applications",
        "/v3/connect/token",
    ] {
        let resp = client()
            .get(format!("{}{path}", gw.url))
            .bearer_auth(BILLING)
            .send()
            .await
            .unwrap();
        gateway_error(resp, 403, "forbidden").await;
    }
    assert!(nylas.sends().is_empty(), "{:?}", nylas.sends());
    assert_eq!(gw.used(&other).await, (0, 0));
    // The unrestricted client reaches both.
    let resp = send(&gw, &other, Some(CRM)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let metrics = gw.metrics().await;
    let labels = "client=\"billing\",outcome=\"forbidden\"";
    assert_eq!(
        metric_value(&metrics, "sendgw_client_requests_total", labels),
        6.0,
        "two grants and four endpoints (the two-way path is refused as unreadable): {metrics}"
    );
}

#[tokio::test]
async fn a_client_window_denies_when_its_budget_is_spent_though_the_grant_has_room() {
    let nylas = fake().await;
    let gw = Gateway::start(&with_clients(&nylas.url(), DEMO_GRANT_ID, "")).await;
    for _ in 0..2 {
        let resp = send(&gw, DEMO_GRANT_ID, Some(BILLING))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let resp = send(&gw, DEMO_GRANT_ID, Some(BILLING))
        .send()
        .await
        .unwrap();
    let body = gateway_error(resp, 429, "quota_exceeded").await;
    assert_eq!(
        body["error"]["quota"]["limit"], 2,
        "the client's window: {body}"
    );
    // The refused send gave the grant's charge back: all or nothing.
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (2, 2));
    assert_eq!(billing_used(&gw).await, 2);
    // The admin API shows it.
    let q: serde_json::Value = gw
        .admin_get("/v1/clients/billing/quota")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&q["client"], &q["profile"]),
        (&"billing".into(), &"small".into())
    );
    assert_eq!(q["windows"][0]["messages"]["used"], 2, "{q}");
    for unknown in ["crm", "nobody"] {
        let resp = gw
            .admin_get(&format!("/v1/clients/{unknown}/quota"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{unknown}");
    }
    // Another client still sends for the grant.
    let resp = send(&gw, DEMO_GRANT_ID, Some(CRM)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (3, 3));
    assert_eq!(nylas.delivered().len(), 3);
}

#[tokio::test]
async fn a_client_charge_is_given_back_with_the_grant_when_nylas_sends_nothing() {
    let nylas = fake().await;
    let gw = Gateway::start(&with_clients(&nylas.url(), DEMO_GRANT_ID, "")).await;
    nylas
        .add_rule(fake_nylas::Rule::status(400).path("/messages/send"))
        .unwrap();
    let resp = send(&gw, DEMO_GRANT_ID, Some(BILLING))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(billing_used(&gw).await, 0, "released with the grant's");
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
}

#[tokio::test]
async fn an_unknown_grant_or_a_refused_caller_creates_no_store_key() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let other = nylas.add_grant(Grant::new("o@corp.example")).id;
    nylas.add_access_token("tok-of-other", other.clone());
    let gw = Gateway::start(&config(&nylas.url(), &redis_store(&redis))).await;
    let unknown = "0d3c9f2e-8b1a-4c5d-9e6f-7a8b9c0d1e2f";
    let resp = send(&gw, unknown, Some(TOKEN)).send().await.unwrap();
    assert_eq!(resp.status(), 404, "Nylas's answer, relayed");
    // Another grant's access token: Nylas refuses the look-up.
    let resp = send(&gw, DEMO_GRANT_ID, Some("tok-of-other"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "Nylas's answer, relayed");
    assert!(nylas.sends().is_empty(), "{:?}", nylas.sends());
    assert_eq!(redis_keys(&redis), Vec::<String>::new(), "no store key");
    // A caller Nylas accepts is charged as before.
    let resp = send(&gw, DEMO_GRANT_ID, Some(TOKEN)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!redis_keys(&redis).is_empty());
}

#[tokio::test]
async fn a_cancelled_schedule_gives_the_client_charge_back_too() {
    let nylas = fake().await;
    let gw = Gateway::start(&with_clients(&nylas.url(), DEMO_GRANT_ID, "")).await;
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut body = simple();
    body["send_at"] = serde_json::json!(later);
    let scheduled = || send(&gw, DEMO_GRANT_ID, Some(BILLING)).body(body.to_string());
    let mut ids = Vec::new();
    for _ in 0..2 {
        let resp = scheduled().send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let answer: serde_json::Value = resp.json().await.unwrap();
        ids.push(answer["data"]["schedule_id"].as_str().unwrap().to_owned());
    }
    let resp = scheduled().send().await.unwrap();
    gateway_error(resp, 429, "quota_exceeded").await;
    let cancel = client()
        .delete(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/schedules/{}",
            gw.url, ids[0]
        ))
        .bearer_auth(BILLING)
        .send()
        .await
        .unwrap();
    assert!(cancel.status().is_success(), "{cancel:?}");
    // Both charges came back: the client's window has room again, the grant's shows one.
    let resp = scheduled().send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let q = gw.quota(DEMO_GRANT_ID).await;
    assert_eq!(q["windows"][0]["messages"]["scheduled"], 2, "{q}");
}

#[tokio::test]
async fn the_binary_reads_a_client_token_from_its_environment() {
    let nylas = fake().await;
    nylas.set_api_key(Some(API_KEY.into()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let toml = config(
        &nylas.url(),
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [[clients]]\nname = \"worker\"\ntoken_env = \"WORKER_GATEWAY_TOKEN\"\n",
    );
    std::fs::write(&path, toml).unwrap();
    let env = [
        ("WORKER_GATEWAY_TOKEN", "worker-secret"),
        ("SEND_GATEWAY__UPSTREAM__API_KEY", API_KEY),
    ];
    let gw = Process::spawn_with_env(&path, &env);
    let url = format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", gw.url);
    let post = |token: &str| {
        client()
            .post(&url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(simple().to_string())
    };
    let resp = post("worker-secret").send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(post("other").send().await.unwrap().status(), 401);
    let sent = nylas.delivered();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].header("authorization"),
        Some(&*format!("Bearer {API_KEY}"))
    );
}

#[tokio::test]
async fn a_client_with_a_quota_of_its_own_is_held_to_it_on_domain_sends_too() {
    let nylas = fake().await;
    // No `[domains] profile`: domain sends are counted only against the client's quota.
    let gw = Gateway::start(&with_clients(&nylas.url(), DEMO_GRANT_ID, "")).await;
    let toml = gw.state.config();
    assert!(toml.domain_profile().is_none());
    // `billing` may use only its grant: no domain at all.
    let resp = domain_send(&gw, BILLING).send().await.unwrap();
    gateway_error(resp, 403, "forbidden").await;
    drop(gw);
    let toml = with_clients(&nylas.url(), DEMO_GRANT_ID, "").replace(
        &format!("grants = [\"{DEMO_GRANT_ID}\"]\n"),
        "domains = [\"Mail.Example.\"]\n",
    );
    let gw = Gateway::start(&toml).await;
    for _ in 0..2 {
        let resp = domain_send(&gw, BILLING).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    let resp = domain_send(&gw, BILLING).send().await.unwrap();
    gateway_error(resp, 429, "quota_exceeded").await;
    assert_eq!(billing_used(&gw).await, 2);
    // A client without a quota of its own: relayed uncounted, as before.
    for _ in 0..3 {
        assert_eq!(domain_send(&gw, CRM).send().await.unwrap().status(), 200);
    }
    assert_eq!(nylas.delivered().len(), 5);
}

#[tokio::test]
async fn a_restricted_client_learns_nothing_of_other_identifiers() {
    let nylas = fake().await;
    let gw = Gateway::start(&with_clients(&nylas.url(), DEMO_GRANT_ID, "")).await;
    for grant in [
        "nobody@corp.example",
        "0d3c9f2e-8b1a-4c5d-9e6f-7a8b9c0d1e2f",
    ] {
        let resp = send(&gw, grant, Some(BILLING)).send().await.unwrap();
        gateway_error(resp, 403, "forbidden").await;
    }
    // The unrestricted client gets Nylas's own answer.
    let resp = send(&gw, "nobody@corp.example", Some(CRM))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}
