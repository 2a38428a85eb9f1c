//! `deploy/tls-redis`: a `redis-server` started on its `redis.conf` (the test's certificates,
//! port and data folder in place of the example's) accepts TLS only and keeps its data, and
//! a gateway on its `gateway.toml` (the test's address and CA) counts there.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, client, fake, message};
use fake_nylas::DEMO_GRANT_ID;
use testkit::{TestCerts, free_port};

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/tls-redis")
        .join(file)
}

/// The example's Redis, killed when dropped.
struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(dir: &Path, certs: &TestCerts, port: u16) -> Redis {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let child = Command::new("redis-server")
        .arg(example("redis.conf"))
        .args(["--bind", "127.0.0.1", "--tls-port", &port.to_string()])
        .args(["--tls-cert-file", &path(&certs.server_cert)])
        .args(["--tls-key-file", &path(&certs.server_key)])
        .args(["--tls-ca-cert-file", &path(&certs.ca)])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (see .ci/run)");
    Redis(child)
}

/// The example's gateway.toml with the test's upstream, Redis address and CA, and the admin
/// token that compose.yaml gives it through the environment (its admin port is on 0.0.0.0,
/// which needs one).
fn gateway_toml(nylas: &str, port: u16, ca: &Path) -> String {
    let text = std::fs::read_to_string(example("gateway.toml")).expect("gateway.toml");
    for needle in [
        "[server]\n",
        "admin_listen = \"0.0.0.0:9090\"",
        "url = \"https://api.us.nylas.com\"",
        "url = \"rediss://redis:6379\"",
        "tls_ca_file = \"/tls/ca.crt\"",
    ] {
        assert!(text.contains(needle), "gateway.toml lost {needle}");
    }
    assert!(
        !text.contains("admin_token"),
        "the admin token belongs in the environment, not gateway.toml"
    );
    let compose = std::fs::read_to_string(example("compose.yaml")).expect("compose.yaml");
    assert!(
        compose.contains("SEND_GATEWAY__SERVER__ADMIN_TOKEN: ${SEND_GATEWAY_ADMIN_TOKEN:?"),
        "compose.yaml gives the gateway no admin token"
    );
    text.replacen(
        "[server]\n",
        "[server]\nadmin_token = \"tls-example-token\"\n",
        1,
    )
    .replace("https://api.us.nylas.com", nylas)
    .replace("rediss://redis:6379", &format!("rediss://localhost:{port}"))
    .replace("/tls/ca.crt", &ca.to_string_lossy())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_redis_example_counts_and_keeps_its_data() {
    let dir = std::env::temp_dir().join(format!("sendgw-tls-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let certs = TestCerts::generate(&dir.join("tls"));
    let port = free_port();
    let _redis = start_redis(&dir, &certs, port);
    let nylas = fake().await;
    let toml = gateway_toml(&nylas.url(), port, &certs.ca);
    let without_token = toml.replace("admin_token = \"tls-example-token\"\n", "");
    let refused = gateway::config::Config::from_toml_str(&without_token)
        .expect_err("an admin port on 0.0.0.0 without a token");
    assert_eq!(refused.key(), "server.admin_listen", "{refused}");
    let gw = Gateway::start(&toml).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let resp = client()
            .get(format!("{}/readyz", gw.admin))
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = resp.json().await.unwrap();
        if body["status"] == "ready" {
            break body;
        }
        assert!(Instant::now() < deadline, "not ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let m = message(&["a@example.org", "b@example.org"], &[], &[]);
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &m)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 2));
    // Health is read once a second; persistence is on (AOF and RDB) in this redis.conf.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut body = body;
    while body["store"]["persistent"] != true {
        assert!(Instant::now() < deadline, "persistence not seen: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let resp = client()
            .get(format!("{}/readyz", gw.admin))
            .send()
            .await
            .unwrap();
        body = resp.json().await.unwrap();
    }
    assert!(
        dir.join("appendonlydir").exists(),
        "AOF is written in --dir"
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
