//! Charges at a later instant (scheduled sends), on both backends: a charge at `t` counts in
//! every window that will hold `t`, and is admitted only if each of them stays within its
//! limits.

mod common;

use std::time::Duration;

use common::{Harness, T0, contract, ten_minutes};
use limits::{
    CalendarUnit, Cost, Decision, Denial, MAX_AHEAD, MAX_SCHEDULED_SLOTS, Metric, Probe, Profile,
    ProfileSpec, Reservation, StoreError, WindowSpec,
};

const MIN: u64 = 60_000;
const ONE: Cost = Cost::new(1, 1, 0);

async fn at(h: &Harness, p: &Profile, t: u64, cost: Cost) -> Decision {
    h.store
        .reserve_at("g", p, cost, Some(t), None)
        .await
        .expect("reserve")
}

async fn allowed_at(h: &Harness, p: &Profile, t: u64) -> Reservation {
    match at(h, p, t, ONE).await {
        Decision::Allowed(a) => a.reservation,
        Decision::Denied(d) => panic!("denied at +{} ms: {d:?}", t - T0),
    }
}

fn denied(d: Decision) -> Denial {
    match d {
        Decision::Denied(d) => d,
        Decision::Allowed(a) => panic!("allowed: {:?}", a.reservation),
    }
}

async fn scheduled_sends_beyond_the_window_leave_now_free(h: Harness) {
    let p = ten_minutes();
    for _ in 0..3 {
        let r = allowed_at(&h, &p, T0 + 30 * MIN).await;
        assert_eq!(r.at(), T0 + 30 * MIN);
    }
    let u = h.store.usage("g", &p).await.unwrap();
    let m = &u.windows[0].metrics[0];
    assert_eq!((m.used, m.scheduled, m.remaining), (0, 3, 3));
    assert_eq!(u.windows[0].scheduled.messages, 3);
    assert_eq!(u.windows[0].next_free, None);
    for _ in 0..3 {
        allowed_at(&h, &p, T0).await;
    }
    let d = denied(at(&h, &p, T0, ONE).await);
    assert_eq!((d.at, d.fits_at), (T0, Some(T0 + 11 * MIN)));
    assert_eq!(d.retry_after, Some(Duration::from_secs(11 * 60)));
}

async fn a_live_send_that_would_put_four_in_a_window_is_refused(h: Harness) {
    let p = ten_minutes();
    for _ in 0..2 {
        allowed_at(&h, &p, T0 + 5 * MIN).await;
    }
    // Two scheduled five minutes ahead and one now: three in one ten-minute stretch.
    allowed_at(&h, &p, T0).await;
    let d = denied(at(&h, &p, T0, ONE).await);
    assert_eq!((d.metric, d.used, d.limit), (Metric::Messages, 3, 3));
    // Once the send made now has left every stretch that holds +5 min and the slot after.
    assert_eq!(d.fits_at, Some(T0 + 11 * MIN));
    assert_eq!(d.retry_after, Some(Duration::from_secs(11 * 60)));
    let u = h.store.usage("g", &p).await.unwrap();
    let m = &u.windows[0].metrics[0];
    assert_eq!((m.used, m.scheduled, m.remaining), (1, 2, 0));
    h.advance(Duration::from_millis(11 * MIN - 1));
    assert!(!at(&h, &p, T0, ONE).await.is_allowed());
    h.advance(Duration::from_millis(1));
    assert!(at(&h, &p, T0, ONE).await.is_allowed());
}

async fn a_scheduled_send_is_refused_when_the_window_around_it_is_full(h: Harness) {
    let p = ten_minutes();
    for _ in 0..3 {
        allowed_at(&h, &p, T0).await;
    }
    let d = denied(at(&h, &p, T0 + 5 * MIN, ONE).await);
    assert_eq!(d.at, T0 + 5 * MIN);
    assert_eq!(d.fits_at, Some(T0 + 11 * MIN));
    // Waiting does not change what the stretch around a later instant holds.
    assert_eq!(d.retry_after, None);
    allowed_at(&h, &p, T0 + 11 * MIN).await;
    // Later sends now also see the one scheduled at +11 min.
    allowed_at(&h, &p, T0 + 12 * MIN).await;
    allowed_at(&h, &p, T0 + 13 * MIN).await;
    let d = denied(at(&h, &p, T0 + 20 * MIN, ONE).await);
    // The stretches ending at +13 to +21 min hold three each.
    assert_eq!(d.fits_at, Some(T0 + 22 * MIN));
}

