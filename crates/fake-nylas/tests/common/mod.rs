//! Helpers shared by the integration tests: a fake on port 0 and a client.

#![allow(dead_code)]

use fake_nylas::FakeNylas;
use serde_json::Value;

pub const TOKEN: &str = "nyk_test_key";

pub async fn start() -> FakeNylas {
    FakeNylas::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("fake starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client builds")
}

/// A request with the bearer token set.
pub fn authed(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
) -> reqwest::RequestBuilder {
    client.request(method, url).bearer_auth(TOKEN)
}

/// Status, `X-Request-Id` header and JSON body of a response; checks that the body
/// and header carry the same request id.
pub async fn parts(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let header = response
        .headers()
        .get("x-request-id")
        .expect("every answer carries X-Request-Id")
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.expect("a JSON body");
    assert_eq!(body["request_id"], header, "body and header request ids");
    (status, body)
}

/// A multipart body built by hand, so tests control every header of every part.
pub struct Multipart {
    boundary: String,
    body: Vec<u8>,
}

impl Multipart {
    pub fn new() -> Self {
        Multipart {
            boundary: "fake-nylas-test-boundary".into(),
            body: Vec::new(),
        }
    }

    /// Adds a part; `filename` and `content_type` are written only when given.
    pub fn part(
        mut self,
        name: &str,
        filename: Option<&str>,
        content_type: Option<&str>,
        data: &[u8],
    ) -> Self {
        let mut head = format!(
            "--{}\r\nContent-Disposition: form-data; name=\"{name}\"",
            self.boundary
        );
        if let Some(filename) = filename {
            head.push_str(&format!("; filename=\"{filename}\""));
        }
        head.push_str("\r\n");
        if let Some(content_type) = content_type {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        head.push_str("\r\n");
        self.body.extend_from_slice(head.as_bytes());
        self.body.extend_from_slice(data);
        self.body.extend_from_slice(b"\r\n");
        self
    }

    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    pub fn finish(mut self) -> (String, Vec<u8>) {
        self.body
            .extend_from_slice(format!("--{}--\r\n", self.boundary).as_bytes());
        (self.content_type(), self.body)
    }
}
