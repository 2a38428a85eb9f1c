//! Load harness for the whole proxy (`cargo bench -p gateway --bench load`).
//!
//! Starts a private redis-server, the fake Nylas (bodies not recorded) and the release
//! `send-gateway` binary as its own process, then measures:
//! 1. the gateway's peak RSS (`VmHWM`) while relaying 8 concurrent 20 MB multipart sends
//!    (Python-SDK shape, with Content-Length), a few rounds;
//! 2. Redis commands per decision, from `INFO commandstats`: allowed sends, denied sends and
//!    per-message rejections measured separately.
//!
//! It prints the figures; `crates/gateway/BENCHMARKS.md` records them. No assertion here
//! depends on timing.

use std::process::Stdio;
use std::time::{Duration, Instant};

use testkit::RedisServer;
use testkit::multipart::Multipart;
use testkit::process::{Expect, Server};

const ROUNDS: usize = 3;
const CONCURRENT: usize = 8;
const ATTACHMENT: usize = 20_000_000;

/// The release binary on `config`, written to a file; ready once it printed its address.
fn start_gateway(config: &str) -> Server {
    let dir = std::env::temp_dir().join(format!("sendgw-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = testkit::process::send_gateway(env!("CARGO_BIN_EXE_send-gateway"), &path);
    cmd.stderr(Stdio::null());
    Server::spawn(
        &mut cmd,
        "send-gateway",
        Expect::Listening,
        Duration::from_secs(30),
    )
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A Python-SDK-shaped send: the message part, then one attachment.
fn multipart(boundary: &str, recipients: usize, attachment: &[u8]) -> bytes::Bytes {
    let to: Vec<_> = (0..recipients)
        .map(|i| serde_json::json!({"email": format!("r{i}@example.org")}))
        .collect();
    let message = serde_json::json!({"to": to, "subject": "load", "body": "hello"}).to_string();
    Multipart::new(boundary)
        .part(
            "message",
            Some(""),
            Some("application/json"),
            message.as_bytes(),
        )
        .part(
            "file0",
            Some("big.bin"),
            Some("application/octet-stream"),
            attachment,
        )
        .finish()
        .1
}

/// Commands a client sends (round trips), as opposed to commands a Lua script runs inside
/// one of them, which `INFO commandstats` counts too.
const TOP_LEVEL: [&str; 8] = [
    "evalsha",
    "eval",
    "script|load",
    "ping",
    "hello",
    "client|setinfo",
    "select",
    "smembers",
];

/// (round trips, commands run inside scripts) since the last `CONFIG RESETSTAT`.
fn calls(server: &RedisServer) -> (u64, u64) {
    let info = server.command(&["INFO", "commandstats"]).unwrap();
    let (mut top, mut nested) = (0, 0);
    for l in info.lines().filter_map(|l| l.strip_prefix("cmdstat_")) {
        let Some((name, rest)) = l.split_once(':') else {
            continue;
        };
        let n: u64 = rest
            .split("calls=")
            .nth(1)
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if name == "info" || name == "config|resetstat" {
            continue;
        }
        if TOP_LEVEL.contains(&name) {
            top += n
        } else {
            nested += n
        }
    }
    (top, nested)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let redis = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fake = rt
        .block_on(fake_nylas::FakeNylas::start("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    fake.set_record_bodies(false);
    let grant = fake_nylas::DEMO_GRANT_ID;
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[upstream]
url = "{}"
timeout = "60s"

[store]
backend = "redis"
url = "{}"

[grants]
default_profile = "load"

[profiles.load]
max_recipients_per_message = 100
max_message_size = "35MB"

[[profiles.load.windows]]
period = "24h"
messages = 1000000
recipients = 1000000
"#,
        fake.url(),
        redis.url()
    );
    let gw = start_gateway(&config);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENT)
        .build()
        .unwrap();
    let send_url = format!("{}/v3/grants/{grant}/messages/send", gw.url());
    let attachment: Vec<u8> = (0..ATTACHMENT).map(|i| (i % 251) as u8).collect();
    let body = multipart("loadboundary", 3, &attachment);
    println!("gateway RSS before load: {} KiB", vm_hwm_kib(gw.id()));

    let started = Instant::now();
    let mut ok = 0;
    for _ in 0..ROUNDS {
        let results = rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..CONCURRENT {
                let (client, url, body) = (client.clone(), send_url.clone(), body.clone());
                tasks.push(tokio::spawn(async move {
                    client
                        .post(url)
                        .header("authorization", "Bearer load")
                        .header("content-type", "multipart/form-data; boundary=loadboundary")
                        .body(body)
                        .timeout(Duration::from_secs(120))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                }));
            }
            let mut statuses = Vec::new();
            for t in tasks {
                statuses.push(t.await.unwrap());
            }
            statuses
        });
        ok += results.iter().filter(|r| matches!(r, Ok(200))).count();
        assert!(
            results.iter().all(|r| matches!(r, Ok(200))),
            "every 20 MB send is relayed: {results:?}"
        );
    }
    let elapsed = started.elapsed();
    let hwm = vm_hwm_kib(gw.id());
    println!(
        "peak RSS of send-gateway relaying {CONCURRENT} concurrent 20 MB multipart sends x {ROUNDS} rounds: {:.1} MiB ({ok} sends relayed in {:.1} s)",
        hwm as f64 / 1024.0,
        elapsed.as_secs_f64()
    );

    // Redis commands per decision.
    let json = |recipients: usize| {
        let to: Vec<_> = (0..recipients)
            .map(|i| serde_json::json!({"email": format!("r{i}@example.org")}))
            .collect();
        serde_json::json!({"to": to, "subject": "s", "body": "b"}).to_string()
    };
    let send_to = |url: &str, body: String| {
        rt.block_on(
            client
                .post(url)
                .header("authorization", "Bearer load")
                .header("content-type", "application/json")
                .body(body)
                .send(),
        )
        .unwrap()
        .status()
        .as_u16()
    };
    let send = |body: String| send_to(&send_url, body);
    let n = 200;
    redis.command(&["CONFIG", "RESETSTAT"]).unwrap();
    let allowed = (0..n).filter(|_| send(json(2)) == 200).count();
    let after_allowed = calls(&redis);
    redis.command(&["CONFIG", "RESETSTAT"]).unwrap();
    let rejected = (0..n).filter(|_| send(json(101)) == 422).count();
    let after_rejected = calls(&redis);
    // A profile that is already exhausted, for denials: restart the gateway with limit 1.
    drop(gw);
    let gw = start_gateway(&config.replace("messages = 1000000", "messages = 1"));
    let send_url2 = format!("{}/v3/grants/{grant}/messages/send", gw.url());
    let send2 = |body: String| send_to(&send_url2, body);
    // The grant used its one message above; every send now is denied.
    redis.command(&["CONFIG", "RESETSTAT"]).unwrap();
    let denied = (0..n).filter(|_| send2(json(2)) == 429).count();
    let after_denied = calls(&redis);
    let per = |(top, nested): (u64, u64), n: usize| {
        format!(
            "{:.2} round trips ({top} for {n}; {:.1} commands run inside the script per send)",
            top as f64 / n.max(1) as f64,
            nested as f64 / n.max(1) as f64
        )
    };
    println!("redis per allowed send: {}", per(after_allowed, allowed));
    println!("redis per denied send: {}", per(after_denied, denied));
    println!(
        "redis per per-message rejection: {}",
        per(after_rejected, rejected)
    );
    drop(gw);
    rt.block_on(fake.shutdown());
}
