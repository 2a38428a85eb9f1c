//! Adversarial tests of scheduled charges (`reserve_at`, `charge` at an instant, `release`),
//! on both stores, from a review of the scheduled-send engine: the attacks it tried, kept as
//! guards (the two it found to work are fixed and say so).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Harness, T0, contract, ten_minutes};
use limits::{
    CalendarUnit, Clock, Cost, Decision, Denial, Profile, ProfileSpec, QuotaStore, Reservation,
    WindowSpec,
};

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;
const ONE: Cost = Cost::new(1, 1, 0);

fn ms(s: &str) -> u64 {
    u64::try_from(s.parse::<jiff::Timestamp>().unwrap().as_millisecond()).unwrap()
}

async fn at(store: &dyn QuotaStore, p: &Profile, t: Option<u64>, cost: Cost) -> Decision {
    store
        .reserve_at("g", p, cost, t, None)
        .await
        .expect("reserve")
}

async fn allowed(store: &dyn QuotaStore, p: &Profile, t: Option<u64>) -> Reservation {
    match at(store, p, t, ONE).await {
        Decision::Allowed(a) => a.reservation,
        Decision::Denied(d) => panic!("denied at {t:?}: {d:?}"),
    }
}

fn denied(d: Decision) -> Denial {
    match d {
        Decision::Denied(d) => d,
        Decision::Allowed(a) => panic!("allowed: {:?}", a.reservation),
    }
}

async fn scheduled_messages(store: &dyn QuotaStore, p: &Profile) -> (u64, u64) {
    let u = store.usage("g", p).await.unwrap();
    let m = &u.windows[0].metrics[0];
    (m.used, m.scheduled)
}

/// Found in review, fixed: `reset` used to forget the counters but not what a reservation
/// made before it could still give back. A scheduled send remembered before an admin reset (`DELETE /v1/quota/{g}`),
/// cancelled afterwards, takes its unit out of the sends counted since: the bucket then
/// holds fewer than will go out.
async fn a_release_after_reset_takes_nothing_from_later_charges(h: Harness) {
    let p = ten_minutes();
    let s = h.store.as_ref();
    let old = allowed(s, &p, Some(T0 + 5 * MIN)).await;
    h.store.reset("g").await.unwrap();
    for _ in 0..3 {
        allowed(s, &p, Some(T0 + 5 * MIN)).await;
    }
    // The cancel of the send scheduled before the reset arrives now.
    h.store.release(&old).await.unwrap();
    assert_eq!(
        scheduled_messages(s, &p).await,
        (0, 3),
        "three sends charged after the reset still go out at +5 min"
    );
    let d = at(s, &p, Some(T0 + 5 * MIN), ONE).await;
    assert!(
        !d.is_allowed(),
        "a fourth send in a ten-minute stretch that holds three"
    );
}

/// A cancel and a `send_failed` webhook (or two replicas) releasing one reservation at the
/// same moment give it back once.
async fn concurrent_releases_of_one_reservation_give_back_once(h: Harness) {
    let p = ten_minutes();
    let s = h.store.as_ref();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(allowed(s, &p, Some(T0 + 5 * MIN)).await);
    }
    let other = h.second().await;
    let r = held.pop().unwrap();
    let copy = r.clone();
    let (a, b, c) = tokio::join!(
        h.store.release(&r),
        other.release(&r),
        h.store.release(&copy)
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    // A record read back from the store is the same reservation: still nothing more.
    let back = Reservation::from_record("g", &r.to_record()).unwrap();
    other.release(&back).await.unwrap();
    assert_eq!(scheduled_messages(s, &p).await, (0, 2));
    allowed(s, &p, Some(T0 + 5 * MIN)).await;
    assert!(!at(s, &p, Some(T0 + 5 * MIN), ONE).await.is_allowed());
}

