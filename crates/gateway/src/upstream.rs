//! The one upstream: request building, header hygiene and response relaying.
//!
//! Only `[upstream] url` is ever contacted: the request target's path and query are appended
//! to it, and the client's `Host` (or an absolute-form target's authority) is ignored.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, header};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus `Host`, which
/// reqwest sets for the upstream.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
];

/// A client for the configured upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    base: String,
    timeout: Duration,
}

impl Upstream {
    /// A client for `base` (scheme, host, optional path prefix) with a per-request timeout.
    ///
    /// # Errors
    /// The TLS backend cannot be initialised.
    pub fn new(base: &reqwest::Url, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            // Redirects go back to the client unchanged; the gateway never follows them.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            // A stalled body (either way) fails after this long without a byte; a slow but
            // moving download is never cut off.
            .read_timeout(timeout)
            .build()?;
        Ok(Upstream {
            client,
            base: base.as_str().trim_end_matches('/').to_owned(),
            timeout,
        })
    }

    /// The upstream URL for a request target's path and query.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }

    /// The request target as it will reach the upstream: parsed by the same URL parser
    /// that sends it (`\\` becomes `/`, `.` and `..` segments and their encoded forms go),
    /// relative to the configured base. A target that climbs above the base's path stays
    /// under it. `None` when the target cannot form a URL.
    pub fn normalise(&self, path_and_query: &str) -> Option<http::Uri> {
        let url = reqwest::Url::parse(&self.url(path_and_query)).ok()?;
        let base_path = reqwest::Url::parse(&self.base)
            .ok()?
            .path()
            .trim_end_matches('/')
            .to_owned();
        let path = url.path();
        let relative = match path.strip_prefix(&base_path) {
            Some(rest) if rest.starts_with('/') || rest.is_empty() => rest,
            _ => path,
        };
        let relative = if relative.is_empty() { "/" } else { relative };
        let target = match url.query() {
            Some(q) => format!("{relative}?{q}"),
            None => relative.to_owned(),
        };
        target.parse().ok()
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends a request upstream with the client's end-to-end headers.
    ///
    /// The timeout runs until the response headers arrive (Nylas itself gives up at 90 s);
    /// the response body then streams for as long as it keeps moving.
    ///
    /// # Errors
    /// [`UpstreamError::Timeout`] when no response came in time; otherwise whatever reqwest
    /// reports: connect failures, broken connections, or the body stream failing (an aborted
    /// oversized send).
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: reqwest::Body,
        content_length: Option<u64>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut out = forwardable(headers);
        out.remove(header::CONTENT_LENGTH);
        if let Some(len) = content_length {
            out.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        let request = self
            .client
            .request(method, self.url(path_and_query))
            .headers(out)
            .body(body)
            .send();
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => result.map_err(UpstreamError::Http),
            Err(_) => Err(UpstreamError::Timeout(self.timeout)),
        }
    }

    /// `GET` with only the caller's `Authorization`, reading the whole (small) answer.
    ///
    /// # Errors
    /// As [`Upstream::send`].
    pub async fn get_small(
        &self,
        path: &str,
        authorization: Option<&HeaderValue>,
    ) -> Result<(http::StatusCode, HeaderMap, Bytes), reqwest::Error> {
        let mut req = self
            .client
            .get(self.url(path))
            .timeout(self.timeout)
            .header(header::ACCEPT, "application/json");
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        let resp = req.send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?;
        Ok((status, headers, body))
    }
}

/// Why an upstream request produced no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No response headers within the configured timeout.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The HTTP client failed (connect, I/O, body stream).
    #[error("{}", describe(.0))]
    Http(reqwest::Error),
}

impl UpstreamError {
    /// Whether the upstream was too slow.
    pub fn is_timeout(&self) -> bool {
        match self {
            UpstreamError::Timeout(_) => true,
            UpstreamError::Http(e) => e.is_timeout(),
        }
    }

    /// Whether the connection failed before anything was sent.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Http(e) if e.is_connect())
    }
}

/// A reqwest error's kind and innermost cause, without the URL (which could carry an
/// identifier or a query).
pub fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() {
        "body"
    } else if e.is_request() {
        "request"
    } else {
        "other"
    };
    let mut source = std::error::Error::source(e);
    let mut cause = String::new();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    format!("{kind}: {cause}")
}

/// The client's headers minus hop-by-hop ones (including any named by `Connection`).
pub fn forwardable(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for h in HOP_BY_HOP.iter().chain(named.iter()) {
        out.remove(h);
    }
    out
}

/// Relays an upstream response: status and end-to-end headers intact, body streamed.
pub fn relay(resp: reqwest::Response) -> Response {
    let status = resp.status();
    let headers = response_headers(resp.headers());
    let mut out = Response::new(Body::from_stream(resp.bytes_stream()));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// A response from parts already read.
pub fn relay_buffered(status: http::StatusCode, headers: &HeaderMap, body: Bytes) -> Response {
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    *out.headers_mut() = response_headers(headers);
    out
}

fn response_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = forwardable(headers);
    // `Host` is not a response header, but a `Content-Length` must survive: only
    // hop-by-hop headers go.
    out.remove(header::HOST);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let out = forwardable(&h);
        assert_eq!(out.len(), 2);
        assert!(out.contains_key(header::AUTHORIZATION) && out.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn targets_are_normalised_the_way_they_are_sent() {
        let u = Upstream::new(
            &"http://127.0.0.1:4000/nylas".parse().unwrap(),
            Duration::from_secs(1),
        )
        .unwrap();
        let n = |t: &str| u.normalise(t).unwrap().to_string();
        assert_eq!(
            n("/v3/grants/g/messages\\send"),
            "/v3/grants/g/messages/send"
        );
        assert_eq!(
            n("/v3/grants/g/x/%2e%2e/messages/send?a=1"),
            "/v3/grants/g/messages/send?a=1"
        );
        assert_eq!(
            n("/v3/grants/g/./messages/send"),
            "/v3/grants/g/messages/send"
        );
        assert_eq!(
            n("/../../v3/grants/g/messages/send"),
            "/v3/grants/g/messages/send"
        );
        assert_eq!(
            n("/v3/grants/draft%2F1/drafts/d%2F2"),
            "/v3/grants/draft%2F1/drafts/d%2F2"
        );
    }

    #[test]
    fn urls_append_the_target_to_the_configured_base() {
        let u = Upstream::new(
            &"http://127.0.0.1:4000/".parse().unwrap(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(
            u.url("/v3/grants/a%2Fb?x=1"),
            "http://127.0.0.1:4000/v3/grants/a%2Fb?x=1"
        );
    }
}
