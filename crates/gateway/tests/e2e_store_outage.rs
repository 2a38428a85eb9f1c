//! End to end: Redis goes away under a running gateway. The breaker stops the waiting;
//! `reject` answers 503 with `Retry-After` and pulls the replica from its Service; `local`
//! admits exactly its budget, stays ready, and writes what it admitted back to Redis; a
//! reserve whose answer timed out leaves no charge once Redis answers again.

mod common;

use std::time::Duration;

use common::{Gateway, client, config, eventually, fake, message, metric_value};
use fake_nylas::DEMO_GRANT_ID;
use testkit::RedisServer;

fn store(redis: &RedisServer, mode: &str, timeout: &str) -> String {
    format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"{timeout}\"\n\
         on_unavailable = \"{mode}\"\nbreaker_failures = 3\n",
        redis.url()
    )
}

async fn send(gw: &Gateway) -> reqwest::Response {
    let m = message(&["a@example.org"], &[], &[]);
    gw.send_json(&client(), DEMO_GRANT_ID, &m)
        .send()
        .await
        .unwrap()
}

async fn readyz(gw: &Gateway) -> (u16, serde_json::Value) {
    let resp = client()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// The value of an unlabelled sample `name` (0 when absent).
fn plain(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// Messages used for the demo grant, read from Redis itself (a second gateway's view
/// would be the same) once it answers.
async fn used_in_redis(gw: &Gateway) -> u64 {
    gw.used(DEMO_GRANT_ID).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_admits_exactly_its_budget_and_writes_it_back() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), &store(&redis, "local", "1s"))).await;
    for _ in 0..2 {
        assert_eq!(send(&gw).await.status(), 200);
    }
    redis.pause();
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..60 {
        let resp = send(&gw).await;
        match resp.status().as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(resp.headers()["retry-after"], "1");
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // iCloud: 5 % of 1,000 messages a day. The sends that waited out the timeout (until
    // the breaker opened) were admitted from the budget too.
    assert_eq!((ok, refused), (50, 10));
    let metrics = gw.metrics().await;
    assert_eq!(plain(&metrics, "sendgw_local_admissions_total"), 50.0);
    let fast = metric_value(
        &metrics,
        "sendgw_store_duration_seconds_bucket",
        "le=\"0.1\",op=\"reserve\"",
    );
    // Only the sends before the breaker opened waited (1 s each, at most three), and any
    // that happened to be the breaker's once-a-second probe; the rest, the 2 before the
    // pause included, were decided at once (each well under 100 ms). Without the breaker
    // only those 2 would be.
    assert!(
        fast >= 50.0,
        "{fast} reserves decided under 100 ms\n{metrics}"
    );
    let (code, body) = readyz(&gw).await;
    assert_eq!(code, 200, "local mode stays ready: {body}");
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["store"]["up"], false);
    redis.resume();
    let state = gw.state.clone();
    eventually("the local budget is written back", || {
        let state = state.clone();
        async move { state.local.as_ref().unwrap().pending() == 0 }
    })
    .await;
    // 2 before, 50 admitted locally; the three timed-out reserves that Redis ran on
    // waking were given back.
    eventually("Redis holds everything admitted", || async {
        used_in_redis(&gw).await == 52
    })
    .await;
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "sendgw_local_reconciled_units_total",
            "metric=\"messages\""
        ),
        50.0
    );
    assert_eq!(nylas.sends().len(), 52);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_refuses_with_retry_after_and_is_not_ready() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), &store(&redis, "reject", "300ms"))).await;
    assert_eq!(send(&gw).await.status(), 200);
    let (code, body) = readyz(&gw).await;
    assert_eq!((code, body["status"].as_str()), (200, Some("ready")));
    redis.pause();
    for _ in 0..10 {
        let resp = send(&gw).await;
        assert_eq!(resp.headers()["retry-after"], "1");
        common::gateway_error(resp, 503, "quota_unavailable").await;
    }
    let (code, body) = readyz(&gw).await;
    assert_eq!(code, 503, "{body}");
    // Open, or half open while the once-a-second probe is out.
    let breaker = body["store"]["breaker"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(["open", "half_open"].contains(&breaker.as_str()), "{body}");
    assert!(plain(&gw.metrics().await, "sendgw_store_breaker_state") >= 1.0);
    redis.resume();
    eventually("ready again", || async { readyz(&gw).await.0 == 200 }).await;
    assert_eq!(nylas.sends().len(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_refused_while_redis_stalled_past_the_timeout_leave_no_charge() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let mut table = store(&redis, "reject", "200ms");
    // Every send reaches Redis: no breaker in the way of the load.
    table = table.replace("breaker_failures = 3", "breaker_failures = 1000");
    let gw = Gateway::start(&config(&nylas.url(), &table)).await;
    assert_eq!(send(&gw).await.status(), 200);
    redis.pause();
    let load = (0..20).map(|_| {
        let url = gw.url.clone();
        tokio::spawn(async move {
            let m = message(&["b@example.org"], &[], &[]);
            client()
                .post(format!("{url}/v3/grants/{DEMO_GRANT_ID}/messages/send"))
                .bearer_auth(common::TOKEN)
                .json(&m)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    });
    for status in futures_util::future::join_all(load).await {
        assert_eq!(status.unwrap(), 503);
    }
    let timeouts = metric_value(
        &gw.metrics().await,
        "sendgw_decisions_total",
        "outcome=\"store_error\",reason=\"timeout\"",
    );
    assert!(
        timeouts >= 1.0,
        "some reserves were on the wire when Redis stalled"
    );
    redis.resume();
    // Redis runs the stalled reserves on waking; the gateway gives each back by its id.
    eventually("no charge is left for a refused send", || async {
        used_in_redis(&gw).await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(used_in_redis(&gw).await, 1, "and none comes back later");
    assert_eq!(nylas.sends().len(), 1);
    gw.shutdown().await;
}