/// A record whose scope, cost or buckets were changed cannot give back more than the
/// reservation it names charged: releases are keyed by the reservation id.
async fn a_tampered_record_gives_back_at_most_once(h: Harness) {
    let p = ten_minutes();
    let s = h.store.as_ref();
    let r = allowed(s, &p, Some(T0 + 5 * MIN)).await;
    for _ in 0..2 {
        allowed(s, &p, Some(T0 + 5 * MIN)).await;
    }
    h.store.release(&r).await.unwrap();
    // The same id with a bigger cost: already released, so nothing.
    let record = r.to_record().replacen(";1,1,0;", ";3,3,0;", 1);
    let bigger = Reservation::from_record("g", &record).expect("a record");
    assert_eq!(bigger.cost(), Cost::new(3, 3, 0));
    h.store.release(&bigger).await.unwrap();
    assert_eq!(scheduled_messages(s, &p).await, (0, 2));
}

/// A scheduled charge given back after its bucket became current (a `send_failed` webhook
/// comes after `send_at`) gives back exactly its own unit, once.
async fn a_release_after_the_bucket_became_current_gives_back_its_unit(h: Harness) {
    let p = ten_minutes();
    let s = h.store.as_ref();
    let r = allowed(s, &p, Some(T0 + 5 * MIN)).await;
    allowed(s, &p, Some(T0 + 5 * MIN)).await;
    allowed(s, &p, None).await;
    h.advance(Duration::from_millis(6 * MIN));
    assert_eq!(scheduled_messages(s, &p).await, (3, 0));
    h.store.release(&r).await.unwrap();
    h.store.release(&r).await.unwrap();
    assert_eq!(scheduled_messages(s, &p).await, (2, 0));
    allowed(s, &p, None).await;
    let d = denied(at(s, &p, None, ONE).await);
    // The send made at T0 leaves every stretch at +11 min.
    assert_eq!(d.fits_at, Some(T0 + 11 * MIN));
    assert_eq!(d.retry_after, Some(Duration::from_secs(5 * 60)));
}

/// Releasing the newest scheduled bucket keeps the live fast path exact (Redis's `n`
/// field), and a later live send is judged against what is left.
async fn releasing_the_newest_scheduled_bucket_keeps_live_sends_exact(h: Harness) {
    let p = ten_minutes();
    let s = h.store.as_ref();
    allowed(s, &p, Some(T0 + 3 * MIN)).await;
    let newest = allowed(s, &p, Some(T0 + 30 * MIN)).await;
    h.store.release(&newest).await.unwrap();
    allowed(s, &p, None).await;
    allowed(s, &p, None).await;
    let d = denied(at(s, &p, None, ONE).await);
    assert_eq!(d.fits_at, Some(T0 + 11 * MIN));
    let u = s.usage("g", &p).await.unwrap();
    let m = &u.windows[0].metrics[0];
    assert_eq!((m.used, m.scheduled, m.remaining), (2, 1, 0));
    // Past +3 min, the scheduled one is counted as used, not scheduled.
    h.advance(Duration::from_millis(4 * MIN));
    let u = s.usage("g", &p).await.unwrap();
    let m = &u.windows[0].metrics[0];
    assert_eq!((m.used, m.scheduled, m.remaining), (3, 0, 0));
}

