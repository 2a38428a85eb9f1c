//! Shared by the end-to-end suites: a fake Nylas and an in-process gateway on port 0,
//! request builders shaped like the real SDKs, and assertions on the gateway's answers.

#![allow(dead_code)]

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fake_nylas::FakeNylas;
use gateway::AppState;
use gateway::config::Config;
use serde_json::{Value, json};
use testkit::process::{Expect, Server};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[path = "../openapi_check/mod.rs"]
pub mod openapi_check;

/// The bearer token the tests present (the fake accepts any token by default).
pub const TOKEN: &str = "nyk_e2e_key";

/// Longest a test waits for anything to happen (a record to land, a process to start).
pub const WAIT: Duration = Duration::from_secs(10);

/// A fake Nylas on a free port.
pub async fn fake() -> FakeNylas {
    FakeNylas::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("fake nylas starts")
}

/// A configuration whose `[upstream] url` is `upstream`; `rest` continues the
/// `[upstream]` table (e.g. `timeout = "1s"`) and may add further tables.
pub fn config(upstream: &str, rest: &str) -> String {
    format!("[upstream]\nurl = \"{upstream}\"\n{rest}\n")
}

/// A gateway served in this process by `gateway::run`, on two listeners bound to port 0.
#[derive(Debug)]
pub struct Gateway {
    /// The proxy's base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// The admin listener's base URL.
    pub admin: String,
    /// The proxy's address.
    pub addr: std::net::SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Gateway {
    /// Parses `toml`, builds the state (connecting the store) and serves it.
    pub async fn start(toml: &str) -> Gateway {
        let config =
            Config::from_toml_str(toml).unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
        let state = Arc::new(AppState::new(config).await.expect("gateway state"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = listener.local_addr().expect("proxy addr");
        let admin_addr = admin.local_addr().expect("admin addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway::run(listener, admin, Arc::clone(&state), async {
            let _ = stopped.await;
        }));
        Gateway {
            url: format!("http://{addr}"),
            admin: format!("http://{admin_addr}"),
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `POST {url}/v3/grants/{grant}/messages/send` with a JSON message.
    pub fn send_json(
        &self,
        client: &reqwest::Client,
        grant: &str,
        message: &Value,
    ) -> reqwest::RequestBuilder {
        client
            .post(format!("{}/v3/grants/{grant}/messages/send", self.url))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(message).expect("json"))
    }

    /// Sends `message` as JSON for the demo grant and returns the status.
    pub async fn send_status(&self, message: &Value) -> u16 {
        let resp = self
            .send_json(&client(), fake_nylas::DEMO_GRANT_ID, message)
            .send()
            .await
            .expect("an answer");
        resp.status().as_u16()
    }

    /// `GET {admin}{path}`, with the admin token when one is configured (as an operator
    /// would call it).
    pub fn admin_get(&self, path: &str) -> reqwest::RequestBuilder {
        let request = client().get(format!("{}{path}", self.admin));
        match self.state.config().server.admin_token.as_deref() {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// `GET /v1/quota/{grant}` on the admin listener, its answer checked against the
    /// OpenAPI description.
    pub async fn quota(&self, grant: &str) -> Value {
        let resp = self
            .admin_get(&format!("/v1/quota/{grant}"))
            .send()
            .await
            .expect("quota request");
        checked_quota(resp, grant).await
    }

    /// Messages and recipients used in the first window of `grant`'s profile.
    pub async fn used(&self, grant: &str) -> (u64, u64) {
        let q = self.quota(grant).await;
        let w = &q["windows"][0];
        (
            w["messages"]["used"].as_u64().unwrap_or(0),
            w["recipients"]["used"].as_u64().unwrap_or(0),
        )
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics")
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Stops the gateway and waits for it (bounded).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, task).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A client that never goes through a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// A message to `to` (addresses as given), with a short body.
pub fn message(to: &[&str], cc: &[&str], bcc: &[&str]) -> Value {
    let list = |a: &[&str]| a.iter().map(|e| json!({ "email": e })).collect::<Vec<_>>();
    json!({
        "to": list(to),
        "cc": list(cc),
        "bcc": list(bcc),
        "subject": "e2e",
        "body": "hello from the end-to-end suite",
    })
}

/// A message to one recipient.
pub fn simple() -> Value {
    message(&["alice@example.org"], &[], &[])
}

/// Asserts a response the gateway wrote itself: `status`, JSON
/// `{"request_id", "error": {"type", "message"}}` and `X-Request-Id` equal to
/// `request_id`. Returns the body.
pub async fn gateway_error(resp: reqwest::Response, status: u16, error_type: &str) -> Value {
    assert_eq!(
        resp.status(),
        status,
        "status of a gateway error ({error_type})"
    );
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(ct.starts_with("application/json"), "content type {ct:?}");
    let header = resp
        .headers()
        .get("x-request-id")
        .expect("X-Request-Id on a gateway error")
        .to_str()
        .expect("ascii request id")
        .to_owned();
    let body: Value = resp.json().await.expect("a JSON error body");
    assert_eq!(
        body["request_id"], header,
        "body and header request ids: {body}"
    );
    assert!(!header.is_empty());
    assert_eq!(body["error"]["type"], error_type, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// `len` attachment bytes that are not all the same.
pub fn attachment(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 253) as u8).collect()
}

/// A body streamed in `chunk`-byte pieces, so reqwest sends it chunked without
/// `Content-Length` (as the Node SDK does).
pub fn chunked(body: &Bytes, chunk: usize) -> reqwest::Body {
    let pieces: Vec<Bytes> = (0..body.len())
        .step_by(chunk)
        .map(|i| body.slice(i..(i + chunk).min(body.len())))
        .collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(
        pieces.into_iter().map(Ok::<_, std::io::Error>),
    ))
}

/// Calls of `EVALSHA` so far, from Redis `INFO commandstats` (0 when never called).
pub fn evalsha_calls(redis: &testkit::RedisServer) -> u64 {
    let info = redis
        .command(&["INFO", "commandstats"])
        .expect("INFO commandstats");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        .and_then(|rest| rest.split(',').find_map(|kv| kv.strip_prefix("calls=")))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Polls `check` until it returns true or [`WAIT`] passes; panics naming `what` then.
/// For outcomes that land a moment after the client saw its answer (or its error).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {WAIT:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the sample `name{...}` whose labels contain `labels` (e.g.
/// `level="80"`) in a `/metrics` text; 0 when no such sample is there yet.
pub fn metric_value(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name).is_some_and(|rest| {
                rest.starts_with('{') && rest.split('}').next().is_some_and(|s| s.contains(labels))
            })
        })
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("a number in {text}"))
        })
}

