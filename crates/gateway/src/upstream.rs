//! The one upstream: request building, header hygiene and response relaying.
//!
//! Only `[upstream] url` is ever contacted: the request target's path and query are appended
//! to its path, and the client's `Host` (or an absolute-form target's authority) is ignored.
//! The target is normalised once, by [`Upstream::normalise`], and sent exactly as
//! normalised: what the proxy classifies is what Nylas receives.
//!
//! The client is hyper's own pooled client (HTTP/1.1, and HTTP/2 where TLS negotiates it),
//! with no redirect handling: a redirect goes back to the caller as it came.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_http::timeout::TimeoutBody;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus `Host`, which
/// the client sets for the upstream.
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

/// Most bytes read from a small upstream answer (a grant or draft look-up).
pub const SMALL_ANSWER_LIMIT: usize = 1024 * 1024;

/// A client for the configured upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without its trailing `/` (often empty).
    prefix: String,
    timeout: Duration,
}

impl Upstream {
    /// A client for `base` (scheme, host, optional path prefix) with a per-request timeout.
    ///
    /// # Errors
    /// `base` is not an `http` or `https` URL with a host.
    pub fn new(base: &reqwest::Url, timeout: Duration) -> Result<Self, UpstreamError> {
        let bad = || UpstreamError::Config(format!("{base} is not an http(s) URL with a host"));
        let scheme: Scheme = base.scheme().parse().map_err(|_| bad())?;
        let host = base.host_str().ok_or_else(bad)?;
        let authority: Authority = match base.port() {
            Some(port) => format!("{host}:{port}").parse(),
            None => host.parse(),
        }
        .map_err(|_| bad())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout.min(Duration::from_secs(10))));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(Upstream {
            client,
            scheme,
            authority,
            prefix: base.path().trim_end_matches('/').to_owned(),
            timeout,
        })
    }

    /// The request target as it will reach the upstream, relative to the configured base:
    /// `\` becomes `/`, and `.` and `..` segments (also percent-encoded) are resolved the
    /// way a URL parser resolves them; a target that climbs above the root stays at it.
    /// `None` when the result is not a valid target.
    pub fn normalise(&self, path_and_query: &str) -> Option<PathAndQuery> {
        normalise(path_and_query)
    }

    /// [`Upstream::normalise`] for a target already parsed: the common target, which has
    /// nothing to resolve, is kept as it is, without a copy.
    pub fn normalise_target(&self, target: &PathAndQuery) -> Option<PathAndQuery> {
        if needs_normalising(target.path()) {
            normalise(target.as_str())
        } else {
            Some(target.clone())
        }
    }

    /// The absolute upstream URI for a normalised target.
    fn uri(&self, target: &PathAndQuery) -> Result<Uri, UpstreamError> {
        let pq: PathAndQuery = if self.prefix.is_empty() {
            target.clone()
        } else {
            format!("{}{}", self.prefix, target.as_str())
                .parse()
                .map_err(|_| UpstreamError::Config("the target cannot form a URI".into()))?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| UpstreamError::Config("the target cannot form a URI".into()))
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends a request upstream with the client's end-to-end headers (hop-by-hop ones are
    /// dropped here too) and `content_length` when known.
    ///
    /// The timeout runs until the response headers arrive (Nylas itself gives up at 90 s);
    /// the response body then streams for as long as it keeps moving: it fails after the
    /// same time without a byte.
    ///
    /// # Errors
    /// [`UpstreamError::Timeout`] when no response came in time; [`UpstreamError::Http`]
    /// for connect failures, broken connections, or the request body failing (an aborted
    /// oversized send).
    pub async fn send(
        &self,
        method: Method,
        target: &PathAndQuery,
        mut headers: HeaderMap,
        body: Body,
        content_length: Option<u64>,
    ) -> Result<Response, UpstreamError> {
        strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        if let Some(len) = content_length {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = self.uri(target)?;
        *request.headers_mut() = headers;
        let resp = match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Ok(result) => result.map_err(UpstreamError::Http)?,
            Err(_) => return Err(UpstreamError::Timeout(self.timeout)),
        };
        let (mut parts, body) = resp.into_parts();
        strip_response_headers(&mut parts.headers);
        let body = Body::new(TimeoutBody::new(self.timeout, body));
        Ok(Response::from_parts(parts, body))
    }

    /// Relays a request byte for byte (its target already normalised) and returns the
    /// answer as it comes. A request without a body goes on without one: a streamed body
    /// would add `Transfer-Encoding: chunked` to a bodiless `DELETE`, `PUT` or `POST`.
    ///
    /// # Errors
    /// As [`Upstream::send`].
    pub async fn relay(&self, req: axum::extract::Request) -> Result<Response, UpstreamError> {
        let (parts, body) = req.into_parts();
        let length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let body = if http_body::Body::is_end_stream(&body) {
            Body::empty()
        } else {
            body
        };
        let target = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        self.send(parts.method, &target, parts.headers, body, length)
            .await
    }

    /// `GET` with only `authorization`, reading the whole (small) answer.
    ///
    /// # Errors
    /// As [`Upstream::send`], plus [`UpstreamError::Body`] when the answer breaks off or is
    /// over [`SMALL_ANSWER_LIMIT`].
    pub async fn get_small(
        &self,
        path: &str,
        authorization: Option<&HeaderValue>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), UpstreamError> {
        let target: PathAndQuery = path
            .parse()
            .map_err(|_| UpstreamError::Config("the look-up path is not a valid target".into()))?;
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(a) = authorization {
            headers.insert(header::AUTHORIZATION, a.clone());
        }
        let resp = self
            .send(Method::GET, &target, headers, Body::empty(), None)
            .await?;
        let (parts, body) = resp.into_parts();
        let read = Limited::new(body, SMALL_ANSWER_LIMIT).collect();
        let body = match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) => return Err(UpstreamError::Body(e.to_string())),
            Err(_) => return Err(UpstreamError::Timeout(self.timeout)),
        };
        Ok((parts.status, parts.headers, body))
    }
}

