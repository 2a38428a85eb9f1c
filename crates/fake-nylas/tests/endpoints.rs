//! Every Nylas endpoint form the fake answers, over real sockets.

mod common;

use common::{BOUNDARY, TOKEN, authed, client, parts, start};
use fake_nylas::{DEMO_GRANT_EMAIL, DEMO_GRANT_ID, Grant, SendKind, download_pattern};
use reqwest::Method;
use serde_json::{Value, json};
use testkit::multipart::Multipart;

#[tokio::test]
async fn every_identifier_form_resolves_to_the_canonical_grant() {
    let fake = start().await;
    fake.add_access_token("tok-demo", DEMO_GRANT_ID);
    let client = client();
    for identifier in [
        DEMO_GRANT_ID.to_owned(),
        format!("grant:{DEMO_GRANT_ID}"),
        DEMO_GRANT_EMAIL.to_owned(),
        "demo%40example.com".to_owned(),
        "email:demo%40example.com".to_owned(),
        "external:demo".to_owned(),
    ] {
        let response = authed(
            &client,
            Method::GET,
            format!("{}/v3/grants/{identifier}", fake.url()),
        )
        .send()
        .await
        .unwrap();
        let (status, body) = parts(response).await;
        assert_eq!(status, 200, "{identifier}");
        assert_eq!(body["data"]["id"], DEMO_GRANT_ID, "{identifier}");
        assert_eq!(body["data"]["email"], DEMO_GRANT_EMAIL);
        assert_eq!(body["data"]["grant_status"], "valid");
    }
    let me = client
        .get(format!("{}/v3/grants/me", fake.url()))
        .bearer_auth("tok-demo")
        .send()
        .await
        .unwrap();
    assert_eq!(parts(me).await.1["data"]["id"], DEMO_GRANT_ID);
    // The raw, still encoded path is what was recorded.
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.path == "/v3/grants/email:demo%40example.com")
    );
}

