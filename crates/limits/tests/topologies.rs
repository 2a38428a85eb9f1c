//! What only a real Cluster or Sentinel set shows: hash tags keep a grant in one slot, a
//! killed node is survived, scripts come back after `SCRIPT FLUSH`, and a Sentinel failover
//! under load loses no admitted charge. The shared contract runs on both topologies through
//! `contract!` (see `common`); these tests are the rest.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use limits::{
    Cost, Decision, Metric, Profile, ProfileSpec, QuotaStore, RedisConfig, RedisStore, StoreError,
    WindowSpec,
};
use testkit::{RedisCluster, RedisSentinelSet};

const PASSWORD: &str = "topo-pw";

fn daily(messages: u64) -> Profile {
    ProfileSpec::default()
        .window(
            WindowSpec::rolling(Duration::from_secs(86_400))
                .buckets(24)
                .messages(messages),
        )
        .build("daily")
        .unwrap()
}

fn one() -> Cost {
    Cost {
        messages: 1,
        recipients: 1,
        bytes: 100,
    }
}

async fn messages_used(store: &dyn QuotaStore, scope: &str, p: &Profile) -> u64 {
    let usage = store.usage(scope, p).await.expect("usage");
    usage.windows[0].used.get(Metric::Messages)
}

/// Every key of the store, by node.
fn keys_by_node(cluster: &RedisCluster, prefix: &str) -> Vec<Vec<String>> {
    (0..cluster.ports().len())
        .map(|i| {
            let reply = cluster
                .command(i, &["KEYS", &format!("{prefix}:*")])
                .expect("KEYS");
            reply
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with(prefix))
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grants_keys_share_one_slot_and_scripts_return_after_a_flush() {
    let cluster = RedisCluster::start(Some(PASSWORD));
    let cfg = RedisConfig {
        key_prefix: "slots".into(),
        ..common::cluster_config(&cluster, PASSWORD)
    };
    let store = RedisStore::connect(&cfg).await.expect("connect");
    let p = daily(100);
    let scopes: Vec<String> = (0..24).map(|i| format!("grant-{i}")).collect();
    for s in &scopes {
        let d = store.reserve(s, &p, one(), Some(&format!("{s}-k"))).await;
        assert!(matches!(d, Ok(Decision::Allowed(_))), "{s}: {d:?}");
    }
    // Each scope's keys (window, index, idempotency record, reservation record) on one node.
    let mut nodes_of: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for (node, keys) in keys_by_node(&cluster, "slots").iter().enumerate() {
        for k in keys {
            let scope = k
                .split('{')
                .nth(1)
                .and_then(|r| r.split('}').next())
                .unwrap();
            nodes_of.entry(scope.to_owned()).or_default().insert(node);
        }
    }
    assert_eq!(nodes_of.len(), scopes.len(), "{nodes_of:?}");
    assert!(nodes_of.values().all(|n| n.len() == 1), "{nodes_of:?}");
    let used: BTreeSet<usize> = nodes_of.values().flatten().copied().collect();
    assert!(used.len() > 1, "24 grants all on one node: {nodes_of:?}");

    for i in 0..cluster.ports().len() {
        cluster.command(i, &["SCRIPT", "FLUSH"]).expect("flush");
    }
    for s in &scopes {
        let d = store.reserve(s, &p, one(), None).await;
        assert!(
            matches!(d, Ok(Decision::Allowed(_))),
            "after flush {s}: {d:?}"
        );
        assert_eq!(messages_used(&store, s, &p).await, 2);
    }
}

/// Reserves on `scope` until it answers, for at most `limit`.
async fn reserve_until_up(store: &RedisStore, scope: &str, p: &Profile, limit: Duration) {
    let start = Instant::now();
    loop {
        match store.reserve(scope, p, one(), None).await {
            Ok(Decision::Allowed(_)) => return,
            Ok(d) => panic!("{scope}: {d:?}"),
            Err(e) if start.elapsed() < limit => {
                eprintln!("{scope} not yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{scope} still failing after {limit:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cluster_node_is_survived_and_keeps_its_counts() {
    let mut cluster = RedisCluster::start(Some(PASSWORD));
    let cfg = RedisConfig {
        key_prefix: "kill".into(),
        timeout: Duration::from_millis(500),
        ..common::cluster_config(&cluster, PASSWORD)
    };
    let store = RedisStore::connect(&cfg).await.expect("connect");
    let p = daily(100);
    let scopes: Vec<String> = (0..12).map(|i| format!("g{i}")).collect();
    for s in &scopes {
        reserve_until_up(&store, s, &p, Duration::from_secs(1)).await;
    }
    let victim = cluster.node_for_key(&format!("kill:{{{}}}:k", scopes[0]));
    let (down, up): (Vec<&String>, Vec<&String>) = scopes
        .iter()
        .partition(|s| cluster.node_for_key(&format!("kill:{{{s}}}:k")) == victim);
    cluster.stop_node(victim);
    // Grants on the other nodes go on; those on the dead node fail as an outage, never as an
    // admission.
    for s in &up {
        reserve_until_up(&store, s, &p, Duration::from_secs(10)).await;
    }
    for s in &down {
        match store.reserve(s, &p, one(), None).await {
            Err(StoreError::Unavailable(_) | StoreError::Timeout(_)) => {}
            other => panic!("{s} on a dead node: {other:?}"),
        }
    }
    cluster.start_node(victim);
    for s in &scopes {
        reserve_until_up(&store, s, &p, Duration::from_secs(20)).await;
    }
    // The restarted node kept what it had counted (its AOF), and nothing was counted twice.
    for s in &up {
        assert_eq!(messages_used(&store, s, &p).await, 3, "{s}");
    }
    for s in &down {
        assert_eq!(messages_used(&store, s, &p).await, 2, "{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_loses_no_admitted_charge() {
    let set = RedisSentinelSet::start("mymaster", Some(PASSWORD), Some("sentinel-secret"));
    let cfg = RedisConfig {
        key_prefix: "failover".into(),
        timeout: Duration::from_millis(500),
        ..common::sentinel_config(&set, Some("sentinel-secret"))
    };
    let store = Arc::new(RedisStore::connect(&cfg).await.expect("connect"));
    let limit = 600;
    let p = daily(limit);
    let admitted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_master = set.master_port();
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (store, p) = (Arc::clone(&store), p.clone());
            let (admitted, failed) = (Arc::clone(&admitted), Arc::clone(&failed));
            tokio::spawn(async move {
                for _ in 0..200 {
                    match store.reserve("g", &p, one(), None).await {
                        Ok(Decision::Allowed(_)) => admitted.fetch_add(1, Ordering::SeqCst),
                        Ok(Decision::Denied(_)) => 0,
                        Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    while admitted.load(Ordering::SeqCst) < 100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let set = tokio::task::spawn_blocking(move || {
        set.failover();
        set
    })
    .await
    .unwrap();
    for task in load {
        task.await.unwrap();
    }
    assert_ne!(set.master_port(), first_master, "the primary moved");
    // Settle what was answered as an outage, then read the new primary.
    store
        .ping()
        .await
        .expect("the store follows the new primary");
    let admitted = admitted.load(Ordering::SeqCst);
    let used = messages_used(store.as_ref(), "g", &p).await;
    eprintln!(
        "admitted {admitted}, failed {}, counted {used}",
        failed.load(Ordering::SeqCst)
    );
    assert!(
        admitted <= limit,
        "admitted {admitted} past the limit {limit}"
    );
    assert!(
        used >= admitted,
        "the new primary counts {used} of {admitted} admitted"
    );
    assert_eq!(used, admitted, "failed reserves were given back");
}
