//! Quota engine benchmarks (`cargo bench -p limits`). Figures and the machine they were
//! taken on are in `crates/limits/BENCHMARKS.md`.
//!
//! - `memory/reserve`: decisions per second of the memory store on one core (one
//!   current-thread runtime), over 10,000 grants with the iCloud profile.
//! - `redis/reserve` vs `redis/ping`: one reserve against a bare PING on the same
//!   connection to a private redis-server; the ratio is printed at the end.
//! - `*/reserve_scheduled`: a live reserve for a grant that also has a send scheduled in
//!   every 15-minute bucket of the next 30 days (2,880 scheduled buckets, the most Nylas's
//!   30-day horizon allows in a 24 h window): the slow path.
//! - Redis bytes held by one grant whose iCloud window has every bucket used, and by one
//!   with 30 days of scheduled buckets besides, printed.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use limits::{
    Cost, FakeClock, MemoryOptions, MemoryStore, Profile, QuotaStore, RedisConfig, RedisStore,
};
use testkit::RedisServer;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn memory(c: &mut Criterion) {
    let rt = runtime();
    let store = Arc::new(MemoryStore::new());
    // The same store keeping a journal (a write to the OS per change, fsync each second).
    let dir = tempfile::tempdir().unwrap();
    let options = MemoryOptions {
        path: Some(dir.path().to_owned()),
        ..MemoryOptions::default()
    };
    let journalled = Arc::new(MemoryStore::open(&options).unwrap());
    let profile = Profile::builtin("icloud").unwrap();
    let grants: Vec<String> = (0..10_000).map(|i| format!("grant-{i}")).collect();
    let mut g = c.benchmark_group("memory");
    g.throughput(Throughput::Elements(1));
    for (name, store) in [("reserve", &store), ("reserve_journal", &journalled)] {
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                i = (i + 1) % grants.len();
                let (store, grant, profile) = (store, &grants[i], &profile);
                async move {
                    let d = store
                        .reserve(grant, profile, Cost::new(1, 1, 0), None)
                        .await
                        .unwrap();
                    // Keep grants under their limit so the bench measures the allowed path.
                    if let Some(r) = d.reservation()
                        && r.id() % 512 == 0
                    {
                        store.reset(grant).await.unwrap();
                    }
                    black_box(d)
                }
            })
        });
    }
    // A decision then its barrier, as the gateway makes them for every send it forwards:
    // one write to the OS per send when sends come one at a time.
    let mut i = 0usize;
    g.bench_function("reserve_journal_durable", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % grants.len();
            let (store, grant, profile) = (&journalled, &grants[i], &profile);
            async move {
                let d = store
                    .reserve(grant, profile, Cost::new(1, 1, 0), None)
                    .await
                    .unwrap();
                store.durable().await.unwrap();
                if let Some(r) = d.reservation()
                    && r.id() % 512 == 0
                {
                    store.reset(grant).await.unwrap();
                }
                black_box(d)
            }
        })
    });
    let sched = scheduled_grant(&rt, store.as_ref(), "scheduled");
    g.bench_function("reserve_scheduled", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                store
                    .reserve("scheduled", &sched, Cost::new(1, 1, 0), None)
                    .await
                    .unwrap(),
            )
        })
    });
    g.finish();
}

/// A 24 h window of 96 buckets with room for every bench call, and a send scheduled in each
/// of its buckets for the next 30 days on `grant`.
fn scheduled_grant(rt: &tokio::runtime::Runtime, store: &dyn QuotaStore, grant: &str) -> Profile {
    let profile = limits::ProfileSpec::default()
        .window(limits::WindowSpec::rolling(Duration::from_secs(86_400)).messages(u64::MAX / 4))
        .build("sched")
        .unwrap();
    let now = limits::Clock::now_ms(&limits::SystemClock);
    for i in 1..=2880u64 {
        let at = Some(now + i * 900_000);
        rt.block_on(store.reserve_at(grant, &profile, Cost::new(1, 1, 0), at, None))
            .unwrap();
    }
    profile
}

