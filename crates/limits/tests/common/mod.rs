//! Builds the two backends for the shared contract suite.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use limits::{FakeClock, MemoryStore, QuotaStore, RedisConfig, RedisStore, RedisTls};
use testkit::RedisServer;

/// 2026-03-01T00:00:00Z, a bucket boundary for every bucket width used here.
pub const T0: u64 = 1_772_323_200_000;

/// A store under test with the clock that drives it.
pub struct Harness {
    pub store: Arc<dyn QuotaStore>,
    pub clock: FakeClock,
    pub redis: Option<RedisServer>,
}

impl Harness {
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// A second store on the same data (a second connection, or the same memory store).
    pub async fn second(&self) -> Arc<dyn QuotaStore> {
        match &self.redis {
            Some(r) => Arc::new(redis_store(r, &self.clock).await),
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
    }
}

/// A store on `server`: over TLS (trusting the server's private CA) when it was started
/// with TLS.
pub async fn redis_store(server: &RedisServer, clock: &FakeClock) -> RedisStore {
    let cfg = match server.certs() {
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
    };
    RedisStore::connect(&cfg)
        .await
        .expect("connect to test redis")
        .with_clock_override(clock.clone())
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
    let store = redis_store(&server, &clock).await;
    Harness {
        store: Arc::new(store),
        clock,
        redis: Some(server),
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
