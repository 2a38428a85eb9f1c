//! Grant and domain identifiers end to end: every spelling of one grant id or one
//! sending domain shares one quota, and a path segment that names no grant is refused
//! before anything is counted or forwarded.

mod common;

use common::*;
use fake_nylas::DEMO_GRANT_ID;
use gateway::scope::Scope;
use testkit::RedisServer;

/// Every spelling of the demo grant's id Nylas reads.
fn spellings() -> Vec<String> {
    let upper = DEMO_GRANT_ID.to_ascii_uppercase();
    let simple = DEMO_GRANT_ID.replace('-', "");
    vec![
        DEMO_GRANT_ID.to_owned(),
        upper.clone(),
        format!("%7B{upper}%7D"),
        simple.to_ascii_uppercase(),
        format!("grant:{simple}"),
        format!("grant:%7B{DEMO_GRANT_ID}%7D"),
    ]
}

#[tokio::test]
async fn every_spelling_of_a_grant_id_shares_one_quota() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let c = client();
    let forms = spellings();
    for form in &forms {
        let resp = gw.send_json(&c, form, &simple()).send().await.unwrap();
        let status = resp.status();
        assert_eq!(status, 200, "{form}: {}", resp.text().await.unwrap());
    }
    let n = forms.len() as u64;
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (n, n));
    // The admin API reads the same quota through any spelling.
    assert_eq!(gw.used(&DEMO_GRANT_ID.replace('-', "")).await, (n, n));
    assert_eq!(nylas.delivered().len(), forms.len());
}

#[tokio::test]
async fn an_identifier_that_names_no_grant_is_refused_uncounted_and_unsent() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let store = format!("[store]\nbackend = \"redis\"\nurl = \"{}\"\n", redis.url());
    let gw = Gateway::start(&config(&nylas.url(), &store)).await;
    let c = client();
    let simple_id = DEMO_GRANT_ID.replace('-', "");
    let bogus = [
        "plainid".to_owned(),
        "grant:abc".to_owned(),
        "grant:me".to_owned(),
        "other:thing".to_owned(),
        "email:".to_owned(),
        format!("urn:uuid:{DEMO_GRANT_ID}"),
        format!("%20{DEMO_GRANT_ID}"),
        format!("{DEMO_GRANT_ID}x"),
        format!("%7B{simple_id}%7D"),
    ];
    for form in &bogus {
        let resp = gw.send_json(&c, form, &simple()).send().await.unwrap();
        gateway_error(resp, 400, "invalid_send_request").await;
        let draft = c
            .post(format!("{}/v3/grants/{form}/drafts/d1", gw.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        gateway_error(draft, 400, "invalid_send_request").await;
    }
    let requests = nylas.requests();
    assert!(
        requests.is_empty(),
        "neither a look-up nor a send reached Nylas: {requests:?}"
    );
    assert_eq!(redis_keys(&redis), Vec::<String>::new(), "no store key");
}

#[tokio::test]
async fn spellings_of_one_domain_share_one_quota() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "[domains]\nprofile = \"icloud\"\n")).await;
    let c = client();
    let forms = [
        "example.com",
        "Example.com.",
        "%20example.com",
        "EXAMPLE.COM.%20",
    ];
    for form in forms {
        let resp = c
            .post(format!("{}/v3/domains/{form}/messages/send", gw.url))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(simple().to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        assert_eq!(status, 200, "{form}: {}", resp.text().await.unwrap());
    }
    let config = gw.state.config();
    let profile = config.domain_profile().expect("a domain profile");
    let usage = gw
        .state
        .store
        .usage(Scope::domain("example.com").as_str(), profile)
        .await
        .expect("usage");
    let used = &usage.windows[0].used;
    assert_eq!((used.messages, used.recipients), (4, 4));
    // The path went upstream as the client wrote it.
    let paths: Vec<_> = nylas.sends().into_iter().map(|r| r.path).collect();
    assert!(
        paths.contains(&"/v3/domains/Example.com./messages/send".to_owned()),
        "{paths:?}"
    );
    // A domain that is only whitespace and dots names nothing.
    let resp = c
        .post(format!("{}/v3/domains/%20.%20/messages/send", gw.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(simple().to_string())
        .send()
        .await
        .unwrap();
    gateway_error(resp, 400, "invalid_send_request").await;
    assert_eq!(nylas.sends().len(), forms.len());
}
