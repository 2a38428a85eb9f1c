//! One contract, two backends: every test here runs against the memory store (fake clock)
//! and against a private redis-server (the same fake clock passed to the script).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Harness, T0, contract};
use limits::{
    CalendarUnit, Cost, Decision, FleetCursor, FleetEntry, Guarded, META_COOLDOWN, META_PROFILE,
    Metric, Profile, ProfileSpec, Reservation, Usage, WindowSpec,
};

const HOUR: Duration = Duration::from_secs(3600);

fn rolling(secs: u64, buckets: u32, messages: u64, recipients: u64) -> Profile {
    ProfileSpec::default()
        .window(
            WindowSpec::rolling(Duration::from_secs(secs))
                .buckets(buckets)
                .messages(messages)
                .recipients(recipients),
        )
        .build("test")
        .unwrap()
}

fn used(u: &Usage, window: usize, metric: Metric) -> u64 {
    u.windows[window].used.get(metric)
}

async fn reserve(h: &Harness, scope: &str, p: &Profile, cost: Cost) -> Decision {
    h.store
        .reserve(scope, p, cost, None)
        .await
        .expect("reserve")
}

async fn allowed(h: &Harness, scope: &str, p: &Profile, cost: Cost) -> Reservation {
    match reserve(h, scope, p, cost).await {
        Decision::Allowed(a) => a.reservation,
        Decision::Denied(d) => panic!("unexpected denial: {d:?}"),
    }
}

async fn allows_up_to_the_limit_then_denies_without_charging(h: Harness) {
    let p = rolling(60, 6, 3, 100);
    for i in 0..3 {
        let d = reserve(&h, "g", &p, Cost::new(1, 2, 10)).await;
        let Decision::Allowed(a) = d else {
            panic!("send {i} denied")
        };
        let m = &a.usage.windows[0].metrics[0];
        assert_eq!(
            (m.metric, m.limit, m.used, m.remaining),
            (Metric::Messages, 3, i + 1, 2 - i)
        );
    }
    let before = h.store.usage("g", &p).await.unwrap();
    assert_eq!(used(&before, 0, Metric::Messages), 3);
    assert_eq!(used(&before, 0, Metric::Recipients), 6);
    assert_eq!(
        used(&before, 0, Metric::Bytes),
        30,
        "unlimited metrics are still counted"
    );
    for _ in 0..5 {
        let Decision::Denied(d) = reserve(&h, "g", &p, Cost::new(1, 2, 10)).await else {
            panic!("allowed")
        };
        assert_eq!(d.metric, Metric::Messages);
        assert_eq!((d.limit, d.used, d.requested), (3, 3, 1));
        assert_eq!(&*d.window, "1m");
        assert_eq!(
            d.retry_after,
            Some(Duration::from_secs(70)),
            "oldest bucket (10 s) expires after 60 s + 10 s"
        );
    }
    assert_eq!(
        h.store.usage("g", &p).await.unwrap(),
        before,
        "denials change no counter"
    );
}

async fn all_or_nothing_across_windows_and_metrics(h: Harness) {
    let p = ProfileSpec::default()
        .window(WindowSpec::rolling(Duration::from_secs(60)).messages(10))
        .window(WindowSpec::calendar(CalendarUnit::Day, "UTC").recipients(5))
        .build("two")
        .unwrap();
    allowed(&h, "g", &p, Cost::new(1, 4, 0)).await;
    let Decision::Denied(d) = reserve(&h, "g", &p, Cost::new(1, 2, 0)).await else {
        panic!("allowed")
    };
    assert_eq!(
        (d.metric, &*d.window, d.limit, d.used, d.requested),
        (Metric::Recipients, "day", 5, 4, 2)
    );
    assert_eq!(
        d.retry_after,
        Some(Duration::from_secs(86_400)),
        "the UTC day ends 24 h after T0"
    );
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(
        used(&u, 0, Metric::Messages),
        1,
        "the 60 s window was not charged by the denial"
    );
    assert_eq!(used(&u, 1, Metric::Recipients), 4);
    allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
}

