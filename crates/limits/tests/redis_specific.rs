//! What only the Redis store has to show: its keys, their expiry, Redis's clock, one round
//! trip per decision, and typed errors when Redis misbehaves.

mod common;

use std::time::Duration;

use limits::{
    CalendarUnit, Cost, FakeClock, Profile, ProfileSpec, QuotaStore, RedisConfig, RedisStore,
    StoreError, WindowSpec,
};
use testkit::RedisServer;

fn config(server: &RedisServer, timeout: Duration) -> RedisConfig {
    RedisConfig {
        url: server.url(),
        timeout,
        key_prefix: "t".into(),
        ..RedisConfig::default()
    }
}

fn keys(server: &RedisServer) -> Vec<String> {
    let raw = server.command(&["KEYS", "*"]).unwrap();
    raw.lines()
        .skip(1)
        .filter(|l| !l.starts_with('$'))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn uses_redis_time_and_expires_every_key() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&config(&server, Duration::from_secs(2)))
        .await
        .unwrap();
    let p = ProfileSpec::default()
        .window(WindowSpec::rolling(Duration::from_secs(3600)).messages(2))
        .window(WindowSpec::calendar(CalendarUnit::Day, "Europe/Berlin").recipients(100))
        .build("mixed")
        .unwrap();
    let d = store
        .reserve("grant-1", &p, Cost::new(1, 3, 0), Some("idem"))
        .await
        .unwrap();
    assert!(d.is_allowed());
    store.release(d.reservation().unwrap()).await.unwrap();
    assert!(
        store
            .reserve("grant-1", &p, Cost::new(1, 3, 0), None)
            .await
            .unwrap()
            .is_allowed()
    );
    let all = keys(&server);
    let mut windows: Vec<&String> = all.iter().filter(|k| k.contains(":w:")).collect();
    windows.sort();
    // Keys name the scope and the window (period and bucketing), never a limit value.
    assert_eq!(
        windows,
        [
            "t:{grant-1}:w:day@Europe/Berlin",
            "t:{grant-1}:w:r3600000b96"
        ],
        "{all:?}"
    );
    assert!(
        all.iter().any(|k| k.starts_with("t:{grant-1}:x:")),
        "release marker: {all:?}"
    );
    assert!(
        all.iter().any(|k| k == "t:{grant-1}:k"),
        "key index: {all:?}"
    );
    for k in &all {
        assert!(
            k.starts_with("t:{grant-1}:"),
            "every key carries the scope's hash tag: {k}"
        );
        let ttl = server.int(&["PTTL", k]);
        assert!(ttl > 0, "{k} has no expiry ({ttl})");
    }
    // With Redis's own clock, the rolling key lives about an hour (plus one 37.5 s bucket).
    let rolling = all.iter().find(|k| k.contains(":w:r3600000")).unwrap();
    let ttl = server.int(&["PTTL", rolling]);
    assert!(ttl > 3_500_000 && ttl <= 3_637_500, "{ttl}");
    let u = store.usage("grant-1", &p).await.unwrap();
    assert_eq!(u.windows[0].used.messages, 1);
    assert_eq!(u.windows[1].used.recipients, 3);
}

