//! [`Control`]: the fake's shared state and the methods tests drive it with.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::HeaderMap;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

use crate::behavior::{Rule, RuleError, Rules};
use crate::grants::{Grant, Grants};
use crate::idempotency::Idempotency;
use crate::message::normalize_attachments;
use crate::record::{Recorded, Records, Stats};
use crate::reply::ApiError;

/// How many sent messages the fake keeps per grant for `GET .../messages`.
const MESSAGES_KEPT_PER_GRANT: usize = 1000;

/// A cloneable handle on a fake's state: recordings, rules, grants, drafts.
///
/// [`crate::FakeNylas`] dereferences to it; [`crate::app`] serves one without a socket.
#[derive(Debug, Clone, Default)]
pub struct Control {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    inner: Mutex<Inner>,
    /// Woken whenever a record is added or updated.
    recorded: Notify,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) records: Records,
    pub(crate) rules: Rules,
    pub(crate) grants: Grants,
    pub(crate) idempotency: Idempotency,
    /// Drafts by (canonical grant id, draft id).
    drafts: HashMap<(String, String), Value>,
    /// Sent messages per canonical grant id, newest last.
    messages: HashMap<String, VecDeque<Value>>,
    /// Scheduled sends by (canonical grant id, schedule id).
    schedules: BTreeMap<(String, String), Value>,
    /// When set, only this key or a registered access token is accepted.
    api_key: Option<String>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            records: Records::default(),
            rules: Rules::default(),
            grants: Grants::seeded(),
            idempotency: Idempotency::default(),
            drafts: HashMap::new(),
            messages: HashMap::new(),
            schedules: BTreeMap::new(),
            api_key: None,
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
///
/// # Errors
/// 401 `unauthorized` when the header is missing, not `Bearer` or empty.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer header"))?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(ApiError::unauthorized(
            "the Authorization header must be 'Bearer <token>'",
        ));
    }
    Ok(token.to_owned())
}

impl Control {
    /// A fresh state holding only the demo grant.
    pub fn new() -> Self {
        Control::default()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.shared
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn notify_recorded(&self) {
        self.shared.recorded.notify_waiters();
    }

    // ----- recording -----

    /// Every recorded request, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().records.list.iter().cloned().collect()
    }

    /// Completely received requests to a send endpoint (E1, E1m, E2, E3, E7),
    /// whatever they were answered (see [`Recorded::status`]).
    pub fn sends(&self) -> Vec<Recorded> {
        self.filtered(Recorded::is_send)
    }

    /// Sends Nylas would have carried out: complete, answered 2xx, not replays.
    pub fn delivered(&self) -> Vec<Recorded> {
        self.filtered(Recorded::is_delivered)
    }

    fn filtered(&self, keep: impl Fn(&Recorded) -> bool) -> Vec<Recorded> {
        let inner = self.lock();
        inner
            .records
            .list
            .iter()
            .filter(|r| keep(r))
            .cloned()
            .collect()
    }

    /// Forgets the recorded requests (not the counters of [`Control::stats`]).
    pub fn clear(&self) {
        self.lock().records.list.clear();
    }

    /// Whether request bodies are stored (`body_len` always is). Turn off for load.
    pub fn set_record_bodies(&self, on: bool) {
        self.lock().records.record_bodies = on;
    }

    /// Keeps only the newest `limit` records (`Some(0)`: keep none; `None`: all).
    pub fn set_record_limit(&self, limit: Option<usize>) {
        let mut inner = self.lock();
        inner.records.limit = limit;
        if let Some(limit) = limit {
            while inner.records.list.len() > limit {
                inner.records.list.pop_front();
            }
        }
    }

    /// Counters over the fake's life.
    pub fn stats(&self) -> Stats {
        self.lock().records.stats
    }

    /// Waits until `ready` holds for the recorded requests, or `timeout` passes.
    /// Returns whether it held.
    ///
    /// The server records a request when its body ends, so after a client error
    /// (an aborted upload) the record may land a moment after the client returns.
    pub async fn wait_until(&self, timeout: Duration, ready: impl Fn(&[Recorded]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.recorded.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if ready(self.lock().records.list.make_contiguous()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return ready(self.lock().records.list.make_contiguous());
            }
        }
    }

