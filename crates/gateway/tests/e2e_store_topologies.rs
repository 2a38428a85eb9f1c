//! End to end: the gateway counts on a password-protected Redis Cluster given several seeds
//! (plain and over TLS), and on a Sentinel-managed primary (plain and over TLS), through a
//! failover, without a restart. Each topology is started by the test from `redis-server` on free ports.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, client, config, eventually, fake, message};
use fake_nylas::DEMO_GRANT_ID;
use testkit::{RedisCluster, RedisSentinelSet};

const PASSWORD: &str = "e2e-pw";

fn cluster_store(cluster: &RedisCluster, scheme: &str) -> String {
    let seeds: Vec<String> = cluster
        .ports()
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let mut table = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{scheme}://:{PASSWORD}@{}\"\n",
        seeds.join(",")
    );
    if let Some(certs) = cluster.certs() {
        table.push_str(&format!("tls_ca_file = \"{}\"\n", certs.ca.display()));
    }
    table
}

/// Sends one message to two recipients; true when it went out.
async fn send_one(gw: &Gateway) -> bool {
    let m = message(&["a@example.org", "b@example.org"], &[], &[]);
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &m)
        .send()
        .await
        .unwrap();
    match resp.status().as_u16() {
        200 => true,
        503 => false,
        other => panic!("unexpected status {other}: {}", resp.text().await.unwrap()),
    }
}

/// The keys that hold the demo grant's counts, on any node.
fn grant_keys(cluster: &RedisCluster) -> String {
    (0..cluster.ports().len())
        .map(|i| cluster.command(i, &["KEYS", "sendgw:*"]).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_counted_on_a_password_protected_cluster_given_several_seeds() {
    let cluster = RedisCluster::start(Some(PASSWORD));
    let nylas = fake().await;
    let gw = Gateway::start(&config(
        &nylas.url(),
        &cluster_store(&cluster, "redis+cluster"),
    ))
    .await;
    assert!(send_one(&gw).await, "a send through the cluster");
    assert!(send_one(&gw).await, "a second send");
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (2, 4));
    assert!(grant_keys(&cluster).contains(DEMO_GRANT_ID));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_counted_on_a_cluster_over_tls() {
    let cluster = RedisCluster::start_tls(Some(PASSWORD));
    let nylas = fake().await;
    let gw = Gateway::start(&config(
        &nylas.url(),
        &cluster_store(&cluster, "rediss+cluster"),
    ))
    .await;
    assert!(send_one(&gw).await, "a send through the TLS cluster");
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 2));
    assert!(grant_keys(&cluster).contains(DEMO_GRANT_ID));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_counted_through_sentinel_and_after_a_failover() {
    let set = RedisSentinelSet::start("mymaster", Some(PASSWORD), Some("watch-pw"));
    counted_through_a_failover(set).await;
}

/// As above with every sentinel and data node over TLS only (`rediss+sentinel://`, the
/// private CA in `tls_ca_file`): the sentinels are asked over TLS, the primary they name
/// is reached over TLS, before and after the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_counted_through_sentinel_over_tls_and_after_a_failover() {
    let set = RedisSentinelSet::start_tls("mymaster", Some(PASSWORD), Some("watch-pw"));
    assert!(set.url().starts_with("rediss+sentinel://"), "{}", set.url());
    counted_through_a_failover(set).await;
}

/// A gateway on `set` counts a send, follows a failover by itself (refusing, never letting
/// through uncounted, until it has), and the new primary holds every charge.
async fn counted_through_a_failover(set: RedisSentinelSet) {
    let nylas = fake().await;
    let mut store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\nsentinel_password = \"watch-pw\"\n",
        set.url()
    );
    if let Some(certs) = set.certs() {
        store.push_str(&format!("tls_ca_file = \"{}\"\n", certs.ca.display()));
    }
    let gw = Gateway::start(&config(&nylas.url(), &store)).await;
    assert!(send_one(&gw).await, "a send through Sentinel");
    let before = set.master_port();
    let set = tokio::task::spawn_blocking(move || {
        set.failover();
        set
    })
    .await
    .unwrap();
    assert_ne!(set.master_port(), before);
    // The gateway finds the new primary by itself; until then a send is refused (503),
    // never let through uncounted.
    let start = Instant::now();
    let mut sent = 1;
    while sent < 3 {
        // Generous: the sentinels' own view settles first, and this machine may be busy.
        assert!(start.elapsed() < Duration::from_secs(45), "no new primary");
        if send_one(&gw).await {
            sent += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(nylas.sends().len(), 3);
    // A send refused while the new primary had no replica to acknowledge its charge (WAIT)
    // is given back once the store answers pings again (within a second or so), not at
    // once: until then it may still count.
    eventually("the new primary counts all three and no more", || async {
        gw.used(DEMO_GRANT_ID).await == (3, 6)
    })
    .await;
    let keys = set
        .data_command(set.master_port(), &["KEYS", "sendgw:*"])
        .unwrap();
    assert!(keys.contains(DEMO_GRANT_ID), "{keys}");
    gw.shutdown().await;
}
