//! Forced answers and delays: how a test makes Nylas misbehave.
//!
//! A [`Rule`] matches requests by method and by a substring of `path?query`; the first
//! active rule that matches is used (and counted down when it has `times`). A rule can
//! delay the answer, force it, or both. Forced answers skip everything else, grant
//! resolution and idempotency included, the way a proxy or an overloaded Nylas would.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::reply::{default_error_type, error_body, json_response};

/// Why a [`Rule`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// `status` is not a valid HTTP status code.
    #[error("status {0} is not a valid http status")]
    Status(u16),
    /// `times` is zero, so the rule would never apply.
    #[error("times must be at least 1")]
    ZeroTimes,
    /// A header name or value cannot be sent.
    #[error("header {0:?} is not a valid http header")]
    Header(String),
    /// `method` is not an HTTP method.
    #[error("method {0:?} is not a valid http method")]
    Method(String),
}

/// One forced behaviour; the JSON form is what `POST /__fake/behavior` takes.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use fake_nylas::Rule;
///
/// // The next send is throttled by the provider, the one after is slow.
/// let throttle = Rule::rate_limited(30).path("/messages/send").times(1);
/// let slow = Rule::delay(Duration::from_secs(5)).times(1);
/// assert_eq!(throttle.status, Some(429));
/// assert_eq!(slow.delay_ms, Some(5000));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Only requests whose raw `path?query` contains this (all when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_contains: Option<String>,
    /// Only requests with this method, e.g. `POST` (all when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// How many requests the rule applies to; `None` until cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
    /// Wait this long before answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Answer with this status instead of the normal answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The `error.type` of the default envelope (by status when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    /// The `error.message` of the default envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A JSON body replacing the default envelope; `request_id` is added to an
    /// object lacking one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// A non-JSON body sent verbatim (`text/plain` unless `headers` says otherwise),
    /// e.g. the HTML page of a failing load balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_body: Option<String>,
    /// Extra response headers, e.g. `Retry-After`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl Rule {
    /// Answers with `status` and the Nylas error envelope for it.
    pub fn status(status: u16) -> Self {
        Rule {
            status: Some(status),
            ..Rule::default()
        }
    }

    /// Answers normally, but only after `delay`.
    pub fn delay(delay: Duration) -> Self {
        Rule::default().with_delay(delay)
    }

    /// A provider throttle: 429 `rate_limit_error` with `Retry-After` and a
    /// `provider_error`, as Nylas relays a Google or Microsoft 429.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Rule::status(429)
            .header("Retry-After", retry_after_secs.to_string())
            .body(json!({
                "error": {
                    "type": "rate_limit_error",
                    "message": "Too many requests to the provider",
                    "provider_error": {
                        "error": { "code": 429, "message": "User-rate limit exceeded" }
                    },
                }
            }))
    }

    /// Restricts the rule to requests whose `path?query` contains `fragment`.
    pub fn path(mut self, fragment: impl Into<String>) -> Self {
        self.path_contains = Some(fragment.into());
        self
    }

    /// Restricts the rule to one method.
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.method = Some(method.into());
        self
    }

    /// Applies the rule to the next `n` matching requests only.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    /// Adds a delay before the (forced or normal) answer.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay_ms = Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Sets the envelope's `error.type` and `error.message`.
    pub fn error(mut self, error_type: impl Into<String>, message: impl Into<String>) -> Self {
        self.error_type = Some(error_type.into());
        self.message = Some(message.into());
        self
    }

    /// Replaces the envelope with a JSON body.
    pub fn body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    /// Replaces the envelope with a verbatim, non-JSON body.
    pub fn raw_body(mut self, body: impl Into<String>) -> Self {
        self.raw_body = Some(body.into());
        self
    }

    /// Adds a response header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Checks that the rule can be applied.
    ///
    /// # Errors
    /// The first field that cannot be used.
    pub fn validate(&self) -> Result<(), RuleError> {
        if let Some(status) = self.status
            && StatusCode::from_u16(status).is_err()
        {
            return Err(RuleError::Status(status));
        }
        if self.times == Some(0) {
            return Err(RuleError::ZeroTimes);
        }
        if let Some(method) = &self.method
            && Method::from_bytes(method.as_bytes()).is_err()
        {
            return Err(RuleError::Method(method.clone()));
        }
        for (name, value) in &self.headers {
            if HeaderName::from_bytes(name.as_bytes()).is_err()
                || HeaderValue::from_str(value).is_err()
            {
                return Err(RuleError::Header(name.clone()));
            }
        }
        Ok(())
    }

    fn matches(&self, method: &Method, path_and_query: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method.as_str()))
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| path_and_query.contains(p))
    }

    /// The delay to apply, if any.
    pub(crate) fn delay_duration(&self) -> Option<Duration> {
        self.delay_ms.map(Duration::from_millis)
    }

    /// The forced answer, if the rule forces one.
    pub(crate) fn forced_response(&self, request_id: &str) -> Option<Response> {
        let status = StatusCode::from_u16(self.status?).ok()?;
        let mut response = if let Some(raw) = &self.raw_body {
            let mut response = (status, raw.clone()).into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            if let Ok(value) = HeaderValue::from_str(request_id) {
                response
                    .headers_mut()
                    .insert(crate::REQUEST_ID_HEADER, value);
            }
            response
        } else {
            let body = match &self.body {
                Some(Value::Object(object)) => {
                    let mut object = object.clone();
                    object
                        .entry("request_id")
                        .or_insert_with(|| Value::String(request_id.to_owned()));
                    Value::Object(object)
                }
                Some(other) => other.clone(),
                None if status.is_success() => json!({"request_id": request_id, "data": {}}),
                None => error_body(
                    request_id,
                    self.error_type
                        .as_deref()
                        .unwrap_or_else(|| default_error_type(status.as_u16())),
                    self.message
                        .as_deref()
                        .unwrap_or_else(|| status.canonical_reason().unwrap_or("forced error")),
                ),
            };
            json_response(status, &body, request_id)
        };
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                response.headers_mut().insert(name, value);
            }
        }
        Some(response)
    }
}

