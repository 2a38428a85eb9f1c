//! The admin API against its OpenAPI 3.1 description (`crates/gateway/openapi.json`,
//! served at `/v1/openapi.json`): every operation is driven through every status the spec
//! documents for it, and every answer is checked against the spec by
//! [`common::openapi_check::check`] (status documented, required headers, content type, body
//! valid under the schema). The router's routes and the spec's paths are the same.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::openapi_check::{self, Answer, Spec, check};
use common::{Gateway, client, config, fake, simple};
use fake_nylas::{DEMO_GRANT_ID, FakeNylas, Rule};
use serde_json::{Value, json};
use testkit::RedisServer;

const ADMIN_TOKEN: &str = "s3cret-admin";
const API_KEY: &str = "nyk_openapi_key";
const SECRET: &str = "whsec-openapi";
const BILLING: &str = "billing-client-token";
const CRM: &str = "crm-client-token";

/// Every route the admin router serves (src/admin.rs, and src/webhooks.rs on the admin
/// listener), with its methods.
const ROUTES: &[(&str, &[&str])] = &[
    ("/healthz", &["get"]),
    ("/readyz", &["get"]),
    ("/metrics", &["get"]),
    ("/v1/openapi.json", &["get"]),
    ("/v1/quota/{grant}", &["get", "delete"]),
    ("/v1/quota/{grant}/cooldown", &["delete"]),
    ("/v1/quota/{grant}/explain", &["get"]),
    ("/v1/clients/{name}/quota", &["get"]),
    ("/v1/usage", &["get"]),
    ("/v1/grants/{grant}/profile", &["put", "delete"]),
    ("/v1/nylas/webhooks", &["get", "post"]),
];

/// The operations that take a `{grant}`, with a body for those that need one.
const GRANT_OPS: &[(&str, &str)] = &[
    ("GET", "/v1/quota/{grant}"),
    ("DELETE", "/v1/quota/{grant}"),
    ("DELETE", "/v1/quota/{grant}/cooldown"),
    ("GET", "/v1/quota/{grant}/explain"),
    ("PUT", "/v1/grants/{grant}/profile"),
    ("DELETE", "/v1/grants/{grant}/profile"),
];

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn sign(body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    hex(ring::hmac::sign(&key, body).as_ref())
}

/// Profiles, clients and the webhook secret every gateway here has; `server` and `store`
/// are tables of their own.
fn gateway_config(nylas: &FakeNylas, upstream: &str, tables: &str) -> String {
    let rest = format!(
        "api_key = \"{API_KEY}\"\n{upstream}\n{tables}\n\
         [webhooks]\nsecret = \"{SECRET}\"\n\
         [grants]\ndefault_profile = \"small\"\n\
         [profiles.small]\nmax_recipients_per_message = 5\nmax_message_size = \"1MB\"\n\
         [[profiles.small.windows]]\nperiod = \"1h\"\nmessages = 3\nrecipients = 10\n\
         [profiles.own]\n[[profiles.own.windows]]\nperiod = \"1d\"\nmessages = 100\n\
         [[clients]]\nname = \"billing\"\ntoken_sha256 = \"{}\"\nprofile = \"own\"\n\
         [[clients]]\nname = \"crm\"\ntoken_sha256 = \"{}\"\n",
        sha256(BILLING),
        sha256(CRM),
    );
    config(&nylas.url(), &rest)
}

/// Calls on one admin listener, every answer checked against the spec.
struct Admin<'a> {
    spec: &'a Spec,
    base: String,
    token: Option<&'a str>,
}

impl<'a> Admin<'a> {
    fn new(spec: &'a Spec, gw: &Gateway, token: Option<&'a str>) -> Self {
        Admin {
            spec,
            base: gw.admin.clone(),
            token,
        }
    }

    fn req(&self, method: &str, path: &str) -> reqwest::RequestBuilder {
        let method =
            reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).expect("method");
        let req = client().request(method, format!("{}{path}", self.base));
        match self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send(&self, method: &str, template: &str, req: reqwest::RequestBuilder) -> Answer {
        check(
            self.spec,
            method,
            template,
            req.send().await.expect("an answer"),
        )
        .await
    }

    /// `method path` (no body); asserts the status, and the error type when one is given.
    async fn expect(&self, method: &str, template: &str, path: &str, status: u16) -> Answer {
        let answer = self.send(method, template, self.req(method, path)).await;
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
        answer
    }
}

fn error_type(answer: &Answer) -> &str {
    answer
        .json
        .as_ref()
        .and_then(|v| v["error"]["type"].as_str())
        .unwrap_or("")
}

