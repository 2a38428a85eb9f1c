//! Which requests send mail: [`classify`] maps a method and URI to a [`SendRoute`].
//!
//! Matching is deliberately generous, because a send that is not recognised is passed
//! through without a quota check, while a non-send taken for one only costs a
//! reservation that the failed upstream call gives back:
//! - segments are percent-decoded one by one (so `%2F` inside a draft id stays inside
//!   it), the literal segments compare ASCII case-insensitively;
//! - empty segments (`//`, a trailing slash) and `.` are dropped, `..` removes the
//!   segment before it;
//! - a path that only matches once decoded as a whole (`messages%2Fsend`) still counts.

use http::{Method, Uri};
use percent_encoding::percent_decode_str;

/// A request that sends mail, as recognised by [`classify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendRoute {
    /// E1 / E1m: `POST /v3/grants/{grant}/messages/send`, JSON or multipart (decided by
    /// the content type in [`inspect`](super::inspect())).
    Message {
        /// The grant identifier as it appeared in the path, percent-decoded.
        grant: String,
    },
    /// E2: `POST /v3/grants/{grant}/messages/send?type=mime`, a whole RFC 5322 message.
    Mime {
        /// The grant identifier, percent-decoded.
        grant: String,
    },
    /// E3: `POST /v3/grants/{grant}/drafts/{draft_id}`, sends a saved draft.
    Draft {
        /// The grant identifier, percent-decoded.
        grant: String,
        /// The draft id, percent-decoded (`draft%2F1%23x` is `draft/1#x`).
        draft_id: String,
        /// The request path exactly as received (still percent-encoded): `GET` it
        /// upstream to read the draft's recipients.
        path: String,
    },
    /// E7: `POST /v3/domains/{domain}/messages/send`, transactional send without a grant.
    Domain {
        /// The sending domain, percent-decoded.
        domain: String,
    },
}

/// The kind of a [`SendRoute`], without its data; for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SendKind {
    /// E1 / E1m.
    Message,
    /// E2.
    Mime,
    /// E3.
    Draft,
    /// E7.
    Domain,
}

impl SendKind {
    /// A short stable name: `message`, `mime`, `draft` or `domain`.
    pub fn as_str(self) -> &'static str {
        match self {
            SendKind::Message => "message",
            SendKind::Mime => "mime",
            SendKind::Draft => "draft",
            SendKind::Domain => "domain",
        }
    }
}

impl SendRoute {
    /// The kind of this route.
    pub fn kind(&self) -> SendKind {
        match self {
            SendRoute::Message { .. } => SendKind::Message,
            SendRoute::Mime { .. } => SendKind::Mime,
            SendRoute::Draft { .. } => SendKind::Draft,
            SendRoute::Domain { .. } => SendKind::Domain,
        }
    }

    /// The grant identifier (decoded), for every route but [`SendRoute::Domain`].
    pub fn grant(&self) -> Option<&str> {
        match self {
            SendRoute::Message { grant }
            | SendRoute::Mime { grant }
            | SendRoute::Draft { grant, .. } => Some(grant),
            SendRoute::Domain { .. } => None,
        }
    }

    /// The sending domain of a [`SendRoute::Domain`].
    pub fn domain(&self) -> Option<&str> {
        match self {
            SendRoute::Domain { domain } => Some(domain),
            _ => None,
        }
    }

    /// The draft id of a [`SendRoute::Draft`].
    pub fn draft_id(&self) -> Option<&str> {
        match self {
            SendRoute::Draft { draft_id, .. } => Some(draft_id),
            _ => None,
        }
    }
}

/// Tells whether a request sends mail, and through which endpoint.
///
/// Only `POST` can send. Anything that is not one of the send endpoints gives `None`
/// and should be passed through untouched.
///
/// # Examples
///
/// ```
/// use gateway::send::{classify, SendRoute};
/// use http::{Method, Uri};
///
/// let uri: Uri = "/v3/grants/me/drafts/draft%2F1%23x".parse().unwrap();
/// let route = classify(&Method::POST, &uri).unwrap();
/// assert_eq!(route.draft_id(), Some("draft/1#x"));
/// assert!(classify(&Method::GET, &uri).is_none());
/// ```
pub fn classify(method: &Method, uri: &Uri) -> Option<SendRoute> {
    if method != Method::POST {
        return None;
    }
    let raw_path = uri.path();
    let segments = normalize(raw_path.split('/').map(decode));
    match_segments(&segments, uri, raw_path).or_else(|| {
        // A router that decodes the whole path before splitting would still see a send.
        let whole = decode(raw_path);
        let segments = normalize(whole.split('/').map(str::to_owned));
        match_segments(&segments, uri, raw_path)
    })
}