async fn a_cost_above_the_limit_never_passes(h: Harness) {
    let p = rolling(60, 6, 10, 5);
    let Decision::Denied(d) = reserve(&h, "g", &p, Cost::new(1, 6, 0)).await else {
        panic!("allowed")
    };
    assert_eq!(d.retry_after, None);
    assert_eq!((d.metric, d.used, d.requested), (Metric::Recipients, 0, 6));
}

async fn retry_after_is_exact(h: Harness) {
    let p = rolling(60, 6, 2, 100);
    allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
    h.advance(Duration::from_millis(25_500));
    allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
    let Decision::Denied(d) = reserve(&h, "g", &p, Cost::new(1, 1, 0)).await else {
        panic!("allowed")
    };
    // The first send sits in bucket [T0, T0+10 s), which stops counting at T0 + 70 s.
    assert_eq!(
        d.retry_after,
        Some(Duration::from_secs(45)),
        "70 s - 25.5 s, rounded up"
    );
    h.advance(Duration::from_secs(44));
    assert!(
        !reserve(&h, "g", &p, Cost::new(1, 1, 0)).await.is_allowed(),
        "one second early"
    );
    h.advance(Duration::from_secs(1));
    assert!(
        reserve(&h, "g", &p, Cost::new(1, 1, 0)).await.is_allowed(),
        "at retry_after"
    );
}

async fn rolling_counts_at_least_the_window_and_at_most_one_bucket_more(h: Harness) {
    let p = rolling(60, 6, 1, 100);
    h.advance(Duration::from_millis(9_999)); // last millisecond of the first bucket
    allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
    h.advance(Duration::from_millis(59_999));
    assert!(
        !reserve(&h, "g", &p, Cost::new(1, 1, 0)).await.is_allowed(),
        "forgot before the window's length"
    );
    h.advance(Duration::from_millis(2));
    assert!(
        reserve(&h, "g", &p, Cost::new(1, 1, 0)).await.is_allowed(),
        "remembered more than one bucket extra"
    );
    let before = h.store.usage("g2", &p).await.unwrap();
    assert_eq!(before.windows[0].next_free, None);
    allowed(&h, "g2", &p, Cost::new(1, 1, 0)).await; // at the start of a bucket
    h.advance(Duration::from_millis(69_999));
    assert!(!reserve(&h, "g2", &p, Cost::new(1, 1, 0)).await.is_allowed());
    h.advance(Duration::from_millis(1));
    assert!(
        reserve(&h, "g2", &p, Cost::new(1, 1, 0)).await.is_allowed(),
        "window plus exactly one bucket"
    );
}

async fn release_gives_back_exactly_once(h: Harness) {
    let p = rolling(60, 6, 10, 10);
    let before = h.store.usage("g", &p).await.unwrap();
    let r = allowed(&h, "g", &p, Cost::new(1, 3, 500)).await;
    h.store.release(&r).await.unwrap();
    assert_eq!(
        h.store.usage("g", &p).await.unwrap(),
        before,
        "reserve then release is a no-op"
    );
    let keep = allowed(&h, "g", &p, Cost::new(1, 3, 500)).await;
    h.store.release(&r).await.unwrap();
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(
        (
            used(&u, 0, Metric::Messages),
            used(&u, 0, Metric::Recipients)
        ),
        (1, 3),
        "second release is a no-op"
    );
    assert_eq!(keep.cost(), Cost::new(1, 3, 500));
}

async fn release_never_goes_below_zero_and_skips_expired_buckets(h: Harness) {
    let p = rolling(60, 6, 10, 10);
    let old = allowed(&h, "g", &p, Cost::new(1, 5, 0)).await;
    h.store.reset("g").await.unwrap();
    h.advance(Duration::from_millis(1));
    let small = allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
    // What `old` charged went with the reset: releasing it takes nothing from `small`.
    h.store.release(&old).await.unwrap();
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(
        (
            used(&u, 0, Metric::Messages),
            used(&u, 0, Metric::Recipients)
        ),
        (1, 1),
        "a reservation made before a reset gives nothing back"
    );
    h.store.release(&small).await.unwrap();
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(used(&u, 0, Metric::Recipients), 0);

    let stale = allowed(&h, "g", &p, Cost::new(1, 4, 0)).await;
    h.advance(Duration::from_secs(80));
    allowed(&h, "g", &p, Cost::new(1, 2, 0)).await;
    h.store.release(&stale).await.unwrap();
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(
        used(&u, 0, Metric::Recipients),
        2,
        "releasing an expired bucket touches nothing live"
    );
}

