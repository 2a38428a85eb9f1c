//! End to end: what the listeners do about slow, stalled and greedy clients (`[server]
//! body_timeout`, `header_timeout`, `max_header_bytes`, `max_in_flight_sends`), and HTTPS
//! on them (`tls_cert_file`, `tls_key_file`).
//!
//! Timings here are bounds, never measurements: every wait is a poll with a generous limit.

mod common;

use std::time::{Duration, Instant};

use common::{
    Gateway, TOKEN, WAIT, attachment, client, config, eventually, fake, gateway_error, message,
    metric_value, simple,
};
use fake_nylas::{DEMO_GRANT_ID, Rule};
use testkit::multipart::Multipart;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `head` and the first bytes of a body, then sends nothing more (the connection
/// stays open); returns the answer read until the gateway closes the connection (bounded
/// by [`WAIT`]) and how long it took.
async fn stall_after(addr: std::net::SocketAddr, head: &str, first: &[u8]) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write head");
    s.write_all(first).await.expect("write first bytes");
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// The unlabelled sample `name` of a `/metrics` text (`None` when absent).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `sendgw_requests_in_flight`, once the gateway has seen the connection go.
async fn in_flight(gw: &Gateway) -> f64 {
    let m = gw.metrics().await;
    sample(&m, "sendgw_requests_in_flight").expect("the in-flight gauge")
}

/// Sends Nylas has seen begin (`POST .../messages/send`), whether or not they completed;
/// look-ups the gateway makes on a send's behalf are not counted.
fn sends_seen(nylas: &fake_nylas::FakeNylas) -> usize {
    nylas
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/messages/send"))
        .count()
}

/// One ordinary JSON send through `gw`.
async fn send(gw: &Gateway) -> reqwest::Response {
    gw.send_json(&client(), DEMO_GRANT_ID, &simple())
        .send()
        .await
        .expect("an answer")
}

fn send_head(content_type: &str, length: usize) -> String {
    format!(
        "POST /v3/grants/{DEMO_GRANT_ID}/messages/send HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {length}\r\n\r\n"
    )
}

/// Asserts a raw answer is the gateway's own error envelope with `status` and `error_type`.
fn assert_envelope(answer: &str, status: u16, error_type: &str) {
    assert!(
        answer.starts_with(&format!("HTTP/1.1 {status} ")),
        "status {status}: {answer}"
    );
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("\r\nx-request-id: "), "{answer}");
    assert!(
        answer.contains(&format!("\"type\":\"{error_type}\"")),
        "{answer}"
    );
    assert!(answer.contains("\"request_id\":\""), "{answer}");
}

#[tokio::test]
async fn a_json_body_that_stalls_is_answered_408_and_charged_nothing() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "[server]\nbody_timeout = \"1s\"")).await;
    let body = serde_json::to_vec(&message(&["a@example.org"], &[], &[])).unwrap();
    let head = send_head("application/json", body.len());
    let (answer, took) = stall_after(gw.addr, &head, &body[..body.len() / 2]).await;
    assert_envelope(&answer, 408, "body_timeout");
    println!("stalled JSON body answered after {took:?} (body_timeout 1s)");
    assert_eq!(sends_seen(&nylas), 0, "no send reached Nylas");
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
    assert_eq!(in_flight(&gw).await, 0.0);
}

#[tokio::test]
async fn a_multipart_send_that_stalls_after_its_charge_is_released_at_once() {
    let nylas = fake().await;
    // The upstream timeout is far away: only the body timeout can end this send soon.
    let toml = config(
        &nylas.url(),
        "timeout = \"60s\"\n[server]\nbody_timeout = \"1s\"",
    );
    let gw = Gateway::start(&toml).await;
    let msg = serde_json::to_vec(&message(&["a@example.org"], &[], &[])).unwrap();
    let (ct, body) = Multipart::new("b0undary")
        .part("message", None, None, &msg)
        .part(
            "file0",
            Some("a.bin"),
            Some("application/octet-stream"),
            &attachment(200_000),
        )
        .finish();
    let head = send_head(&ct, body.len());
    // The message part and the start of the attachment: enough to count and charge it.
    let first = &body[..msg.len() + 4000];
    let (answer, took) = stall_after(gw.addr, &head, first).await;
    assert_envelope(&answer, 408, "body_timeout");
    println!("stalled multipart upload answered after {took:?} (body_timeout 1s)");
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "sendgw_reservations_settled_total",
            "outcome=\"released\""
        ),
        1.0,
        "it was charged, then given back: {m}"
    );
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (0, 0),
        "the charge is released"
    );
    assert!(
        nylas.delivered().is_empty(),
        "Nylas never had the whole message"
    );
    assert_eq!(in_flight(&gw).await, 0.0);
}