#[tokio::test]
async fn unknown_grants_and_missing_auth_get_nylas_envelopes() {
    let fake = start().await;
    let client = client();
    let unknown = authed(
        &client,
        Method::GET,
        format!("{}/v3/grants/nobody%40example.com/messages", fake.url()),
    )
    .send()
    .await
    .unwrap();
    let (status, body) = parts(unknown).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["type"], "not_found_error");

    let anonymous = client
        .post(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
            fake.url()
        ))
        .json(&json!({"to": [{"email": "a@x.com"}]}))
        .send()
        .await
        .unwrap();
    let (status, body) = parts(anonymous).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["type"], "unauthorized");

    let me_with_api_key = authed(&client, Method::GET, format!("{}/v3/grants/me", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(parts(me_with_api_key).await.0, 401);

    let nowhere = authed(&client, Method::GET, format!("{}/v3/calendars", fake.url()))
        .send()
        .await
        .unwrap();
    let (status, body) = parts(nowhere).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["type"], "not_found_error");

    let wrong_method = authed(
        &client,
        Method::PUT,
        format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", fake.url()),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(parts(wrong_method).await.0, 404);
}

#[tokio::test]
async fn an_api_key_refuses_other_tokens() {
    let fake = start().await;
    fake.set_api_key(Some(TOKEN.into()));
    let client = client();
    let url = format!("{}/v3/grants/{DEMO_GRANT_ID}", fake.url());
    assert_eq!(
        authed(&client, Method::GET, url.clone())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let wrong = client.get(url).bearer_auth("other").send().await.unwrap();
    assert_eq!(parts(wrong).await.0, 401);
}

#[tokio::test]
async fn json_send_echoes_recipients_and_schedules_with_send_at() {
    let fake = start().await;
    let client = client();
    let message = json!({
        "to": [{"name": "A", "email": "a@x.com"}],
        "cc": [{"email": "c@x.com"}],
        "bcc": [{"email": "b@x.com"}],
        "subject": "hello",
        "body": "<p>hi</p>",
        "attachments": [{"filename": "a.txt", "content_type": "text/plain", "content": "aGVsbG8="}],
    });
    let response = authed(
        &client,
        Method::POST,
        format!(
            "{}/v3/grants/email:demo%40example.com/messages/send",
            fake.url()
        ),
    )
    .json(&message)
    .send()
    .await
    .unwrap();
    let (status, body) = parts(response).await;
    assert_eq!(status, 200);
    assert_eq!(body["grant_id"], DEMO_GRANT_ID);
    let data = &body["data"];
    assert_eq!(data["grant_id"], DEMO_GRANT_ID);
    assert!(data["id"].is_string());
    assert_eq!(data["to"], message["to"]);
    assert_eq!(data["cc"], message["cc"]);
    assert_eq!(data["bcc"], message["bcc"]);
    assert_eq!(data["subject"], "hello");
    assert_eq!(data["attachments"][0]["size"], 5);
    assert!(data.get("schedule_id").is_none());

    let mut scheduled = message.clone();
    scheduled["send_at"] = json!(1_900_000_000);
    let response = authed(
        &client,
        Method::POST,
        format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", fake.url()),
    )
    .json(&scheduled)
    .send()
    .await
    .unwrap();
    let (_, body) = parts(response).await;
    let schedule_id = body["data"]["schedule_id"]
        .as_str()
        .expect("a schedule id")
        .to_owned();

    let cancel = authed(
        &client,
        Method::DELETE,
        format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/schedules/{schedule_id}",
            fake.url()
        ),
    )
    .send()
    .await
    .unwrap();
    let (status, body) = parts(cancel).await;
    assert_eq!(status, 202);
    assert_eq!(body["grant_id"], DEMO_GRANT_ID);
    let schedule = authed(
        &client,
        Method::GET,
        format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/schedules/{schedule_id}",
            fake.url()
        ),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(
        parts(schedule).await.1["data"]["status"]["code"],
        "cancelled"
    );

    let sends = fake.sends();
    assert_eq!(sends.len(), 2);
    assert_eq!(sends[0].send, Some(SendKind::Json));
    assert_eq!(
        sends[0].path,
        "/v3/grants/email:demo%40example.com/messages/send"
    );
    assert_eq!(sends[0].body_json().unwrap(), message);
    assert_eq!(sends[0].status, Some(200));
    assert_eq!(fake.delivered().len(), 2);
}

#[tokio::test]
async fn bad_json_and_charset_are_invalid_requests() {
    let fake = start().await;
    let client = client();
    let url = format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", fake.url());
    for (content_type, body) in [
        ("application/json", "{not json"),
        ("application/json", "[]"),
        (
            "application/json; charset=utf-8",
            r#"{"to":[{"email":"a@x.com"}]}"#,
        ),
        ("application/json", r#"{"to":[]}"#),
        ("application/json", r#"{"to":[{"name":"no email"}]}"#),
    ] {
        let response = authed(&client, Method::POST, url.clone())
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, envelope) = parts(response).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(envelope["error"]["type"], "invalid_request_error");
    }
    // Received whole, so they are sends; refused, so none was delivered.
    assert_eq!(fake.sends().len(), 5);
    assert!(fake.delivered().is_empty());
}

#[tokio::test]
async fn python_style_multipart_send_lists_attachments() {
    let fake = start().await;
    let client = client();
    let attachment = vec![7u8; 3 * 1024 * 1024];
    let (content_type, body) = Multipart::new(BOUNDARY)
        .part(
            "message",
            Some(""),
            Some("application/json"),
            br#"{"to":[{"email":"a@x.com"}],"subject":"big"}"#,
        )
        .part(
            "file0",
            Some("big.bin"),
            Some("application/octet-stream"),
            &attachment,
        )
        .part("logo", Some("logo.png"), Some("image/png"), b"png")
        .finish();
    let response = authed(
        &client,
        Method::POST,
        format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", fake.url()),
    )
    .header("content-type", content_type)
    .body(body.clone())
    .send()
    .await
    .unwrap();
    let (status, reply) = parts(response).await;
    assert_eq!(status, 200, "{reply}");
    let attachments = reply["data"]["attachments"].as_array().unwrap();
    assert_eq!(attachments.len(), 2);
    assert_eq!(attachments[0]["filename"], "big.bin");
    assert_eq!(attachments[0]["size"], attachment.len());
    assert_eq!(attachments[1]["content_id"], "logo");
    assert_eq!(reply["data"]["to"][0]["email"], "a@x.com");

    let sends = fake.sends();
    assert_eq!(sends[0].send, Some(SendKind::Multipart));
    assert_eq!(sends[0].body_len, body.len() as u64);
    assert_eq!(sends[0].body.len(), body.len());
}

#[tokio::test]
async fn node_style_chunked_multipart_send_is_read_whole() {
    let fake = start().await;
    let client = client();
    let (content_type, body) = Multipart::new(BOUNDARY)
        .part(
            "message",
            None,
            None,
            br#"{"bcc":[{"email":"b@x.com"}],"subject":"s"}"#,
        )
        .part("file0", Some("a.txt"), Some("text/plain"), &[b'x'; 100_000])
        .finish();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    let response = authed(
        &client,
        Method::POST,
        format!("{}/v3/domains/mail.example.com/messages/send", fake.url()),
    )
    .header("content-type", content_type)
    .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
        chunks,
    )))
    .send()
    .await
    .unwrap();
    let (status, reply) = parts(response).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply.get("grant_id").is_none());
    assert_eq!(reply["data"]["bcc"][0]["email"], "b@x.com");
    assert_eq!(reply["data"]["attachments"][0]["size"], 100_000);
    let sends = fake.sends();
    assert_eq!(sends[0].send, Some(SendKind::Domain));
    assert!(sends[0].header("content-length").is_none());
    assert_eq!(sends[0].header("transfer-encoding"), Some("chunked"));
    assert!(sends[0].complete);
}