async fn releasing_a_scheduled_charge_frees_its_slot(h: Harness) {
    let p = ten_minutes();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(allowed_at(&h, &p, T0 + 5 * MIN).await);
    }
    assert!(!at(&h, &p, T0, ONE).await.is_allowed());
    let r = held.pop().unwrap();
    h.store.release(&r).await.unwrap();
    h.store.release(&r).await.unwrap();
    allowed_at(&h, &p, T0).await;
    assert!(!at(&h, &p, T0, ONE).await.is_allowed());
}

async fn a_reservation_record_reads_back_and_releases(h: Harness) {
    let p = ten_minutes();
    let kept = allowed_at(&h, &p, T0 + 5 * MIN).await;
    let record = kept.to_record();
    let back = Reservation::from_record("g", &record).expect("a record");
    assert_eq!(back, kept);
    assert_eq!(Reservation::from_record("g", "nonsense"), None);
    assert_eq!(Reservation::from_record("g", "1;x;0;1,1,0;;"), None);
    h.store.release(&back).await.unwrap();
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(u.windows[0].metrics[0].scheduled, 0);
}

async fn calendar_days_count_a_scheduled_send_on_its_day(h: Harness) {
    let p = ProfileSpec::default()
        .window(WindowSpec::calendar(CalendarUnit::Day, "UTC").messages(2))
        .build("day")
        .unwrap();
    let tomorrow = T0 + 30 * 60 * MIN;
    for _ in 0..2 {
        allowed_at(&h, &p, tomorrow).await;
    }
    for _ in 0..2 {
        allowed_at(&h, &p, T0 + MIN).await;
    }
    let d = denied(at(&h, &p, T0, ONE).await);
    // Today is full and so is tomorrow: the day after.
    assert_eq!(d.fits_at, Some(T0 + 48 * 60 * MIN));
    assert_eq!(d.retry_after, Some(Duration::from_secs(48 * 3600)));
    let u = h.store.usage("g", &p).await.unwrap();
    let m = &u.windows[0].metrics[0];
    assert_eq!((m.used, m.scheduled, m.remaining), (2, 2, 0));
    h.advance(Duration::from_millis(25 * 60 * MIN));
    let u = h.store.usage("g", &p).await.unwrap();
    let m = &u.windows[0].metrics[0];
    assert_eq!((m.used, m.scheduled, m.remaining), (2, 0, 0));
    assert!(!at(&h, &p, T0, ONE).await.is_allowed());
}

async fn a_scheduled_release_on_a_calendar_day_gives_back_that_day(h: Harness) {
    let p = ProfileSpec::default()
        .window(WindowSpec::calendar(CalendarUnit::Day, "Europe/Berlin").messages(1))
        .build("day")
        .unwrap();
    let tomorrow = T0 + 30 * 60 * MIN;
    let r = allowed_at(&h, &p, tomorrow).await;
    assert!(!at(&h, &p, tomorrow, ONE).await.is_allowed());
    h.store.release(&r).await.unwrap();
    allowed_at(&h, &p, tomorrow).await;
    allowed_at(&h, &p, T0).await;
}

async fn a_past_instant_means_now_and_too_far_ahead_is_refused(h: Harness) {
    let p = ten_minutes();
    let r = allowed_at(&h, &p, T0 - 5 * MIN).await;
    assert_eq!(r.at(), T0);
    let far = T0 + MAX_AHEAD.as_millis() as u64 + MIN;
    match h.store.reserve_at("g", &p, ONE, Some(far), None).await {
        Err(StoreError::Invalid(msg)) => assert!(msg.contains("days ahead"), "{msg}"),
        other => panic!("{other:?}"),
    }
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(u.windows[0].metrics[0].used, 1);
}

async fn forced_charges_at_an_instant_count_there(h: Harness) {
    let p = ten_minutes();
    let u = h
        .store
        .charge("g", &p, Cost::new(3, 0, 0), Some(T0 + 30 * MIN))
        .await
        .unwrap()
        .usage;
    let m = &u.windows[0].metrics[0];
    assert_eq!((m.used, m.scheduled), (0, 3));
    assert!(!at(&h, &p, T0 + 25 * MIN, ONE).await.is_allowed());
    allowed_at(&h, &p, T0).await;
}

