//! Inspecting send bodies as the SDKs shape them, and forwarding them byte for byte.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use gateway::send::{InspectError, InspectOptions, Inspected, SendRoute, classify, inspect};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method};
use testkit::multipart::Multipart;

const LIMIT: u64 = 20_000_000;
const PY_BOUNDARY: &str = "c0a5e8b2f7d94b1e9f3a6d2c8e4b7a15";
const NODE_BOUNDARY: &str = "----formdata-undici-062417369542";

fn route(uri: &str) -> SendRoute {
    classify(&Method::POST, &uri.parse().expect("uri")).expect("a send route")
}

fn send() -> SendRoute {
    route("/v3/grants/g1/messages/send")
}

fn send_mime() -> SendRoute {
    route("/v3/grants/g1/messages/send?type=mime")
}

fn headers(content_type: Option<&str>, content_length: Option<usize>) -> HeaderMap {
    let mut map = HeaderMap::new();
    if let Some(ct) = content_type {
        map.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(ct).expect("content type"),
        );
    }
    if let Some(len) = content_length {
        map.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    map
}

fn multipart_type(boundary: &str) -> String {
    format!("multipart/form-data; boundary={boundary}")
}

fn opts() -> InspectOptions {
    InspectOptions {
        max_message_size: Some(LIMIT),
        ..InspectOptions::default()
    }
}

/// The body as a stream of `chunk`-sized pieces, counting how many were pulled.
fn chunked(body: &Bytes, chunk: usize, pulled: Arc<AtomicUsize>) -> Body {
    let pieces: Vec<Bytes> = (0..body.len())
        .step_by(chunk)
        .map(|i| body.slice(i..(i + chunk).min(body.len())))
        .collect();
    Body::from_stream(stream::iter(pieces).map(move |piece| {
        pulled.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(piece)
    }))
}

/// Drains the upstream body: the bytes forwarded and the error that stopped it.
async fn forward(inspected: Inspected) -> (Vec<u8>, Option<InspectError>) {
    let mut stream = inspected.body.into_stream();
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => out.extend_from_slice(&chunk),
            Err(error) => {
                assert!(stream.next().await.is_none(), "nothing follows an error");
                return (out, Some(error));
            }
        }
    }
    (out, None)
}

/// Python SDK (requests + toolbelt): the message part has `filename=""` and a
/// content type; attachments are `file0`, `file1`...
fn python_multipart(message: &str, attachments: &[(&str, &[u8])]) -> Bytes {
    let mut body = Multipart::new(PY_BOUNDARY).part(
        "message",
        Some(""),
        Some("application/json"),
        message.as_bytes(),
    );
    for (i, (name, data)) in attachments.iter().enumerate() {
        body = body.part(
            &format!("file{i}"),
            Some(name),
            Some("application/octet-stream"),
            data,
        );
    }
    body.finish().1
}

/// Node SDK (undici FormData): the message part has no filename and no content type.
fn node_multipart(message: &str, attachment: &[u8]) -> Bytes {
    Multipart::new(NODE_BOUNDARY)
        .part("message", None, None, message.as_bytes())
        .part(
            "file0",
            Some("big.bin"),
            Some("application/octet-stream"),
            attachment,
        )
        .finish()
        .1
}

const MESSAGE: &str = r#"{"subject":"Report","body":"<p>see attached</p>","to":[{"name":"Ann","email":"ann@example.com"}],"cc":[{"email":"ANN@example.com"},{"email":"bob@example.com"}],"bcc":[{"email":"carl@example.com"}]}"#;

// ---------------------------------------------------------------- JSON

#[tokio::test]
async fn json_counts_unique_recipients_and_replays_the_body() {
    let body = Bytes::from_static(MESSAGE.as_bytes());
    let inspected = inspect(
        &send(),
        &headers(Some("application/json"), Some(body.len())),
        Body::from(body.clone()),
        &opts(),
    )
    .await
    .expect("inspected");
    assert_eq!(inspected.cost.recipients, 3);
    assert!(inspected.size_known && !inspected.draft_needs_lookup);
    assert_eq!(inspected.body.content_length(), Some(body.len() as u64));
    assert_eq!(inspected.body.as_bytes(), Some(&body));
    let (out, error) = forward(inspected).await;
    assert_eq!((out.as_slice(), error), (&body[..], None));
}