async fn release_targets_the_bucket_it_charged(h: Harness) {
    let p = rolling(60, 6, 10, 10);
    let first = allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
    h.advance(Duration::from_secs(30));
    allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
    h.store.release(&first).await.unwrap();
    // Had the release hit the newer bucket, the remaining unit would expire 30 s early.
    h.advance(Duration::from_secs(40));
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(used(&u, 0, Metric::Messages), 1);
    assert_eq!(u.windows[0].next_free, Some(Duration::from_secs(30)));
}

async fn idempotent_repeats_return_the_first_decision(h: Harness) {
    let p = rolling(3600, 12, 5, 5);
    let a = h
        .store
        .reserve("g", &p, Cost::new(1, 2, 0), Some("key-1"))
        .await
        .unwrap();
    assert!(!a.is_replay());
    h.advance(Duration::from_secs(10));
    let b = h
        .store
        .reserve("g", &p, Cost::new(1, 2, 0), Some("key-1"))
        .await
        .unwrap();
    assert!(
        b.is_replay(),
        "the repeat is marked so the caller does not settle it"
    );
    assert_eq!(
        a.reservation(),
        b.reservation(),
        "the repeat returns the first reservation"
    );
    assert_eq!(a.usage(), b.usage(), "and the usage as it was then");
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(
        used(&u, 0, Metric::Recipients),
        2,
        "the repeat charged nothing"
    );
    // The key is scoped: the same key on another grant is a new request.
    let other = h
        .store
        .reserve("other", &p, Cost::new(1, 2, 0), Some("key-1"))
        .await
        .unwrap();
    assert!(other.is_allowed() && !other.is_replay());
    // After an hour the key is forgotten.
    h.advance(HOUR);
    let c = h
        .store
        .reserve("g", &p, Cost::new(1, 2, 0), Some("key-1"))
        .await
        .unwrap();
    assert!(!c.is_replay());
    assert_ne!(c.reservation().unwrap().id(), a.reservation().unwrap().id());
}

async fn releasing_an_idempotent_reservation_forgets_its_key(h: Harness) {
    let p = rolling(3600, 12, 5, 5);
    let a = h
        .store
        .reserve("g", &p, Cost::new(1, 2, 0), Some("k"))
        .await
        .unwrap();
    let b = h
        .store
        .reserve("g", &p, Cost::new(1, 2, 0), Some("k"))
        .await
        .unwrap();
    // Releasing through both copies gives back once.
    h.store.release(a.reservation().unwrap()).await.unwrap();
    h.store.release(b.reservation().unwrap()).await.unwrap();
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(used(&u, 0, Metric::Recipients), 0);
    // The send did not happen: a retry with the same key is a new, counted request.
    let c = h
        .store
        .reserve("g", &p, Cost::new(1, 2, 0), Some("k"))
        .await
        .unwrap();
    assert!(c.is_allowed() && !c.is_replay());
    assert_ne!(c.reservation().unwrap().id(), a.reservation().unwrap().id());
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(used(&u, 0, Metric::Recipients), 2);
    // Releasing the old reservation again does not forget the new one's key.
    h.store.release(a.reservation().unwrap()).await.unwrap();
    assert!(
        h.store
            .reserve("g", &p, Cost::new(1, 2, 0), Some("k"))
            .await
            .unwrap()
            .is_replay()
    );
}

