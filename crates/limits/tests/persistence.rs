//! The memory store's journal: what a store held comes back when it is opened again on
//! the same directory, whatever mix of charges, releases, resets, settings and
//! compactions came before; a torn last write is repaired; damage and a second process are
//! refused; and a capped store refuses new scopes without dropping any.

use std::path::Path;
use std::time::Duration;

use limits::{
    CalendarUnit, Clock, Cost, Decision, FakeClock, Guarded, META_PROFILE, MemoryOptions,
    MemoryStore, Profile, ProfileSpec, QuotaStore, Reservation, StoreError, Usage, WindowSpec,
};
use rand::{Rng, SeedableRng};

/// 2026-03-01T00:00:00Z.
const T0: u64 = 1_772_323_200_000;

fn profile() -> Profile {
    ProfileSpec::default()
        .window(
            WindowSpec::rolling(Duration::from_secs(3600))
                .buckets(12)
                .messages(40)
                .recipients(100),
        )
        .window(WindowSpec::calendar(CalendarUnit::Day, "Europe/Paris").recipients(150))
        .build("two")
        .unwrap()
}

fn options(dir: &Path, compact_at_bytes: u64) -> MemoryOptions {
    MemoryOptions {
        path: Some(dir.to_owned()),
        compact_at_bytes,
        ..MemoryOptions::default()
    }
}

fn open(dir: &Path, clock: &FakeClock, compact_at_bytes: u64) -> MemoryStore {
    MemoryStore::open_with_clock(&options(dir, compact_at_bytes), clock.clone()).expect("open")
}

const SCOPES: [&str; 5] = [
    "grant:a",
    "grant:b",
    "grant:c",
    "domain:x.example",
    "grant:e",
];

async fn all_usage(store: &MemoryStore, p: &Profile) -> Vec<Usage> {
    let mut out = Vec::new();
    for s in SCOPES {
        out.push(store.usage(s, p).await.unwrap());
    }
    out
}

async fn all_settings(store: &MemoryStore) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for s in SCOPES {
        for name in [META_PROFILE, "cooldown", "lock"] {
            out.push(store.meta_get(s, name).await.unwrap());
        }
    }
    out
}

