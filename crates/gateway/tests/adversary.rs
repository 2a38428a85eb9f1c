//! Adversarial review: ways a send could get out uncounted or a change could slip past a
//! draft's lock, each shown by a test that fails while the hole is open. Tests whose name
//! starts with `held_` pin attacks that the gateway withstands.
//!
//! Every upstream here is on 127.0.0.1; every loop and wait is bounded.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{
    Gateway, TOKEN, WAIT, chunked, client, config, draft_send_in_flight, eventually, fake, simple,
};
use fake_nylas::{DEMO_GRANT_ID, Rule};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------
// A raw upstream: reads HTTP/1.1 requests byte for byte (de-chunking a chunked body) and
// answers as a test tells it, or never.
// ---------------------------------------------------------------------------------------

/// What the raw upstream does with one request (given its head and the body so far).
#[derive(Clone)]
enum Answer {
    /// Answer with these raw bytes once the whole body has arrived.
    Canned(Arc<Vec<u8>>),
    /// Never answer; keep reading until the peer gives up (bounded by `WAIT`).
    Never,
}

#[derive(Default)]
struct Seen {
    /// Decoded bodies, one per request, as far as they arrived.
    bodies: Vec<Vec<u8>>,
}

struct RawUpstream {
    url: String,
    seen: Arc<Mutex<Seen>>,
}

impl RawUpstream {
    async fn start(answer: Answer) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = Arc::clone(&seen);
        tokio::spawn(async move {
            // At most a handful of connections per test.
            for _ in 0..16 {
                let Ok(Ok((stream, _))) = tokio::time::timeout(WAIT, listener.accept()).await
                else {
                    return;
                };
                let (answer, seen) = (answer.clone(), Arc::clone(&shared));
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(WAIT, serve_one(stream, answer, seen)).await;
                });
            }
        });
        RawUpstream { url, seen }
    }

    fn bodies(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().bodies.clone()
    }
}

