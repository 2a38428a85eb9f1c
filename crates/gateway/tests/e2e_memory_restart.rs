//! End to end with the real binary and the memory store keeping a journal (`store.path`):
//! a gateway killed with SIGKILL in the middle of a load comes back with every charge of
//! every send that reached Nylas, its overrides and its cool-downs, and lets no more than
//! the quota through over both lives. A capped store refuses new grants with 503.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Process, client, fake};
use fake_nylas::{DEMO_GRANT_ID, Grant, Rule};
use futures_util::future::join_all;
use serde_json::{Value, json};

const QUOTA: u64 = 300;
const LOAD: usize = 200;

fn write_config(dir: &Path, nylas: &str, extra: &str) -> std::path::PathBuf {
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
url = "{nylas}"
timeout = "30s"

[store]
backend = "memory"
path = "{state}"
{extra}

[grants]
default_profile = "sixty"

[profiles.sixty]
[[profiles.sixty.windows]]
period = "24h"
messages = {QUOTA}

[profiles.two]
[[profiles.two.windows]]
period = "24h"
messages = 2
"#,
        state = dir.join("state").display(),
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

async fn quota(gw: &Process, grant: &str) -> Value {
    let resp = client()
        .get(format!("{}/v1/quota/{grant}", gw.admin))
        .send()
        .await
        .expect("quota");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("quota JSON")
}

async fn used(gw: &Process, grant: &str) -> u64 {
    quota(gw, grant).await["windows"][0]["messages"]["used"]
        .as_u64()
        .expect("messages used")
}

/// Sends `n` concurrently; SIGKILLs the gateway once `kill_after` have been answered 200.
/// Returns how many were answered 200.
async fn load_then_kill(gw: &mut Process, n: usize, kill_after: usize) -> usize {
    let ok = std::sync::atomic::AtomicUsize::new(0);
    let sends = (0..n).map(|_| async {
        if let Ok(resp) = gw.send(DEMO_GRANT_ID).send().await
            && resp.status() == 200
            && ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == kill_after
        {
            gw.signal("KILL");
        }
    });
    join_all(sends).await;
    ok.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_comes_back_with_every_count_override_and_cool_down() {
    let nylas = fake().await;
    let throttled = nylas.add_grant(Grant::new("t@corp.example")).id;
    let overridden = nylas.add_grant(Grant::new("o@corp.example")).id;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &nylas.url(), "");
    let mut gw = Process::spawn(&config);

    // An override set through the admin API, and a cool-down taught by Nylas.
    let resp = client()
        .put(format!("{}/v1/grants/{overridden}/profile", gw.admin))
        .json(&json!({ "profile": "two" }))
        .send()
        .await
        .expect("override");
    assert_eq!(resp.status(), 200);
    nylas
        .add_rule(Rule::rate_limited(600).path("/messages/send").times(1))
        .expect("rule");
    assert_eq!(gw.send_once(&throttled).await.0, 429);
    let before_load = nylas.sends().len();

    let ok = load_then_kill(&mut gw, LOAD, 20).await;
    let status = gw.exit_status(Duration::from_secs(10)).await;
    assert!(status.is_some(), "the gateway did not die");
    let reached = nylas.sends().len() - before_load;
    eprintln!("before the kill: {ok} answered 200, {reached} reached Nylas");
    assert!(reached >= 20, "{reached} sends reached Nylas");

    let gw = Process::spawn(&config);
    let counted = used(&gw, DEMO_GRANT_ID).await;
    eprintln!("after the restart: {counted} counted");
    // Nothing lost: every send that reached Nylas is counted. At most the sends in flight
    // at the kill are counted without having gone out (the safe side).
    assert!(
        counted >= reached as u64,
        "{counted} counted, {reached} sent"
    );
    assert!(
        counted <= LOAD as u64,
        "{counted} counted of {LOAD} attempted"
    );
    let q = quota(&gw, &overridden).await;
    assert_eq!(q["profile"], "two", "{q}");
    assert_eq!(q["profile_source"], "override", "{q}");
    let (status, body) = gw.send_once(&throttled).await;
    assert_eq!(
        (status, &body["error"]["type"]),
        (429, &json!("provider_throttled"))
    );

    // Over both lives, no more than the quota reached Nylas for the grant.
    let more = (0..QUOTA).map(|_| gw.send_once(DEMO_GRANT_ID));
    let statuses: Vec<u16> = join_all(more).await.into_iter().map(|(s, _)| s).collect();
    let demo_sent = nylas
        .sends()
        .iter()
        .filter(|s| s.path.contains(DEMO_GRANT_ID))
        .count() as u64;
    assert!(
        demo_sent <= QUOTA,
        "{demo_sent} sent past a quota of {QUOTA}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(used(&gw, DEMO_GRANT_ID).await, QUOTA);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_new_grants_with_503() {
    let nylas = fake().await;
    let grants: Vec<String> = (0..3)
        .map(|i| nylas.add_grant(Grant::new(format!("g{i}@corp.example"))).id)
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &nylas.url(), "max_scopes = 2");
    let gw = Process::spawn(&config);
    assert_eq!(gw.send_once(&grants[0]).await.0, 200);
    assert_eq!(gw.send_once(&grants[1]).await.0, 200);
    let resp = gw.send(&grants[2]).send().await.expect("an answer");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "60");
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(body["error"]["type"], "quota_store_full", "{body}");
    assert_eq!(
        gw.send_once(&grants[0]).await.0,
        200,
        "a grant held is served"
    );
    assert_eq!(
        nylas.sends().len(),
        3,
        "the refused send never reached Nylas"
    );
    let m = gw.metrics().await;
    assert!(m.contains("sendgw_store_scopes 2"), "{m}");
    assert!(m.contains("sendgw_store_scopes_refused_total 1"), "{m}");
}

/// The fleet view lists what was counted before a restart, with no send after it: the
/// memory store journals its fleet index along with the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_view_survives_a_restart() {
    let nylas = fake().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &nylas.url(), "");
    let mut gw = Process::spawn(&config);
    for _ in 0..3 {
        assert_eq!(gw.send_once(DEMO_GRANT_ID).await.0, 200);
    }
    let fleet = |gw: &Process| {
        let url = format!("{}/v1/usage", gw.admin);
        async move {
            let resp = client().get(url).send().await.expect("usage");
            assert_eq!(resp.status(), 200);
            let page: Value = resp.json().await.expect("usage JSON");
            page["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|r| {
                    (
                        r["id"].as_str().unwrap().to_owned(),
                        r["utilization"].as_f64().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    // A page writes this replica's notes first: listed, and in the journal.
    let before = fleet(&gw).await;
    assert_eq!(before, [(DEMO_GRANT_ID.to_owned(), 3.0 / QUOTA as f64)]);
    gw.signal("KILL");
    assert!(gw.exit_status(Duration::from_secs(10)).await.is_some());
    let gw = Process::spawn(&config);
    assert_eq!(fleet(&gw).await, before, "listed again with no new send");
}