#[tokio::test]
async fn raw_mime_send_reads_the_mime_part_as_file_or_field() {
    let fake = start().await;
    let client = client();
    let mime = b"From: Demo <demo@example.com>\r\nTo: A <a@x.com>, b@x.com\r\nCc: c@x.com\r\nSubject: raw hello\r\n\r\nbody\r\n";
    for (filename, content_type) in [(Some("message.eml"), Some("message/rfc822")), (None, None)] {
        let (ct, body) = Multipart::new(BOUNDARY)
            .part("mime", filename, content_type, mime)
            .finish();
        let response = authed(
            &client,
            Method::POST,
            format!(
                "{}/v3/grants/{DEMO_GRANT_ID}/messages/send?type=mime",
                fake.url()
            ),
        )
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
        let (status, reply) = parts(response).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["data"]["subject"], "raw hello");
        assert_eq!(
            reply["data"]["to"],
            json!([{"email": "a@x.com", "name": "A"}, {"email": "b@x.com"}])
        );
        assert_eq!(reply["data"]["cc"][0]["email"], "c@x.com");
        assert_eq!(reply["data"]["grant_id"], DEMO_GRANT_ID);
    }
    let sends = fake.sends();
    assert_eq!(sends.len(), 2);
    assert!(sends.iter().all(|s| s.send == Some(SendKind::Mime)));
    assert_eq!(sends[0].query.as_deref(), Some("type=mime"));

    let (ct, body) = Multipart::new(BOUNDARY)
        .part("message", None, None, b"{}")
        .finish();
    let missing = authed(
        &client,
        Method::POST,
        format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send?type=mime",
            fake.url()
        ),
    )
    .header("content-type", ct)
    .body(body)
    .send()
    .await
    .unwrap();
    assert_eq!(parts(missing).await.0, 400);
}

