//! The two backends side by side on one random sequence of reserves (now and scheduled),
//! forced charges, releases and clock moves: every decision, denial (window, metric,
//! `fits_at`, `retry_after`) and usage must agree.

mod common;

use std::time::Duration;

use limits::{CalendarUnit, Cost, Decision, ProfileSpec, Reservation, WindowSpec};

type Seen = (String, limits::Metric, u64, Option<u64>, Option<Duration>);

fn denial(d: &Decision) -> Option<Seen> {
    match d {
        Decision::Denied(d) => Some((
            d.window_id.to_string(),
            d.metric,
            d.at,
            d.fits_at,
            d.retry_after,
        )),
        Decision::Allowed(_) => None,
    }
}

#[tokio::test]
async fn memory_and_redis_agree_on_a_random_sequence() {
    let p = ProfileSpec::default()
        .window(
            WindowSpec::rolling(Duration::from_secs(60))
                .messages(7)
                .recipients(20)
                .buckets(6),
        )
        .window(WindowSpec::calendar(CalendarUnit::Day, "Europe/Berlin").messages(15))
        .build("d")
        .unwrap();
    let mem = common::memory();
    let red = common::redis().await;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut held: Vec<(Reservation, Reservation)> = Vec::new();
    // (scheduled allowed, scheduled denied, denied now with a later fit): the sequence must
    // reach each, or it compares less than it claims.
    let mut seen = (0, 0, 0);
    for step in 0..4000 {
        match rnd(12) {
            0..=7 => {
                let cost = Cost::new(1, rnd(8), 0);
                // Half now, half scheduled up to a day and a half ahead (mostly within minutes).
                let at = match rnd(4) {
                    0 | 1 => None,
                    2 => Some(limits::Clock::now_ms(&mem.clock) + rnd(600_000)),
                    _ => Some(limits::Clock::now_ms(&mem.clock) + rnd(129_600_000)),
                };
                let a = mem.store.reserve_at("g", &p, cost, at, None).await.unwrap();
                let b = red.store.reserve_at("g", &p, cost, at, None).await.unwrap();
                assert_eq!(denial(&a), denial(&b), "step {step}: denials differ");
                match (&a, at) {
                    (Decision::Allowed(_), Some(_)) => seen.0 += 1,
                    (Decision::Denied(_), Some(_)) => seen.1 += 1,
                    (Decision::Denied(d), None) if d.fits_at.is_some() => seen.2 += 1,
                    _ => {}
                }
                assert_eq!(
                    format!("{:?}", a.usage()),
                    format!("{:?}", b.usage()),
                    "step {step}: usage differs"
                );
                if let (Some(x), Some(y)) = (a.reservation(), b.reservation()) {
                    held.push((x.clone(), y.clone()));
                }
            }
            8 => {
                let at = Some(limits::Clock::now_ms(&mem.clock) + rnd(300_000));
                let cost = Cost::new(rnd(2), rnd(3), 0);
                let a = mem.store.charge("g", &p, cost, at).await.unwrap().usage;
                let b = red.store.charge("g", &p, cost, at).await.unwrap().usage;
                assert_eq!(
                    format!("{a:?}"),
                    format!("{b:?}"),
                    "step {step}: charges differ"
                );
            }
            9 | 10 if !held.is_empty() => {
                let i = usize::try_from(rnd(held.len() as u64)).unwrap();
                let (x, y) = held.swap_remove(i);
                mem.store.release(&x).await.unwrap();
                red.store.release(&y).await.unwrap();
            }
            _ => {
                let by = Duration::from_millis(rnd(40_000));
                mem.advance(by);
                red.advance(by);
            }
        }
    }
    assert!(seen.0 > 50 && seen.1 > 50 && seen.2 > 50, "{seen:?}");
}