async fn serve_one(mut stream: TcpStream, answer: Answer, seen: Arc<Mutex<Seen>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let slot = {
        let mut s = seen.lock().unwrap();
        s.bodies.push(Vec::new());
        s.bodies.len() - 1
    };
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let Some(head_end) = find(&buf, b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        if head.starts_with("get ") {
            // The gateway's look-up of the grant, which it makes before charging: the grant
            // exists (a grant id needs no more than a 2xx).
            let body = "{\"data\":{}}";
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
            return;
        }
        let raw = &buf[head_end + 4..];
        let (body, done) = if head.contains("transfer-encoding: chunked") {
            dechunk(raw)
        } else {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            (raw[..raw.len().min(len)].to_vec(), raw.len() >= len)
        };
        seen.lock().unwrap().bodies[slot] = body;
        if done {
            match &answer {
                Answer::Canned(bytes) => {
                    let _ = stream.write_all(bytes).await;
                    let _ = stream.shutdown().await;
                    return;
                }
                Answer::Never => {}
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The data of a chunked body as far as it has arrived, and whether its last chunk came.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = find(raw, b"\r\n") else {
            return (out, false);
        };
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
        else {
            return (out, false);
        };
        if size == 0 {
            return (out, true);
        }
        let data = &raw[line_end + 2..];
        if data.len() < size + 2 {
            out.extend_from_slice(&data[..data.len().min(size)]);
            return (out, false);
        }
        out.extend_from_slice(&data[..size]);
        raw = &data[size + 2..];
    }
}

/// An HTTP/1.1 answer with `headers` and `body`.
fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// `data` as a gzip member (one stored deflate block: no compressor needed).
fn gzip(data: &[u8]) -> Vec<u8> {
    assert!(data.len() <= 0xffff, "one stored block");
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    out.push(1); // BFINAL, stored
    let len = data.len() as u16;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Nylas's answer to a send that went to `n` recipients.
fn sent_answer(n: usize) -> Vec<u8> {
    let to: Vec<Value> = (0..n)
        .map(|i| json!({ "email": format!("r{i}@example.org") }))
        .collect();
    serde_json::to_vec(&json!({
        "request_id": "req-1",
        "grant_id": DEMO_GRANT_ID,
        "data": { "id": "m1", "grant_id": DEMO_GRANT_ID, "to": to, "subject": "s", "body": "b" },
    }))
    .unwrap()
}

fn recipients(names: &[&str]) -> Vec<Value> {
    names
        .iter()
        .map(|n| json!({ "email": format!("{n}@example.org") }))
        .collect()
}

/// One raw HTTP/1.1 request to `addr` exactly as written (no URL normalisation on the
/// client side); returns the status code (0 when none came in time).
async fn raw_request(addr: std::net::SocketAddr, head_and_body: &[u8]) -> u16 {
    let Ok(Ok(mut stream)) = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await else {
        return 0;
    };
    if stream.write_all(head_and_body).await.is_err() {
        return 0;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Finding 1: a multipart send whose closing boundary went upstream, followed by an
// epilogue that outgrows the size limit, is released (answered 413) though Nylas holds the
// complete message.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_epilogue_past_the_limit_after_the_closing_boundary_keeps_the_charge() {
    // Nylas (here: a raw upstream) reads up to the closing boundary, has the complete
    // message, and takes its time to answer, as a Go handler that acts on the parsed form
    // would.
    let upstream = RawUpstream::start(Answer::Never).await;
    let toml = config(
        &upstream.url,
        "timeout = \"5s\"\n\
         [grants]\ndefault_profile = \"small\"\n\
         [profiles.small]\nmax_message_size = 200000\n\
         [[profiles.small.windows]]\nperiod = \"1h\"\nmessages = 100\nrecipients = 100\n",
    );
    let gw = Gateway::start(&toml).await;
    let boundary = "adv-epilogue-boundary";
    let mut message = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"message\"\r\n\r\n\
         {{\"to\":[{{\"email\":\"a@example.org\"}}],\"subject\":\"s\",\"body\":\"b\"}}\r\n\
         --{boundary}--\r\n"
    )
    .into_bytes();
    // The epilogue: ignored by every multipart parser, but metered by the gateway.
    message.extend(std::iter::repeat_n(b'x', 300_000));
    let body = Bytes::from(message);
    let resp = client()
        .post(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
            gw.url
        ))
        .bearer_auth(TOKEN)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(chunked(&body, 8 * 1024))
        .send();
    let status = tokio::time::timeout(WAIT, resp)
        .await
        .expect("the gateway answers in time")
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    let closing = format!("--{boundary}--");
    let complete = upstream
        .bodies()
        .iter()
        .any(|b| find(b, closing.as_bytes()).is_some());
    assert!(
        complete,
        "precondition: the complete message (its closing boundary) reached the upstream"
    );
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (1, 1),
        "the complete message went upstream (answered {status}), so the charge must stay"
    );
}

// ---------------------------------------------------------------------------------------
// Finding 2: the upward correction parses Nylas's answer as it comes off the wire; a
// client that asks for `Accept-Encoding: gzip` (every SDK does) gets a compressed answer,
// which the correction cannot read, so it silently charges nothing extra.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_gzip_answer_listing_more_recipients_is_still_corrected() {
    let answer = response(
        "200 OK",
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        &gzip(&sent_answer(5)),
    );
    let upstream = RawUpstream::start(Answer::Canned(Arc::new(answer))).await;
    let gw = Gateway::start(&config(&upstream.url, "")).await;
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &simple())
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (1, 5),
        "Nylas says it sent to 5: the difference must be charged whatever the encoding"
    );
}

#[tokio::test]
async fn held_an_identity_answer_listing_more_recipients_is_corrected() {
    let answer = response(
        "200 OK",
        &[("content-type", "application/json")],
        &sent_answer(5),
    );
    let upstream = RawUpstream::start(Answer::Canned(Arc::new(answer))).await;
    let gw = Gateway::start(&config(&upstream.url, "")).await;
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 5));
}

// ---------------------------------------------------------------------------------------
// Finding 3: a draft edited directly at Nylas while its send is in flight is meant to be
// caught by settling to what Nylas says it sent, but an answer over 64 KiB is never read:
// a draft body of 70 kB (echoed in the answer) switches the backstop off.
// ---------------------------------------------------------------------------------------

async fn draft_edited_around_the_gateway(body_len: usize) -> (u64, u64) {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let body = "x".repeat(body_len);
    nylas.add_draft(
        DEMO_GRANT_ID,
        "d1",
        json!({"to": recipients(&["a"]), "subject": "saved", "body": body}),
    );
    nylas
        .add_rule(
            Rule::delay(Duration::from_millis(600))
                .method("POST")
                .path("/drafts/d1")
                .times(1),
        )
        .unwrap();
    let url = format!("{}/v3/grants/{DEMO_GRANT_ID}/drafts/d1", gw.url);
    let send = tokio::spawn(async move {
        let resp = client().post(&url).bearer_auth(TOKEN).send().await.unwrap();
        resp.status().as_u16()
    });
    eventually("the send reached Nylas", || async {
        nylas
            .requests()
            .iter()
            .any(|r| r.method == "POST" && r.path.ends_with("/drafts/d1"))
    })
    .await;
    // Edited at Nylas directly (another client, the dashboard), not through the gateway.
    nylas.add_draft(
        DEMO_GRANT_ID,
        "d1",
        json!({"to": recipients(&["a", "b", "c", "d", "e"]), "subject": "saved", "body": body}),
    );
    let status = tokio::time::timeout(WAIT, send).await.unwrap().unwrap();
    assert_eq!(status, 200);
    let delivered = nylas.delivered();
    assert_eq!(delivered.len(), 1);
    gw.used(DEMO_GRANT_ID).await
}

