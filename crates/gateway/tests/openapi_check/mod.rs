//! Checks admin answers against `crates/gateway/openapi.json`, the OpenAPI 3.1 description
//! served at `/v1/openapi.json`: a suite passes each response it gets to [`check`] with
//! the operation it called. It is `common::openapi_check`, so every suite has it, and
//! `Gateway::quota` checks every quota read of every suite.
//!
//! [`check`] asserts that the status is documented for the operation, that every header
//! the spec requires is there, that the content type is one the spec lists (or that there
//! is no body where none is documented), and that the body validates against the
//! documented schema (JSON Schema draft 2020-12, `$ref`s resolved within the spec). It
//! also records what it saw, so a suite can tell which documented statuses it never met.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::Mutex;

use serde_json::{Map, Value};

/// The repo's spec, as the gateway embeds it.
pub const TEXT: &str = include_str!("../../openapi.json");

/// The spec, and what [`check`] has seen of it.
#[derive(Debug)]
pub struct Spec {
    doc: Value,
    seen: Mutex<BTreeSet<(String, String, String)>>,
    seen_count: Mutex<usize>,
}

/// A response as [`check`] read it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
    /// The body, when it is JSON.
    pub json: Option<Value>,
}

impl Spec {
    /// Parses [`TEXT`].
    pub fn load() -> Spec {
        Spec {
            doc: serde_json::from_str(TEXT).expect("openapi.json is JSON"),
            seen: Mutex::default(),
            seen_count: Mutex::default(),
        }
    }

    pub fn doc(&self) -> &Value {
        &self.doc
    }

    /// `v`, or what its `$ref` (a local pointer, followed until none) names.
    pub fn deref<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        while let Some(r) = v.get("$ref").and_then(Value::as_str) {
            v = self.pointer(r);
        }
        v
    }

    fn pointer(&self, r: &str) -> &Value {
        let p = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("$ref {r:?} is not local"));
        self.doc
            .pointer(p)
            .unwrap_or_else(|| panic!("$ref {r:?} names nothing in the spec"))
    }

    /// Every `(path template, method)` the spec documents, methods in lower case.
    pub fn operations(&self) -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                if METHODS.contains(&method.as_str()) {
                    ops.insert((path.clone(), method.clone()));
                }
            }
        }
        ops
    }

    /// Every documented `(path, method, status)` no [`check`] has seen yet.
    pub fn unseen(&self) -> Vec<(String, String, String)> {
        let seen = self.seen.lock().unwrap();
        let mut missing = Vec::new();
        for (path, method) in self.operations() {
            let responses = &self.doc["paths"][&path][&method]["responses"];
            for status in responses.as_object().expect("responses").keys() {
                let key = (path.clone(), method.clone(), status.clone());
                if !seen.contains(&key) {
                    missing.push(key);
                }
            }
        }
        missing
    }

    /// How many answers [`check`] has validated.
    pub fn validated(&self) -> usize {
        self.seen_count.lock().map(|n| *n).unwrap_or(0)
    }

    /// Asserts the document is OpenAPI 3.1 and every `$ref` in it resolves.
    pub fn assert_well_formed(&self) {
        assert_eq!(self.doc["openapi"], "3.1.0");
        assert!(self.doc["info"]["title"].is_string() && self.doc["info"]["version"].is_string());
        let mut refs = Vec::new();
        collect_refs(&self.doc, &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            self.pointer(&r);
        }
    }
}