async fn denials_are_not_remembered_by_idempotency_keys(h: Harness) {
    let p = rolling(60, 6, 1, 5);
    allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
    let d = h
        .store
        .reserve("g", &p, Cost::new(1, 1, 0), Some("retry-me"))
        .await
        .unwrap();
    let Decision::Denied(denied) = d else {
        panic!("allowed")
    };
    h.advance(denied.retry_after.unwrap());
    let again = h
        .store
        .reserve("g", &p, Cost::new(1, 1, 0), Some("retry-me"))
        .await
        .unwrap();
    assert!(
        again.is_allowed() && !again.is_replay(),
        "retried after retry_after, the send is admitted"
    );
}

async fn over_long_idempotency_keys_are_refused(h: Harness) {
    let p = rolling(60, 6, 5, 5);
    let key = "k".repeat(limits::MAX_IDEMPOTENCY_KEY + 1);
    assert!(matches!(
        h.store
            .reserve("g", &p, Cost::new(1, 1, 0), Some(&key))
            .await,
        Err(limits::StoreError::Invalid(_))
    ));
}

async fn usage_reports_limit_used_remaining_and_next_free(h: Harness) {
    let p = Profile::builtin("icloud").unwrap();
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(u.windows.len(), 1);
    assert_eq!(u.windows[0].next_free, None);
    assert_eq!(u.windows[0].metrics.len(), 2);
    allowed(&h, "g", &p, Cost::new(1, 7, 1000)).await;
    h.advance(Duration::from_secs(600));
    let u = h.store.usage("g", &p).await.unwrap();
    let w = &u.windows[0];
    assert_eq!((&*w.label, w.seconds), ("24h", 86_400));
    assert_eq!(w.metrics[1].metric, Metric::Recipients);
    assert_eq!(
        (
            w.metrics[1].limit,
            w.metrics[1].used,
            w.metrics[1].remaining
        ),
        (1000, 7, 993)
    );
    // Sent in the bucket [T0, T0+15 min): frees at T0 + 24 h + 15 min.
    assert_eq!(w.next_free, Some(Duration::from_secs(86_400 + 900 - 600)));
}

async fn reset_clears_a_scope_only(h: Harness) {
    let p = rolling(60, 6, 1, 10);
    allowed(&h, "a", &p, Cost::new(1, 1, 0)).await;
    allowed(&h, "b", &p, Cost::new(1, 1, 0)).await;
    h.store.reset("a").await.unwrap();
    assert!(reserve(&h, "a", &p, Cost::new(1, 1, 0)).await.is_allowed());
    assert!(!reserve(&h, "b", &p, Cost::new(1, 1, 0)).await.is_allowed());
}

async fn changing_a_limit_keeps_usage(h: Harness) {
    let loose = rolling(3600, 12, 100, 100);
    let tight = rolling(3600, 12, 6, 100);
    for _ in 0..5 {
        allowed(&h, "g", &loose, Cost::new(1, 1, 0)).await;
    }
    let d = reserve(&h, "g", &tight, Cost::new(1, 1, 0)).await;
    let Decision::Allowed(a) = d else {
        panic!("denied")
    };
    assert_eq!(a.usage.windows[0].metrics[0].remaining, 0);
    assert!(
        !reserve(&h, "g", &tight, Cost::new(1, 1, 0))
            .await
            .is_allowed()
    );
}

async fn calendar_days_follow_new_york_dst(h: Harness) {
    let p = ProfileSpec::default()
        .window(WindowSpec::calendar(CalendarUnit::Day, "America/New_York").messages(1))
        .build("ny")
        .unwrap();
    // 2026-03-08 is 23 hours long in New York: it starts 05:00Z and ends 2026-03-09T04:00Z.
    let day_start = 1_772_946_000_000; // 2026-03-08T05:00:00Z
    h.clock.set(day_start + 3_600_000);
    allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
    let Decision::Denied(d) = reserve(&h, "g", &p, Cost::new(1, 1, 0)).await else {
        panic!("allowed")
    };
    assert_eq!(d.retry_after, Some(Duration::from_secs(22 * 3600)));
    h.clock.set(day_start + 23 * 3_600_000 - 1);
    assert!(!reserve(&h, "g", &p, Cost::new(1, 1, 0)).await.is_allowed());
    h.clock.set(day_start + 23 * 3_600_000);
    assert!(
        reserve(&h, "g", &p, Cost::new(1, 1, 0)).await.is_allowed(),
        "a new local day"
    );
    // 2026-11-01 lasts 25 hours: 04:00Z to 2026-11-02T05:00Z.
    let fall = 1_793_505_600_000; // 2026-11-01T04:00:00Z
    h.clock.set(fall + 1);
    allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
    h.clock.set(fall + 25 * 3_600_000 - 1);
    let Decision::Denied(d) = reserve(&h, "g", &p, Cost::new(1, 1, 0)).await else {
        panic!("allowed")
    };
    assert_eq!(d.retry_after, Some(Duration::from_secs(1)));
    h.clock.set(fall + 25 * 3_600_000);
    assert!(reserve(&h, "g", &p, Cost::new(1, 1, 0)).await.is_allowed());
}