/// A change of a saved draft (`PUT`, `PATCH` or `DELETE /v3/grants/{g}/drafts/{id}`): not a
/// send, but it must not overlap a send of the same draft. Paths are matched as
/// generously as [`classify`] matches them.
pub fn classify_draft_change(method: &Method, uri: &Uri) -> Option<SendRoute> {
    if ![Method::PUT, Method::PATCH, Method::DELETE].contains(method) {
        return None;
    }
    classify(&Method::POST, uri).filter(|r| matches!(r, SendRoute::Draft { .. }))
}

/// A cancel of a scheduled send: `DELETE /v3/grants/{grant}/messages/schedules/{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleCancel {
    /// The grant identifier, percent-decoded.
    pub grant: String,
    /// The schedule id, percent-decoded.
    pub schedule_id: String,
}

/// Tells whether a request cancels a scheduled send (which gives its charge back once
/// Nylas agrees). Paths are matched as generously as [`classify`] matches them.
///
/// # Examples
///
/// ```
/// use gateway::send::classify_schedule_cancel;
/// use http::{Method, Uri};
///
/// let uri: Uri = "/v3/grants/me/messages/schedules/abc%2F1".parse().unwrap();
/// let cancel = classify_schedule_cancel(&Method::DELETE, &uri).unwrap();
/// assert_eq!((cancel.grant.as_str(), cancel.schedule_id.as_str()), ("me", "abc/1"));
/// assert!(classify_schedule_cancel(&Method::GET, &uri).is_none());
/// ```
pub fn classify_schedule_cancel(method: &Method, uri: &Uri) -> Option<ScheduleCancel> {
    if method != Method::DELETE {
        return None;
    }
    let raw_path = uri.path();
    let matches = |segments: &[String]| {
        let lit = |i: usize, want: &str| segments[i].eq_ignore_ascii_case(want);
        (segments.len() == 6
            && lit(0, "v3")
            && lit(1, "grants")
            && lit(3, "messages")
            && lit(4, "schedules"))
        .then(|| ScheduleCancel {
            grant: segments[2].clone(),
            schedule_id: segments[5].clone(),
        })
    };
    matches(&normalize(raw_path.split('/').map(decode))).or_else(|| {
        let whole = decode(raw_path);
        matches(&normalize(whole.split('/').map(str::to_owned)))
    })
}

/// What a request's path is about, for a client that may use only some grants or domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSubject {
    /// `/v3/grants/{identifier}/...`: one grant (the identifier percent-decoded).
    Grant(String),
    /// `/v3/domains/{domain}/...`: one sending domain.
    Domain(String),
    /// Anything else: the application's own endpoints (`GET /v3/grants`, webhooks, ...).
    Application,
}

/// Every reading of a path, as generously as [`classify`] reads it: segment by segment,
/// and decoded whole before splitting (a front end that reads it the second way must not
/// reach another grant than the one checked).
///
/// # Examples
///
/// ```
/// use gateway::send::{PathSubject, path_subjects};
///
/// let uri = "/v3/grants/a%2F..%2F..%2Fdomains%2Fb/messages".parse().unwrap();
/// assert_eq!(
///     path_subjects(&uri),
///     [PathSubject::Grant("a/../../domains/b".into()), PathSubject::Domain("b".into())]
/// );
/// assert_eq!(path_subjects(&"/v3/webhooks".parse().unwrap()), [PathSubject::Application]);
/// ```
pub fn path_subjects(uri: &Uri) -> Vec<PathSubject> {
    let raw_path = uri.path();
    let subject = |segments: &[String]| {
        let lit = |i: usize, want: &str| segments[i].eq_ignore_ascii_case(want);
        match segments.len() {
            n if n >= 3 && lit(0, "v3") && lit(1, "grants") => {
                PathSubject::Grant(segments[2].clone())
            }
            n if n >= 3 && lit(0, "v3") && lit(1, "domains") => {
                PathSubject::Domain(segments[2].clone())
            }
            _ => PathSubject::Application,
        }
    };
    let first = subject(&normalize(raw_path.split('/').map(decode)));
    let whole = decode(raw_path);
    let second = subject(&normalize(whole.split('/').map(str::to_owned)));
    if first == second {
        vec![first]
    } else {
        vec![first, second]
    }
}