/// New York's 25-hour day (2026-11-01) holds a send scheduled at 23:30 EST, which is
/// already 2 November in UTC; the next day starts at local midnight, 05:00Z. Its 23-hour
/// day (2026-03-08) ends at 04:00Z on the 9th.
async fn dst_days_hold_the_sends_scheduled_on_them(h: Harness) {
    let p = ProfileSpec::default()
        .window(WindowSpec::calendar(CalendarUnit::Day, "America/New_York").messages(1))
        .build("ny")
        .unwrap();
    let s = h.store.as_ref();
    allowed(s, &p, Some(ms("2026-11-01T16:00:00Z"))).await;
    let d = denied(at(s, &p, Some(ms("2026-11-02T04:30:00Z")), ONE).await);
    assert_eq!(d.fits_at, Some(ms("2026-11-02T05:00:00Z")));
    assert_eq!(d.retry_after, None);
    allowed(s, &p, Some(ms("2026-11-02T05:00:00Z"))).await;
    // The short day: 05:00Z on the 8th to 04:00Z on the 9th.
    allowed(s, &p, Some(ms("2026-03-08T05:00:00Z"))).await;
    let d = denied(at(s, &p, Some(ms("2026-03-09T03:59:59Z")), ONE).await);
    assert_eq!(d.fits_at, Some(ms("2026-03-09T04:00:00Z")));
    allowed(s, &p, Some(ms("2026-03-09T04:00:00Z"))).await;
    // The day before the short day is free, and so is today.
    allowed(s, &p, Some(ms("2026-03-08T04:59:59Z"))).await;
    allowed(s, &p, None).await;
    let u = s.usage("g", &p).await.unwrap();
    let m = &u.windows[0].metrics[0];
    assert_eq!((m.used, m.scheduled), (1, 5));
    // When the long day has come, its send counts as used, and release gives it back.
    h.clock.set(ms("2026-11-01T12:00:00Z"));
    let u = s.usage("g", &p).await.unwrap();
    assert_eq!(u.windows[0].metrics[0].used, 1);
}

/// Santiago skips midnight when DST starts (2026-09-06: 00:00 becomes 01:00): that day
/// starts at its first instant, and a charge just before it belongs to the day before.
async fn a_zone_that_skips_midnight_keeps_days_apart(h: Harness) {
    let p = ProfileSpec::default()
        .window(WindowSpec::calendar(CalendarUnit::Day, "America/Santiago").messages(1))
        .build("cl")
        .unwrap();
    let s = h.store.as_ref();
    // 2026-09-05 23:59:59 -04 is 2026-09-06T03:59:59Z; 01:00 -03 on the 6th is 04:00Z.
    allowed(s, &p, Some(ms("2026-09-06T03:59:59Z"))).await;
    allowed(s, &p, Some(ms("2026-09-06T04:00:00Z"))).await;
    let d = denied(at(s, &p, Some(ms("2026-09-06T12:00:00Z")), ONE).await);
    // The 6th has 23 hours: it ends at midnight -03 on the 7th, 03:00Z.
    assert_eq!(d.fits_at, Some(ms("2026-09-07T03:00:00Z")));
}

/// A forced charge (a correction after Nylas's answer) at a later instant counts there
/// past the limit, refuses what would overfill the stretch around it, and leaves now alone.
async fn a_forced_charge_past_the_limit_at_an_instant(h: Harness) {
    let p = ten_minutes();
    let s = h.store.as_ref();
    let u = s
        .charge("g", &p, Cost::new(5, 0, 0), Some(T0 + 20 * MIN))
        .await
        .unwrap()
        .usage;
    assert_eq!(u.windows[0].metrics[0].scheduled, 5);
    assert_eq!(u.windows[0].metrics[0].remaining, 3);
    let d = denied(at(s, &p, Some(T0 + 15 * MIN), ONE).await);
    // The stretch holding +15 min also holds +20 min until +31 min.
    assert_eq!(d.fits_at, Some(T0 + 31 * MIN));
    for _ in 0..3 {
        allowed(s, &p, None).await;
    }
    assert!(!at(s, &p, None, ONE).await.is_allowed());
}

