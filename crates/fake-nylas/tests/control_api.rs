//! The `/__fake/` control API, as a shell script would drive it.

mod common;

use common::{authed, client, parts, start};
use fake_nylas::{DEMO_GRANT_ID, Rule};
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test]
async fn behavior_can_be_forced_listed_and_cleared_over_http() {
    let fake = start().await;
    let client = client();
    let base = fake.url();

    let added = client
        .post(format!("{base}/__fake/behavior"))
        .json(&json!({
            "path_contains": "/messages/send",
            "times": 1,
            "status": 429,
            "headers": {"Retry-After": "30"},
            "error_type": "nylas_rate_limit_exceeded",
            "message": "too many sends",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    let rules: Vec<Rule> = added.json().await.unwrap();
    assert_eq!(rules[0].status, Some(429));

    let send = format!("{base}/v3/grants/{DEMO_GRANT_ID}/messages/send");
    let response = authed(&client, Method::POST, send.clone())
        .json(&json!({"to": [{"email": "a@x.com"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "30");
    let (status, body) = parts(response).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], "nylas_rate_limit_exceeded");

    // A list of rules is accepted too; clearing removes them all.
    let listed = client
        .post(format!("{base}/__fake/behavior"))
        .json(&json!([{"status": 500}, {"delay_ms": 10}]))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.json::<Vec<Value>>().await.unwrap().len(), 2);
    let cleared = client
        .delete(format!("{base}/__fake/behavior"))
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 204);
    assert!(fake.rules().is_empty());

    let invalid = client
        .post(format!("{base}/__fake/behavior"))
        .json(&json!({"status": 429, "retry_after": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), 400);
    let error: Value = invalid.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains("retry_after"));
}

#[tokio::test]
async fn requests_are_listed_without_bodies_and_cleared() {
    let fake = start().await;
    let client = client();
    let base = fake.url();
    authed(
        &client,
        Method::POST,
        format!("{base}/v3/grants/{DEMO_GRANT_ID}/messages/send"),
    )
    .json(&json!({"to": [{"email": "a@x.com"}]}))
    .send()
    .await
    .unwrap();

    let listed: Vec<Value> = client
        .get(format!("{base}/__fake/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "control calls are not recorded");
    let entry = &listed[0];
    assert_eq!(entry["method"], "POST");
    assert_eq!(
        entry["path"],
        format!("/v3/grants/{DEMO_GRANT_ID}/messages/send")
    );
    assert_eq!(entry["complete"], true);
    assert_eq!(entry["send"], "json");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["body_len"], 28);
    assert!(entry.get("body").is_none());
    assert_eq!(entry["headers"]["content-type"], "application/json");

    let with_bodies: Vec<Value> = client
        .get(format!("{base}/__fake/requests?bodies=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(with_bodies[0]["body"], r#"{"to":[{"email":"a@x.com"}]}"#);

    let sends: Vec<Value> = client
        .get(format!("{base}/__fake/sends"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sends.len(), 1);

    let cleared = client
        .delete(format!("{base}/__fake/requests"))
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 204);
    assert!(fake.requests().is_empty());

    let stats: Value = client
        .get(format!("{base}/__fake/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["sends"], 1);
}

#[tokio::test]
async fn grants_tokens_drafts_and_config_are_set_over_http() {
    let fake = start().await;
    let client = client();
    let base = fake.url();

    let grant: Value = client
        .post(format!("{base}/__fake/grants"))
        .json(&json!({"id": "g-ext", "email": "ext@corp.example", "provider": "microsoft", "external_id": "crm-42"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(grant["grant_status"], "valid");
    let (status, body) = parts(
        authed(
            &client,
            Method::GET,
            format!("{base}/v3/grants/external:crm-42"),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((status, body["data"]["id"].as_str()), (200, Some("g-ext")));

    let token = client
        .post(format!("{base}/__fake/tokens"))
        .json(&json!({"token": "tok-ext", "grant_id": "ext@corp.example"}))
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), 204);
    let me = client
        .get(format!("{base}/v3/grants/me"))
        .bearer_auth("tok-ext")
        .send()
        .await
        .unwrap();
    assert_eq!(parts(me).await.1["data"]["id"], "g-ext");

    let draft = client
        .post(format!("{base}/__fake/drafts"))
        .json(&json!({"grant_id": "g-ext", "draft_id": "d1", "draft": {"to": [{"email": "a@x.com"}]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(draft.status(), 201);
    let read = authed(
        &client,
        Method::GET,
        format!("{base}/v3/grants/g-ext/drafts/d1"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(parts(read).await.0, 200);

    let config: Value = client
        .post(format!("{base}/__fake/config"))
        .json(&json!({"record_bodies": false, "record_limit": 10, "api_key": "secret"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        config,
        json!({"record_bodies": false, "record_limit": 10, "api_key": "secret"})
    );
    let typo = client
        .post(format!("{base}/__fake/config"))
        .json(&json!({"record_body": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(typo.status(), 400);

    let reset = client
        .post(format!("{base}/__fake/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 204);
    let grants: Vec<Value> = client
        .get(format!("{base}/__fake/grants"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0]["id"], DEMO_GRANT_ID);
    let config: Value = client
        .get(format!("{base}/__fake/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["api_key"], Value::Null);
}
