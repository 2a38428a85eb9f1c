//! JSON send shapes that Nylas's Go service could read differently from the gateway:
//! each is refused with `InspectError::Invalid` (400 `invalid_send_request`) before
//! anything is charged or forwarded, or counted at the larger reading.
//! See docs/send-requests.md.

use axum::body::Body;
use gateway::send::{
    InspectError, InspectOptions, Inspected, SendRoute, classify, cost_from_message_json, inspect,
};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method};
use serde_json::json;
use testkit::multipart::Multipart;

const TO: &str = r#""to":[{"email":"a@x.com"}]"#;

fn route(uri: &str) -> SendRoute {
    classify(&Method::POST, &uri.parse().expect("uri")).expect("a send route")
}

fn opts() -> InspectOptions {
    InspectOptions {
        max_message_size: Some(20_000_000),
        ..InspectOptions::default()
    }
}

fn content_type(value: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(
        CONTENT_TYPE,
        HeaderValue::from_str(value).expect("content type"),
    );
    map
}

/// An E1 JSON send of `body`.
async fn send_json(body: &str) -> Result<Inspected, InspectError> {
    let route = route("/v3/grants/g1/messages/send");
    inspect(
        &route,
        &content_type("application/json"),
        Body::from(body.to_owned()),
        &opts(),
    )
    .await
}

/// An E1m multipart send whose `message` part is `message`, with one small attachment.
async fn send_multipart(message: &str) -> Result<Inspected, InspectError> {
    let (ct, body) = Multipart::new("b0")
        .part("message", None, None, message.as_bytes())
        .part("file0", Some("a.txt"), Some("text/plain"), b"hello")
        .finish();
    let route = route("/v3/grants/g1/messages/send");
    inspect(&route, &content_type(&ct), Body::from(body), &opts()).await
}

/// The refusal message, after checking it does not echo an address.
fn refused(result: Result<Inspected, InspectError>, what: &str) -> String {
    match result {
        Err(InspectError::Invalid(message)) => {
            assert!(
                !message.contains("@x.com") && !message.contains("@y.com"),
                "{what}: the message echoes an address: {message}"
            );
            message
        }
        Err(other) => panic!("{what}: expected invalid, got {other}"),
        Ok(inspected) => panic!(
            "{what}: expected a refusal, counted {} recipients",
            inspected.cost.recipients
        ),
    }
}