#[tokio::test]
async fn a_large_draft_edited_around_the_gateway_is_still_corrected() {
    assert_eq!(
        draft_edited_around_the_gateway(70_000).await,
        (1, 5),
        "Nylas sent the edited draft to 5; its answer is over 64 KiB and was not read"
    );
}

#[tokio::test]
async fn held_a_small_draft_edited_around_the_gateway_is_corrected() {
    assert_eq!(draft_edited_around_the_gateway(100).await, (1, 5));
}

// ---------------------------------------------------------------------------------------
// Finding 4: a draft change whose grant is spelled `urn:uuid:<id>` (which Go's
// google/uuid `Parse`, and the fake, read as the grant id) is refused as an identifier by
// `grant_ref`, and `draft_change` then relays it *without the lock*: it lands between the
// gateway's read of the draft and Nylas's send. Correction charges the extra afterwards,
// but the per-message cap and the window limit were not checked before Nylas sent.
// Fixed by never relaying a draft change without the lock: an identifier the gateway
// refuses for sends is refused for draft changes too (400), as is a failed look-up.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_draft_change_spelled_urn_uuid_never_lands_during_the_send_of_that_draft() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    nylas.add_draft(
        DEMO_GRANT_ID,
        "d1",
        json!({"to": recipients(&["a"]), "subject": "saved"}),
    );
    let send = draft_send_in_flight(&gw, &nylas, "d1").await;
    let change_url = format!("{}/v3/grants/urn:uuid:{DEMO_GRANT_ID}/drafts/d1", gw.url);
    let change = client()
        .put(&change_url)
        .bearer_auth(TOKEN)
        .json(&json!({ "to": recipients(&["a", "b", "c", "d", "e"]) }))
        .send();
    let change = tokio::time::timeout(WAIT, change).await.unwrap().unwrap();
    assert_eq!(
        change.status(),
        400,
        "a spelling the gateway refuses for sends is refused for changes, not relayed unlocked"
    );
    assert!(
        !nylas.requests().iter().any(|r| r.method == "PUT"),
        "the change never reached Nylas"
    );
    let (status, sent) = tokio::time::timeout(WAIT, send).await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        sent["data"]["to"].as_array().map(Vec::len),
        Some(1),
        "the change slipped in between the gateway's read and Nylas's send: {sent}"
    );
}

#[tokio::test]
async fn held_a_send_spelled_urn_uuid_is_refused_without_a_store_key() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let resp = gw
        .send_json(&client(), &format!("urn:uuid:{DEMO_GRANT_ID}"), &simple())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(nylas.sends().is_empty());
}

