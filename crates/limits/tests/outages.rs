//! Redis outages: the breaker that stops waiting, reserves whose answers were lost (given
//! back once Redis answers), and the local budget written back when it returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use limits::{
    Allowance, BreakerState, BreakerStore, Cost, Decision, Guarded, LocalBudget, MemoryStore,
    Millis, Profile, QuotaStore, RedisConfig, RedisStore, Reservation, StoreError, Usage,
};
use testkit::RedisServer;

fn icloud() -> Profile {
    Profile::builtin("icloud").unwrap()
}

fn one() -> Cost {
    Cost::new(1, 1, 0)
}

async fn store_on(server: &RedisServer, timeout: Duration) -> RedisStore {
    let cfg = RedisConfig {
        url: server.url(),
        timeout,
        ..RedisConfig::default()
    };
    RedisStore::connect(&cfg).await.expect("connect")
}

async fn messages_used(store: &dyn QuotaStore, scope: &str) -> u64 {
    let u = store.usage(scope, &icloud()).await.expect("usage");
    u.windows[0].used.messages
}

#[tokio::test]
async fn a_reserve_whose_answer_was_lost_is_given_back_once_redis_answers() {
    let server = RedisServer::start();
    let store = Arc::new(store_on(&server, Duration::from_millis(200)).await);
    assert!(
        store
            .reserve("g", &icloud(), one(), None)
            .await
            .unwrap()
            .is_allowed()
    );
    server.pause();
    let calls = (0..10).map(|_| {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.reserve("g", &icloud(), one(), None).await })
    });
    for call in calls {
        let r = call.await.unwrap();
        assert!(matches!(r, Err(StoreError::Timeout(_))), "{r:?}");
    }
    server.resume();
    // The reserves were on the wire: Redis runs them on waking, before this read.
    assert_eq!(
        messages_used(&*store, "g").await,
        11,
        "the late reserves ran"
    );
    store.ping().await.expect("ping settles what was lost");
    assert_eq!(
        messages_used(&*store, "g").await,
        1,
        "only the answered send counts"
    );
    // Each admitted reserve leaves a record for RECORD_TTL; the settled ones are taken.
    let records = server.command(&["KEYS", "sendgw:{g}:c:*"]).unwrap();
    assert_eq!(records.matches(":c:").count(), 1, "{records}");
    // A second settling finds nothing more to give back.
    store.ping().await.unwrap();
    assert_eq!(messages_used(&*store, "g").await, 1);
}

/// A store that fails (slowly, as a timeout would) while `down` is set, counting calls.
#[derive(Debug, Default)]
struct Flaky {
    down: AtomicBool,
    calls: AtomicU64,
    inner: MemoryStore,
}

impl Flaky {
    async fn gate(&self) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Timeout(Duration::from_millis(250)));
        }
        Ok(())
    }
}

#[async_trait]
impl QuotaStore for Flaky {
    async fn reserve_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        key: Option<&str>,
    ) -> Result<Decision, StoreError> {
        self.gate().await?;
        self.inner.reserve_at(scope, profile, cost, at, key).await
    }
    async fn charge(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Allowance, StoreError> {
        self.gate().await?;
        self.inner.charge(scope, profile, cost, at).await
    }
    async fn release(&self, r: &Reservation) -> Result<(), StoreError> {
        self.gate().await?;
        self.inner.release(r).await
    }
    async fn usage(&self, scope: &str, profile: &Profile) -> Result<Usage, StoreError> {
        self.inner.usage(scope, profile).await
    }
    async fn reset(&self, scope: &str) -> Result<(), StoreError> {
        self.inner.reset(scope).await
    }
    async fn reserve_guarded(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        key: Option<&str>,
        expected: Option<&str>,
    ) -> Result<Guarded, StoreError> {
        self.gate().await?;
        self.inner
            .reserve_guarded(scope, profile, cost, at, key, expected)
            .await
    }
    async fn cool_down(&self, scope: &str, d: Duration) -> Result<(), StoreError> {
        self.inner.cool_down(scope, d).await
    }
    async fn meta_get(&self, scope: &str, name: &str) -> Result<Option<String>, StoreError> {
        self.inner.meta_get(scope, name).await
    }
    async fn meta_set(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.inner.meta_set(scope, name, value, ttl).await
    }
    async fn meta_set_new(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.meta_set_new(scope, name, value, ttl).await
    }
    async fn meta_delete(&self, scope: &str, name: &str) -> Result<(), StoreError> {
        self.inner.meta_delete(scope, name).await
    }
    async fn meta_delete_if(&self, scope: &str, name: &str, v: &str) -> Result<bool, StoreError> {
        self.inner.meta_delete_if(scope, name, v).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.gate().await
    }
}