#[tokio::test]
async fn a_stalled_admin_body_is_cut_off_too() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "[server]\nbody_timeout = \"1s\"")).await;
    let admin: std::net::SocketAddr = gw.admin.trim_start_matches("http://").parse().unwrap();
    let head = format!(
        "PUT /v1/grants/{DEMO_GRANT_ID}/profile HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    );
    let (answer, took) = stall_after(admin, &head, b"{\"profile\":").await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    println!("stalled admin body answered after {took:?} (body_timeout 1s)");
    let q = gw.quota(DEMO_GRANT_ID).await;
    assert_ne!(q["profile_source"], "override", "nothing was changed: {q}");
}

#[tokio::test]
async fn clients_stalled_inside_their_headers_are_cut_off_and_hold_nothing() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "[server]\nheader_timeout = \"1s\"")).await;
    let started = Instant::now();
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        // Clients stop inside a header line, send nothing at all, or open HTTP/2 (the
        // preface, no stream) and go quiet.
        let partial = match i % 3 {
            0 => {
                format!("POST /v3/grants/{DEMO_GRANT_ID}/messages/send HTTP/1.1\r\nHost: x\r\nX-Pa")
            }
            1 => String::new(),
            _ => "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_owned(),
        };
        s.write_all(partial.as_bytes()).await.expect("write");
        stalled.push(s);
    }
    eventually("the gateway sees the 20 connections", || async {
        metric_value(
            &gw.metrics().await,
            "sendgw_connections",
            "listener=\"proxy\"",
        ) >= 20.0
    })
    .await;
    for mut s in stalled {
        let mut out = Vec::new();
        let read = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "a stalled client was not disconnected within {WAIT:?}"
        );
        // hyper's bare 408, its HTTP/2 SETTINGS frame, or nothing.
        let answer = String::from_utf8_lossy(&out);
        assert!(
            !answer.starts_with("HTTP/1.1") || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
    }
    println!(
        "20 stalled clients all disconnected after {:?} (header_timeout 1s)",
        started.elapsed()
    );
    eventually("no connection or request is left open", || async {
        let m = gw.metrics().await;
        metric_value(&m, "sendgw_connections", "listener=\"proxy\"") == 0.0
            && sample(&m, "sendgw_requests_in_flight") == Some(0.0)
    })
    .await;
    assert!(nylas.requests().is_empty());
    // The listener still serves.
    let resp = send(&gw).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_send_beyond_max_in_flight_sends_is_shed_with_503_before_the_store() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "[server]\nmax_in_flight_sends = 1")).await;
    nylas
        .add_rule(
            Rule::delay(Duration::from_secs(2))
                .path("/messages/send")
                .times(1),
        )
        .expect("delay rule");
    let first = {
        let req = gw.send_json(&client(), DEMO_GRANT_ID, &simple());
        tokio::spawn(async move { req.send().await.expect("an answer").status().as_u16() })
    };
    eventually("the first send reached Nylas", || async {
        sends_seen(&nylas) == 1
    })
    .await;
    let resp = send(&gw).await;
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    gateway_error(resp, 503, "overloaded").await;
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(
        nylas.delivered().len(),
        1,
        "the shed send never went upstream"
    );
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (1, 1),
        "and was never charged"
    );
    let m = gw.metrics().await;
    assert_eq!(sample(&m, "sendgw_sends_shed_total"), Some(1.0), "{m}");
    // With the first one done there is room again.
    let resp = send(&gw).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_header_block_over_max_header_bytes_gets_431_in_the_envelope() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(
        &nylas.url(),
        "[server]\nmax_header_bytes = \"16KiB\"",
    ))
    .await;
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &simple())
        .header("x-padding", "a".repeat(20 * 1024))
        .send()
        .await
        .unwrap();
    gateway_error(resp, 431, "headers_too_large").await;
    assert!(nylas.requests().is_empty());
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
    // Just under the limit is served.
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &simple())
        .header("x-padding", "a".repeat(15 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// A gateway serving HTTPS with a fresh test certificate for 127.0.0.1 in `dir`.
async fn tls_gateway(nylas: &fake_nylas::FakeNylas, dir: &std::path::Path) -> Gateway {
    let certs = testkit::TestCerts::generate(dir);
    let toml = config(
        &nylas.url(),
        &format!(
            "[server]\ntls_cert_file = {:?}\ntls_key_file = {:?}",
            certs.server_cert, certs.server_key
        ),
    );
    Gateway::start(&toml).await
}

/// A client that trusts only the CA in `dir`; HTTP/1.1 only when `http1`.
fn tls_client(dir: &std::path::Path, http1: bool) -> reqwest::Client {
    let ca = std::fs::read(dir.join("ca.pem")).expect("ca");
    let builder = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("ca pem"));
    let builder = if http1 { builder.http1_only() } else { builder };
    builder.build().expect("client")
}

async fn https_send(gw: &Gateway, c: &reqwest::Client) -> reqwest::Result<reqwest::Response> {
    c.post(format!(
        "https://{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
        gw.addr
    ))
    .bearer_auth(TOKEN)
    .json(&simple())
    .send()
    .await
}

#[tokio::test]
async fn https_sends_are_counted_over_h2_and_http_1_1_and_admin_speaks_https() {
    let nylas = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = tls_gateway(&nylas, dir.path()).await;
    let resp = https_send(&gw, &tls_client(dir.path(), false))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.version(),
        reqwest::Version::HTTP_2,
        "h2 chosen by ALPN"
    );
    let resp = https_send(&gw, &tls_client(dir.path(), true))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(nylas.delivered().len(), 2, "both reached Nylas");
    let admin = gw.admin.replace("http://", "https://");
    let health = tls_client(dir.path(), false)
        .get(format!("{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let quota: serde_json::Value = tls_client(dir.path(), false)
        .get(format!("{admin}/v1/quota/{DEMO_GRANT_ID}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(quota["windows"][0]["messages"]["used"], 2, "{quota}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = client()
        .get(format!("http://{}/v3/grants", gw.addr))
        .send()
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
}

#[tokio::test]
async fn a_reload_serves_a_renewed_certificate_and_keeps_the_old_on_a_bad_one() {
    let nylas = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = tls_gateway(&nylas, dir.path()).await;
    let old_ca = tls_client(dir.path(), true);
    assert_eq!(https_send(&gw, &old_ca).await.unwrap().status(), 200);
    let config = (*gw.state.config()).clone();
    // A broken file at the same path: the running certificate stays (new connection).
    std::fs::write(dir.path().join("server.pem"), "not a certificate").unwrap();
    gw.state.reload(config.clone());
    let fresh = tls_client(dir.path(), true);
    assert_eq!(https_send(&gw, &fresh).await.unwrap().status(), 200);
    // A renewed certificate (from another CA) at the same paths: served from now on.
    let renewed = tempfile::tempdir().unwrap();
    testkit::TestCerts::generate(renewed.path());
    for file in ["server.pem", "server.key"] {
        std::fs::copy(renewed.path().join(file), dir.path().join(file)).unwrap();
    }
    gw.state.reload(config);
    let new_ca = tls_client(renewed.path(), true);
    assert_eq!(https_send(&gw, &new_ca).await.unwrap().status(), 200);
    // A fresh client (a pooled connection would still be the old handshake's).
    let old_ca = tls_client(dir.path(), true);
    assert!(
        https_send(&gw, &old_ca).await.is_err(),
        "the old certificate is no longer served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_https_ready_lines_and_sighup_rolls_the_certificate() {
    let nylas = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = testkit::TestCerts::generate(dir.path());
    let path = dir.path().join("gateway.toml");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         tls_cert_file = {:?}\ntls_key_file = {:?}\n[upstream]\nurl = \"{}\"\n",
        certs.server_cert,
        certs.server_key,
        nylas.url()
    );
    std::fs::write(&path, toml).unwrap();
    let gw = common::Process::spawn(&path);
    assert!(gw.url.starts_with("https://127.0.0.1:"), "{}", gw.url);
    assert!(gw.admin.starts_with("https://127.0.0.1:"), "{}", gw.admin);
    let healthz = |c: reqwest::Client| {
        let url = format!("{}/healthz", gw.admin);
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(healthz(tls_client(dir.path(), true)).await.unwrap(), 200);
    let renewed = tempfile::tempdir().unwrap();
    testkit::TestCerts::generate(renewed.path());
    for file in ["server.pem", "server.key"] {
        std::fs::copy(renewed.path().join(file), dir.path().join(file)).unwrap();
    }
    gw.signal("HUP");
    eventually("the renewed certificate is served", || async {
        healthz(tls_client(renewed.path(), true)).await.ok() == Some(200)
    })
    .await;
}

/// Writes `request` whole and reads the answer until the gateway closes the connection.
async fn raw_exchange(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// What the docs say hyper answers itself, before any request exists to carry an id: pinned
/// here so that a change in hyper shows up as a failing test rather than stale docs.
#[tokio::test]
async fn heads_hyper_refuses_itself_get_its_bare_answers() {
    let nylas = fake().await;
    let toml = config(&nylas.url(), "[server]\nmax_header_bytes = \"16KiB\"");
    let gw = Gateway::start(&toml).await;
    // Over twice max_header_bytes: hyper's read buffer is full before the head ends.
    let huge = format!(
        "GET /v3/grants HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(33 * 1024)
    );
    let malformed = "GET /v3/grants HTTP/1.1\r\nHost x\r\n\r\n";
    for (request, status) in [(huge.as_str(), 431), (malformed, 400)] {
        let answer = raw_exchange(gw.addr, request).await.to_ascii_lowercase();
        assert!(
            answer.starts_with(&format!("http/1.1 {status} ")),
            "{answer}"
        );
        assert!(answer.contains("content-length: 0\r\n"), "{answer}");
        assert!(!answer.contains("x-request-id"), "{answer}");
    }
    assert!(nylas.requests().is_empty());
}