/// A send by the `billing` client; its status.
async fn send(gw: &Gateway) -> u16 {
    let resp = client()
        .post(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
            gw.url
        ))
        .bearer_auth(BILLING)
        .json(&simple())
        .send()
        .await
        .expect("a send answer");
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_answer_matches_the_openapi_spec() {
    let spec = Spec::load();
    spec.assert_well_formed();
    routes_match_the_spec(&spec);

    let nylas = fake().await;
    let server = format!("[server]\nadmin_token = \"{ADMIN_TOKEN}\"\nprotect_metrics = true\n");
    let gw = Gateway::start(&gateway_config(&nylas, "", &server)).await;
    let admin = Admin::new(&spec, &gw, Some(ADMIN_TOKEN));
    let anon = Admin::new(&spec, &gw, None);
    let wrong = Admin::new(&spec, &gw, Some("not-the-token"));
    open_endpoints(&anon).await;
    metrics(&admin, &anon).await;
    quota_reads(&admin, &gw, &nylas).await;
    explain(&admin, &gw).await;
    fleet_and_clients(&admin, &gw).await;
    profile_changes(&admin).await;
    refused_without_the_token(&anon, &wrong).await;
    webhooks(&anon).await;
    every_route_answers(&admin).await;
    gw.state.begin_shutdown();
    let answer = anon.expect("GET", "/readyz", "/readyz", 503).await;
    assert_eq!(answer.json.unwrap()["status"], "shutting_down");
    gw.shutdown().await;

    lookups_that_fail(&spec).await;
    store_down(&spec).await;

    let unseen = spec.unseen();
    assert!(
        unseen.is_empty(),
        "documented but never answered: {unseen:#?}"
    );
    eprintln!(
        "{} admin answers validated against openapi.json",
        spec.validated()
    );
}

/// The list above is the spec's operations, and names every route admin.rs declares.
fn routes_match_the_spec(spec: &Spec) {
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .flat_map(|(path, methods)| {
            methods
                .iter()
                .map(|m| ((*path).to_owned(), (*m).to_owned()))
        })
        .collect();
    assert_eq!(
        listed,
        spec.operations(),
        "the routes listed here and the spec's"
    );
    let source = include_str!("../src/admin.rs");
    let mut declared: BTreeSet<String> = source
        .split(".route(")
        .skip(1)
        .filter_map(|rest| rest.trim_start().strip_prefix('"')?.split('"').next())
        .map(str::to_owned)
        .collect();
    declared.insert(gateway::webhooks::PATH.to_owned());
    let paths: BTreeSet<String> = ROUTES.iter().map(|(p, _)| (*p).to_owned()).collect();
    assert_eq!(
        declared, paths,
        "the routes admin.rs declares and the ones listed here"
    );
}

/// Health, readiness and the spec itself: open, whatever the token.
async fn open_endpoints(anon: &Admin<'_>) {
    let answer = anon.expect("GET", "/healthz", "/healthz", 200).await;
    assert_eq!(answer.json, Some(json!({"status": "ok"})));
    let answer = anon.expect("GET", "/readyz", "/readyz", 200).await;
    assert_eq!(answer.json.unwrap()["status"], "ready");
    let answer = anon
        .expect("GET", "/v1/openapi.json", "/v1/openapi.json", 200)
        .await;
    assert_eq!(
        answer.body,
        openapi_check::TEXT,
        "the served spec is the repo's file"
    );
    assert_eq!(answer.content_type.as_deref(), Some("application/json"));
}