#[tokio::test]
async fn duplicate_keys_are_refused_json_and_multipart() {
    let cases = [
        // Go reads the last `to`; so does serde_json, but nothing should depend on it.
        format!(r#"{{{TO},"to":[{{"email":"b@x.com"}},{{"email":"c@x.com"}}]}}"#),
        format!(r#"{{"bcc":[{{"email":"b@x.com"}}],{TO},"bcc":[]}}"#),
        r#"{"to":[{"email":"a@x.com","email":"b@x.com"}]}"#.to_owned(),
        format!(r#"{{{TO},"attachments":[{{"size":16000000,"size":1}}]}}"#),
        format!(r#"{{{TO},"custom_headers":[{{"name":"X-A","name":"Bcc","value":"b@y.com"}}]}}"#),
        // An escaped key is the same key.
        format!(r#"{{{TO},"\u0074o":[{{"email":"b@x.com"}}]}}"#),
    ];
    for body in &cases {
        let message = refused(send_json(body).await, body);
        assert!(message.contains("appears twice"), "{body}: {message}");
        let message = refused(send_multipart(body).await, body);
        assert!(message.contains("appears twice"), "{body}: {message}");
    }
}

#[tokio::test]
async fn keys_go_would_fold_onto_a_field_are_refused() {
    let cases = [
        // Go binds `TO` to the To field (last wins): 2 recipients, not 1.
        format!(r#"{{{TO},"TO":[{{"email":"b@x.com"}},{{"email":"c@x.com"}}]}}"#),
        format!(r#"{{{TO},"Cc":[{{"email":"b@x.com"}}]}}"#),
        r#"{"BCC":[{"email":"b@x.com"}],"cc":[{"email":"c@x.com"}]}"#.to_owned(),
        // A long s (U+017F) folds onto `s`: a 16 MB attachment the gateway would miss.
        format!(r#"{{{TO},"attachment\u017f":[{{"filename":"f","size":16000000}}]}}"#),
        format!(r#"{{{TO},"attachments":[{{"filename":"f","Size":16000000}}]}}"#),
        r#"{"to":[{"email":"a@x.com","EMAIL":"b@x.com"}]}"#.to_owned(),
        format!(r#"{{{TO},"custom_headers":[{{"Name":"Bcc","value":"b@y.com"}}]}}"#),
        format!(r#"{{{TO},"reply_to":[{{"Email":"r@x.com"}}]}}"#),
        format!(r#"{{{TO},"Body":"{}"}}"#, "x".repeat(1000)),
    ];
    for body in &cases {
        let message = refused(send_json(body).await, body);
        assert!(message.contains("reads as"), "{body}: {message}");
        refused(send_multipart(body).await, body);
    }
}

#[tokio::test]
async fn a_recipient_must_be_one_bare_address_in_an_object() {
    let cases = [
        r#"{"to":["a@x.com"]}"#,
        r#"{"to":[{"email":"a@x.com, b@y.com"}]}"#,
        r#"{"to":[{"email":"a@x.com;b@y.com"}]}"#,
        r#"{"to":[{"email":"Ann <a@x.com>"}]}"#,
        r#"{"cc":[{"email":" a@x.com "}]}"#,
        r#"{"cc":[{"email":"a@x.com\t"}]}"#,
        r#"{"bcc":[{"email":"\"a b\"@x.com"}]}"#,
        r#"{"bcc":[{"email":"a@x.com\r\nb@y.com"}]}"#,
        r#"{"bcc":[{"email":"a@b@x.com"}]}"#,
        r#"{"bcc":[{"email":"ax.com"}]}"#,
        r#"{"to":[{"email":["a@x.com","b@y.com"]}]}"#,
    ];
    for body in cases {
        refused(send_json(body).await, body);
        refused(send_multipart(body).await, body);
    }
    // A display name stays in `name`, which may hold commas.
    let ok = r#"{"to":[{"name":"Smith, Ann","email":"ann.smith+x@x.com"}]}"#;
    assert_eq!(send_json(ok).await.expect("ok").cost.recipients, 1);
}

#[tokio::test]
async fn a_send_without_recipients_is_refused() {
    for body in [
        r#"{"subject":"nobody"}"#,
        r#"{"to":[],"cc":null,"bcc":[]}"#,
        r#"{"from":[{"email":"f@x.com"}],"reply_to":[{"email":"r@x.com"}]}"#,
    ] {
        let message = refused(send_json(body).await, body);
        assert!(message.contains("no recipients"), "{body}: {message}");
        refused(send_multipart(body).await, body);
    }
}

#[tokio::test]
async fn custom_headers_naming_recipients_are_refused() {
    for name in [
        "To",
        "cc",
        "BCC",
        " Bcc ",
        "Resent-To",
        "resent-bcc",
        "RESENT-CC",
        "Re\\u017fent-To",
        "B\\u200bcc",
    ] {
        let body = format!(
            r#"{{{TO},"custom_headers":[{{"name":"{name}","value":"b@y.com, c@y.com"}}]}}"#
        );
        let message = refused(send_json(&body).await, &body);
        assert!(message.contains("custom_headers"), "{body}: {message}");
        refused(send_multipart(&body).await, &body);
    }
    let ok = format!(r#"{{{TO},"custom_headers":[{{"name":"X-Campaign","value":"q3"}}]}}"#);
    assert_eq!(send_json(&ok).await.expect("ok").cost.recipients, 1);
}

#[tokio::test]
async fn only_ascii_case_makes_two_addresses_one() {
    // The Kelvin sign lowercases to `k` in Unicode, but it is another mailbox.
    let body =
        r#"{"to":[{"email":"k@x.com"},{"email":"\u212a@x.com"}],"cc":[{"email":"K@X.COM"}]}"#;
    assert_eq!(send_json(body).await.expect("ok").cost.recipients, 2);
    let body = r#"{"to":[{"email":"\u00fc@x.com"}],"cc":[{"email":"\u00dc@x.com"}]}"#;
    assert_eq!(send_multipart(body).await.expect("ok").cost.recipients, 2);
}

#[test]
fn drafts_from_nylas_are_read_as_strictly() {
    let envelope = |data: serde_json::Value| json!({"request_id": "r", "data": data});
    for data in [
        json!({"to": [{"email": " a@x.com "}]}),
        json!({"to": ["a@x.com"]}),
        json!({"to": [{"email": "Ann <a@x.com>"}]}),
        json!({"to": [{"email": "a@x.com"}], "Bcc": [{"email": "b@x.com"}]}),
        json!({"to": [{"email": "a@x.com"}], "custom_headers": [{"name": "Bcc", "value": "b@y.com"}]}),
    ] {
        let v = envelope(data);
        assert!(
            matches!(cost_from_message_json(&v), Err(InspectError::Invalid(_))),
            "{v}"
        );
    }
    let v = envelope(json!({"to": [{"email": "k@x.com"}], "cc": [{"email": "\u{212a}@x.com"}]}));
    assert_eq!(cost_from_message_json(&v).expect("cost").recipients, 2);
}

#[tokio::test]
async fn a_draft_send_body_may_not_carry_fields() {
    let draft = route("/v3/grants/g1/drafts/d1");
    for body in [r#"{"bcc":[{"email":"b@x.com"}]}"#, r#"{"x":1,"x":2}"#, "[]"] {
        let result = inspect(
            &draft,
            &content_type("application/json"),
            Body::from(body),
            &opts(),
        )
        .await;
        refused(result, body);
    }
    for body in ["", "{}", " { } "] {
        let result = inspect(
            &draft,
            &content_type("application/json"),
            Body::from(body),
            &opts(),
        )
        .await;
        assert!(result.expect("draft").draft_needs_lookup, "{body:?}");
    }
}