#[tokio::test]
async fn the_breaker_opens_after_consecutive_failures_and_a_probe_closes_it() {
    let flaky = Arc::new(Flaky::default());
    let breaker = BreakerStore::new(Arc::clone(&flaky) as Arc<dyn QuotaStore>, 3);
    assert!(
        breaker
            .reserve("g", &icloud(), one(), None)
            .await
            .unwrap()
            .is_allowed()
    );
    flaky.down.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert!(breaker.reserve("g", &icloud(), one(), None).await.is_err());
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    let asked = flaky.calls.load(Ordering::SeqCst);
    for _ in 0..100 {
        let r = breaker.reserve("g", &icloud(), one(), None).await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    }
    assert_eq!(
        flaky.calls.load(Ordering::SeqCst),
        asked,
        "an open breaker does not ask the store"
    );
    flaky.down.store(false, Ordering::SeqCst);
    // Within the probe interval, still open; after it, one call probes and closes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while breaker.ping().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the probe never closed the breaker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.recoveries(), 1);
    assert!(
        breaker
            .reserve("g", &icloud(), one(), None)
            .await
            .unwrap()
            .is_allowed()
    );
}

#[tokio::test]
async fn a_failed_probe_keeps_the_breaker_open_and_a_denial_is_an_answer() {
    let flaky = Arc::new(Flaky::default());
    let breaker = BreakerStore::new(Arc::clone(&flaky) as Arc<dyn QuotaStore>, 1);
    let full = Cost::new(1, 1_000, 0);
    assert!(
        breaker
            .reserve("g", &icloud(), full, None)
            .await
            .unwrap()
            .is_allowed()
    );
    // Denials never open it: the store answered.
    for _ in 0..5 {
        assert!(
            !breaker
                .reserve("g", &icloud(), one(), None)
                .await
                .unwrap()
                .is_allowed()
        );
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    flaky.down.store(true, Ordering::SeqCst);
    assert!(breaker.ping().await.is_err());
    assert_eq!(breaker.state(), BreakerState::Open);
    let asked = flaky.calls.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while flaky.calls.load(Ordering::SeqCst) == asked {
        assert!(Instant::now() < deadline, "no probe was let through");
        let _ = breaker.ping().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(flaky.calls.load(Ordering::SeqCst), asked + 1, "one probe");
    assert_eq!(breaker.state(), BreakerState::Open, "the probe failed");
}

#[tokio::test]
async fn with_redis_paused_an_open_breaker_decides_without_waiting() {
    let server = RedisServer::start();
    let timeout = Duration::from_secs(2);
    let redis: Arc<dyn QuotaStore> = Arc::new(store_on(&server, timeout).await);
    let breaker = BreakerStore::new(redis, 3);
    server.pause();
    for _ in 0..3 {
        assert!(breaker.reserve("g", &icloud(), one(), None).await.is_err());
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    let started = Instant::now();
    for _ in 0..200 {
        assert!(breaker.reserve("g", &icloud(), one(), None).await.is_err());
    }
    let took = started.elapsed();
    eprintln!("200 decisions with the breaker open: {took:?}");
    // Each would wait the 2 s timeout without the breaker: 400 s in all.
    assert!(took < timeout, "{took:?}");
    server.resume();
}

#[tokio::test]
async fn the_local_budget_admits_its_share_and_writes_it_back() {
    let target = MemoryStore::new();
    let local = LocalBudget::new(0.05);
    let p = icloud();
    let mut admitted = Vec::new();
    for _ in 0..60 {
        if let Decision::Allowed(a) = local.reserve("g", &p, one(), None).await.unwrap() {
            admitted.push(a.reservation);
        }
    }
    assert_eq!(admitted.len(), 50, "5 % of 1,000");
    // A send that did not happen gives its share back, and is not written back.
    local.release(&admitted.pop().unwrap()).await.unwrap();
    assert!(
        local
            .reserve("g", &p, one(), None)
            .await
            .unwrap()
            .is_allowed()
    );
    assert_eq!(local.pending(), 50);
    let done = local.reconcile(&target).await.unwrap();
    assert_eq!((done.charges, done.cost.messages), (50, 50));
    assert_eq!(local.pending(), 0);
    assert_eq!(messages_used(&target, "g").await, 50);
    // Still within the window, the budget stays spent (no second share per outage).
    assert!(
        !local
            .reserve("g", &p, one(), None)
            .await
            .unwrap()
            .is_allowed()
    );
}

#[tokio::test]
async fn what_could_not_be_written_back_stays_for_the_next_time() {
    let flaky = Flaky::default();
    let local = LocalBudget::new(0.05);
    for _ in 0..5 {
        assert!(
            local
                .reserve("g", &icloud(), one(), None)
                .await
                .unwrap()
                .is_allowed()
        );
    }
    flaky.down.store(true, Ordering::SeqCst);
    assert!(local.reconcile(&flaky).await.is_err());
    assert_eq!(local.pending(), 5);
    flaky.down.store(false, Ordering::SeqCst);
    assert_eq!(local.reconcile(&flaky).await.unwrap().charges, 5);
    assert_eq!(messages_used(&flaky, "g").await, 5);
}