/// One change: a charge (now, scheduled or forced, some idempotent), a release of an
/// earlier reservation, a reset, a setting written or removed, a cool-down, or time
/// passing.
#[derive(Debug, Clone)]
enum Op {
    Reserve(&'static str, Cost, Option<u64>, Option<String>),
    Charge(&'static str, Cost),
    Release(usize),
    Reset(&'static str),
    SetProfile(&'static str, Option<Duration>),
    DeleteProfile(&'static str),
    CoolDown(&'static str, Duration),
    Lock(&'static str, Duration),
    Unlock(&'static str),
    Wait(Duration),
}

fn random_op(rng: &mut rand::rngs::StdRng, now: u64) -> Op {
    let scope = SCOPES[rng.random_range(0..SCOPES.len())];
    let cost = Cost::new(1, rng.random_range(1..6), rng.random_range(0..5000));
    let secs = |rng: &mut rand::rngs::StdRng, max| Duration::from_secs(rng.random_range(1..max));
    match rng.random_range(0..100) {
        0..40 => {
            let at = rng
                .random_bool(0.3)
                .then(|| now + rng.random_range(0..6 * 3_600_000));
            let key = rng
                .random_bool(0.2)
                .then(|| format!("k{}", rng.random_range(0..5)));
            Op::Reserve(scope, cost, at, key)
        }
        40..50 => Op::Charge(scope, cost),
        50..65 => Op::Release(rng.random_range(0..1000)),
        65..68 => Op::Reset(scope),
        68..76 => Op::SetProfile(scope, rng.random_bool(0.5).then(|| secs(rng, 7200))),
        76..80 => Op::DeleteProfile(scope),
        80..84 => Op::CoolDown(scope, secs(rng, 600)),
        84..88 => Op::Lock(scope, secs(rng, 60)),
        88..90 => Op::Unlock(scope),
        _ => Op::Wait(Duration::from_millis(rng.random_range(0..900_000))),
    }
}

async fn apply(store: &MemoryStore, clock: &FakeClock, op: &Op, held: &mut Vec<Reservation>) {
    let p = profile();
    match op.clone() {
        Op::Reserve(scope, cost, at, key) => {
            let d = store.reserve_at(scope, &p, cost, at, key.as_deref()).await;
            if let Ok(Decision::Allowed(a)) = d {
                held.push(a.reservation);
            }
        }
        Op::Charge(scope, cost) => drop(store.charge(scope, &p, cost, None).await.unwrap()),
        Op::Release(i) if !held.is_empty() => {
            let r = held.swap_remove(i % held.len());
            store.release(&r).await.unwrap();
        }
        Op::Release(_) => {}
        Op::Reset(scope) => store.reset(scope).await.unwrap(),
        Op::SetProfile(scope, ttl) => {
            store
                .meta_set(scope, META_PROFILE, "gmail", ttl)
                .await
                .unwrap();
        }
        Op::DeleteProfile(scope) => store.meta_delete(scope, META_PROFILE).await.unwrap(),
        Op::CoolDown(scope, d) => store.cool_down(scope, d).await.unwrap(),
        Op::Lock(scope, ttl) => drop(store.meta_set_new(scope, "lock", "me", ttl).await),
        Op::Unlock(scope) => drop(store.meta_delete_if(scope, "lock", "me").await),
        Op::Wait(d) => clock.advance(d),
    }
}

/// Random histories run side by side on a journalled store and on one in memory only,
/// with and without compactions: the journalled store opened again reports exactly what
/// the other does, before and after the reservations made before the restart are given
/// back.
#[tokio::test]
async fn a_reopened_store_holds_exactly_what_it_held() {
    for (seed, compact_at) in [(1, 64 << 20), (2, 2048), (3, 300), (4, 64 << 20)] {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::new(T0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut held, mut held_ref) = (Vec::new(), Vec::new());
        let store = open(dir.path(), &clock, compact_at);
        let reference = MemoryStore::with_clock(clock.clone());
        for _ in 0..600 {
            let op = random_op(&mut rng, clock.now_ms());
            if let Op::Wait(d) = op {
                clock.advance(d);
                continue;
            }
            apply(&store, &clock, &op, &mut held).await;
            apply(&reference, &clock, &op, &mut held_ref).await;
        }
        drop(store);
        let again = open(dir.path(), &clock, compact_at);
        let want = all_usage(&reference, &profile()).await;
        assert!(
            want.iter().any(|u| u.windows[0].used.messages > 0),
            "seed {seed}: idle"
        );
        assert_eq!(all_usage(&again, &profile()).await, want, "seed {seed}");
        assert_eq!(all_settings(&again).await, all_settings(&reference).await);
        for (r, r_ref) in held.iter().zip(&held_ref) {
            again.release(r).await.unwrap();
            reference.release(r_ref).await.unwrap();
        }
        drop(again);
        let third = open(dir.path(), &clock, compact_at);
        let want = all_usage(&reference, &profile()).await;
        assert_eq!(
            all_usage(&third, &profile()).await,
            want,
            "seed {seed}, after releases"
        );
    }
}

#[tokio::test]
async fn a_reservation_made_before_a_restart_is_given_back_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(T0);
    let p = profile();
    let store = open(dir.path(), &clock, 64 << 20);
    let d = store
        .reserve("grant:a", &p, Cost::new(1, 3, 10), None)
        .await;
    let r = d.unwrap().reservation().unwrap().clone();
    drop(store);
    let store = open(dir.path(), &clock, 64 << 20);
    assert_eq!(
        store.usage("grant:a", &p).await.unwrap().windows[0]
            .used
            .recipients,
        3
    );
    store.release(&r).await.unwrap();
    store.release(&r).await.unwrap();
    drop(store);
    let store = open(dir.path(), &clock, 64 << 20);
    let u = store.usage("grant:a", &p).await.unwrap();
    assert_eq!(
        (u.windows[0].used.recipients, u.windows[1].used.recipients),
        (0, 0)
    );
}

#[tokio::test]
async fn an_idempotent_repeat_after_a_restart_charges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(T0);
    let p = profile();
    let store = open(dir.path(), &clock, 64 << 20);
    let first = store
        .reserve("grant:a", &p, Cost::new(1, 2, 0), Some("k"))
        .await;
    let first = first.unwrap().reservation().unwrap().clone();
    drop(store);
    let store = open(dir.path(), &clock, 64 << 20);
    let again = store
        .reserve("grant:a", &p, Cost::new(1, 2, 0), Some("k"))
        .await;
    let again = again.unwrap();
    assert!(again.is_replay());
    assert_eq!(again.reservation(), Some(&first));
    assert_eq!(
        again.usage().windows[0].used.recipients,
        2,
        "usage reported afresh"
    );
    assert_eq!(
        store.usage("grant:a", &p).await.unwrap().windows[0]
            .used
            .recipients,
        2
    );
}

#[tokio::test]
async fn overrides_and_cool_downs_survive_and_expire_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(T0);
    let p = profile();
    let store = open(dir.path(), &clock, 64 << 20);
    store
        .meta_set("grant:a", META_PROFILE, "gmail", None)
        .await
        .unwrap();
    store
        .cool_down("grant:a", Duration::from_secs(60))
        .await
        .unwrap();
    drop(store);
    let store = open(dir.path(), &clock, 64 << 20);
    let guarded = store
        .reserve_guarded("grant:a", &p, Cost::new(1, 1, 0), None, None, Some("gmail"))
        .await
        .unwrap();
    assert_eq!(guarded, Guarded::CoolingDown(Duration::from_secs(60)));
    clock.advance(Duration::from_secs(61));
    let guarded = store
        .reserve_guarded("grant:a", &p, Cost::new(1, 1, 0), None, None, Some("gmail"))
        .await
        .unwrap();
    assert!(matches!(guarded, Guarded::Decided(d) if d.is_allowed()));
}

/// A write cut short by a crash at any byte: the store opens with every record before it
/// and the file is cut back, so later writes follow a whole record.
#[tokio::test]
async fn a_torn_last_write_is_repaired_at_every_cut() {
    let clock = FakeClock::new(T0);
    let p = profile();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &clock, 64 << 20);
    store
        .reserve("grant:a", &p, Cost::new(1, 1, 0), None)
        .await
        .unwrap();
    store.durable().await.unwrap();
    let one = std::fs::read(dir.path().join("journal")).unwrap();
    store
        .reserve("grant:a", &p, Cost::new(1, 1, 0), None)
        .await
        .unwrap();
    drop(store);
    let two = std::fs::read(dir.path().join("journal")).unwrap();
    for cut in one.len()..two.len() {
        std::fs::write(dir.path().join("journal"), &two[..cut]).unwrap();
        let store = open(dir.path(), &clock, 64 << 20);
        let used = store.usage("grant:a", &p).await.unwrap().windows[0]
            .used
            .messages;
        assert_eq!(used, 1, "cut at {cut}");
        assert_eq!(std::fs::read(dir.path().join("journal")).unwrap(), one);
    }
}

#[tokio::test]
async fn damage_before_the_last_record_refuses_to_open() {
    let clock = FakeClock::new(T0);
    let p = profile();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &clock, 64 << 20);
    for _ in 0..3 {
        store
            .reserve("grant:a", &p, Cost::new(1, 1, 0), None)
            .await
            .unwrap();
    }
    drop(store);
    let path = dir.path().join("journal");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let err =
        MemoryStore::open_with_clock(&options(dir.path(), 64 << 20), clock.clone()).unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "a damaged journal is left as it was"
    );
}

#[tokio::test]
async fn two_stores_never_share_a_directory() {
    let clock = FakeClock::new(T0);
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path(), &clock, 64 << 20);
    let err =
        MemoryStore::open_with_clock(&options(dir.path(), 64 << 20), clock.clone()).unwrap_err();
    assert!(
        err.to_string().contains("another send-gateway process"),
        "{err}"
    );
}

/// Compaction keeps the journal near the size of what is live, however long it runs.
#[tokio::test]
async fn the_journal_stays_bounded_under_churn() {
    let clock = FakeClock::new(T0);
    let p = ProfileSpec::default()
        .window(WindowSpec::rolling(Duration::from_secs(60)).messages(1000))
        .build("minute")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &clock, 16 << 10);
    for i in 0..20_000u64 {
        let scope = format!("grant:{}", i % 7);
        let d = store
            .reserve(&scope, &p, Cost::new(1, 1, 0), None)
            .await
            .unwrap();
        if i % 2 == 0 {
            store.release(d.reservation().unwrap()).await.unwrap();
        }
        store.durable().await.unwrap();
        clock.advance(Duration::from_millis(500));
    }
    drop(store);
    let len = std::fs::metadata(dir.path().join("journal")).unwrap().len();
    // Some 3 MB were written in all; what is live takes a few tens of kilobytes.
    assert!(len < 128 << 10, "journal of {len} bytes");
    // What is live came through every compaction: the last minute's unreleased sends.
    let store = open(dir.path(), &clock, 16 << 10);
    let mut used = 0;
    for g in 0..7 {
        used += store
            .usage(&format!("grant:{g}"), &p)
            .await
            .unwrap()
            .windows[0]
            .used
            .messages;
    }
    assert!(
        (60..=70).contains(&used),
        "{used} sends counted in the last minute"
    );
}

