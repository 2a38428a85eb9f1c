//! Property tests of the window and reservation maths, run on the memory store (many cases)
//! and on Redis (fewer cases: each is a handful of round trips to a private server).

mod common;

use std::sync::Arc;
use std::time::Duration;

use limits::{
    Cost, Decision, FakeClock, MemoryStore, Metric, Profile, ProfileSpec, QuotaStore, Reservation,
    WindowSpec,
};
use proptest::prelude::*;

const WINDOW_MS: u64 = 60_000;

#[derive(Debug, Clone)]
struct Op {
    advance_ms: u64,
    recipients: u64,
    release_previous: bool,
    /// Scheduled this far ahead; `None`: a send going out now.
    ahead_ms: Option<u64>,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        (
            0u64..25_000,
            1u64..6,
            prop::bool::weighted(0.15),
            prop::option::weighted(0.4, 0u64..3 * WINDOW_MS),
        )
            .prop_map(|(advance_ms, recipients, release_previous, ahead_ms)| Op {
                advance_ms,
                recipients,
                release_previous,
                ahead_ms,
            }),
        1..60,
    )
}

fn profile(buckets: u32, messages: u64, recipients: u64) -> Profile {
    ProfileSpec::default()
        .window(
            WindowSpec::rolling(Duration::from_millis(WINDOW_MS))
                .buckets(buckets)
                .messages(messages)
                .recipients(recipients),
        )
        .build("prop")
        .unwrap()
}

/// Runs `ops` against `store` and checks every property along the way.
async fn check(
    store: Arc<dyn QuotaStore>,
    clock: FakeClock,
    scope: &str,
    p: Profile,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let mut kept: Vec<(u64, Cost, Reservation)> = Vec::new();
    for op in ops {
        clock.advance(Duration::from_millis(op.advance_ms));
        let now = clock.now_ms_for_test();
        if op.release_previous
            && let Some((_, _, r)) = kept.pop()
        {
            store.release(&r).await.unwrap();
        }
        let cost = Cost::new(1, op.recipients, 0);
        let before = store.usage(scope, &p).await.unwrap();
        let at = op.ahead_ms.map(|a| now + a);
        match store.reserve_at(scope, &p, cost, at, None).await.unwrap() {
            Decision::Allowed(a) => {
                // Reserve then release returns usage to where it was.
                let probe = store
                    .reserve(scope, &p, Cost::new(0, 0, 1), None)
                    .await
                    .unwrap();
                if let Decision::Allowed(x) = &probe {
                    let mid = store.usage(scope, &p).await.unwrap();
                    store.release(&x.reservation).await.unwrap();
                    let after = store.usage(scope, &p).await.unwrap();
                    prop_assert_eq!(after.windows[0].used.bytes + 1, mid.windows[0].used.bytes);
                    prop_assert_eq!(&after, &a.usage);
                }
                prop_assert_eq!(a.reservation.at(), at.unwrap_or(now));
                kept.push((a.reservation.at(), cost, a.reservation));
            }
            Decision::Denied(d) => {
                prop_assert_eq!(
                    &store.usage(scope, &p).await.unwrap(),
                    &before,
                    "a denial changed usage"
                );
                if let (Some(at), Some(fits)) = (at, d.fits_at) {
                    // Exact for a scheduled send too: the instant before is refused, it is not.
                    prop_assert!(d.retry_after.is_none() && fits > at);
                    let before_fit = store.reserve_at(scope, &p, cost, Some(fits - 1), None);
                    prop_assert!(
                        !before_fit.await.unwrap().is_allowed(),
                        "admitted before fits_at"
                    );
                    match store
                        .reserve_at(scope, &p, cost, Some(fits), None)
                        .await
                        .unwrap()
                    {
                        Decision::Allowed(a) => kept.push((fits, cost, a.reservation)),
                        Decision::Denied(d2) => {
                            prop_assert!(false, "denied at fits_at: {d:?} then {d2:?}")
                        }
                    }
                } else if let Some(retry) = d.retry_after {
                    // Exact: denied one second before retry_after, admitted at it.
                    let secs = retry.as_secs();
                    prop_assert!(secs >= 1);
                    clock.advance(Duration::from_secs(secs - 1));
                    prop_assert!(
                        !store
                            .reserve(scope, &p, cost, None)
                            .await
                            .unwrap()
                            .is_allowed(),
                        "admitted before retry_after"
                    );
                    clock.advance(Duration::from_secs(1));
                    let at = clock.now_ms_for_test();
                    match store.reserve(scope, &p, cost, None).await.unwrap() {
                        Decision::Allowed(a) => kept.push((at, cost, a.reservation)),
                        Decision::Denied(d2) => {
                            prop_assert!(false, "denied at retry_after: {d:?} then {d2:?}")
                        }
                    }
                } else {
                    prop_assert!(cost.recipients > d.limit);
                }
            }
        }
        // No window-length interval holds more than the limit of what was kept.
        for m in [Metric::Messages, Metric::Recipients] {
            let limit = p.windows()[0].limit(m).unwrap().get();
            for (start, _, _) in &kept {
                let sum: u64 = kept
                    .iter()
                    .filter(|(t, _, _)| *t >= *start && *t < *start + WINDOW_MS)
                    .map(|(_, c, _)| c.get(m))
                    .sum();
                prop_assert!(sum <= limit, "{m}: {sum} > {limit} in [{start}, +60 s)");
            }
        }
    }
    Ok(())
}

trait NowForTest {
    fn now_ms_for_test(&self) -> u64;
}

impl NowForTest for FakeClock {
    fn now_ms_for_test(&self) -> u64 {
        limits::Clock::now_ms(self)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn memory_store_properties(buckets in 1u32..13, messages in 1u64..8, recipients in 5u64..20, ops in ops()) {
        let clock = FakeClock::new(common::T0);
        let store: Arc<dyn QuotaStore> = Arc::new(MemoryStore::with_clock(clock.clone()));
        runtime().block_on(check(store, clock, "g", profile(buckets, messages, recipients), ops))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn redis_store_properties(buckets in 1u32..13, messages in 1u64..8, recipients in 5u64..20, ops in ops()) {
        let server = testkit::RedisServer::start();
        let rt = runtime();
        let clock = FakeClock::new(common::T0);
        let store: Arc<dyn QuotaStore> = Arc::new(rt.block_on(common::redis_store(&server, &clock)));
        rt.block_on(check(store, clock, "g", profile(buckets, messages, recipients), ops))?;
    }
}
