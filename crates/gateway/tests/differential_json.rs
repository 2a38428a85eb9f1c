//! Differential test: a JSON send read the way Go's `encoding/json` reads it (Nylas's API
//! is a Go service) never holds more recipients than the gateway counts, unless the
//! gateway refuses the request.
//!
//! The reference below ports the rules that matter for counting: an object key binds a
//! struct field when the two are equal under Unicode simple case folding (`"TO"`, `"Cc"`,
//! `"EMAIL"`, a Kelvin sign for `k`, a long s for `s`), and when several keys bind one field
//! the last one wins. Recipients are counted as distinct strings after ASCII-only
//! lowercasing, the comparison the gateway promises (two addresses that differ in any other
//! way are two recipients).
//!
//! Generated requests mix exact, folded and duplicated keys at the message and the
//! recipient level; `proptest` shrinks any failure to a minimal body.

use std::collections::BTreeSet;

use axum::body::Body;
use gateway::send::{InspectError, InspectOptions, classify, inspect};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;
use serde::de::{MapAccess, SeqAccess, Visitor};

/// A JSON value that keeps every key of an object, duplicates included, in order.
#[derive(Debug, Clone)]
enum Raw {
    Object(Vec<(String, Raw)>),
    Array(Vec<Raw>),
    String(String),
    Other,
}

impl<'de> serde::Deserialize<'de> for Raw {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, Raw>()? {
            entries.push((k, v));
        }
        Ok(Raw::Object(entries))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element::<Raw>()? {
            items.push(v);
        }
        Ok(Raw::Array(items))
    }

    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::String(v))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Raw, E> {
        Ok(Raw::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Raw, E> {
        Ok(Raw::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Raw, E> {
        Ok(Raw::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Raw, E> {
        Ok(Raw::Other)
    }

    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Other)
    }
}

/// Go's `bytes.EqualFold` against an ASCII field name: every character must fold, under
/// Unicode simple case folding, onto the field's character.
fn go_fold_eq(key: &str, field: &str) -> bool {
    let mut k = key.chars();
    for f in field.chars() {
        let Some(c) = k.next() else { return false };
        let folds = c == f
            || c.to_lowercase().eq(f.to_lowercase())
            || c.to_uppercase().eq(f.to_uppercase())
            || c.to_uppercase().flat_map(char::to_lowercase).eq([f]);
        if !folds {
            return false;
        }
    }
    k.next().is_none()
}

/// The value Go would bind to `field` of `object`: the last key that folds onto it.
fn go_field<'a>(object: &'a [(String, Raw)], field: &str) -> Option<&'a Raw> {
    object
        .iter()
        .rev()
        .find(|(k, _)| go_fold_eq(k, field))
        .map(|(_, v)| v)
}

/// Recipients as Go reads them: to, cc and bcc, each a list of objects with an email.
fn go_recipients(message: &Raw) -> BTreeSet<String> {
    let Raw::Object(fields) = message else {
        return BTreeSet::new();
    };
    let mut out = BTreeSet::new();
    for list in ["to", "cc", "bcc"] {
        let Some(Raw::Array(items)) = go_field(fields, list) else {
            continue;
        };
        for item in items {
            if let Raw::Object(entry) = item
                && let Some(Raw::String(email)) = go_field(entry, "email")
            {
                out.insert(email.to_ascii_lowercase());
            }
        }
    }
    out
}

/// What the gateway makes of the body: its recipient count, or a refusal.
fn gateway_count(body: &str) -> Result<u64, InspectError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let route = classify(
        &Method::POST,
        &"/v3/grants/6f1b0f3e-2a4c-4d8e-9b7a-3c5d2e1f0a9b/messages/send"
            .parse()
            .expect("uri"),
    )
    .expect("a send");
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = Body::from(body.to_owned());
    runtime
        .block_on(inspect(&route, &headers, body, &InspectOptions::default()))
        .map(|i| i.cost.recipients)
}

// ---------------------------------------------------------------------------------------
// Generators: bodies written as text, so that duplicate keys survive.

const KEYS: [&str; 3] = ["to", "cc", "bcc"];

fn spelling(field: &'static str) -> impl Strategy<Value = String> {
    let exact = Just(field.to_owned());
    let upper = Just(field.to_uppercase());
    let title = Just(format!("{}{}", field[..1].to_uppercase(), &field[1..]));
    // Non-ASCII characters that fold onto ASCII letters: Kelvin sign for k, long s for s.
    let exotic = Just(field.replace('s', "\u{17f}").replace('k', "\u{212a}"));
    prop_oneof![4 => exact, 1 => upper, 1 => title, 1 => exotic]
}

fn email() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "a@example.org",
        "b@example.org",
        "A@example.org",
        "c@e\u{212a}ample.org",
        "c@ekample.org",
        "d@example.org",
    ])
    .prop_map(str::to_owned)
}

fn recipient() -> impl Strategy<Value = String> {
    let entry = (spelling("email"), email()).prop_map(|(k, e)| format!("{k:?}:{e:?}"));
    prop::collection::vec(entry, 1..3).prop_map(|entries| format!("{{{}}}", entries.join(",")))
}

fn list() -> impl Strategy<Value = String> {
    prop::collection::vec(recipient(), 0..4).prop_map(|items| format!("[{}]", items.join(",")))
}

fn message() -> impl Strategy<Value = String> {
    let field = (prop::sample::select(KEYS.to_vec()), list())
        .prop_flat_map(|(k, l)| (spelling(k), Just(l)))
        .prop_map(|(k, l)| format!("{k:?}:{l}"));
    prop::collection::vec(field, 1..5)
        .prop_map(|fields| format!("{{\"subject\":\"s\",{}}}", fields.join(",")))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_gateway_never_counts_fewer_recipients_than_go_reads(body in message()) {
        let raw: Raw = serde_json::from_str(&body).expect("generated JSON parses");
        let go = go_recipients(&raw).len() as u64;
        match gateway_count(&body) {
            Ok(counted) => prop_assert!(
                counted >= go,
                "gateway counted {counted}, Go reads {go}, in {body}"
            ),
            Err(InspectError::Invalid(_)) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?} for {body}"),
        }
    }
}

#[test]
fn the_reference_reads_the_way_go_does() {
    assert!(go_fold_eq("TO", "to") && go_fold_eq("Bcc", "bcc"));
    assert!(
        go_fold_eq("attachment\u{17f}", "attachments"),
        "long s folds onto s"
    );
    assert!(go_fold_eq("\u{212a}", "k"), "Kelvin sign folds onto k");
    assert!(!go_fold_eq("tos", "to") && !go_fold_eq("t", "to"));
    let raw: Raw =
        serde_json::from_str(r#"{"to":[{"email":"a@x"}],"TO":[{"EMAIL":"b@x"},{"email":"c@x"}]}"#)
            .unwrap();
    let got: Vec<_> = go_recipients(&raw).into_iter().collect();
    assert_eq!(
        got,
        ["b@x", "c@x"],
        "the last key that folds onto a field wins"
    );
}