#[tokio::test]
async fn a_full_store_refuses_new_scopes_and_keeps_the_old_ones() {
    let clock = FakeClock::new(T0);
    let p = profile();
    let options = MemoryOptions {
        max_scopes: Some(3),
        ..MemoryOptions::default()
    };
    let store = MemoryStore::open_with_clock(&options, clock.clone()).unwrap();
    for s in ["grant:a", "grant:b", "grant:c"] {
        store
            .reserve(s, &p, Cost::new(1, 1, 0), None)
            .await
            .unwrap();
    }
    let err = store.reserve("grant:d", &p, Cost::new(1, 1, 0), None).await;
    assert_eq!(err, Err(StoreError::Full(3)));
    assert_eq!(store.refused_scopes(), 1);
    assert_eq!(store.scope_count(), 3);
    let old = store.reserve("grant:a", &p, Cost::new(1, 1, 0), None).await;
    assert!(old.unwrap().is_allowed(), "a scope already held is served");
    // Once the old scopes' counts have expired, there is room again.
    clock.advance(Duration::from_secs(2 * 24 * 3600));
    let new = store.reserve("grant:d", &p, Cost::new(1, 1, 0), None).await;
    assert!(new.unwrap().is_allowed());
    assert_eq!(store.refused_scopes(), 1);
}