#[tokio::test]
async fn one_round_trip_per_decision() {
    let server = RedisServer::start();
    let clock = FakeClock::new(common::T0);
    let store = RedisStore::connect(&config(&server, Duration::from_secs(2)))
        .await
        .unwrap()
        .with_clock_override(clock);
    let p = Profile::builtin("icloud").unwrap();
    // Load the script once, then count commands.
    store
        .reserve("warm", &p, Cost::new(1, 1, 0), None)
        .await
        .unwrap();
    server.command(&["CONFIG", "RESETSTAT"]).unwrap();
    for i in 0..10 {
        store
            .reserve("g", &p, Cost::new(1, 100, 0), None)
            .await
            .unwrap()
            .reservation()
            .map(|_| i);
    }
    let info = server.command(&["INFO", "commandstats"]).unwrap();
    let calls = |cmd: &str| -> u64 {
        info.lines()
            .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // Ten allowed and denied decisions (the limit is 1,000 recipients), ten EVALSHA calls.
    assert_eq!(calls("evalsha"), 10, "{info}");
    assert_eq!(calls("eval"), 0);
}

#[tokio::test]
async fn reloads_the_script_after_script_flush() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&config(&server, Duration::from_secs(2)))
        .await
        .unwrap();
    let p = Profile::builtin("google").unwrap();
    assert!(
        store
            .reserve("g", &p, Cost::new(1, 1, 0), None)
            .await
            .unwrap()
            .is_allowed()
    );
    server.command(&["SCRIPT", "FLUSH"]).unwrap();
    assert!(
        store
            .reserve("g", &p, Cost::new(1, 1, 0), None)
            .await
            .unwrap()
            .is_allowed()
    );
    let u = store.usage("g", &p).await.unwrap();
    assert_eq!(u.windows[0].used.messages, 2);
}

#[tokio::test]
async fn a_full_icloud_window_fits_in_4_kib() {
    let server = RedisServer::start();
    let clock = FakeClock::new(common::T0);
    let store = RedisStore::connect(&config(&server, Duration::from_secs(2)))
        .await
        .unwrap()
        .with_clock_override(clock.clone());
    let p = Profile::builtin("icloud").unwrap();
    // One send in every one of the 97 buckets that can be live at once, 10 recipients each.
    for _ in 0..97 {
        assert!(
            store
                .reserve("full", &p, Cost::new(1, 10, 20_000_000), None)
                .await
                .unwrap()
                .is_allowed()
        );
        clock.advance(Duration::from_secs(900));
    }
    let bytes = |k: &String| server.int(&["MEMORY", "USAGE", k, "SAMPLES", "0"]);
    // Each reservation's record lives ten minutes of Redis time (for giving back a reserve
    // whose answer was lost), so at most the last ten minutes' sends hold one; the fake
    // clock keeps all 97 alive here, so they are measured apart.
    let (records, held): (Vec<String>, Vec<String>) =
        keys(&server).into_iter().partition(|k| k.contains(":c:"));
    let total: i64 = held.iter().map(bytes).sum();
    assert!(total <= 4096, "a full iCloud grant uses {total} bytes");
    assert_eq!(records.len(), 97);
    let per_record = records.iter().map(bytes).max().unwrap_or(0);
    assert!(
        per_record <= 128,
        "a reservation record uses {per_record} bytes"
    );
}

#[tokio::test]
async fn errors_are_typed_and_the_connection_recovers() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(300);
    let store = RedisStore::connect(&config(&server, timeout))
        .await
        .unwrap();
    let p = Profile::builtin("icloud").unwrap();
    assert!(
        store
            .reserve("g", &p, Cost::new(1, 1, 0), None)
            .await
            .unwrap()
            .is_allowed()
    );

    server.pause();
    let err = store
        .reserve("g", &p, Cost::new(1, 1, 0), None)
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::Timeout(timeout));
    server.resume();

    server.stop();
    let err = store
        .reserve("g", &p, Cost::new(1, 1, 0), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable(_) | StoreError::Timeout(_)),
        "{err:?}"
    );
    assert!(store.ping().await.is_err());

    server.restart();
    let mut recovered = false;
    for _ in 0..50 {
        if store
            .reserve("g", &p, Cost::new(1, 1, 0), None)
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "the connection manager reconnects after a restart"
    );
    store.ping().await.unwrap();
}

#[tokio::test]
async fn bad_configuration_is_refused() {
    let err = RedisStore::connect(&RedisConfig {
        key_prefix: "a{b".into(),
        ..RedisConfig::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)));
    let err = RedisStore::connect(&RedisConfig {
        url: "http://nope".into(),
        ..RedisConfig::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}