fn match_segments(segments: &[String], uri: &Uri, raw_path: &str) -> Option<SendRoute> {
    let lit = |i: usize, want: &str| {
        segments
            .get(i)
            .is_some_and(|s| s.eq_ignore_ascii_case(want))
    };
    if segments.len() != 5 || !lit(0, "v3") {
        return None;
    }
    let third = segments[2].clone();
    if lit(1, "grants") && lit(3, "messages") && lit(4, "send") {
        return Some(if wants_mime(uri.query()) {
            SendRoute::Mime { grant: third }
        } else {
            SendRoute::Message { grant: third }
        });
    }
    if lit(1, "grants") && lit(3, "drafts") {
        return Some(SendRoute::Draft {
            grant: third,
            draft_id: segments[4].clone(),
            path: raw_path.to_owned(),
        });
    }
    if lit(1, "domains") && lit(3, "messages") && lit(4, "send") {
        return Some(SendRoute::Domain { domain: third });
    }
    None
}

/// Drops empty and `.` segments and applies `..`, as RFC 3986 dot-segment removal.
fn normalize(segments: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for segment in segments {
        match segment.as_str() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(segment),
        }
    }
    out
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// True when any `type` query parameter is `mime` (form-urlencoded, case-insensitive).
///
/// Any `type=mime` wins: the inspection then insists on a `mime` part, so a request
/// that is not really raw MIME is refused rather than counted wrongly.
fn wants_mime(query: Option<&str>) -> bool {
    let Some(query) = query else { return false };
    query.split('&').any(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        form_decode(key) == "type" && form_decode(value).eq_ignore_ascii_case("mime")
    })
}

/// True when the query names a field a send is counted from (`message`, `mime`, any case).
///
/// Go's `Request.FormValue` prefers a query value to the body's multipart field of the
/// same name: a `?message=...` would be what Nylas sends while the gateway counts the
/// body's part. Such a send is refused.
///
/// # Examples
///
/// ```
/// use gateway::send::query_names_a_counted_field;
///
/// assert!(query_names_a_counted_field(Some("type=mime&mime=x")));
/// assert!(query_names_a_counted_field(Some("MESS%41GE=x")));
/// assert!(!query_names_a_counted_field(Some("type=mime")));
/// ```
pub fn query_names_a_counted_field(query: Option<&str>) -> bool {
    let Some(query) = query else { return false };
    query.split(['&', ';']).any(|pair| {
        let key = form_decode(pair.split_once('=').map_or(pair, |(k, _)| k));
        key.eq_ignore_ascii_case("message") || key.eq_ignore_ascii_case("mime")
    })
}

fn form_decode(s: &str) -> String {
    decode(&s.replace('+', " "))
}

/// How a grant identifier from a path maps to a quota key; see [`grant_ref`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantRef {
    /// A grant id, in its canonical form: the lowercase hyphenated UUID.
    Id(String),
    /// An email address, `email:...`, `external:...` or `me`: ask Nylas
    /// (`GET /v3/grants/{identifier}`) for the canonical id, and cache it.
    NeedsResolution(String),
    /// Neither a grant id nor a form Nylas resolves (`plainid`, `grant:abc`,
    /// `other:thing`, an empty segment): refused before anything is counted or sent.
    Invalid,
}