#[tokio::test]
async fn json_without_content_type_is_json() {
    let inspected = inspect(&send(), &HeaderMap::new(), Body::from(MESSAGE), &opts())
        .await
        .expect("inspected");
    assert_eq!(inspected.cost.recipients, 3);
    let domain = route("/v3/domains/example.com/messages/send");
    let ct = headers(Some("application/json; charset=utf-8"), None);
    let inspected = inspect(&domain, &ct, Body::from(MESSAGE), &opts())
        .await
        .expect("domain send");
    assert_eq!(inspected.cost.recipients, 3);
}

#[tokio::test]
async fn json_attachment_of_16_mb_is_too_large_14_mb_fits() {
    let opts = InspectOptions {
        json_limit: 32 << 20,
        ..opts()
    };
    for (bytes, fits) in [(16_000_000usize, false), (14_000_000, true)] {
        // "QUJD" is base64 for three bytes.
        let content = "QUJD".repeat(bytes / 3);
        let json = format!(
            r#"{{"to":[{{"email":"a@x.com"}}],"attachments":[{{"filename":"f.bin","content_type":"application/octet-stream","content":"{content}"}}]}}"#
        );
        let result = inspect(
            &send(),
            &headers(Some("application/json"), None),
            Body::from(json),
            &opts,
        )
        .await;
        match result {
            Ok(inspected) => {
                assert!(fits, "{bytes} should not fit");
                assert!(inspected.cost.size <= LIMIT && inspected.cost.size > 18_666_666);
            }
            Err(InspectError::TooLarge { size, limit }) => {
                assert!(!fits, "{bytes} should fit");
                assert!(size > limit && limit == LIMIT);
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    // Python sends `size` too: the declared size alone is enough.
    let json = r#"{"to":[{"email":"a@x.com"}],"attachments":[{"filename":"f","content":"QUJD","size":16000000}]}"#;
    let result = inspect(&send(), &HeaderMap::new(), Body::from(json), &opts).await;
    assert!(matches!(result, Err(InspectError::TooLarge { .. })));
}

#[tokio::test]
async fn bad_json_is_invalid() {
    for body in [
        "",
        "{",
        "[1,2",
        "\"just a string\"",
        r#"{"to":"a@x.com"}"#,
        r#"{"cc":[{"name":"x"}]}"#,
    ] {
        let result = inspect(
            &send(),
            &headers(Some("application/json"), None),
            Body::from(body),
            &opts(),
        )
        .await;
        assert!(matches!(result, Err(InspectError::Invalid(_))), "{body:?}");
    }
    let result = inspect(
        &send(),
        &headers(Some("text/plain"), None),
        Body::from(MESSAGE),
        &opts(),
    )
    .await;
    assert!(matches!(result, Err(InspectError::Invalid(_))));
}

#[tokio::test]
async fn json_over_the_json_limit_is_too_large() {
    let opts = InspectOptions {
        json_limit: 100,
        ..opts()
    };
    let body = Bytes::from(format!(r#"{{"body":"{}"}}"#, "x".repeat(200)));
    // Refused from Content-Length alone, before reading...
    let result = inspect(
        &send(),
        &headers(Some("application/json"), Some(body.len())),
        Body::from(body.clone()),
        &opts,
    )
    .await;
    assert_eq!(
        result.err(),
        Some(InspectError::TooLarge {
            size: body.len() as u64,
            limit: 100
        })
    );
    // ...and while reading a chunked body.
    let pulled = Arc::new(AtomicUsize::new(0));
    let result = inspect(
        &send(),
        &headers(None, None),
        chunked(&body, 30, pulled.clone()),
        &opts,
    )
    .await;
    assert!(matches!(
        result,
        Err(InspectError::TooLarge { limit: 100, .. })
    ));
    assert!(
        pulled.load(Ordering::SeqCst) < 6,
        "stopped reading at the limit"
    );
}

#[tokio::test]
async fn client_body_failure_is_a_body_error() {
    let body = Body::from_stream(stream::iter(vec![
        Ok(Bytes::from_static(b"{\"to\":")),
        Err(std::io::Error::other("connection reset")),
    ]));
    let result = inspect(&send(), &HeaderMap::new(), body, &opts()).await;
    assert!(matches!(result, Err(InspectError::Body(_))));
}

// ---------------------------------------------------------------- drafts

#[tokio::test]
async fn drafts_need_a_lookup() {
    let draft = route("/v3/grants/me/drafts/draft%2F1%23x");
    assert_eq!(draft.draft_id(), Some("draft/1#x"));
    // Python: no body, no content type. Node: `{}` as JSON.
    for (ct, body) in [(None, ""), (Some("application/json"), "{}")] {
        let inspected = inspect(&draft, &headers(ct, None), Body::from(body), &opts())
            .await
            .expect("draft");
        assert!(inspected.draft_needs_lookup && !inspected.size_known);
        let (out, error) = forward(inspected).await;
        assert_eq!((out.as_slice(), error), (body.as_bytes(), None));
    }
    let result = inspect(
        &draft,
        &headers(Some("application/json"), None),
        Body::from("{oops"),
        &opts(),
    )
    .await;
    assert!(matches!(result, Err(InspectError::Invalid(_))));
}

// ---------------------------------------------------------------- multipart (E1m)

#[tokio::test]
async fn python_multipart_with_empty_filename_message_part() {
    let body = python_multipart(
        MESSAGE,
        &[
            ("a.pdf", b"%PDF-1.4 tiny"),
            ("b.txt", b"hello\r\n--not-a-boundary\r\n"),
        ],
    );
    let h = headers(Some(&multipart_type(PY_BOUNDARY)), Some(body.len()));
    let inspected = inspect(&send(), &h, Body::from(body.clone()), &opts())
        .await
        .expect("inspected");
    assert_eq!(inspected.cost.recipients, 3);
    assert!(inspected.size_known);
    assert_eq!(inspected.body.content_length(), Some(body.len() as u64));
    let overflow = inspected.body.overflow();
    let (out, error) = forward(inspected).await;
    assert_eq!(error, None);
    assert_eq!(out, body, "forwarded byte for byte");
    assert!(overflow.is_finished() && !overflow.is_over());
    assert_eq!(overflow.bytes(), body.len() as u64);
}

#[tokio::test]
async fn multipart_16_mb_is_refused_up_front_14_mb_fits() {
    for (bytes, fits) in [(16_000_000usize, false), (14_000_000, true)] {
        let body = python_multipart(MESSAGE, &[("big.bin", &vec![0x5a; bytes])]);
        let h = headers(Some(&multipart_type(PY_BOUNDARY)), Some(body.len()));
        let pulled = Arc::new(AtomicUsize::new(0));
        let result = inspect(
            &send(),
            &h,
            chunked(&body, 64 << 10, pulled.clone()),
            &opts(),
        )
        .await;
        // Only the head of the body was read, whatever the outcome.
        assert!(
            pulled.load(Ordering::SeqCst) <= 2,
            "read {} chunks",
            pulled.load(Ordering::SeqCst)
        );
        match result {
            Ok(inspected) => {
                assert!(fits, "{bytes} should not fit");
                assert!(inspected.size_known);
                assert!(inspected.cost.size <= LIMIT && inspected.cost.size > 18_666_666);
                let (out, error) = forward(inspected).await;
                assert_eq!(error, None);
                assert!(out == body, "forwarded byte for byte");
            }
            Err(InspectError::TooLarge { size, limit }) => {
                assert!(!fits, "{bytes} should fit");
                assert!(size > limit);
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
}

#[tokio::test]
async fn node_chunked_multipart_is_cut_short_past_the_limit() {
    let attachment = vec![0xa5; 16_000_000];
    let body = node_multipart(MESSAGE, &attachment);
    let h = headers(Some(&multipart_type(NODE_BOUNDARY)), None);
    let pulled = Arc::new(AtomicUsize::new(0));
    let inspected = inspect(&send(), &h, chunked(&body, 64 << 10, pulled), &opts())
        .await
        .expect("inspected");
    assert!(
        !inspected.size_known,
        "no Content-Length: size unknown up front"
    );
    assert_eq!(inspected.cost.recipients, 3);
    assert!(inspected.cost.size < 1_000_000);
    let overflow = inspected.body.overflow();
    let (out, error) = forward(inspected).await;
    assert!(
        matches!(error, Some(InspectError::TooLarge { limit: LIMIT, .. })),
        "{error:?}"
    );
    assert!(
        out.len() < body.len() && out.len() > 14_000_000,
        "cut short at {}",
        out.len()
    );
    assert!(
        body.starts_with(&out),
        "what went out is the client's bytes"
    );
    assert!(overflow.is_over() && !overflow.is_finished());
    assert!(overflow.size() > LIMIT);
    assert!(matches!(
        overflow.failure(),
        Some(InspectError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn node_chunked_multipart_under_the_limit_streams_through() {
    let attachment: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let body = node_multipart(MESSAGE, &attachment);
    let h = headers(Some(&multipart_type(NODE_BOUNDARY)), None);
    let pulled = Arc::new(AtomicUsize::new(0));
    let inspected = inspect(&send(), &h, chunked(&body, 16 << 10, pulled), &opts())
        .await
        .expect("inspected");
    let initial = inspected.cost.size;
    let overflow = inspected.body.overflow();
    let (out, error) = forward(inspected).await;
    assert_eq!(error, None);
    assert!(out == body, "forwarded byte for byte");
    assert!(overflow.is_finished() && !overflow.is_over());
    assert!(
        overflow.size() > 4_000_000 && overflow.size() > initial,
        "final size {}",
        overflow.size()
    );
}

#[tokio::test]
async fn replay_is_byte_for_byte_whatever_the_chunking() {
    let body = python_multipart(
        MESSAGE,
        &[("a.bin", &[0u8, 13, 10, 45, 45, 255]), ("b.bin", b"x")],
    );
    let mut with_epilogue = body.to_vec();
    with_epilogue.extend_from_slice(b"epilogue bytes are forwarded too\r\n");
    let with_epilogue = Bytes::from(with_epilogue);
    for body in [&body, &with_epilogue] {
        for chunk in [1, 2, 3, 7, 64, 100_000] {
            for length in [Some(body.len()), None] {
                let h = headers(Some(&multipart_type(PY_BOUNDARY)), length);
                let pulled = Arc::new(AtomicUsize::new(0));
                let inspected = inspect(&send(), &h, chunked(body, chunk, pulled), &opts())
                    .await
                    .expect("inspected");
                assert_eq!(inspected.cost.recipients, 3);
                let (out, error) = forward(inspected).await;
                assert_eq!(error, None, "chunk {chunk}");
                assert_eq!(out, body.to_vec(), "chunk {chunk}");
            }
        }
    }
}

#[tokio::test]
async fn attachments_before_the_message_part_are_buffered_within_bounds() {
    let b = PY_BOUNDARY;
    let body = Bytes::from(format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"file0\"; filename=\"a.txt\"\r\n\
         Content-Type: text/plain\r\n\r\n{}\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n{MESSAGE}\r\n--{b}--\r\n",
        "a".repeat(5000)
    ));
    let h = headers(Some(&multipart_type(b)), Some(body.len()));
    let inspected = inspect(&send(), &h, chunked(&body, 512, Arc::default()), &opts())
        .await
        .expect("inspected");
    assert_eq!(inspected.cost.recipients, 3);
    let (out, _) = forward(inspected).await;
    assert_eq!(out, body);

    let tight = InspectOptions {
        max_head: 2000,
        ..opts()
    };
    let result = inspect(&send(), &h, chunked(&body, 512, Arc::default()), &tight).await;
    assert!(
        matches!(result, Err(InspectError::Invalid(_))),
        "{result:?}"
    );

    let small = InspectOptions {
        max_message_size: Some(4000),
        ..opts()
    };
    let result = inspect(&send(), &h, chunked(&body, 512, Arc::default()), &small).await;
    assert!(
        matches!(result, Err(InspectError::TooLarge { limit: 4000, .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn missing_message_part_is_invalid() {
    let b = PY_BOUNDARY;
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"file0\"; filename=\"a.txt\"\r\n\r\nabc\r\n--{b}--\r\n"
    );
    let result = inspect(
        &send(),
        &headers(Some(&multipart_type(b)), None),
        Body::from(body),
        &opts(),
    )
    .await;
    assert!(matches!(result, Err(InspectError::Invalid(_))));
}

#[tokio::test]
async fn broken_multipart_is_invalid() {
    let b = PY_BOUNDARY;
    let cases = [
        // No boundary parameter.
        ("multipart/form-data".to_owned(), format!("--{b}\r\n")),
        // Not multipart at all.
        (multipart_type(b), "just some text".to_owned()),
        // Message part never ends.
        (
            multipart_type(b),
            format!("--{b}\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n{MESSAGE}"),
        ),
        // Part headers never end.
        (
            multipart_type(b),
            format!("--{b}\r\nContent-Disposition: form-data; name=\"message\"\r\n"),
        ),
        // Message part is not JSON.
        (
            multipart_type(b),
            format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\nnope\r\n--{b}--\r\n"
            ),
        ),
    ];
    for (ct, body) in cases {
        let result = inspect(
            &send(),
            &headers(Some(&ct), None),
            Body::from(body.clone()),
            &opts(),
        )
        .await;
        assert!(
            matches!(result, Err(InspectError::Invalid(_))),
            "{body:?}: {result:?}"
        );
    }
}

#[tokio::test]
async fn broken_multipart_after_the_message_part_never_completes_upstream() {
    let b = PY_BOUNDARY;
    // Truncated: the attachment never reaches its closing boundary.
    let body = Bytes::from(format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n{MESSAGE}\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file0\"; filename=\"a\"\r\n\r\n{}",
        "z".repeat(3000)
    ));
    let h = headers(Some(&multipart_type(b)), None);
    let inspected = inspect(&send(), &h, chunked(&body, 256, Arc::default()), &opts())
        .await
        .expect("inspected");
    let overflow = inspected.body.overflow();
    let (out, error) = forward(inspected).await;
    assert!(matches!(error, Some(InspectError::Invalid(_))), "{error:?}");
    assert!(out.len() < body.len(), "the last chunk is held back");
    assert!(!overflow.is_over() && !overflow.is_finished());
    assert!(matches!(overflow.failure(), Some(InspectError::Invalid(_))));
}

#[tokio::test]
async fn a_second_message_part_is_refused() {
    let b = PY_BOUNDARY;
    let body = Bytes::from(format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n{MESSAGE}\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n{{\"to\":[]}}\r\n--{b}--\r\n"
    ));
    let h = headers(Some(&multipart_type(b)), Some(body.len()));
    let inspected = inspect(&send(), &h, Body::from(body.clone()), &opts())
        .await
        .expect("inspected");
    let (out, error) = forward(inspected).await;
    assert!(matches!(error, Some(InspectError::Invalid(_))), "{error:?}");
    assert!(out.len() < body.len());
}

// ---------------------------------------------------------------- raw MIME (E2)

const RAW_MIME: &str = "From: Me <me@example.com>\r\n\
To: \"Ann\" <ann@example.com>, =?UTF-8?B?QsOpYQ==?= <bea@example.com>\r\n\
Cc: Friends: carl@example.com, \"Ann again\" <ANN@EXAMPLE.COM>;\r\n\
Bcc: =?ISO-8859-1?Q?Dani=EBl?= <dan@example.com>\r\n\
Subject: =?UTF-8?Q?caf=C3=A9?=\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
Hello.\r\n\
To: not-a-header@example.com\r\n";

#[tokio::test]
async fn raw_mime_as_a_file_part_python() {
    let b = PY_BOUNDARY;
    let body = Bytes::from(format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"mime\"; filename=\"message.eml\"\r\n\
         Content-Type: message/rfc822\r\n\r\n{RAW_MIME}\r\n--{b}--\r\n"
    ));
    for chunk in [1, 5, 64, 10_000] {
        let h = headers(Some(&multipart_type(b)), Some(body.len()));
        let inspected = inspect(
            &send_mime(),
            &h,
            chunked(&body, chunk, Arc::default()),
            &opts(),
        )
        .await
        .expect("mime");
        assert_eq!(inspected.cost.recipients, 4, "chunk {chunk}");
        assert_eq!(inspected.cost.size, body.len() as u64);
        let (out, error) = forward(inspected).await;
        assert_eq!((out, error), (body.to_vec(), None), "chunk {chunk}");
    }
}

#[tokio::test]
async fn raw_mime_as_a_plain_field_go_cli() {
    let b = "0b6fa1c0e9d2";
    let lf_mime = "To: a@x.org, B@X.org\nCc: b@x.org\nSubject: hi\n\nbody\n";
    let body = Bytes::from(format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"mime\"\r\n\r\n{lf_mime}\r\n--{b}--\r\n"
    ));
    let uri = route("/v3/grants/a%40x.org/messages/send?foo=bar&type=mime");
    let inspected = inspect(
        &uri,
        &headers(Some(&multipart_type(b)), None),
        Body::from(body.clone()),
        &opts(),
    )
    .await
    .expect("mime");
    assert_eq!(inspected.cost.recipients, 2);
    assert!(!inspected.size_known);
    let (out, error) = forward(inspected).await;
    assert_eq!((out, error), (body.to_vec(), None));
}

#[tokio::test]
async fn raw_mime_without_headers_or_recipients_is_invalid() {
    let b = PY_BOUNDARY;
    let mime_part = |content: &str| {
        format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"mime\"; filename=\"message.eml\"\r\n\r\n{content}\r\n--{b}--\r\n"
        )
    };
    let cases = [
        mime_part("\r\nno header section"),
        mime_part("From: me@x.org\r\nSubject: nobody\r\n\r\nbody"),
        mime_part(""),
        // No mime part at all.
        format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n{MESSAGE}\r\n--{b}--\r\n"
        ),
    ];
    for body in cases {
        let result = inspect(
            &send_mime(),
            &headers(Some(&multipart_type(b)), None),
            Body::from(body.clone()),
            &opts(),
        )
        .await;
        assert!(
            matches!(result, Err(InspectError::Invalid(_))),
            "{body:?}: {result:?}"
        );
    }
    let result = inspect(
        &send_mime(),
        &headers(Some("application/json"), None),
        Body::from(MESSAGE),
        &opts(),
    )
    .await;
    assert!(matches!(result, Err(InspectError::Invalid(_))));
}

#[tokio::test]
async fn raw_mime_over_the_limit_is_refused_from_content_length() {
    let b = PY_BOUNDARY;
    let body = Bytes::from(format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"mime\"\r\n\r\n{RAW_MIME}{}\r\n--{b}--\r\n",
        "x".repeat(2000)
    ));
    let small = InspectOptions {
        max_message_size: Some(1500),
        ..opts()
    };
    let h = headers(Some(&multipart_type(b)), Some(body.len()));
    let result = inspect(
        &send_mime(),
        &h,
        chunked(&body, 300, Arc::default()),
        &small,
    )
    .await;
    assert_eq!(
        result.err(),
        Some(InspectError::TooLarge {
            size: body.len() as u64,
            limit: 1500
        })
    );
    // Without Content-Length it is cut while streaming.
    let h = headers(Some(&multipart_type(b)), None);
    let inspected = inspect(
        &send_mime(),
        &h,
        chunked(&body, 300, Arc::default()),
        &small,
    )
    .await
    .expect("head fits");
    let overflow = inspected.body.overflow();
    let (out, error) = forward(inspected).await;
    assert!(matches!(
        error,
        Some(InspectError::TooLarge { limit: 1500, .. })
    ));
    assert!(out.len() <= 1500 && overflow.is_over());
}
