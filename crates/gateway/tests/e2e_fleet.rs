//! End to end: the fleet view, `GET /v1/usage`, on both stores with 1,000 grants sending
//! through the proxy: the threshold, busiest-first order, pagination, and entries that
//! go stale when a grant's usage falls.

mod common;

use std::collections::{HashMap, HashSet};

use common::{Gateway, client, config, fake, message};
use fake_nylas::Grant;
use futures_util::StreamExt;
use serde_json::{Value, json};
use testkit::RedisServer;

const GRANTS: usize = 1000;

/// One window of 100 recipients: a grant sending `r` recipients is at `r / 100`.
const PROFILE: &str = "[grants]\ndefault_profile = \"fleet\"\n[profiles.fleet]\n\
    [[profiles.fleet.windows]]\nperiod = \"1h\"\nmessages = 1000\nrecipients = 100\n";

/// Grant `i`'s recipients: 1 to 100, about ten grants at each.
fn recipients(i: usize) -> usize {
    1 + (i * 37) % 100
}

/// 1,000 grants, each sending one message of [`recipients`] through the proxy; returns
/// each grant's id and recipient count.
async fn send_all(gw: &Gateway, nylas: &fake_nylas::FakeNylas) -> HashMap<String, usize> {
    let grants: Vec<(String, usize)> = (0..GRANTS)
        .map(|i| {
            let id = nylas.add_grant(Grant::new(format!("f{i}@corp.example"))).id;
            (id, recipients(i))
        })
        .collect();
    let c = client();
    let sends = futures_util::stream::iter(grants.iter().map(|(id, r)| {
        let to: Vec<String> = (0..*r).map(|k| format!("r{k}@x.example")).collect();
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        let req = gw.send_json(&c, id, &message(&to, &[], &[]));
        async move { req.send().await.expect("an answer").status().as_u16() }
    }))
    .buffer_unordered(16)
    .collect::<Vec<u16>>()
    .await;
    assert!(sends.iter().all(|&s| s == 200), "every send admitted");
    grants.into_iter().collect()
}

/// Every page of `/v1/usage?min_utilization=min&limit=limit`, in order.
async fn pages(gw: &Gateway, min: f64, limit: usize) -> Vec<Vec<Value>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/usage?min_utilization={min}&limit={limit}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let resp = gw.admin_get(&path).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let body: Value = resp.json().await.unwrap();
        out.push(body["data"].as_array().unwrap().clone());
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
        assert!(out.len() <= GRANTS, "pagination ends");
    }
}

/// The fleet view lists exactly the grants at or above `min`, busiest first, each once,
/// with the utilization their sends give, in full pages but the last.
fn check_listing(pages: &[Vec<Value>], sent: &HashMap<String, usize>, min: f64, limit: usize) {
    for p in &pages[..pages.len() - 1] {
        assert_eq!(p.len(), limit, "only the last page is short");
    }
    let rows: Vec<&Value> = pages.iter().flatten().collect();
    let listed: Vec<(String, f64)> = rows
        .iter()
        .map(|r| {
            assert_eq!(r["scope"], "grant", "{r}");
            assert_eq!(r["profile"], "fleet", "{r}");
            let id = r["id"].as_str().unwrap().to_owned();
            let used = r["windows"][0]["recipients"]["used"].as_u64().unwrap();
            assert_eq!(used as usize, sent[&id], "{r}");
            (id, r["utilization"].as_f64().unwrap())
        })
        .collect();
    let ids: HashSet<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), listed.len(), "no grant is listed twice");
    let expected: HashSet<&str> = sent
        .iter()
        .filter(|(_, r)| **r as f64 / 100.0 >= min)
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(ids, expected, "exactly the grants at or above {min}");
    for (id, u) in &listed {
        assert_eq!(*u, sent[id] as f64 / 100.0, "{id}");
    }
    for pair in listed.windows(2) {
        assert!(pair[0].1 >= pair[1].1, "busiest first: {pair:?}");
    }
}