async fn calendar_months_in_berlin_cross_dst_and_month_ends(h: Harness) {
    let p = ProfileSpec::default()
        .window(WindowSpec::calendar(CalendarUnit::Month, "Europe/Berlin").recipients(10))
        .build("berlin")
        .unwrap();
    // March 2026 in Berlin: 2026-02-28T23:00Z to 2026-03-31T22:00Z (DST starts on the 29th).
    let end = 1_774_994_400_000; // 2026-03-31T22:00:00Z
    h.clock.set(end - 3_600_000);
    allowed(&h, "g", &p, Cost::new(1, 10, 0)).await;
    let Decision::Denied(d) = reserve(&h, "g", &p, Cost::new(1, 1, 0)).await else {
        panic!("allowed")
    };
    assert_eq!(d.retry_after, Some(Duration::from_secs(3600)));
    h.clock.set(end - 1);
    assert!(!reserve(&h, "g", &p, Cost::new(1, 1, 0)).await.is_allowed());
    h.clock.set(end);
    let Decision::Allowed(a) = reserve(&h, "g", &p, Cost::new(1, 10, 0)).await else {
        panic!("denied")
    };
    // April has 30 days and no DST change: 720 hours.
    assert_eq!(
        a.usage.windows[0].next_free,
        Some(Duration::from_secs(720 * 3600))
    );
    // A release of March's charge after the month changed does nothing to April.
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(used(&u, 0, Metric::Recipients), 10);
}

async fn sixty_four_tasks_on_two_connections_admit_exactly_the_limit(h: Harness) {
    let p = Arc::new(rolling(3600, 12, 100, 10_000));
    let stores = [Arc::clone(&h.store), h.second().await];
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = Arc::clone(&stores[i % 2]);
        let p = Arc::clone(&p);
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u64;
            for _ in 0..4 {
                if store
                    .reserve("hot", &p, Cost::new(1, 1, 0), None)
                    .await
                    .unwrap()
                    .is_allowed()
                {
                    admitted += 1;
                }
            }
            admitted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 100, "256 attempts on a limit of 100");
    let u = h.store.usage("hot", &p).await.unwrap();
    assert_eq!(used(&u, 0, Metric::Messages), 100);
}

async fn scopes_are_independent(h: Harness) {
    let p = rolling(60, 6, 1, 1);
    allowed(&h, "grant-a", &p, Cost::new(1, 1, 0)).await;
    allowed(&h, "grant-b", &p, Cost::new(1, 1, 0)).await;
    allowed(&h, "we{ird}:scope", &p, Cost::new(1, 1, 0)).await;
    assert!(
        !reserve(&h, "grant-a", &p, Cost::new(1, 1, 0))
            .await
            .is_allowed()
    );
}

async fn profiles_without_windows_always_allow(h: Harness) {
    let p = ProfileSpec::new(Some(10), Some(1000))
        .build("caps-only")
        .unwrap();
    for _ in 0..3 {
        assert!(reserve(&h, "g", &p, Cost::new(1, 1, 0)).await.is_allowed());
    }
    assert!(h.store.usage("g", &p).await.unwrap().windows.is_empty());
}