#[tokio::test]
async fn held_a_draft_change_through_other_spellings_waits_for_the_send() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let upper = DEMO_GRANT_ID.to_ascii_uppercase();
    let spellings = [
        format!("grant:{upper}"),
        format!("%7B{DEMO_GRANT_ID}%7D"),
        DEMO_GRANT_ID.replace('-', ""),
        fake_nylas::DEMO_GRANT_EMAIL.to_ascii_uppercase(),
    ];
    for (i, grant) in spellings.iter().enumerate() {
        let draft = format!("d{i}");
        nylas.add_draft(
            DEMO_GRANT_ID,
            &draft,
            json!({"to": recipients(&["a"]), "subject": "saved"}),
        );
        nylas
            .add_rule(
                Rule::delay(Duration::from_millis(500))
                    .method("POST")
                    .path(format!("/drafts/{draft}"))
                    .times(1),
            )
            .unwrap();
        let url = format!("{}/v3/grants/{DEMO_GRANT_ID}/drafts/{draft}", gw.url);
        let send = tokio::spawn(async move {
            let resp = client().post(&url).bearer_auth(TOKEN).send().await.unwrap();
            resp.json::<Value>().await.unwrap()
        });
        let tail = format!("/drafts/{draft}");
        eventually("the send reached Nylas", || async {
            nylas
                .requests()
                .iter()
                .any(|r| r.method == "POST" && r.path.ends_with(&tail))
        })
        .await;
        // The draft id percent-encoded and with a trailing slash, too.
        let change_url = format!("{}/v3/grants/{grant}/drafts/%64{i}/", gw.url);
        let change = client()
            .patch(&change_url)
            .bearer_auth(TOKEN)
            .json(&json!({ "to": recipients(&["a", "b", "c"]) }))
            .send();
        let _ = tokio::time::timeout(WAIT, change).await.unwrap().unwrap();
        let sent = tokio::time::timeout(WAIT, send).await.unwrap().unwrap();
        assert_eq!(
            sent["data"]["to"].as_array().map(Vec::len),
            Some(1),
            "{grant}: {sent}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Routing: odd request targets, written raw (no client-side normalisation). Whatever the
// fake delivered must have been charged, and nothing goes anywhere but the upstream.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn held_odd_targets_never_deliver_uncounted_and_only_reach_the_upstream() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let g = DEMO_GRANT_ID;
    let targets = [
        format!("/v3/grants/{g}/messages/send"),
        format!("/v3/grants/{g}/messages/send/"),
        format!("/v3/grants/{g}//messages/send"),
        format!("/v3/grants/{g}/./messages/send"),
        format!("/v3/grants/{g}/x/../messages/send"),
        format!("/v3/grants/{g}/x/%2e%2E/messages/send"),
        format!("/v3/grants/{g}/messages\\send"),
        format!("/v3/grants/{g}/messages%2Fsend"),
        format!("/v3/grants/{g}/messages/sen%64"),
        format!("/v3/grants/{g}/messages/send;x=1"),
        format!("/v3/grants/{g}/messages/send?type=json"),
        format!("/V3/GRANTS/{g}/MESSAGES/SEND"),
        format!("/v3/grants/%7B{g}%7D/messages/send"),
        format!("/v3/grants/grant:{g}/messages/send"),
        format!("http://evil.invalid/v3/grants/{g}/messages/send"),
        format!("//evil.invalid/v3/grants/{g}/messages/send"),
        format!("/v3/grants/x%2F..%2F{g}/messages/send"),
        format!("/../v3/grants/{g}/messages/send"),
    ];
    let body = serde_json::to_vec(&simple()).unwrap();
    for target in &targets {
        let before_delivered = nylas.delivered().len() as u64;
        let before_used = gw.used(g).await.0;
        let mut req = format!(
            "POST {target} HTTP/1.1\r\nhost: evil.invalid\r\nauthorization: Bearer {TOKEN}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let status = raw_request(gw.addr, &req).await;
        let delivered = nylas.delivered().len() as u64 - before_delivered;
        let charged = gw.used(g).await.0 - before_used;
        assert!(
            charged >= delivered,
            "{target}: answered {status}, {delivered} delivered, {charged} charged"
        );
    }
    // Every request that reached an upstream reached this one, under its own host.
    let own = nylas.url().trim_start_matches("http://").to_owned();
    for r in nylas.requests() {
        assert_eq!(r.header("host"), Some(own.as_str()), "{}", r.path);
    }
}

// ---------------------------------------------------------------------------------------
// Settlement: a replay header on a send Nylas did not replay, and a huge answer body.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn held_a_huge_send_answer_streams_without_being_buffered_whole() {
    // 8 MB answer without Content-Length (chunked by hyper when relayed): read_small stops
    // at 64 KiB and streams the rest; the charge is kept.
    let nylas = fake().await;
    let big = "y".repeat(8 * 1024 * 1024);
    nylas
        .add_rule(
            Rule::status(200)
                .path("/messages/send")
                .body(json!({"data": {"to": recipients(&["a"]), "pad": big}}))
                .times(1),
        )
        .unwrap();
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = tokio::time::timeout(WAIT, resp.bytes())
        .await
        .unwrap()
        .unwrap();
    assert!(got.len() > 8 * 1024 * 1024);
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 1));
}

#[tokio::test]
async fn held_a_bogus_or_empty_grant_segment_is_refused_before_nylas() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    for grant in [
        "plainid",
        "grant:abc",
        "a%2Fb",
        "%20",
        "other:thing",
        "email:",
    ] {
        let resp = gw
            .send_json(&client(), grant, &simple())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{grant}");
        assert!(
            nylas.requests().is_empty(),
            "{grant}: nothing reaches Nylas"
        );
    }
}