async fn scheduled_buckets_expire_with_their_window(h: Harness) {
    let p = ten_minutes();
    for _ in 0..3 {
        allowed_at(&h, &p, T0 + 30 * MIN).await;
    }
    h.advance(Duration::from_millis(41 * MIN));
    let u = h.store.usage("g", &p).await.unwrap();
    let m = &u.windows[0].metrics[0];
    assert_eq!((m.used, m.scheduled, m.remaining), (0, 0, 3));
}

async fn a_scope_holds_a_bounded_number_of_scheduled_buckets(h: Harness) {
    let p = ProfileSpec::default()
        .window(
            WindowSpec::rolling(Duration::from_secs(1))
                .buckets(1)
                .messages(1_000_000),
        )
        .build("fine")
        .unwrap();
    let slots = MAX_SCHEDULED_SLOTS as u64;
    for i in 1..=slots {
        allowed_at(&h, &p, T0 + i * 1000).await;
    }
    // Another send into a bucket already held is fine; a new bucket is not.
    allowed_at(&h, &p, T0 + 1000).await;
    match h
        .store
        .reserve_at("g", &p, ONE, Some(T0 + (slots + 1) * 1000), None)
        .await
    {
        Err(StoreError::Invalid(msg)) => assert!(msg.contains("scheduled"), "{msg}"),
        other => panic!("{other:?}"),
    }
    // Nothing was charged by the refusal, and sends now still pass.
    let u = h.store.usage("g", &p).await.unwrap();
    assert_eq!(u.windows[0].metrics[0].scheduled, slots + 1);
    allowed_at(&h, &p, T0).await;
}

/// A probe answers what the next reserve answers, at every instant tried, and charges
/// nothing: admitted with the usage as it is, or refused with the same denial.
async fn probes_answer_as_reserves_would_and_charge_nothing(h: Harness) {
    let p = ten_minutes();
    let instants = [
        None,
        Some(T0 + 30 * MIN),
        Some(T0 + 5 * MIN),
        Some(T0 + 30 * MIN),
    ];
    let (mut admitted, mut refused) = (0, 0);
    for round in 0..4 {
        for &t in &instants {
            let before = h.store.usage("g", &p).await.unwrap();
            let probe = h.store.probe_at("g", &p, ONE, t).await.unwrap();
            assert_eq!(
                h.store.usage("g", &p).await.unwrap(),
                before,
                "a probe charges nothing"
            );
            match (
                probe,
                h.store.reserve_at("g", &p, ONE, t, None).await.unwrap(),
            ) {
                (Probe::Fits(u), Decision::Allowed(_)) => {
                    assert_eq!(u, before);
                    admitted += 1;
                }
                (Probe::Refused(a), Decision::Denied(b)) => {
                    assert_eq!(a, b, "round {round} at {t:?}");
                    refused += 1;
                }
                (probe, decision) => panic!("round {round} at {t:?}: {probe:?} vs {decision:?}"),
            }
        }
    }
    assert!(
        admitted > 0 && refused > 0,
        "{admitted} admitted, {refused} refused"
    );
    // More than the limit itself is refused for good.
    let big = Cost::new(4, 4, 0);
    match h.store.probe_at("g", &p, big, None).await.unwrap() {
        Probe::Refused(d) => assert_eq!(d.fits_at, None),
        other => panic!("{other:?}"),
    }
}

contract!(
    probes_answer_as_reserves_would_and_charge_nothing,
    scheduled_sends_beyond_the_window_leave_now_free,
    a_live_send_that_would_put_four_in_a_window_is_refused,
    a_scheduled_send_is_refused_when_the_window_around_it_is_full,
    releasing_a_scheduled_charge_frees_its_slot,
    a_reservation_record_reads_back_and_releases,
    calendar_days_count_a_scheduled_send_on_its_day,
    a_scheduled_release_on_a_calendar_day_gives_back_that_day,
    a_past_instant_means_now_and_too_far_ahead_is_refused,
    forced_charges_at_an_instant_count_there,
    scheduled_buckets_expire_with_their_window,
    a_scope_holds_a_bounded_number_of_scheduled_buckets,
);