async fn guarded_reservations_respect_cool_downs_and_overrides(h: Harness) {
    let p = rolling(60, 6, 10, 10);
    let guarded = |expected: Option<&'static str>| {
        let store = std::sync::Arc::clone(&h.store);
        let p = p.clone();
        async move {
            store
                .reserve_guarded("g", &p, Cost::new(1, 1, 0), None, None, expected)
                .await
                .unwrap()
        }
    };
    assert!(matches!(
        guarded(None).await,
        Guarded::Decided(Decision::Allowed(_))
    ));
    // An override the caller does not know about: nothing is charged.
    h.store
        .meta_set("g", META_PROFILE, "google", None)
        .await
        .unwrap();
    assert_eq!(
        guarded(None).await,
        Guarded::OverrideChanged(Some("google".into()))
    );
    assert!(matches!(
        guarded(Some("google")).await,
        Guarded::Decided(Decision::Allowed(_))
    ));
    h.store.meta_delete("g", META_PROFILE).await.unwrap();
    assert_eq!(
        guarded(Some("google")).await,
        Guarded::OverrideChanged(None)
    );
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(
        used(&u, 0, Metric::Messages),
        2,
        "only the two decided reservations charged"
    );

    // A cool-down refuses until it ends, on the store's clock; a shorter one keeps the longer.
    h.store
        .cool_down("g", Duration::from_secs(30))
        .await
        .unwrap();
    h.store
        .cool_down("g", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        guarded(None).await,
        Guarded::CoolingDown(Duration::from_secs(30))
    );
    h.advance(Duration::from_secs(29));
    assert_eq!(
        guarded(None).await,
        Guarded::CoolingDown(Duration::from_secs(1))
    );
    h.advance(Duration::from_secs(1));
    assert!(matches!(
        guarded(None).await,
        Guarded::Decided(Decision::Allowed(_))
    ));
    // Unguarded reservations ignore both.
    h.store
        .cool_down("g", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(reserve(&h, "g", &p, Cost::new(1, 1, 0)).await.is_allowed());
    // Other scopes are not affected.
    assert!(matches!(
        h.store
            .reserve_guarded("other", &p, Cost::new(1, 1, 0), None, None, None)
            .await
            .unwrap(),
        Guarded::Decided(_)
    ));
}

async fn settings_are_shared_and_set_once(h: Harness) {
    assert_eq!(h.store.meta_get("g", "provider").await.unwrap(), None);
    h.store
        .meta_set("g", "provider", "icloud", Some(HOUR))
        .await
        .unwrap();
    let other = h.second().await;
    assert_eq!(
        other.meta_get("g", "provider").await.unwrap().as_deref(),
        Some("icloud")
    );
    assert!(
        h.store
            .meta_set_new("g", "threshold", "1", HOUR)
            .await
            .unwrap()
    );
    assert!(
        !other
            .meta_set_new("g", "threshold", "1", HOUR)
            .await
            .unwrap(),
        "one replica wins"
    );
    h.store.meta_delete("g", "threshold").await.unwrap();
    assert!(
        other
            .meta_set_new("g", "threshold", "1", HOUR)
            .await
            .unwrap()
    );
    // reset clears usage, not settings.
    h.store.reset("g").await.unwrap();
    assert_eq!(
        h.store.meta_get("g", "provider").await.unwrap().as_deref(),
        Some("icloud")
    );
}

async fn forced_charges_count_past_the_limit_and_deny_what_follows(h: Harness) {
    let p = ProfileSpec::default()
        .window(
            WindowSpec::rolling(HOUR)
                .buckets(4)
                .messages(3)
                .recipients(5),
        )
        .window(WindowSpec::calendar(CalendarUnit::Day, "UTC").recipients(5))
        .build("test")
        .unwrap();
    allowed(&h, "g", &p, Cost::new(1, 4, 0)).await;
    // The send turned out to have 3 more recipients than reserved: charged, past the limit.
    let after = h
        .store
        .charge("g", &p, Cost::new(0, 3, 0), None)
        .await
        .unwrap()
        .usage;
    assert_eq!(used(&after, 0, Metric::Recipients), 7);
    assert_eq!(used(&after, 1, Metric::Recipients), 7);
    assert_eq!(used(&after, 0, Metric::Messages), 1);
    let usage = h.store.usage("g", &p).await.unwrap();
    assert_eq!(usage, after_without_clock_drift(&after, &usage));
    // Over the limit, the window admits nothing until enough of it expires.
    match reserve(&h, "g", &p, Cost::new(1, 0, 0)).await {
        Decision::Denied(d) => assert_eq!((d.metric, d.used), (Metric::Recipients, 7)),
        Decision::Allowed(_) => panic!("a window over its limit must deny"),
    }
    assert_eq!(
        h.store.usage("g", &p).await.unwrap(),
        usage_now(&h, &p).await
    );
}

