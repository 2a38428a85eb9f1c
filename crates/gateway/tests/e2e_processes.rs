//! End to end with the real binary: two gateway processes sharing one Redis enforce one
//! quota exactly under concurrent load.

mod common;

use common::{Process, TOKEN, client, fake, simple};
use fake_nylas::DEMO_GRANT_ID;
use futures_util::future::join_all;
use serde_json::Value;
use testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_redis_let_exactly_the_quota_through() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
url = "{nylas}"
timeout = "30s"

[store]
backend = "redis"
url = "{redis}"
timeout = "5s"

[grants]
default_profile = "hundred"

[profiles.hundred]
[[profiles.hundred.windows]]
period = "24h"
messages = 100
"#,
        nylas = nylas.url(),
        redis = redis.url(),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, toml).expect("write config");
    let gateways = [Process::spawn(&path), Process::spawn(&path)];
    assert_ne!(gateways[0].url, gateways[1].url);

    let c = client();
    let sends = (0..300).map(|i| {
        let gw = &gateways[i % 2];
        let req = c
            .post(format!(
                "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
                gw.url
            ))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(simple().to_string());
        async move {
            let resp = req.send().await.expect("an answer");
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("a JSON body");
            (status, body)
        }
    });
    let answers = join_all(sends).await;

    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let denied = answers
        .iter()
        .filter(|(s, b)| *s == 429 && b["error"]["type"] == "quota_exceeded")
        .count();
    let others: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s != 200 && *s != 429)
        .take(3)
        .collect();
    assert!(others.is_empty(), "unexpected answers: {others:?}");
    assert_eq!((ok, denied), (100, 200), "exactly the quota went through");
    assert_eq!(
        nylas.sends().len(),
        100,
        "the fake received exactly 100 sends"
    );
    assert_eq!(nylas.delivered().len(), 100);

    for gw in &gateways {
        let q: Value = c
            .get(format!("{}/v1/quota/{DEMO_GRANT_ID}", gw.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(q["profile"], "hundred");
        assert_eq!(q["windows"][0]["messages"]["used"], 100, "{q}");
        assert_eq!(q["windows"][0]["messages"]["remaining"], 0, "{q}");
    }
}