    /// Waits for at least `n` recorded requests (or `timeout`), then returns them all.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        self.wait_until(timeout, |records| records.len() >= n).await;
        self.requests()
    }

    // ----- behaviour -----

    /// Adds a rule after the existing ones.
    ///
    /// # Errors
    /// [`RuleError`] when the rule cannot be applied; nothing is added.
    pub fn add_rule(&self, rule: Rule) -> Result<(), RuleError> {
        rule.validate()?;
        self.lock().rules.push(rule);
        Ok(())
    }

    /// The active rules, with their remaining `times`.
    pub fn rules(&self) -> Vec<Rule> {
        self.lock().rules.all()
    }

    /// Removes every rule: answers are normal again.
    pub fn clear_rules(&self) {
        self.lock().rules.clear();
    }

    // ----- grants, tokens, drafts -----

    /// Registers (or replaces, by id) a grant and returns it.
    pub fn add_grant(&self, grant: Grant) -> Grant {
        self.lock().grants.insert(grant.clone());
        grant
    }

    /// Every registered grant, by id.
    pub fn grants(&self) -> Vec<Grant> {
        self.lock().grants.all()
    }

    /// Makes `token` an access token of `grant_id`: it resolves `me` to that grant
    /// and is refused for other grants.
    pub fn add_access_token(&self, token: impl Into<String>, grant_id: impl Into<String>) {
        self.lock()
            .grants
            .insert_token(token.into(), grant_id.into());
    }

    /// Requires this bearer token (or a registered access token) on every Nylas
    /// call; `None` (the default) accepts any token.
    pub fn set_api_key(&self, key: Option<String>) {
        self.lock().api_key = key;
    }

    /// Stores a draft and returns it as `GET .../drafts/{id}` will.
    ///
    /// `grant` may be any identifier form; it is resolved now when it can be. The
    /// draft is normalized: `id`, `grant_id`, `object`, `to`/`cc`/`bcc` and every
    /// attachment's `size` are filled in. Drafts stay after being sent (real Nylas
    /// deletes them) so a test can send one twice.
    pub fn add_draft(&self, grant: &str, draft_id: &str, draft: Value) -> Value {
        let mut inner = self.lock();
        let grant_id = inner
            .grants
            .lookup(grant, None)
            .map_or_else(|| grant.to_owned(), |g| g.id.clone());
        let draft = normalize_draft(&grant_id, draft_id, draft);
        inner
            .drafts
            .insert((grant_id, draft_id.to_owned()), draft.clone());
        draft
    }

    /// Puts everything back as after start: demo grant only, no records, rules,
    /// tokens, drafts, messages or kept idempotent answers; bodies recorded; no API
    /// key. The counters and sequence numbers go on.
    pub fn reset(&self) {
        let mut inner = self.lock();
        let mut records = std::mem::take(&mut inner.records);
        records.list.clear();
        records.record_bodies = true;
        records.limit = None;
        *inner = Inner {
            records,
            ..Inner::default()
        };
    }

    // ----- crate-internal helpers for the handlers -----

    /// The settings `GET /__fake/config` shows.
    pub(crate) fn config(&self) -> Value {
        let inner = self.lock();
        json!({
            "record_bodies": inner.records.record_bodies,
            "record_limit": inner.records.limit,
            "api_key": inner.api_key,
        })
    }

    /// Checks the bearer token against the API key, if one is set.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let token = bearer_token(headers)?;
        let inner = self.lock();
        match &inner.api_key {
            Some(key) if *key != token && !inner.grants.is_token(&token) => {
                Err(ApiError::unauthorized("invalid API key or access token"))
            }
            _ => Ok(token),
        }
    }

    /// Authenticates the caller and resolves a decoded grant identifier.
    pub(crate) fn authorize_grant(
        &self,
        headers: &HeaderMap,
        segment: &str,
    ) -> Result<Grant, ApiError> {
        let token = self.authenticate(headers)?;
        self.lock().grants.resolve(segment, &token).cloned()
    }

    /// The canonical id of a decoded identifier, when it resolves.
    pub(crate) fn canonical_grant(&self, segment: &str, bearer: Option<&str>) -> Option<String> {
        self.lock()
            .grants
            .lookup(segment, bearer)
            .map(|g| g.id.clone())
    }

    pub(crate) fn draft(&self, grant_id: &str, draft_id: &str) -> Option<Value> {
        self.lock()
            .drafts
            .get(&(grant_id.to_owned(), draft_id.to_owned()))
            .cloned()
    }

    pub(crate) fn drafts(&self, grant_id: &str) -> Vec<Value> {
        let inner = self.lock();
        let mut drafts: Vec<_> = inner
            .drafts
            .iter()
            .filter(|((g, _), _)| g == grant_id)
            .map(|((_, id), draft)| (id.clone(), draft.clone()))
            .collect();
        drafts.sort_by(|a, b| a.0.cmp(&b.0));
        drafts.into_iter().map(|(_, draft)| draft).collect()
    }

    pub(crate) fn remove_draft(&self, grant_id: &str, draft_id: &str) -> bool {
        self.lock()
            .drafts
            .remove(&(grant_id.to_owned(), draft_id.to_owned()))
            .is_some()
    }

    /// Keeps a sent message (and its schedule, if it has one).
    pub(crate) fn store_message(&self, grant_id: &str, message: &Value) {
        let mut inner = self.lock();
        if let Some(schedule_id) = message.get("schedule_id").and_then(Value::as_str) {
            let schedule = json!({
                "schedule_id": schedule_id,
                "status": { "code": "pending", "description": "schedule send awaiting send at time" },
                "close_time": message.get("send_at").cloned().unwrap_or(Value::Null),
            });
            inner
                .schedules
                .insert((grant_id.to_owned(), schedule_id.to_owned()), schedule);
        }
        let list = inner.messages.entry(grant_id.to_owned()).or_default();
        list.push_back(message.clone());
        while list.len() > MESSAGES_KEPT_PER_GRANT {
            list.pop_front();
        }
    }

    pub(crate) fn messages(&self, grant_id: &str) -> Vec<Value> {
        self.lock()
            .messages
            .get(grant_id)
            .map(|list| list.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn message(&self, grant_id: &str, message_id: &str) -> Option<Value> {
        self.lock().messages.get(grant_id).and_then(|list| {
            list.iter()
                .find(|m| m.get("id").and_then(Value::as_str) == Some(message_id))
                .cloned()
        })
    }

    pub(crate) fn schedules(&self, grant_id: &str) -> Vec<Value> {
        self.lock()
            .schedules
            .iter()
            .filter(|((g, _), _)| g == grant_id)
            .map(|(_, s)| s.clone())
            .collect()
    }

    pub(crate) fn schedule(&self, grant_id: &str, schedule_id: &str) -> Option<Value> {
        self.lock()
            .schedules
            .get(&(grant_id.to_owned(), schedule_id.to_owned()))
            .cloned()
    }

    /// Marks a schedule cancelled; false when the fake never saw it.
    pub(crate) fn cancel_schedule(&self, grant_id: &str, schedule_id: &str) -> bool {
        let mut inner = self.lock();
        match inner
            .schedules
            .get_mut(&(grant_id.to_owned(), schedule_id.to_owned()))
        {
            Some(schedule) => {
                schedule["status"] =
                    json!({ "code": "cancelled", "description": "schedule send cancelled" });
                true
            }
            None => false,
        }
    }
}

/// Fills in the fields a Nylas draft always has.
pub(crate) fn normalize_draft(grant_id: &str, draft_id: &str, draft: Value) -> Value {
    let mut object = match draft {
        Value::Object(object) => object,
        _ => Map::new(),
    };
    object.insert("id".into(), Value::String(draft_id.to_owned()));
    object.insert("grant_id".into(), Value::String(grant_id.to_owned()));
    object.insert("object".into(), Value::String("draft".into()));
    for field in ["to", "cc", "bcc"] {
        object
            .entry(field)
            .or_insert_with(|| Value::Array(Vec::new()));
    }
    object
        .entry("subject")
        .or_insert_with(|| Value::String(String::new()));
    object
        .entry("body")
        .or_insert_with(|| Value::String(String::new()));
    let attachments = object
        .remove("attachments")
        .unwrap_or_else(|| Value::Array(Vec::new()));
    object.insert("attachments".into(), normalize_attachments(attachments));
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::{DEMO_GRANT_EMAIL, DEMO_GRANT_ID};

    #[test]
    fn drafts_registered_by_email_are_kept_under_the_canonical_id() {
        let control = Control::new();
        let draft = control.add_draft(
            DEMO_GRANT_EMAIL,
            "d/1",
            json!({"to": [{"email": "a@b.c"}], "attachments": [{"filename": "x", "content": "aGVsbG8="}]}),
        );
        assert_eq!(draft["grant_id"], DEMO_GRANT_ID);
        assert_eq!(draft["attachments"][0]["size"], 5);
        assert_eq!(control.draft(DEMO_GRANT_ID, "d/1"), Some(draft));
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers).unwrap_err().status, 401);
        headers.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&headers).unwrap_err().status, 401);
        headers.insert(http::header::AUTHORIZATION, "bearer  tok ".parse().unwrap());
        assert_eq!(bearer_token(&headers).unwrap(), "tok");
    }

    #[test]
    fn an_api_key_restricts_tokens() {
        let control = Control::new();
        control.set_api_key(Some("key".into()));
        control.add_access_token("tok", DEMO_GRANT_ID);
        let with = |token: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
            control.authenticate(&headers)
        };
        assert!(with("key").is_ok());
        assert!(with("tok").is_ok());
        assert_eq!(with("other").unwrap_err().status, 401);
    }
}