/// Whether `path` holds anything [`normalise`] would change: a `\\`, or a segment that
/// starts with a dot, plain or percent-encoded (a few false alarms, never a miss).
fn needs_normalising(path: &str) -> bool {
    path.contains('\\') || path.contains("/.") || path.contains("/%2e") || path.contains("/%2E")
}

/// See [`Upstream::normalise`].
fn normalise(path_and_query: &str) -> Option<PathAndQuery> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let path = path.replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        match dots(segment) {
            1 if i == last => out.push(""),
            1 => {}
            2 => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            _ => out.push(segment),
        }
    }
    let mut target = String::with_capacity(path_and_query.len() + 1);
    for segment in &out {
        target.push('/');
        target.push_str(segment);
    }
    if target.is_empty() {
        target.push('/');
    }
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    target.parse().ok()
}

/// 1 for a `.` segment, 2 for `..` (either dot may be written `%2e`), else 0.
fn dots(segment: &str) -> u8 {
    let lower = segment.to_ascii_lowercase();
    match lower.as_str() {
        "." | "%2e" => 1,
        ".." | ".%2e" | "%2e." | "%2e%2e" => 2,
        _ => 0,
    }
}

/// Why an upstream request produced no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No response headers within the configured timeout.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The HTTP client failed (connect, I/O, request body stream).
    #[error("{}", describe(.0))]
    Http(hyper_util::client::legacy::Error),
    /// A small answer could not be read whole.
    #[error("body: {0}")]
    Body(String),
    /// The configured base or a target cannot form a request.
    #[error("{0}")]
    Config(String),
}

impl UpstreamError {
    /// Whether the upstream was too slow.
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Timeout(_))
    }

    /// Whether the connection failed before anything was sent.
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Http(e) => e.is_connect(),
            UpstreamError::Config(_) => true,
            _ => false,
        }
    }

    /// Whether the request failed because the client's body stalled (`[server]
    /// body_timeout`) while it was streaming upstream.
    pub fn is_body_stall(&self) -> bool {
        match self {
            UpstreamError::Http(e) => crate::body_timeout::is_stall(e),
            _ => false,
        }
    }
}

/// A client error's kind and innermost cause, without the URL (which could carry an
/// identifier or a query).
fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let kind = if e.is_connect() { "connect" } else { "request" };
    format!("{kind}: {}", innermost_cause(e))
}

/// The innermost cause of an error chain: what went wrong, without the outer layers'
/// messages (a client's carry the URL, which could hold an identifier or a query).
pub fn innermost_cause(e: &dyn std::error::Error) -> String {
    let mut source = e.source();
    let mut cause = String::new();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    cause
}

/// Removes hop-by-hop headers, including any named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for h in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(h);
    }
}

/// The client's headers minus hop-by-hop ones (including any named by `Connection`).
pub fn forwardable(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    strip_hop_by_hop(&mut out);
    out
}

/// A response from parts already read.
pub fn relay_buffered(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Response {
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    let mut headers = headers.clone();
    strip_response_headers(&mut headers);
    *out.headers_mut() = headers;
    out
}

/// Only hop-by-hop headers go from a response; its `Content-Length` stays.
fn strip_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
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
        assert_eq!(n("/v3/grants/g/%2E"), "/v3/grants/g/");
        assert_eq!(n("/v3/grants/g/x/.%2E"), "/v3/grants/g/");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/v3//grants"), "/v3//grants");
        // The fast path agrees with the full one on every target above and on plain ones.
        for t in [
            "/v3/grants/g/messages\\send",
            "/v3/grants/g/x/%2e%2e/messages/send?a=1",
            "/v3/grants/g/./messages/send",
            "/../../v3/grants/g/messages/send",
            "/v3/grants/draft%2F1/drafts/d%2F2",
            "/v3/grants/g/%2E",
            "/v3/.well-known/x?y=/.",
            "/v3/grants/g/messages?limit=5",
            "/",
        ] {
            let parsed: PathAndQuery = t.parse().unwrap();
            assert_eq!(u.normalise_target(&parsed), u.normalise(t), "{t}");
        }
    }

    #[test]
    fn urls_append_the_target_to_the_configured_base() {
        let u = Upstream::new(
            &"http://127.0.0.1:4000/".parse().unwrap(),
            Duration::from_secs(1),
        )
        .unwrap();
        let t: PathAndQuery = "/v3/grants/a%2Fb?x=1".parse().unwrap();
        assert_eq!(
            u.uri(&t).unwrap().to_string(),
            "http://127.0.0.1:4000/v3/grants/a%2Fb?x=1"
        );
        let prefixed = Upstream::new(
            &"https://api.example/nylas/".parse().unwrap(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(
            prefixed.uri(&t).unwrap().to_string(),
            "https://api.example/nylas/v3/grants/a%2Fb?x=1"
        );
    }
}
