//! Builds the two backends for the shared contract suite.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use limits::{
    FakeClock, MemoryOptions, MemoryStore, QuotaStore, RedisConfig, RedisStore, RedisTls,
};
use testkit::{RedisCluster, RedisSentinelSet, RedisServer};

/// 2026-03-01T00:00:00Z, a bucket boundary for every bucket width used here.
pub const T0: u64 = 1_772_323_200_000;

/// A store under test with the clock that drives it.
pub struct Harness {
    pub store: Arc<dyn QuotaStore>,
    pub clock: FakeClock,
    pub redis: Option<RedisServer>,
    /// How to open a second connection to the same Redis data.
    pub config: Option<RedisConfig>,
    /// The journal directory of a persistent memory store, removed with the harness.
    pub dir: Option<Arc<tempfile::TempDir>>,
}

impl Harness {
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// A second store on the same data (a second connection, or the same memory store).
    pub async fn second(&self) -> Arc<dyn QuotaStore> {
        match &self.config {
            Some(cfg) => Arc::new(store_from(cfg, &self.clock).await),
            None => Arc::clone(&self.store),
        }
    }
}

pub fn memory() -> Harness {
    let clock = FakeClock::new(T0);
    Harness {
        store: Arc::new(MemoryStore::with_clock(clock.clone())),
        clock,
        redis: None,
        config: None,
        dir: None,
    }
}

/// A memory store keeping a journal, compacted every few kilobytes so that the contract
/// also runs across compactions.
pub fn memory_journal() -> Harness {
    let clock = FakeClock::new(T0);
    let dir = tempfile::tempdir().expect("tempdir");
    let options = MemoryOptions {
        path: Some(dir.path().to_owned()),
        compact_at_bytes: 4096,
        ..MemoryOptions::default()
    };
    let store = MemoryStore::open_with_clock(&options, clock.clone()).expect("open");
    Harness {
        store: Arc::new(store),
        clock,
        redis: None,
        config: None,
        dir: Some(Arc::new(dir)),
    }
}

/// A store on `server`: over TLS (trusting the server's private CA) when it was started
/// with TLS.
pub async fn redis_store(server: &RedisServer, clock: &FakeClock) -> RedisStore {
    store_from(&config_for(server), clock).await
}

/// How to reach `server`: over TLS (trusting its private CA) when it was started with TLS.
pub fn config_for(server: &RedisServer) -> RedisConfig {
    match server.certs() {
        Some(certs) => RedisConfig {
            url: server.tls_url(),
            timeout: Duration::from_secs(2),
            tls: RedisTls {
                ca_pem: Some(std::fs::read(&certs.ca).expect("ca")),
                ..RedisTls::default()
            },
            ..RedisConfig::default()
        },
        None => RedisConfig {
            url: server.url(),
            timeout: Duration::from_secs(2),
            ..RedisConfig::default()
        },
    }
}

/// A store on `cfg` whose script reads `clock` instead of Redis `TIME`.
pub async fn store_from(cfg: &RedisConfig, clock: &FakeClock) -> RedisStore {
    RedisStore::connect(cfg)
        .await
        .expect("connect to test redis")
        .with_clock_override(clock.clone())
}

/// A password-protected three-master cluster, reached through every seed.
pub fn cluster_config(cluster: &RedisCluster, password: &str) -> RedisConfig {
    let seeds: Vec<String> = cluster
        .ports()
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    RedisConfig {
        url: format!("redis+cluster://:{password}@{}", seeds.join(",")),
        timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    }
}

/// A Sentinel-managed primary, found through its sentinels.
pub fn sentinel_config(set: &RedisSentinelSet, sentinel_password: Option<&str>) -> RedisConfig {
    RedisConfig {
        url: set.url(),
        timeout: Duration::from_secs(2),
        sentinel_password: sentinel_password.map(str::to_owned),
        ..RedisConfig::default()
    }
}

/// A harness on a shared topology: a fresh key prefix keeps each test's keys apart.
pub async fn on_topology(cfg: &RedisConfig, test: &str) -> Harness {
    let clock = FakeClock::new(T0);
    let cfg = RedisConfig {
        key_prefix: format!("t-{test}"),
        ..cfg.clone()
    };
    Harness {
        store: Arc::new(store_from(&cfg, &clock).await),
        clock,
        redis: None,
        config: Some(cfg),
        dir: None,
    }
}

pub async fn redis() -> Harness {
    redis_on(RedisServer::start()).await
}

/// The Redis backend over `rediss://`.
pub async fn redis_tls() -> Harness {
    redis_on(RedisServer::start_tls(false)).await
}

async fn redis_on(server: RedisServer) -> Harness {
    let clock = FakeClock::new(T0);
    let config = config_for(&server);
    let store = store_from(&config, &clock).await;
    Harness {
        store: Arc::new(store),
        clock,
        redis: Some(server),
        config: Some(config),
        dir: None,
    }
}

/// Runs each named `async fn(Harness)` of the calling file on every backend: in
/// `memory_backend`, `redis_backend` and `redis_tls_backend` test modules.
#[allow(unused_macros)] // not every test file runs the contract
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::memory()).await;
                }
            )*
        }
        mod memory_journal_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::memory_journal()).await;
                }
            )*
        }
        mod redis_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::redis().await).await;
                }
            )*
        }
        mod redis_tls_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::redis_tls().await).await;
                }
            )*
        }
        // One cluster and one Sentinel set for the whole suite (each test under its own key
        // prefix), since starting a topology costs seconds.
        mod redis_cluster_backend {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn whole_contract() {
                let cluster = testkit::RedisCluster::start(Some("cluster-pw"));
                let cfg = super::common::cluster_config(&cluster, "cluster-pw");
                $(
                    eprintln!("contract on a cluster: {}", stringify!($name));
                    let h = super::common::on_topology(&cfg, stringify!($name)).await;
                    super::$name(h).await;
                )*
            }
        }
        mod redis_sentinel_backend {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn whole_contract() {
                let set = testkit::RedisSentinelSet::start("mymaster", Some("data-pw"), Some("sentinel-pw"));
                let cfg = super::common::sentinel_config(&set, Some("sentinel-pw"));
                $(
                    eprintln!("contract on Sentinel: {}", stringify!($name));
                    let h = super::common::on_topology(&cfg, stringify!($name)).await;
                    super::$name(h).await;
                )*
            }
        }
    };
}

#[allow(unused_imports)]
pub(crate) use contract;

/// Ten minutes in ten one-minute buckets, three messages: the scheduled-charge suites' window.
pub fn ten_minutes() -> limits::Profile {
    limits::ProfileSpec::default()
        .window(
            limits::WindowSpec::rolling(Duration::from_secs(600))
                .buckets(10)
                .messages(3),
        )
        .build("ten")
        .unwrap()
}
