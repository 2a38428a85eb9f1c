//! What the fake received: one [`Recorded`] per request, in the order bodies ended.

use std::collections::VecDeque;

use bytes::Bytes;
use http::{HeaderMap, Method};
use serde::Serialize;
use serde_json::{Map, Value};

/// The send endpoints of nylas-api.md, by the shape of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SendKind {
    /// E1: `POST /v3/grants/{g}/messages/send`, JSON.
    Json,
    /// E1m: the same path, `multipart/form-data`.
    Multipart,
    /// E2: `POST /v3/grants/{g}/messages/send?type=mime`.
    Mime,
    /// E3: `POST /v3/grants/{g}/drafts/{draft_id}`.
    Draft,
    /// E7: `POST /v3/domains/{domain}/messages/send`, JSON or multipart.
    Domain,
}

impl SendKind {
    /// Which send endpoint, if any, a request targets.
    pub fn classify(
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<SendKind> {
        if method != Method::POST {
            return None;
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match segments.as_slice() {
            ["v3", "grants", _, "messages", "send"] => {
                if query.is_some_and(is_mime_query) {
                    Some(SendKind::Mime)
                } else if is_multipart(headers) {
                    Some(SendKind::Multipart)
                } else {
                    Some(SendKind::Json)
                }
            }
            ["v3", "grants", _, "drafts", id] if !id.is_empty() => Some(SendKind::Draft),
            ["v3", "domains", _, "messages", "send"] => Some(SendKind::Domain),
            _ => None,
        }
    }
}

/// Whether a query string asks for a raw MIME send (`type=mime`).
pub(crate) fn is_mime_query(query: &str) -> bool {
    query.split('&').any(|pair| pair == "type=mime")
}

/// Whether a request carries `multipart/form-data`.
pub(crate) fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        })
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Position in arrival order (of body ends), from 0; survives `clear`.
    pub seq: u64,
    /// The request method.
    pub method: Method,
    /// The path as received, still percent-encoded.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// Every request header.
    pub headers: HeaderMap,
    /// The body received (all of it, or what arrived before the abort); empty when
    /// body recording is off.
    pub body: Bytes,
    /// How many body bytes arrived, recorded or not.
    pub body_len: u64,
    /// False when the body ended in an error (the client aborted it mid-stream).
    pub complete: bool,
    /// Which send endpoint the request targeted, if any.
    pub send: Option<SendKind>,
    /// The status answered; `None` while the answer is pending (a delay) or when
    /// none was given (aborted body, client gone).
    pub status: Option<u16>,
    /// True when answered from the idempotency store (`Idempotent-Response: true`).
    pub idempotent_replay: bool,
}

impl Recorded {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON.
    pub fn body_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A completely received request to a send endpoint.
    pub fn is_send(&self) -> bool {
        self.complete && self.send.is_some()
    }

    /// A send Nylas would have carried out: complete, answered 2xx and not a replay.
    pub fn is_delivered(&self) -> bool {
        self.is_send()
            && !self.idempotent_replay
            && self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// The JSON summary `GET /__fake/requests` lists.
    pub(crate) fn summary(&self, with_body: bool) -> Value {
        let mut headers = Map::new();
        for (name, value) in &self.headers {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            match headers.get_mut(name.as_str()) {
                Some(Value::String(existing)) => {
                    existing.push_str(", ");
                    existing.push_str(&value);
                }
                _ => {
                    headers.insert(name.as_str().to_owned(), Value::String(value));
                }
            }
        }
        let mut summary = serde_json::json!({
            "seq": self.seq,
            "method": self.method.as_str(),
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body_len": self.body_len,
            "complete": self.complete,
            "send": self.send,
            "status": self.status,
            "idempotent_replay": self.idempotent_replay,
        });
        if with_body {
            summary["body"] = Value::String(String::from_utf8_lossy(&self.body).into_owned());
        }
        summary
    }
}

/// Counters over the fake's whole life (not reset by `clear`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Requests whose body ended, completely or not.
    pub requests: u64,
    /// Requests whose body was aborted.
    pub aborted: u64,
    /// Complete requests to send endpoints.
    pub sends: u64,
    /// Answers forced by a rule.
    pub forced: u64,
    /// Answers replayed from the idempotency store.
    pub replays: u64,
}

/// The recorded requests, bounded by an optional limit (oldest dropped first).
#[derive(Debug)]
pub(crate) struct Records {
    pub(crate) list: VecDeque<Recorded>,
    pub(crate) record_bodies: bool,
    pub(crate) limit: Option<usize>,
    pub(crate) next_seq: u64,
    pub(crate) stats: Stats,
}

impl Default for Records {
    fn default() -> Self {
        Records {
            list: VecDeque::new(),
            record_bodies: true,
            limit: None,
            next_seq: 0,
            stats: Stats::default(),
        }
    }
}

impl Records {
    /// Stores a request and returns its sequence number.
    pub(crate) fn push(&mut self, mut recorded: Recorded) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        recorded.seq = seq;
        self.stats.requests += 1;
        if !recorded.complete {
            self.stats.aborted += 1;
        }
        if recorded.is_send() {
            self.stats.sends += 1;
        }
        if self.limit == Some(0) {
            return seq;
        }
        self.list.push_back(recorded);
        if let Some(limit) = self.limit {
            while self.list.len() > limit {
                self.list.pop_front();
            }
        }
        seq
    }

    /// Notes how request `seq` was answered.
    pub(crate) fn set_outcome(&mut self, seq: u64, status: u16, replay: bool) {
        if replay {
            self.stats.replays += 1;
        }
        if let Some(recorded) = self.list.iter_mut().rev().find(|r| r.seq == seq) {
            recorded.status = Some(status);
            recorded.idempotent_replay = replay;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(method: Method, path: &str, query: Option<&str>, ct: &str) -> Option<SendKind> {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
        SendKind::classify(&method, path, query, &headers)
    }

    #[test]
    fn send_endpoints_are_told_apart() {
        let json = "application/json";
        let multi = "multipart/form-data; boundary=x";
        let send = "/v3/grants/g/messages/send";
        assert_eq!(
            classify(Method::POST, send, None, json),
            Some(SendKind::Json)
        );
        assert_eq!(
            classify(Method::POST, send, None, multi),
            Some(SendKind::Multipart)
        );
        assert_eq!(
            classify(Method::POST, send, Some("type=mime"), multi),
            Some(SendKind::Mime)
        );
        assert_eq!(
            classify(Method::POST, "/v3/grants/g/drafts/draft%2F1", None, ""),
            Some(SendKind::Draft)
        );
        assert_eq!(
            classify(Method::POST, "/v3/domains/d.com/messages/send", None, json),
            Some(SendKind::Domain)
        );
        assert_eq!(
            classify(Method::GET, "/v3/grants/g/drafts/d", None, ""),
            None
        );
        assert_eq!(
            classify(Method::POST, "/v3/grants/g/drafts", None, json),
            None
        );
        assert_eq!(
            classify(Method::POST, "/v3/grants/g/messages", None, json),
            None
        );
    }

    #[test]
    fn the_limit_keeps_the_newest_records() {
        let mut records = Records {
            limit: Some(2),
            ..Records::default()
        };
        for _ in 0..3 {
            records.push(Recorded {
                seq: 0,
                method: Method::GET,
                path: "/".into(),
                query: None,
                headers: HeaderMap::new(),
                body: Bytes::new(),
                body_len: 0,
                complete: true,
                send: None,
                status: None,
                idempotent_replay: false,
            });
        }
        let seqs: Vec<u64> = records.list.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(records.stats.requests, 3);
    }
}