async fn a_forced_charge_is_given_back_like_a_reservation(h: Harness) {
    let p = ProfileSpec::default()
        .window(WindowSpec::rolling(HOUR).buckets(4).messages(2))
        .build("test")
        .unwrap();
    allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
    allowed(&h, "g", &p, Cost::new(1, 1, 0)).await;
    // Past the limit, as shadow mode charges a send that goes out whatever its quota says.
    let forced = h
        .store
        .charge("g", &p, Cost::new(1, 1, 0), None)
        .await
        .unwrap();
    assert_eq!(used(&forced.usage, 0, Metric::Messages), 3);
    // Nothing was sent after all: exactly that charge comes back, once.
    h.store.release(&forced.reservation).await.unwrap();
    h.store.release(&forced.reservation).await.unwrap();
    let usage = h.store.usage("g", &p).await.unwrap();
    assert_eq!(used(&usage, 0, Metric::Messages), 2);
    assert!(!reserve(&h, "g", &p, Cost::new(1, 0, 0)).await.is_allowed());
}

async fn usage_now(h: &Harness, p: &Profile) -> Usage {
    let u = h.store.usage("g", p).await.unwrap();
    assert_eq!(
        used(&u, 0, Metric::Messages),
        1,
        "the denial charged nothing"
    );
    u
}

/// `usage` read later may differ from `after` only in the time left until a unit frees up.
fn after_without_clock_drift(after: &Usage, later: &Usage) -> Usage {
    let mut u = after.clone();
    for (w, l) in u.windows.iter_mut().zip(&later.windows) {
        w.next_free = l.next_free;
    }
    u
}

async fn a_setting_is_deleted_only_by_its_holder(h: Harness) {
    assert!(
        h.store
            .meta_set_new("g", "lock", "holder-a", HOUR)
            .await
            .unwrap()
    );
    assert!(
        !h.store
            .meta_delete_if("g", "lock", "holder-b")
            .await
            .unwrap(),
        "another value leaves it"
    );
    assert_eq!(
        h.store.meta_get("g", "lock").await.unwrap().as_deref(),
        Some("holder-a")
    );
    assert!(
        h.store
            .meta_delete_if("g", "lock", "holder-a")
            .await
            .unwrap()
    );
    assert_eq!(h.store.meta_get("g", "lock").await.unwrap(), None);
    assert!(
        !h.store
            .meta_delete_if("g", "lock", "holder-a")
            .await
            .unwrap(),
        "nothing left to delete"
    );
    assert!(
        h.store
            .meta_set_new("g", "lock", "holder-b", HOUR)
            .await
            .unwrap()
    );
}

/// A cool-down's time left, as the store's own clock counts it; none for a setting that is
/// absent or kept forever.
async fn a_cool_downs_time_left_is_the_stores_own(h: Harness) {
    assert_eq!(h.store.meta_ttl("g", META_COOLDOWN).await.unwrap(), None);
    h.store
        .cool_down("g", Duration::from_secs(600))
        .await
        .unwrap();
    let left = h.store.meta_ttl("g", META_COOLDOWN).await.unwrap().unwrap();
    assert!(
        left <= Duration::from_secs(600) && left > Duration::from_secs(590),
        "{left:?}"
    );
    h.store
        .meta_set("g", META_PROFILE, "google", None)
        .await
        .unwrap();
    assert_eq!(h.store.meta_ttl("g", META_PROFILE).await.unwrap(), None);
}