/// The active rules, in the order they were added.
#[derive(Debug, Default)]
pub(crate) struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    pub(crate) fn push(&mut self, rule: Rule) {
        self.rules.push(rule);
    }

    pub(crate) fn clear(&mut self) {
        self.rules.clear();
    }

    pub(crate) fn all(&self) -> Vec<Rule> {
        self.rules.clone()
    }

    /// The first rule matching the request, counted down (and dropped once spent).
    pub(crate) fn take(&mut self, method: &Method, path_and_query: &str) -> Option<Rule> {
        let index = self
            .rules
            .iter()
            .position(|rule| rule.matches(method, path_and_query))?;
        let rule = &mut self.rules[index];
        match rule.times {
            Some(1) => Some(self.rules.remove(index)),
            Some(n) => {
                rule.times = Some(n - 1);
                Some(rule.clone())
            }
            None => Some(rule.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_rules_are_spent_then_the_next_rule_applies() {
        let mut rules = Rules::default();
        rules.push(Rule::status(500).path("/send").times(2));
        rules.push(Rule::status(404));
        let post = Method::POST;
        assert_eq!(
            rules
                .take(&post, "/v3/grants/g/messages/send")
                .unwrap()
                .status,
            Some(500)
        );
        assert_eq!(rules.take(&post, "/v3/grants/g").unwrap().status, Some(404));
        assert_eq!(
            rules
                .take(&post, "/v3/grants/g/messages/send")
                .unwrap()
                .status,
            Some(500)
        );
        assert_eq!(
            rules
                .take(&post, "/v3/grants/g/messages/send")
                .unwrap()
                .status,
            Some(404)
        );
        assert_eq!(rules.all().len(), 1);
    }

    #[test]
    fn method_filter_is_case_insensitive() {
        let mut rules = Rules::default();
        rules.push(Rule::status(500).method("delete"));
        assert!(rules.take(&Method::POST, "/x").is_none());
        assert!(rules.take(&Method::DELETE, "/x").is_some());
    }

    #[test]
    fn invalid_rules_are_refused() {
        assert_eq!(Rule::status(1000).validate(), Err(RuleError::Status(1000)));
        assert_eq!(
            Rule::status(500).times(0).validate(),
            Err(RuleError::ZeroTimes)
        );
        assert!(
            Rule::status(500)
                .header("bad header", "x")
                .validate()
                .is_err()
        );
        assert!(Rule::rate_limited(30).validate().is_ok());
    }

    #[test]
    fn rate_limited_rule_renders_the_provider_throttle() {
        let response = Rule::rate_limited(30).forced_response("rid").unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "30");
        assert_eq!(response.headers()[crate::REQUEST_ID_HEADER], "rid");
    }
}