#[tokio::test]
async fn drafts_are_read_and_sent_with_percent_encoded_ids() {
    let fake = start().await;
    let client = client();
    fake.add_draft(
        DEMO_GRANT_EMAIL,
        "draft/1#x",
        json!({
            "to": [{"email": "a@x.com"}],
            "bcc": [{"email": "b@x.com"}, {"email": "c@x.com"}],
            "subject": "draft subject",
            "attachments": [{"filename": "f.pdf", "content_type": "application/pdf", "size": 1234}],
        }),
    );
    let url = format!(
        "{}/v3/grants/{DEMO_GRANT_ID}/drafts/draft%2F1%23x",
        fake.url()
    );

    let read = authed(&client, Method::GET, url.clone())
        .send()
        .await
        .unwrap();
    let (status, draft) = parts(read).await;
    assert_eq!(status, 200);
    assert_eq!(draft["data"]["id"], "draft/1#x");
    assert_eq!(draft["data"]["bcc"].as_array().unwrap().len(), 2);
    assert_eq!(draft["data"]["cc"], json!([]));
    assert_eq!(draft["data"]["attachments"][0]["size"], 1234);

    // Python: no body at all; Node: `{}` as JSON.
    let python = authed(&client, Method::POST, url.clone())
        .send()
        .await
        .unwrap();
    let (status, sent) = parts(python).await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["data"]["subject"], "draft subject");
    assert_eq!(sent["data"]["grant_id"], DEMO_GRANT_ID);
    let node = authed(&client, Method::POST, url)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(parts(node).await.0, 200);

    let unknown = authed(
        &client,
        Method::POST,
        format!("{}/v3/grants/{DEMO_GRANT_ID}/drafts/nope", fake.url()),
    )
    .send()
    .await
    .unwrap();
    let (status, body) = parts(unknown).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["type"], "not_found_error");

    let sends = fake.sends();
    assert_eq!(sends.len(), 3);
    assert!(sends.iter().all(|s| s.send == Some(SendKind::Draft)));
    assert_eq!(
        sends[0].path,
        format!("/v3/grants/{DEMO_GRANT_ID}/drafts/draft%2F1%23x")
    );
    assert_eq!(fake.delivered().len(), 2);
}

#[tokio::test]
async fn created_drafts_and_sent_messages_can_be_read_back() {
    let fake = start().await;
    let grant = fake.add_grant(Grant::new("ops@corp.example").with_provider("microsoft"));
    let client = client();
    let base = format!("{}/v3/grants/{}", fake.url(), grant.email);

    let created = authed(&client, Method::POST, format!("{base}/drafts"))
        .json(&json!({"to": [{"email": "a@x.com"}], "subject": "later"}))
        .send()
        .await
        .unwrap();
    let (status, created) = parts(created).await;
    assert_eq!(status, 200);
    let draft_id = created["data"]["id"].as_str().unwrap().to_owned();
    assert_eq!(created["grant_id"], grant.id);

    let sent = authed(&client, Method::POST, format!("{base}/drafts/{draft_id}"))
        .send()
        .await
        .unwrap();
    let (_, sent) = parts(sent).await;
    let message_id = sent["data"]["id"].as_str().unwrap().to_owned();

    let list = authed(&client, Method::GET, format!("{base}/messages"))
        .send()
        .await
        .unwrap();
    let (_, list) = parts(list).await;
    assert_eq!(list["data"][0]["id"], message_id.as_str());
    let one = authed(
        &client,
        Method::GET,
        format!("{base}/messages/{message_id}"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(parts(one).await.1["data"]["subject"], "later");
    let missing = authed(&client, Method::GET, format!("{base}/messages/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(parts(missing).await.0, 404);
}

#[tokio::test]
async fn downloads_stream_the_pattern_at_the_requested_size() {
    let fake = start().await;
    let client = client();
    let url = format!(
        "{}/v3/grants/{DEMO_GRANT_ID}/attachments/att-1/download",
        fake.url()
    );

    let response = authed(&client, Method::GET, url.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    assert_eq!(response.headers()["content-length"], "5000000");
    assert!(response.headers().contains_key("x-request-id"));
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len(), 5_000_000);
    assert!(
        bytes == download_pattern(5_000_000),
        "default download is the pattern"
    );

    let small = authed(
        &client,
        Method::GET,
        format!("{url}?message_id=m1&size=1000"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(small.content_length(), Some(1000));
    assert_eq!(small.bytes().await.unwrap(), download_pattern(1000));

    let empty = authed(&client, Method::GET, format!("{url}?size=0"))
        .send()
        .await
        .unwrap();
    assert!(empty.bytes().await.unwrap().is_empty());

    let bad = authed(&client, Method::GET, format!("{url}?size=big"))
        .send()
        .await
        .unwrap();
    assert_eq!(parts(bad).await.0, 400);
}

#[tokio::test]
async fn the_router_answers_without_a_socket() {
    use tower::ServiceExt;

    let control = fake_nylas::Control::new();
    let app = fake_nylas::app(control.clone());
    let request = http::Request::get(format!("/v3/grants/{DEMO_GRANT_EMAIL}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(axum::body::Body::empty())
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["data"]["id"], DEMO_GRANT_ID);
    assert_eq!(control.requests().len(), 1);
}