async fn metrics(admin: &Admin<'_>, anon: &Admin<'_>) {
    let answer = anon.expect("GET", "/metrics", "/metrics", 401).await;
    assert_eq!(error_type(&answer), "unauthorized");
    let answer = admin.expect("GET", "/metrics", "/metrics", 200).await;
    assert!(answer.content_type.unwrap().starts_with("text/plain"));
    let req = admin
        .req("GET", "/metrics")
        .header("accept", "application/openmetrics-text;version=1.0.0");
    let answer = admin.send("GET", "/metrics", req).await;
    assert!(
        answer
            .content_type
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(answer.body.ends_with("# EOF\n"));
}

/// `GET /v1/quota`: usage, a cool-down and its end, unknown grants.
async fn quota_reads(admin: &Admin<'_>, gw: &Gateway, nylas: &FakeNylas) {
    let quota = format!("/v1/quota/{DEMO_GRANT_ID}");
    assert_eq!(send(gw).await, 200);
    let answer = admin.expect("GET", "/v1/quota/{grant}", &quota, 200).await;
    let q = answer.json.unwrap();
    assert_eq!(
        (q["cooldown"].clone(), q["profile"].clone()),
        (Value::Null, json!("small"))
    );
    for unknown in ["nobody@corp.example", "me", "not a grant"] {
        let path = format!("/v1/quota/{}", unknown.replace(' ', "%20"));
        let answer = admin.expect("GET", "/v1/quota/{grant}", &path, 404).await;
        assert_eq!(error_type(&answer), "not_found_error");
    }
    let rule = Rule::rate_limited(30).path("/messages/send").times(1);
    nylas.add_rule(rule).unwrap();
    assert_eq!(send(gw).await, 429);
    let answer = admin.expect("GET", "/v1/quota/{grant}", &quota, 200).await;
    assert!(answer.json.unwrap()["cooldown"]["remaining_seconds"].as_u64() > Some(0));
    let path = format!("/v1/quota/{DEMO_GRANT_ID}/explain");
    let answer = admin
        .expect("GET", "/v1/quota/{grant}/explain", &path, 200)
        .await;
    assert_eq!(answer.json.unwrap()["reason"], "provider_throttled");
    let cooldown = "/v1/quota/{grant}/cooldown";
    admin
        .expect("DELETE", cooldown, &format!("{quota}/cooldown"), 204)
        .await;
    admin
        .expect("DELETE", cooldown, "/v1/quota/me/cooldown", 404)
        .await;
    admin
        .expect("DELETE", "/v1/quota/{grant}", "/v1/quota/me", 404)
        .await;
}

/// Every shape of an explanation, and the queries it refuses.
async fn explain(admin: &Admin<'_>, gw: &Gateway) {
    let t = "/v1/quota/{grant}/explain";
    let ask = |q: &str| format!("/v1/quota/{DEMO_GRANT_ID}/explain?{q}");
    let reason = |a: Answer| a.json.unwrap()["reason"].as_str().unwrap().to_owned();
    assert_eq!(
        reason(admin.expect("GET", t, &ask(""), 200).await),
        "within_quota"
    );
    let many = admin.expect("GET", t, &ask("recipients=6"), 200).await;
    assert_eq!(reason(many), "too_many_recipients");
    let big = admin.expect("GET", t, &ask("bytes=2000000"), 200).await;
    assert_eq!(reason(big), "message_too_large");
    while send(gw).await == 200 {}
    assert_eq!(
        reason(admin.expect("GET", t, &ask("recipients=1"), 200).await),
        "messages"
    );
    // A scheduled send: refused in the full window around ten minutes from now, admitted
    // two days out; more than a year ahead is a bad question.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let soon = admin
        .expect("GET", t, &ask(&format!("send_at={}", now + 600)), 200)
        .await;
    assert_eq!(reason(soon), "messages");
    let later = ask(&format!("send_at={}", now + 2 * 86_400));
    assert_eq!(
        reason(admin.expect("GET", t, &later, 200).await),
        "within_quota"
    );
    let far = ask(&format!("send_at={}", now + 400 * 86_400));
    admin.expect("GET", t, &far, 400).await;
    for bad in ["send_at=x", "grant=x", "recipients=x", "bytes=-1"] {
        let answer = admin.expect("GET", t, &ask(bad), 400).await;
        assert_eq!(error_type(&answer), "invalid_request_error", "{bad}");
    }
    admin.expect("GET", t, "/v1/quota/me/explain", 404).await;
    let reset = format!("/v1/quota/{DEMO_GRANT_ID}");
    admin
        .expect("DELETE", "/v1/quota/{grant}", &reset, 204)
        .await;
}

/// A client's own quota, and the fleet view's pages.
async fn fleet_and_clients(admin: &Admin<'_>, gw: &Gateway) {
    assert_eq!(send(gw).await, 200);
    let t = "/v1/clients/{name}/quota";
    let answer = admin
        .expect("GET", t, "/v1/clients/billing/quota", 200)
        .await;
    assert_eq!(answer.json.unwrap()["profile"], "own");
    admin.expect("GET", t, "/v1/clients/crm/quota", 404).await;
    admin
        .expect("GET", t, "/v1/clients/nobody/quota", 404)
        .await;
    let answer = admin
        .expect("GET", "/v1/usage", "/v1/usage?limit=1", 200)
        .await;
    let cursor = answer.json.unwrap()["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let next = format!("/v1/usage?limit=1&min_utilization=0&cursor={cursor}");
    admin.expect("GET", "/v1/usage", &next, 200).await;
    let all = admin.expect("GET", "/v1/usage", "/v1/usage", 200).await;
    let page = all.json.unwrap();
    assert_eq!(page["next_cursor"], Value::Null);
    let scopes: BTreeSet<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["scope"].as_str())
        .collect();
    assert!(
        scopes.contains("grant") && scopes.contains("client"),
        "{page}"
    );
    for bad in [
        "limit=0",
        "limit=1001",
        "min_utilization=-1",
        "cursor=zz",
        "grant=x",
    ] {
        let answer = admin
            .expect("GET", "/v1/usage", &format!("/v1/usage?{bad}"), 400)
            .await;
        assert_eq!(error_type(&answer), "invalid_request_error", "{bad}");
    }
}

/// An override set, refused and removed.
async fn profile_changes(admin: &Admin<'_>) {
    let t = "/v1/grants/{grant}/profile";
    let path = format!("/v1/grants/{DEMO_GRANT_ID}/profile");
    let put = |body: Vec<u8>| {
        admin
            .req("PUT", &path)
            .header("content-type", "application/json")
            .body(body)
    };
    let answer = admin
        .send("PUT", t, put(br#"{"profile": "own"}"#.to_vec()))
        .await;
    assert_eq!(
        (answer.status, &answer.json.unwrap()["profile_source"]),
        (200, &json!("override"))
    );
    let quota = admin
        .expect(
            "GET",
            "/v1/quota/{grant}",
            &format!("/v1/quota/{DEMO_GRANT_ID}"),
            200,
        )
        .await;
    assert_eq!(quota.json.unwrap()["profile_source"], "override");
    for bad in [
        &br#"{"profile": "nope"}"#[..],
        br#"{"profile": "own", "x": 1}"#,
        b"own",
    ] {
        let answer = admin.send("PUT", t, put(bad.to_vec())).await;
        assert_eq!(answer.status, 400, "{}", String::from_utf8_lossy(bad));
    }
    let answer = admin.send("PUT", t, put(vec![b' '; 3 << 20])).await;
    assert_eq!(answer.status, 413);
    let me = admin
        .req("PUT", "/v1/grants/me/profile")
        .json(&json!({"profile": "own"}));
    assert_eq!(admin.send("PUT", t, me).await.status, 404);
    admin.expect("DELETE", t, &path, 204).await;
    admin
        .expect("DELETE", t, "/v1/grants/me/profile", 404)
        .await;
}

/// Every operation behind the token, called without it and with a wrong one.
async fn refused_without_the_token(anon: &Admin<'_>, wrong: &Admin<'_>) {
    for (path, methods) in ROUTES {
        let concrete = path
            .replace("{grant}", DEMO_GRANT_ID)
            .replace("{name}", "billing");
        for method in *methods {
            let op = &anon.spec.doc()["paths"][path][method];
            if op["security"].as_array().is_none_or(Vec::is_empty) {
                continue;
            }
            for caller in [anon, wrong] {
                let answer = caller.expect(method, path, &concrete, 401).await;
                assert_eq!(error_type(&answer), "unauthorized");
            }
        }
    }
}

/// The handshake and notifications, signed and not.
async fn webhooks(anon: &Admin<'_>) {
    let t = "/v1/nylas/webhooks";
    let answer = anon
        .expect("GET", t, "/v1/nylas/webhooks?challenge=abc123", 200)
        .await;
    assert_eq!(answer.body, "abc123");
    for bad in [
        "",
        "?challenge=",
        &format!("?challenge={}", "x".repeat(1025)),
    ] {
        let answer = anon.expect("GET", t, &format!("{t}{bad}"), 400).await;
        assert_eq!(error_type(&answer), "invalid_webhook");
    }
    let twice = anon
        .expect("GET", t, "/v1/nylas/webhooks?challenge=a&challenge=b", 400)
        .await;
    assert!(twice.content_type.unwrap().starts_with("text/plain"));
    let post = |body: Vec<u8>, signature: String| {
        anon.req("POST", t)
            .header("x-nylas-signature", signature)
            .body(body)
    };
    let note = br#"{"id":"n-openapi-1","type":"message.created","data":{"object":{}}}"#.to_vec();
    assert_eq!(
        anon.send("POST", t, post(note.clone(), sign(&note)))
            .await
            .status,
        200
    );
    assert_eq!(
        anon.send("POST", t, post(note.clone(), sign(&note)))
            .await
            .status,
        200
    );
    assert_eq!(
        anon.send("POST", t, post(note.clone(), sign(b"other")))
            .await
            .status,
        401
    );
    let junk = b"not json".to_vec();
    assert_eq!(
        anon.send("POST", t, post(junk.clone(), sign(&junk)))
            .await
            .status,
        400
    );
    let huge = vec![b' '; (1 << 20) + 1];
    assert_eq!(
        anon.send("POST", t, post(huge.clone(), sign(&huge)))
            .await
            .status,
        413
    );
}

/// Each route answers each method the spec gives it (not the router's 404 or 405: the
/// answer must be one the spec documents), and 405 for a method it does not.
async fn every_route_answers(admin: &Admin<'_>) {
    for (path, methods) in ROUTES {
        let concrete = path
            .replace("{grant}", DEMO_GRANT_ID)
            .replace("{name}", "billing");
        for method in *methods {
            let answer = admin.send(method, path, admin.req(method, &concrete)).await;
            assert!(
                ![404, 405].contains(&answer.status) || answer.json.is_some(),
                "{method} {path}"
            );
        }
        let other = ["get", "put", "post", "delete", "patch"]
            .into_iter()
            .find(|m| !methods.contains(m))
            .expect("a method the route does not take");
        let resp = admin.req(other, &concrete).send().await.expect("an answer");
        assert_eq!(resp.status(), 405, "{other} {path}");
    }
}

/// With `[upstream] api_key`, a grant look-up Nylas refuses is 502 and one it does not
/// answer in time 504, for every operation taking a grant; no webhook secret is 404.
async fn lookups_that_fail(spec: &Spec) {
    let nylas = fake().await;
    nylas.add_rule(Rule::status(500).path("refused")).unwrap();
    nylas
        .add_rule(Rule::delay(Duration::from_secs(30)).path("slow"))
        .unwrap();
    let toml = gateway_config(&nylas, "timeout = \"1s\"", "")
        .replace(&format!("[webhooks]\nsecret = \"{SECRET}\"\n"), "");
    let gw = Gateway::start(&toml).await;
    let admin = Admin::new(spec, &gw, None);
    for (method, template) in GRANT_OPS {
        for (who, status, error) in [
            ("refused", 502, "upstream_unavailable"),
            ("slow", 504, "upstream_timeout"),
        ] {
            let path = template.replace("{grant}", &format!("{who}@corp.example"));
            let req = admin.req(method, &path).json(&json!({"profile": "own"}));
            let answer = admin.send(method, template, req).await;
            assert_eq!(
                (answer.status, error_type(&answer)),
                (status, error),
                "{method} {path}"
            );
        }
    }
    let t = "/v1/nylas/webhooks";
    let note = br#"{"id":"n1","type":"message.created"}"#.to_vec();
    let req = admin
        .req("POST", t)
        .header("x-nylas-signature", sign(&note))
        .body(note);
    assert_eq!(admin.send("POST", t, req).await.status, 404);
    gw.shutdown().await;
}

/// A Redis store that stops answering (`on_unavailable = "reject"`): not ready, and every
/// operation that reads or writes the store is 503.
async fn store_down(spec: &Spec) {
    let mut redis = RedisServer::start();
    let nylas = fake().await;
    let store = format!("[store]\nbackend = \"redis\"\nurl = \"{}\"\n", redis.url());
    let gw = Gateway::start(&gateway_config(&nylas, "", &store)).await;
    let admin = Admin::new(spec, &gw, None);
    let answer = admin.expect("GET", "/readyz", "/readyz", 200).await;
    assert_eq!(answer.json.unwrap()["store"]["breaker"], "closed");
    redis.stop();
    let answer = admin.expect("GET", "/readyz", "/readyz", 503).await;
    assert_eq!(answer.json.unwrap()["status"], "store_unavailable");
    let mut calls: Vec<(&str, &str, String)> = GRANT_OPS
        .iter()
        .map(|(m, t)| (*m, *t, t.replace("{grant}", DEMO_GRANT_ID)))
        .collect();
    calls.push((
        "GET",
        "/v1/clients/{name}/quota",
        "/v1/clients/billing/quota".into(),
    ));
    calls.push(("GET", "/v1/usage", "/v1/usage".into()));
    for (method, template, path) in calls {
        let req = admin.req(method, &path).json(&json!({"profile": "own"}));
        let answer = admin.send(method, template, req).await;
        assert_eq!(
            (answer.status, error_type(&answer)),
            (503, "quota_unavailable"),
            "{method} {path}"
        );
    }
    let t = "/v1/nylas/webhooks";
    let note = br#"{"id":"n-down","type":"message.created"}"#.to_vec();
    let req = admin
        .req("POST", t)
        .header("x-nylas-signature", sign(&note))
        .body(note);
    assert_eq!(admin.send("POST", t, req).await.status, 503);
    gw.shutdown().await;
}
