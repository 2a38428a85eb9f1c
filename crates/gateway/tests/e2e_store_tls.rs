//! End to end: the gateway counts on a Redis it reaches over TLS (`rediss://`), trusting a
//! private CA from `[store] tls_ca_file`, with a client certificate where the server demands
//! one; without it, sends are refused (`on_unavailable = "reject"`), never let through.

mod common;

use common::{Gateway, client, config, fake, message};
use fake_nylas::DEMO_GRANT_ID;

fn store(redis: &testkit::RedisServer, with_client_cert: bool) -> String {
    let certs = redis.certs().expect("a TLS server");
    let mut table = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntls_ca_file = \"{}\"\n",
        redis.tls_url(),
        certs.ca.display()
    );
    if with_client_cert {
        table.push_str(&format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            certs.client_cert.display(),
            certs.client_key.display()
        ));
    }
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_counted_in_redis_over_mutual_tls() {
    let redis = testkit::RedisServer::start_tls(true);
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), &store(&redis, true))).await;
    let m = message(&["a@example.org", "b@example.org"], &[], &[]);
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &m)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 2));
    // The count is in that Redis (read on its plain port).
    let keys = redis.command(&["KEYS", "sendgw:*"]).unwrap();
    assert!(keys.contains(DEMO_GRANT_ID), "{keys}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_client_certificate_sends_are_refused_not_uncounted() {
    let redis = testkit::RedisServer::start_tls(true);
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), &store(&redis, false))).await;
    let m = message(&["a@example.org"], &[], &[]);
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &m)
        .send()
        .await
        .unwrap();
    common::gateway_error(resp, 503, "quota_unavailable").await;
    assert!(nylas.sends().is_empty());
    gw.shutdown().await;
}