async fn fleet_view(store: &str) -> (fake_nylas::FakeNylas, HashMap<String, usize>) {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), &format!("{store}{PROFILE}"))).await;
    let sent = send_all(&gw, &nylas).await;

    let all = pages(&gw, 0.0, 100).await;
    assert_eq!(all.len(), 10, "1,000 grants in pages of 100");
    check_listing(&all, &sent, 0.0, 100);
    // Pages of 25 end inside runs of grants at one utilization (ten grants each).
    let busy = pages(&gw, 0.8, 25).await;
    check_listing(&busy, &sent, 0.8, 25);
    assert_eq!(
        busy.iter().flatten().count(),
        210,
        "21 recipient counts from 80 to 100"
    );

    // A grant whose usage falls (reset here; sends ageing out are the same to the index)
    // leaves the view, though the index still holds its old bound.
    let top = busy[0][0]["id"].as_str().unwrap().to_owned();
    let resp = client()
        .delete(format!("{}/v1/quota/{top}", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let mut after = sent.clone();
    after.remove(&top);
    check_listing(&pages(&gw, 0.8, 25).await, &after, 0.8, 25);
    check_listing(&pages(&gw, 0.0, 1000).await, &after, 0.0, 1000);
    gw.shutdown().await;
    (nylas, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_view_of_1000_grants_in_memory() {
    fleet_view("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_view_of_1000_grants_in_redis() {
    let redis = RedisServer::start();
    let store = common::redis_store(&redis);
    let (nylas, sent) = fleet_view(&store).await;
    // Another replica on the same Redis sees the same fleet.
    let other = Gateway::start(&config(&nylas.url(), &format!("{store}{PROFILE}"))).await;
    check_listing(&pages(&other, 0.5, 100).await, &sent, 0.5, 100);
}

#[tokio::test]
async fn bad_queries_are_refused() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    for q in [
        "limit=0",
        "limit=1001",
        "min_utilization=-0.5",
        "min_utilization=x",
        "cursor=nothex",
        "grant=a",
    ] {
        let resp = gw
            .admin_get(&format!("/v1/usage?{q}"))
            .send()
            .await
            .unwrap();
        let body = common::gateway_error(resp, 400, "invalid_request_error").await;
        assert!(body["error"]["message"].is_string(), "{q}: {body}");
    }
}

#[tokio::test]
async fn clients_with_a_profile_are_listed_beside_their_grants() {
    let nylas = fake().await;
    let token = "fleet-client-token";
    let digest: String = gateway::config::token_digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let rest = format!(
        "api_key = \"nyk_gateway\"\n{PROFILE}\
         [profiles.app]\n[[profiles.app.windows]]\nperiod = \"1d\"\nmessages = 4\n\
         [[clients]]\nname = \"billing\"\ntoken_sha256 = \"{digest}\"\nprofile = \"app\"\n"
    );
    let gw = Gateway::start(&config(&nylas.url(), &rest)).await;
    let c = client();
    for _ in 0..3 {
        let resp = c
            .post(format!(
                "{}/v3/grants/{}/messages/send",
                gw.url,
                fake_nylas::DEMO_GRANT_ID
            ))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(message(&["a@x.example"], &[], &[]).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let rows: Vec<Value> = pages(&gw, 0.0, 10).await.concat();
    let seen: Vec<(&str, &str, f64)> = rows
        .iter()
        .map(|r| {
            let scope = r["scope"].as_str().unwrap();
            (
                scope,
                r["profile"].as_str().unwrap(),
                r["utilization"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("client", "app", 0.75), ("grant", "fleet", 0.03)],
        "the client at 3 of 4 messages, then the grant at 3 of 100 recipients"
    );
    assert_eq!(rows[0]["id"], "billing");
}

/// A limit lowered by a reload puts a grant over it without any new charge: its next
/// (refused) send puts it in the view, at its figure under the new limit.
#[tokio::test]
async fn a_grant_over_a_lowered_limit_shows_with_its_next_attempt() {
    let nylas = fake().await;
    let toml = config(&nylas.url(), PROFILE);
    let gw = Gateway::start(&toml).await;
    let c = client();
    let sixty: Vec<String> = (0..60).map(|k| format!("r{k}@x.example")).collect();
    let sixty: Vec<&str> = sixty.iter().map(String::as_str).collect();
    let grant = fake_nylas::DEMO_GRANT_ID;
    let resp = gw
        .send_json(&c, grant, &message(&sixty, &[], &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(pages(&gw, 0.8, 10).await.concat().is_empty(), "at 60 %");
    let lowered = toml.replace("recipients = 100", "recipients = 50");
    gw.state
        .reload(gateway::config::Config::from_toml_str(&lowered).unwrap());
    let one = message(&["a@x.example"], &[], &[]);
    let resp = gw.send_json(&c, grant, &one).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let rows = pages(&gw, 0.8, 10).await.concat();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (&rows[0]["id"], &rows[0]["utilization"]),
        (&json!(grant), &json!(1.2))
    );
}