/// The keys in `redis`, through `redis-cli`.
pub fn redis_keys(redis: &testkit::RedisServer) -> Vec<String> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "--scan"])
        .output()
        .expect("redis-cli runs");
    assert!(out.status.success(), "redis-cli: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A Redis-backed `[store]` table for `redis`.
pub fn redis_store(redis: &testkit::RedisServer) -> String {
    format!("[store]\nbackend = \"redis\"\nurl = \"{}\"\n", redis.url())
}

/// A `send-gateway` process ([`testkit::process::Server`]); killed (and reaped) when
/// dropped, whatever the test did.
#[derive(Debug)]
pub struct Process {
    server: Server,
    pub url: String,
    pub admin: String,
}

impl Process {
    /// Starts the binary on `config` and reads the two addresses it prints on stdout.
    pub fn spawn(config: &Path) -> Process {
        Process::spawn_with_env(config, &[])
    }

    /// [`Process::spawn`], with these environment variables set in the child.
    pub fn spawn_with_env(config: &Path, env: &[(&str, &str)]) -> Process {
        let mut cmd = testkit::process::send_gateway(env!("CARGO_BIN_EXE_send-gateway"), config);
        cmd.stderr(Stdio::inherit()).envs(env.iter().copied());
        let server = Server::spawn(&mut cmd, "send-gateway", Expect::ListeningAndAdmin, WAIT);
        Process {
            url: server.url().to_owned(),
            admin: server.admin().expect("an admin listener").to_owned(),
            server,
        }
    }

    /// Sends `signal` (`HUP`, `TERM`) with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        self.server.signal(signal);
    }

    /// Waits (bounded by `limit`) for the process to exit.
    pub async fn exit_status(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.server.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn send(&self, grant: &str) -> reqwest::RequestBuilder {
        client()
            .post(format!("{}/v3/grants/{grant}/messages/send", self.url))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(simple().to_string())
    }

    /// One send; its status and JSON body.
    pub async fn send_once(&self, grant: &str) -> (u16, Value) {
        let resp = self.send(grant).send().await.expect("an answer");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("a JSON body"))
    }

    pub async fn metrics(&self) -> String {
        client()
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Polls `/metrics` (bounded) until `name{labels}` reaches `value`.
    pub async fn wait_metric(&self, name: &str, labels: &str, value: f64) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let m = self.metrics().await;
            if metric_value(&m, name, labels) >= value {
                return m;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}{{{labels}}} did not reach {value} within {WAIT:?}:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn quota(&self, grant: &str) -> Value {
        let resp = client()
            .get(format!("{}/v1/quota/{grant}", self.admin))
            .send()
            .await
            .expect("quota");
        checked_quota(resp, grant).await
    }
}

/// The admin API's description, loaded once per test binary.
pub static SPEC: std::sync::LazyLock<openapi_check::Spec> =
    std::sync::LazyLock::new(openapi_check::Spec::load);

/// A `GET /v1/quota/{grant}` answer: 200, and valid against the OpenAPI description.
async fn checked_quota(resp: reqwest::Response, grant: &str) -> Value {
    assert_eq!(resp.status(), 200, "quota of {grant}");
    let answer = openapi_check::check(&SPEC, "GET", "/v1/quota/{grant}", resp).await;
    answer.json.expect("quota json")
}

/// Sends the saved draft `draft_id` of the demo grant through `gw` while the fake Nylas
/// holds that send for 800 ms, and returns once Nylas has the request in hand: the send's
/// task, which ends with its status and body. For tests of what may land meanwhile.
pub async fn draft_send_in_flight(
    gw: &Gateway,
    nylas: &FakeNylas,
    draft_id: &str,
) -> JoinHandle<(u16, Value)> {
    nylas
        .add_rule(
            fake_nylas::Rule::delay(Duration::from_millis(800))
                .method("POST")
                .path(format!("/drafts/{draft_id}"))
                .times(1),
        )
        .expect("delay rule");
    let url = format!(
        "{}/v3/grants/{}/drafts/{draft_id}",
        gw.url,
        fake_nylas::DEMO_GRANT_ID
    );
    let send = tokio::spawn(async move {
        let resp = client()
            .post(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("send");
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.expect("a JSON answer"))
    });
    let suffix = format!("/drafts/{draft_id}");
    eventually("the send reached Nylas", || async {
        nylas
            .requests()
            .iter()
            .any(|r| r.method == "POST" && r.path.ends_with(&suffix))
    })
    .await;
    send
}