/// The fleet index: notes only raise, listing is highest first with ties by name from the
/// highest, a cursor inside a run of ties resumes after it, and a reader's lower takes
/// effect only if no note came after its listing.
async fn the_fleet_index_orders_pages_and_lowers_only_unchanged_entries(h: Harness) {
    let entry = |scope: &str, utilization: f64| FleetEntry {
        scope: scope.into(),
        profile: "p".into(),
        utilization,
        expires_at: T0 + 3_600_000,
        version: 0,
    };
    let notes: Vec<FleetEntry> = [("a", 0.5), ("b", 0.9), ("c", 0.5), ("d", 0.5), ("e", 0.1)]
        .iter()
        .map(|&(s, u)| entry(s, u))
        .collect();
    h.store.fleet_note(&notes).await.unwrap();
    h.store.fleet_note(&[entry("b", 0.2)]).await.unwrap();
    let names = |l: &[FleetEntry]| l.iter().map(|e| e.scope.clone()).collect::<Vec<_>>();
    let all = h.store.fleet_list(0.0, None, 10).await.unwrap();
    assert_eq!(names(&all), ["b", "d", "c", "a", "e"]);
    assert_eq!(all[0].utilization, 0.9, "a note never lowers");
    let after_d = FleetCursor::after(&all[1]);
    let next = h.store.fleet_list(0.3, Some(&after_d), 10).await.unwrap();
    assert_eq!(names(&next), ["c", "a"], "after d, down to 0.3");
    // A note after the listing wins over the reader's lower, even of the same bound.
    let seen = all[0].version;
    h.store.fleet_note(&[entry("b", 0.9)]).await.unwrap();
    h.store.fleet_lower("b", seen, 0.4).await.unwrap();
    assert_eq!(
        h.store.fleet_list(0.0, None, 1).await.unwrap()[0].scope,
        "b"
    );
    let fresh = h.store.fleet_list(0.0, None, 1).await.unwrap()[0].version;
    h.store.fleet_lower("b", fresh, 0.4).await.unwrap();
    let all = h.store.fleet_list(0.0, None, 10).await.unwrap();
    assert_eq!(names(&all), ["d", "c", "a", "b", "e"]);
    let b = all.iter().find(|e| e.scope == "b").unwrap().version;
    h.store.fleet_lower("b", b, 0.0).await.unwrap();
    assert_eq!(
        names(&h.store.fleet_list(0.0, None, 10).await.unwrap()),
        ["d", "c", "a", "e"]
    );
}

contract!(
    the_fleet_index_orders_pages_and_lowers_only_unchanged_entries,
    a_cool_downs_time_left_is_the_stores_own,
    allows_up_to_the_limit_then_denies_without_charging,
    all_or_nothing_across_windows_and_metrics,
    a_cost_above_the_limit_never_passes,
    retry_after_is_exact,
    rolling_counts_at_least_the_window_and_at_most_one_bucket_more,
    release_gives_back_exactly_once,
    release_never_goes_below_zero_and_skips_expired_buckets,
    release_targets_the_bucket_it_charged,
    idempotent_repeats_return_the_first_decision,
    releasing_an_idempotent_reservation_forgets_its_key,
    denials_are_not_remembered_by_idempotency_keys,
    over_long_idempotency_keys_are_refused,
    usage_reports_limit_used_remaining_and_next_free,
    reset_clears_a_scope_only,
    changing_a_limit_keeps_usage,
    calendar_days_follow_new_york_dst,
    calendar_months_in_berlin_cross_dst_and_month_ends,
    sixty_four_tasks_on_two_connections_admit_exactly_the_limit,
    scopes_are_independent,
    profiles_without_windows_always_allow,
    guarded_reservations_respect_cool_downs_and_overrides,
    settings_are_shared_and_set_once,
    forced_charges_count_past_the_limit_and_deny_what_follows,
    a_forced_charge_is_given_back_like_a_reservation,
    a_setting_is_deleted_only_by_its_holder,
);

#[test]
fn t0_is_what_the_tests_assume() {
    assert_eq!(T0 % 900_000, 0);
}