/// The earliest instant every window takes a charge, when they disagree: the rolling
/// window is free from +11 min, the calendar day (full with a send scheduled for this
/// afternoon) only from midnight, and just after midnight a scheduled burst fills the
/// rolling window again until 00:21, when the new day still has room.
async fn fits_at_agrees_across_windows(h: Harness) {
    let p = ProfileSpec::default()
        .window(
            WindowSpec::rolling(Duration::from_secs(600))
                .buckets(10)
                .messages(3),
        )
        .window(WindowSpec::calendar(CalendarUnit::Day, "UTC").messages(4))
        .build("two")
        .unwrap();
    let s = h.store.as_ref();
    for _ in 0..3 {
        allowed(s, &p, None).await;
    }
    allowed(s, &p, Some(T0 + 14 * HOUR)).await;
    let midnight = T0 + 24 * HOUR;
    for _ in 0..3 {
        allowed(s, &p, Some(midnight + 10 * MIN)).await;
    }
    let d = denied(at(s, &p, None, ONE).await);
    let fits = d.fits_at.expect("a later fit");
    assert_eq!(fits, midnight + 21 * MIN);
    assert_eq!(
        d.retry_after,
        Some(Duration::from_secs((fits - T0).div_ceil(1000)))
    );
    assert!(!at(s, &p, Some(fits - 1), ONE).await.is_allowed());
    assert!(at(s, &p, Some(fits), ONE).await.is_allowed());
}

contract!(
    a_release_after_reset_takes_nothing_from_later_charges,
    concurrent_releases_of_one_reservation_give_back_once,
    a_tampered_record_gives_back_at_most_once,
    a_release_after_the_bucket_became_current_gives_back_its_unit,
    releasing_the_newest_scheduled_bucket_keeps_live_sends_exact,
    dst_days_hold_the_sends_scheduled_on_them,
    a_zone_that_skips_midnight_keeps_days_apart,
    a_forced_charge_past_the_limit_at_an_instant,
    fits_at_agrees_across_windows,
);

/// Found in review, fixed (a divergence): a decision that charges nothing (a denial) moves the memory
/// store's "now" forward (`latest`), Redis's only on a charge (`h`). After the clock steps
/// back, the same request is charged in different buckets: memory at the instant of the
/// denial, Redis at the instant asked for, so usage and `Reservation::at` differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_agree_when_the_clock_steps_back_after_a_denial() {
    let p = ten_minutes();
    let mem = common::memory();
    let red = common::redis().await;
    let mut answers = Vec::new();
    for h in [&mem, &red] {
        let s = h.store.as_ref();
        for _ in 0..2 {
            allowed(s, &p, None).await;
        }
        h.advance(Duration::from_millis(9 * MIN));
        assert!(!at(s, &p, None, Cost::new(2, 0, 0)).await.is_allowed());
        h.clock.set(T0 + 5 * MIN);
        let r = allowed(s, &p, Some(T0 + 7 * MIN)).await;
        answers.push((
            r.at(),
            r.charges().to_vec(),
            scheduled_messages(s, &p).await,
        ));
    }
    assert_eq!(answers[0], answers[1], "memory vs Redis after a step back");
}