async fn fleet_listed(store: &MemoryStore) -> Vec<(String, String, f64, u64)> {
    let all = store.fleet_list(0.0, None, 100).await.unwrap();
    all.into_iter()
        .map(|e| (e.scope, e.profile, e.utilization, e.expires_at))
        .collect()
}

/// The fleet index comes back with a reopened store: entries as noted, lowered or removed
/// before the restart, through a compaction too, and an entry whose charges expired while
/// the store was closed stays gone.
#[tokio::test]
async fn the_fleet_index_survives_a_restart() {
    use limits::FleetEntry;
    let entry = |scope: &str, utilization: f64, expires_in: u64| FleetEntry {
        scope: scope.to_owned(),
        profile: "two".to_owned(),
        utilization,
        expires_at: T0 + expires_in,
        version: 0,
    };
    for compact_at in [64 << 20, 200] {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::new(T0);
        let store = open(dir.path(), &clock, compact_at);
        let notes = [
            entry("grant:a", 0.9, 3_600_000),
            entry("grant:b", 0.5, 3_600_000),
            entry("grant:c", 0.7, 3_600_000),
            entry("grant:d", 0.95, 60_000),
        ];
        store.fleet_note(&notes).await.unwrap();
        let listed_before = store.fleet_list(0.0, None, 100).await.unwrap();
        let version = |s: &str| listed_before.iter().find(|e| e.scope == s).unwrap().version;
        store
            .fleet_lower("grant:a", version("grant:a"), 0.25)
            .await
            .unwrap();
        store
            .fleet_lower("grant:b", version("grant:b"), 0.0)
            .await
            .unwrap();
        // Enough churn to pass the small store's compaction threshold.
        for i in 0..20 {
            store
                .fleet_note(&[entry("grant:c", 0.7 + f64::from(i) / 1000.0, 3_600_000)])
                .await
                .unwrap();
        }
        let want = fleet_listed(&store).await;
        assert_eq!(want.len(), 3, "{want:?}");
        drop(store);
        let again = open(dir.path(), &clock, compact_at);
        assert_eq!(fleet_listed(&again).await, want, "compact_at {compact_at}");
        // grant:d's charges stop counting after a minute: gone after a restart past it.
        drop(again);
        clock.advance(Duration::from_secs(61));
        let third = open(dir.path(), &clock, compact_at);
        let scopes: Vec<String> = fleet_listed(&third)
            .await
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(scopes, ["grant:c", "grant:a"], "compact_at {compact_at}");
    }
}
