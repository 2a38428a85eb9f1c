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

/// The boundary of the tests' hand-built multipart bodies ([`testkit::multipart::Multipart`]).
pub const BOUNDARY: &str = "fake-nylas-test-boundary";