/// Memory and Redis side by side on a harsher sequence than `differential.rs`: three
/// windows (a rolling hour in four buckets, ten minutes in ten, a New York month across
/// both DST changes), jumps of up to two days, charges up to 40 days ahead, forced
/// charges at instants, releases of old reservations (some long expired), and usage reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_agree_on_a_harsh_random_sequence() {
    let p = ProfileSpec::default()
        .window(
            WindowSpec::rolling(Duration::from_secs(3600))
                .buckets(4)
                .messages(9)
                .recipients(30),
        )
        .window(
            WindowSpec::rolling(Duration::from_secs(600))
                .buckets(10)
                .messages(4),
        )
        .window(WindowSpec::calendar(CalendarUnit::Month, "America/New_York").messages(60))
        .build("harsh")
        .unwrap();
    let mem = common::memory();
    let red = common::redis().await;
    // Start just before New York's spring change, so months and days cross it.
    for h in [&mem, &red] {
        h.clock.set(ms("2026-03-07T23:00:00Z"));
    }
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut held: Vec<(Reservation, Reservation)> = Vec::new();
    let mut seen = (0u32, 0u32, 0u32);
    for step in 0..2500 {
        let now = mem.clock.now_ms();
        match rnd(16) {
            0..=8 => {
                let cost = Cost::new(1, rnd(6), 0);
                let at = match rnd(5) {
                    0 | 1 => None,
                    2 => Some(now + rnd(20 * MIN)),
                    3 => Some(now + rnd(3 * HOUR)),
                    _ => Some(now + rnd(40 * 24 * HOUR)),
                };
                let a = mem.store.reserve_at("g", &p, cost, at, None).await.unwrap();
                let b = red.store.reserve_at("g", &p, cost, at, None).await.unwrap();
                let key = |d: &Decision| match d {
                    Decision::Allowed(a) => (
                        true,
                        a.reservation.at(),
                        a.reservation.charges().to_vec(),
                        None,
                        None,
                        0,
                    ),
                    Decision::Denied(d) => {
                        (false, d.at, Vec::new(), d.fits_at, d.retry_after, d.used)
                    }
                };
                assert_eq!(key(&a), key(&b), "step {step}: decisions differ");
                assert_eq!(
                    format!("{:?}", a.usage()),
                    format!("{:?}", b.usage()),
                    "step {step}: usage differs"
                );
                match &a {
                    Decision::Allowed(_) if at.is_some() => seen.0 += 1,
                    Decision::Denied(d) if d.fits_at.is_some() => seen.1 += 1,
                    _ => {}
                }
                if let (Some(x), Some(y)) = (a.reservation(), b.reservation()) {
                    held.push((x.clone(), y.clone()));
                }
            }
            9 => {
                let at = Some(now + rnd(2 * HOUR));
                let cost = Cost::new(rnd(2), rnd(4), 0);
                let a = mem.store.charge("g", &p, cost, at).await.unwrap().usage;
                let b = red.store.charge("g", &p, cost, at).await.unwrap().usage;
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "step {step}: charges");
            }
            10..=11 if !held.is_empty() => {
                // Any held reservation, however old: releasing expired ones changes nothing.
                let i = usize::try_from(rnd(held.len() as u64)).unwrap();
                let (x, y) = held.swap_remove(i);
                mem.store.release(&x).await.unwrap();
                red.store.release(&y).await.unwrap();
                seen.2 += 1;
            }
            12 => {
                let a = mem.store.usage("g", &p).await.unwrap();
                let b = red.store.usage("g", &p).await.unwrap();
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "step {step}: usage");
            }
            13 => {
                let by = Duration::from_millis(rnd(48 * HOUR));
                mem.advance(by);
                red.advance(by);
            }
            _ => {
                let by = Duration::from_millis(rnd(5 * MIN));
                mem.advance(by);
                red.advance(by);
            }
        }
    }
    assert!(seen.0 > 100 && seen.1 > 50 && seen.2 > 50, "{seen:?}");
}

/// Many gateways releasing many reservations of one scope at once, on one Redis: every
/// reservation is given back exactly once, whatever the interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_replicas_release_each_reservation_once() {
    let p = ProfileSpec::default()
        .window(
            WindowSpec::rolling(Duration::from_secs(600))
                .buckets(10)
                .messages(40),
        )
        .build("race")
        .unwrap();
    let h = common::redis().await;
    let other = h.second().await;
    let mut held = Vec::new();
    for i in 0..40u64 {
        let t = Some(T0 + (i % 4) * MIN + 2 * MIN);
        held.push(allowed(h.store.as_ref(), &p, t).await);
    }
    let mut tasks = Vec::new();
    for (i, r) in held.iter().take(30).enumerate() {
        for store in [Arc::clone(&h.store), Arc::clone(&other)] {
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    tokio::task::yield_now().await;
                }
                store.release(&r).await.unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(scheduled_messages(h.store.as_ref(), &p).await, (0, 10));
}
