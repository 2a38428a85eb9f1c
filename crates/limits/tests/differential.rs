//! The two backends side by side on one random sequence of reserves, releases and clock
//! moves: every decision, denial (window, metric, `retry_after`) and usage must agree.

mod common;

use std::time::Duration;

use limits::{CalendarUnit, Cost, Decision, ProfileSpec, Reservation, WindowSpec};

fn denial(d: &Decision) -> Option<(String, limits::Metric, Option<Duration>)> {
    match d {
        Decision::Denied(d) => Some((d.window_id.to_string(), d.metric, d.retry_after)),
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
    for step in 0..3000 {
        match rnd(10) {
            0..=5 => {
                let cost = Cost::new(1, rnd(8), 0);
                let a = mem.store.reserve("g", &p, cost, None).await.unwrap();
                let b = red.store.reserve("g", &p, cost, None).await.unwrap();
                assert_eq!(denial(&a), denial(&b), "step {step}: denials differ");
                assert_eq!(
                    format!("{:?}", a.usage()),
                    format!("{:?}", b.usage()),
                    "step {step}: usage differs"
                );
                if let (Some(x), Some(y)) = (a.reservation(), b.reservation()) {
                    held.push((x.clone(), y.clone()));
                }
            }
            6 | 7 if !held.is_empty() => {
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
}