/// The methods a path item may hold (OpenAPI 3.1 §4.8.9).
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get("$ref") {
                out.push(r.clone());
            }
            o.values().for_each(|v| collect_refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// Reads `resp` and asserts it is an answer `spec` documents for `method` on
/// `template` (e.g. `"GET"`, `"/v1/quota/{grant}"`); see the module's doc. Returns it.
pub async fn check(spec: &Spec, method: &str, template: &str, resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().expect("ascii header").to_owned())
    };
    let content_type = header("content-type");
    let method = method.to_ascii_lowercase();
    let what = format!("{} {template} → {status}", method.to_uppercase());
    let op = spec.doc["paths"]
        .get(template)
        .and_then(|item| item.get(&method))
        .unwrap_or_else(|| panic!("{what}: the operation is not in the spec"));
    let documented = op["responses"].get(status.to_string()).unwrap_or_else(|| {
        let listed: Vec<_> = op["responses"].as_object().unwrap().keys().collect();
        panic!("{what}: status not documented (the spec lists {listed:?})")
    });
    let documented = spec.deref(documented);
    let mut missing_headers = Vec::new();
    for (name, h) in documented["headers"].as_object().into_iter().flatten() {
        if spec.deref(h)["required"] == true && header(name).is_none() {
            missing_headers.push(name.clone());
        }
    }
    let body = resp.text().await.expect("a readable body");
    assert!(
        missing_headers.is_empty(),
        "{what}: no {missing_headers:?} header\n{body}"
    );
    let json = validate_body(spec, &what, documented, content_type.as_deref(), &body);
    *spec.seen_count.lock().unwrap() += 1;
    spec.seen
        .lock()
        .unwrap()
        .insert((template.to_owned(), method, status.to_string()));
    Answer {
        status,
        content_type,
        body,
        json,
    }
}

/// Validates `body` against the schema `documented` gives its content type; the body as
/// JSON when it is JSON.
fn validate_body(
    spec: &Spec,
    what: &str,
    documented: &Value,
    content_type: Option<&str>,
    body: &str,
) -> Option<Value> {
    let Some(content) = documented.get("content").and_then(Value::as_object) else {
        assert!(
            body.is_empty(),
            "{what}: a body where the spec documents none: {body}"
        );
        return None;
    };
    let ct = content_type.unwrap_or_else(|| panic!("{what}: no content-type"));
    let (media, entry) = media_type(content, ct).unwrap_or_else(|| {
        panic!(
            "{what}: content-type {ct:?} is not one of {:?}",
            content.keys()
        )
    });
    let json = media == "application/json";
    let instance = if json {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"))
    } else {
        Value::String(body.to_owned())
    };
    let schema = entry
        .get("schema")
        .unwrap_or_else(|| panic!("{what}: no schema"));
    let errors = schema_errors(spec, schema, &instance);
    assert!(
        errors.is_empty(),
        "{what}: the body does not match the spec:\n  {}\nbody: {body}",
        errors.join("\n  ")
    );
    json.then_some(instance)
}

/// The documented media type `ct` is (its exact spelling first, else its essence).
fn media_type<'a>(content: &'a Map<String, Value>, ct: &str) -> Option<(String, &'a Value)> {
    let norm = |s: &str| s.to_ascii_lowercase().replace(' ', "");
    let essence = |s: &str| norm(s).split(';').next().unwrap_or("").to_owned();
    let exact = content.iter().find(|(k, _)| norm(k) == norm(ct));
    let loose = || content.iter().find(|(k, _)| essence(k) == essence(ct));
    exact.or_else(loose).map(|(k, v)| (essence(k), v))
}

/// What is wrong with `instance` under `schema`: validated with the whole spec as the root
/// resource (the schema's keywords put at its top), so that `$ref`s into
/// `#/components/...` resolve.
fn schema_errors(spec: &Spec, schema: &Value, instance: &Value) -> Vec<String> {
    let mut root = spec.doc.as_object().expect("an object").clone();
    for (k, v) in schema.as_object().expect("a schema object") {
        assert!(
            root.insert(k.clone(), v.clone()).is_none(),
            "schema keyword {k} clashes"
        );
    }
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&Value::Object(root))
        .unwrap_or_else(|e| panic!("the spec's schema does not compile: {e}"));
    validator
        .iter_errors(instance)
        .map(|e| format!("at {:?}: {e}", e.instance_path().to_string()))
        .collect()
}