fn redis(c: &mut Criterion) {
    let server = RedisServer::start();
    let rt = runtime();
    let cfg = RedisConfig {
        url: server.url(),
        timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    };
    let store = rt.block_on(RedisStore::connect(&cfg)).unwrap();
    let profile = Profile::builtin("icloud").unwrap();
    // A limit no bench run reaches, so every call takes the allowed path.
    let big = limits::ProfileSpec::default()
        .window(
            limits::WindowSpec::rolling(Duration::from_secs(86_400))
                .messages(u64::MAX / 4)
                .recipients(u64::MAX / 4),
        )
        .build("bench")
        .unwrap();
    rt.block_on(store.reserve("warm", &profile, Cost::new(1, 1, 0), None))
        .unwrap();

    let mut g = c.benchmark_group("redis");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ping", |b| {
        b.to_async(&rt)
            .iter(|| async { store.ping().await.unwrap() })
    });
    g.bench_function("reserve", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                store
                    .reserve("g", &big, Cost::new(1, 3, 0), None)
                    .await
                    .unwrap(),
            )
        })
    });
    g.bench_function("reserve_denied", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                store
                    .reserve("g", &profile, Cost::new(1, 3, 0), None)
                    .await
                    .unwrap(),
            )
        })
    });
    let sched = scheduled_grant(&rt, &store, "scheduled");
    g.bench_function("reserve_scheduled", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                store
                    .reserve("scheduled", &sched, Cost::new(1, 1, 0), None)
                    .await
                    .unwrap(),
            )
        })
    });
    g.finish();

    // The ratio, measured interleaved so both see the same machine load.
    let rounds = 20_000;
    let (mut ping, mut reserve) = (Duration::ZERO, Duration::ZERO);
    rt.block_on(async {
        for _ in 0..rounds {
            let t = Instant::now();
            store.ping().await.unwrap();
            ping += t.elapsed();
            let t = Instant::now();
            black_box(
                store
                    .reserve("g", &big, Cost::new(1, 3, 0), None)
                    .await
                    .unwrap(),
            );
            reserve += t.elapsed();
        }
    });
    println!(
        "redis reserve/ping latency ratio: {:.2} (reserve {:.1} µs, ping {:.1} µs, mean of {rounds})",
        reserve.as_secs_f64() / ping.as_secs_f64(),
        reserve.as_secs_f64() * 1e6 / f64::from(rounds),
        ping.as_secs_f64() * 1e6 / f64::from(rounds),
    );

    // Bytes held by a grant with every bucket of its iCloud window used.
    let clock = FakeClock::new(1_772_323_200_000);
    let store = rt
        .block_on(RedisStore::connect(&cfg))
        .unwrap()
        .with_clock_override(clock.clone());
    for _ in 0..97 {
        rt.block_on(store.reserve("full", &profile, Cost::new(1, 10, 20_000_000), None))
            .unwrap();
        clock.advance(Duration::from_secs(900));
    }
    let (total, records) = held_bytes(&server, "full");
    println!(
        "redis bytes per grant with every iCloud bucket used: {total} (MEMORY USAGE over its keys; \
         plus {records} in reservation records, which live ten minutes of Redis time)"
    );
    let (total, records) = held_bytes(&server, "scheduled");
    println!(
        "redis bytes per grant with 2,880 scheduled buckets: {total} (plus {records} in records)"
    );
}

/// Bytes held by `scope`'s keys: the counters, and apart the reservation records (each
/// kept ten minutes of Redis time; the fake clock here keeps every one alive).
fn held_bytes(server: &RedisServer, scope: &str) -> (i64, i64) {
    let keys = server
        .command(&["KEYS", &format!("sendgw:{{{scope}}}:*")])
        .unwrap();
    let (mut counters, mut records) = (0, 0);
    for k in keys.lines().skip(1).filter(|l| !l.starts_with('$')) {
        let bytes = server.int(&["MEMORY", "USAGE", k, "SAMPLES", "0"]);
        if k.contains(":c:") {
            records += bytes;
        } else {
            counters += bytes;
        }
    }
    (counters, records)
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = memory, redis
}
criterion_main!(benches);
