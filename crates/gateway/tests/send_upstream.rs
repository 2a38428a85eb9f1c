//! Forwarding an inspected body through the gateway's upstream client to a server on
//! 127.0.0.1:0.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::post;
use futures_util::{StreamExt, stream};
use gateway::send::{InspectOptions, classify, inspect};
use gateway::upstream::Upstream;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method};
use std::time::Duration;
use testkit::multipart::Multipart;
use tokio::sync::mpsc;

const BOUNDARY: &str = "----formdata-undici-0987654321";
const MESSAGE: &str = r#"{"to":[{"email":"a@x.com"}],"subject":"s","body":"b"}"#;

/// What the fake upstream received: the body, or that it broke off.
type Received = Result<Vec<u8>, String>;

async fn upstream() -> (String, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new().route(
        "/v3/grants/{g}/messages/send",
        post(move |body: Body| {
            let tx = tx.clone();
            async move {
                let mut data = body.into_data_stream();
                let mut got = Vec::new();
                let mut result = None;
                while let Some(chunk) = data.next().await {
                    match chunk {
                        Ok(chunk) => got.extend_from_slice(&chunk),
                        Err(error) => {
                            result = Some(Err(error.to_string()));
                            break;
                        }
                    }
                }
                let _ = tx.send(result.unwrap_or(Ok(got)));
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), rx)
}

fn body_with_attachment(len: usize) -> Bytes {
    let attachment: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    Multipart::new(BOUNDARY)
        .part("message", None, None, MESSAGE.as_bytes())
        .part(
            "file0",
            Some("x.bin"),
            Some("application/octet-stream"),
            &attachment,
        )
        .finish()
        .1
}

fn client_body(body: &Bytes) -> Body {
    let pieces: Vec<Bytes> = (0..body.len())
        .step_by(32 << 10)
        .map(|i| body.slice(i..(i + (32 << 10)).min(body.len())))
        .collect();
    Body::from_stream(stream::iter(
        pieces.into_iter().map(Ok::<_, std::io::Error>),
    ))
}

const TARGET: &str = "/v3/grants/g1/messages/send";

async fn send(
    base: &str,
    body: Bytes,
    with_length: bool,
    limit: u64,
) -> (bool, gateway::send::Overflow) {
    let route = classify(&Method::POST, &TARGET.parse().expect("uri")).expect("send route");
    let mut headers = HeaderMap::new();
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_str(&content_type).expect("ct"),
    );
    if with_length {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let opts = InspectOptions {
        max_message_size: Some(limit),
        ..InspectOptions::default()
    };
    let inspected = inspect(&route, &headers, client_body(&body), &opts)
        .await
        .expect("inspected");
    let upstream_body = inspected.body;
    let overflow = upstream_body.overflow();
    let upstream = Upstream::new(&base.parse().expect("base"), Duration::from_secs(10))
        .expect("upstream client");
    let length = upstream_body.content_length();
    let ok = upstream
        .send(
            Method::POST,
            &TARGET.parse().expect("target"),
            headers,
            upstream_body.into_body(),
            length,
        )
        .await
        .is_ok_and(|r| r.status().is_success());
    (ok, overflow)
}

#[tokio::test]
async fn forwarded_bodies_arrive_byte_for_byte() {
    let (url, mut received) = upstream().await;
    for with_length in [true, false] {
        let body = body_with_attachment(1_000_000);
        let (ok, overflow) = send(&url, body.clone(), with_length, 20_000_000).await;
        assert!(ok);
        assert!(overflow.is_finished() && !overflow.is_over());
        let got = received
            .recv()
            .await
            .expect("upstream saw a request")
            .expect("complete body");
        assert!(
            got == body.to_vec(),
            "byte for byte (with length: {with_length})"
        );
    }
}

#[tokio::test]
async fn an_overflow_aborts_the_upstream_request() {
    let (url, mut received) = upstream().await;
    let body = body_with_attachment(3_000_000);
    let (ok, overflow) = send(&url, body, false, 2_000_000).await;
    assert!(!ok, "the upstream request must fail");
    assert!(overflow.is_over());
    assert!(overflow.size() > 2_000_000 && overflow.bytes() < 3_000_000);
    // The server either saw a broken body or no complete request at all.
    if let Ok(Some(got)) = tokio::time::timeout(Duration::from_secs(5), received.recv()).await {
        assert!(got.is_err(), "upstream must not get a complete body");
    }
}