/// Sorts a decoded grant identifier into a canonical id, one that needs resolving, or
/// one that is refused.
///
/// A grant id is a UUID, with or without `grant:` (any case), in braces or not, with
/// or without its dashes, in any hex case; every spelling gives the same lowercase
/// hyphenated id, so that one grant shares one quota. An email (anything with an `@`),
/// `email:...`, `external:...` (prefixes in any case) and `me` need resolving; anything
/// else is [`GrantRef::Invalid`].
///
/// # Examples
///
/// ```
/// use gateway::send::{grant_ref, GrantRef};
///
/// let id = GrantRef::Id("6f1b0f3e-2a4c-4d8e-9b7a-3c5d2e1f0a9b".into());
/// assert_eq!(grant_ref("6f1b0f3e-2a4c-4d8e-9b7a-3c5d2e1f0a9b"), id);
/// assert_eq!(grant_ref("GRANT:{6F1B0F3E-2A4C-4D8E-9B7A-3C5D2E1F0A9B}"), id);
/// assert_eq!(grant_ref("grant:6f1b0f3e2a4c4d8e9b7a3c5d2e1f0a9b"), id);
/// assert_eq!(grant_ref("me"), GrantRef::NeedsResolution("me".into()));
/// assert_eq!(grant_ref("a@b.c"), GrantRef::NeedsResolution("a@b.c".into()));
/// assert_eq!(grant_ref("grant:abc"), GrantRef::Invalid);
/// ```
pub fn grant_ref(identifier: &str) -> GrantRef {
    let unprefixed = strip_prefix_ignore_case(identifier, "grant:").unwrap_or(identifier);
    if let Some(id) = canonical_uuid(unprefixed) {
        return GrantRef::Id(id);
    }
    let resolvable = unprefixed.len() == identifier.len()
        && (identifier.contains('@')
            || identifier.eq_ignore_ascii_case("me")
            || ["email:", "external:"].iter().any(|prefix| {
                strip_prefix_ignore_case(identifier, prefix).is_some_and(|rest| !rest.is_empty())
            }));
    if resolvable {
        GrantRef::NeedsResolution(identifier.to_owned())
    } else {
        GrantRef::Invalid
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// The lowercase hyphenated form of a UUID written hyphenated (`8-4-4-4-12`), in braces
/// (`{8-4-4-4-12}`) or as 32 hex digits, in any case; `None` for anything else.
///
/// These are the spellings Go's `github.com/google/uuid` `Parse` reads besides
/// `urn:uuid:`, which is refused rather than guessed at.
fn canonical_uuid(id: &str) -> Option<String> {
    let inner = id
        .strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
        .unwrap_or(id);
    let hyphenated = inner.len() == 36
        && inner.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    let simple = inner.len() == 32
        && inner.len() == id.len()
        && inner.bytes().all(|b| b.is_ascii_hexdigit());
    if !hyphenated && !simple {
        return None;
    }
    let hex: String = inner
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(uri: &str) -> Option<SendRoute> {
        classify(&Method::POST, &uri.parse().expect("test uri"))
    }

    fn message(g: &str) -> Option<SendRoute> {
        Some(SendRoute::Message { grant: g.into() })
    }

    fn mime(g: &str) -> Option<SendRoute> {
        Some(SendRoute::Mime { grant: g.into() })
    }

    #[test]
    fn classification_table() {
        let draft = |g: &str, d: &str, p: &str| {
            Some(SendRoute::Draft {
                grant: g.into(),
                draft_id: d.into(),
                path: p.into(),
            })
        };
        let cases: Vec<(&str, Option<SendRoute>)> = vec![
            ("/v3/grants/g1/messages/send", message("g1")),
            ("/v3/grants/g1/messages/send/", message("g1")),
            (
                "https://api.us.nylas.com/v3/grants/g1/messages/send",
                message("g1"),
            ),
            ("/v3/grants/a%40b.com/messages/send", message("a@b.com")),
            (
                "/v3/grants/email:a@b.com/messages/send",
                message("email:a@b.com"),
            ),
            ("/v3/grants/g1/messages/send?type=mime", mime("g1")),
            (
                "/v3/grants/g1/messages/send?foo=1&type=mime&bar",
                mime("g1"),
            ),
            ("/v3/grants/g1/messages/send?type=MIME", mime("g1")),
            ("/v3/grants/g1/messages/send?t%79pe=%6Dime", mime("g1")),
            ("/v3/grants/g1/messages/send?type=json", message("g1")),
            ("/v3/grants/g1/messages/send?subtype=mime", message("g1")),
            ("/v3/grants/g1/messages/send?type=mimex", message("g1")),
            (
                "/v3/grants/me/drafts/draft%2F1%23x",
                draft("me", "draft/1#x", "/v3/grants/me/drafts/draft%2F1%23x"),
            ),
            (
                "/v3/grants/g/drafts/d1/",
                draft("g", "d1", "/v3/grants/g/drafts/d1/"),
            ),
            (
                "/v3/domains/example.com/messages/send",
                Some(SendRoute::Domain {
                    domain: "example.com".into(),
                }),
            ),
            ("/v3/grants/g//messages/send", message("g")),
            ("/v3/grants/g/x/../messages/send", message("g")),
            ("/v3/grants/g/messages%2Fsend", message("g")),
            ("/V3/Grants/g/Messages/SEND", message("g")),
            ("/v3/grants/g/messages", None),
            ("/v3/grants/g/messages/m1", None),
            ("/v3/grants/g/drafts", None),
            ("/v3/grants/g/messages/send/extra", None),
            ("/v3/grants/g/messages/send/..", None),
            ("/v3/grants/messages/send", None),
            ("/v2/grants/g/messages/send", None),
            ("/v3/grants/g/messages/schedules/s1", None),
            ("/", None),
        ];
        for (uri, want) in cases {
            assert_eq!(post(uri), want, "{uri}");
        }
    }

    #[test]
    fn only_post_sends() {
        for method in [Method::GET, Method::PUT, Method::DELETE, Method::PATCH] {
            let uri: Uri = "/v3/grants/g/messages/send".parse().expect("uri");
            assert_eq!(classify(&method, &uri), None, "{method}");
            let uri: Uri = "/v3/grants/g/drafts/d".parse().expect("uri");
            assert_eq!(classify(&method, &uri), None, "{method}");
        }
    }

    #[test]
    fn accessors() {
        let route = post("/v3/grants/g/drafts/d").expect("draft");
        assert_eq!(route.kind(), SendKind::Draft);
        assert_eq!(route.grant(), Some("g"));
        assert_eq!(route.draft_id(), Some("d"));
        assert_eq!(route.domain(), None);
        let route = post("/v3/domains/x.org/messages/send").expect("domain");
        assert_eq!(
            (route.kind().as_str(), route.grant(), route.domain()),
            ("domain", None, Some("x.org"))
        );
    }

    #[test]
    fn grant_refs() {
        let canonical = "3f1e2d3c-0000-4000-8000-abcdefabcdef";
        let id = || GrantRef::Id(canonical.into());
        let resolve = |s: &str| GrantRef::NeedsResolution(s.into());
        let cases = [
            (canonical, id()),
            ("3F1E2D3C-0000-4000-8000-ABCDEFabcdef", id()),
            ("{3f1e2d3c-0000-4000-8000-abcdefabcdef}", id()),
            ("3F1E2D3C000040008000ABCDEFABCDEF", id()),
            ("grant:3F1E2D3C-0000-4000-8000-ABCDEFABCDEF", id()),
            ("GRANT:{3F1E2D3C-0000-4000-8000-ABCDEFABCDEF}", id()),
            ("Grant:3f1e2d3c000040008000abcdefabcdef", id()),
            ("a@b.com", resolve("a@b.com")),
            ("email:a@b.com", resolve("email:a@b.com")),
            ("EMAIL:a@b.com", resolve("EMAIL:a@b.com")),
            ("external:crm-42", resolve("external:crm-42")),
            ("External:crm-42", resolve("External:crm-42")),
            ("me", resolve("me")),
            ("ME", resolve("ME")),
        ];
        for (input, want) in cases {
            assert_eq!(grant_ref(input), want, "{input}");
        }
        let invalid = [
            "grant:abc",
            "plainid",
            "g1",
            "grant:me",
            "grant:",
            "grant:a@b.com",
            "",
            "other:thing",
            "email:",
            "external:",
            "{3f1e2d3c000040008000abcdefabcdef}",
            "{3f1e2d3c-0000-4000-8000-abcdefabcdef",
            "urn:uuid:3f1e2d3c-0000-4000-8000-abcdefabcdef",
            " 3f1e2d3c-0000-4000-8000-abcdefabcdef",
            "3f1e2d3c-0000-4000-8000-abcdefabcdeg",
            "3f1e2d3c0000-4000-8000-abcdefabcdef-",
            "3f1e2d3c000040008000abcdefabcde",
            "3f1e2d3c-0000-4000-8000-abcdefabcdéf",
        ];
        for input in invalid {
            assert_eq!(grant_ref(input), GrantRef::Invalid, "{input:?}");
        }
    }
}
