//! Which requests send mail, what a send costs, and forwarding its body.
//!
//! Pure logic plus body streaming: nothing here knows quotas, stores or configuration.
//! The proxy handler calls [`classify`], then [`inspect()`], reserves
//! [`Inspected::cost`], and forwards [`Inspected::body`].
//!
//! # Layout
//! - `route`: [`classify`] a request into a [`SendRoute`]; [`grant_ref`] sorts grant
//!   identifiers into canonical ids, ones that need resolving, and ones refused.
//! - `cost`: [`SendCost`] and the size model; [`cost_from_message_json`] for a
//!   message object (also a draft fetched from Nylas).
//! - `inspect`: [`inspect()`] reads a send body just far enough to
//!   count it; [`InspectOptions`], [`Inspected`], [`InspectError`].
//! - `body`: [`UpstreamBody`] replays and streams the body upstream byte for byte,
//!   cutting it short past the size limit; [`Overflow`] tells what happened.
//! - `json`: parsing JSON as Nylas's Go service would read it, refusing duplicate keys
//!   and keys that fold onto field names (see `docs/send-requests.md`).
//! - `framing`: the multipart framings refused because Nylas's parser could read them
//!   differently from ours (see `docs/send-requests.md`).
//! - `mime`: the header section of a raw RFC 5322 message and its recipients.
//!
//! # Size model
//!
//! `size` estimates the message as the provider will see (and limit) it, erring high:
//! under-counting gets accounts blocked, over-counting only refuses a send that was
//! within a few hundred bytes of the limit.
//! - Headers: [`HEADER_ALLOWANCE`] (1 KiB) plus the subject, each address (`to`, `cc`,
//!   `bcc`, `from`, `reply_to`: email and name plus [`ADDRESS_OVERHEAD`]) and custom
//!   headers. Non-ASCII text counts as RFC 2047 encoded words (at most `2n + 12`).
//! - Body: as if base64-encoded, [`base64_mime_len`] of its bytes (providers do
//!   encode non-ASCII bodies; base64 is the largest common encoding).
//! - Each attachment of `n` bytes: `base64_mime_len(n) = ceil(n/3)*4 + 2*ceil(that/76)`
//!   (base64 with CRLF every 76 characters) plus [`PART_HEADER_ALLOWANCE`] and its
//!   file name, content type and content id. In JSON, `n` is the larger of `size` and
//!   the decoded length of `content` (`len*3/4 - padding`). So 16,000,000 bytes do not
//!   fit under a 20,000,000 byte limit and 14,000,000 do.
//! - Multipart (E1m, E7): the `message` part counts as JSON above; every other request
//!   byte counts as attachment data, inflated by `base64_mime_len`, so part headers
//!   and boundaries are counted too (slightly high, on purpose). With a
//!   `Content-Length` the whole body is estimated before anything is sent; without one
//!   (the Node SDK streams chunked) the estimate grows as the body streams and the body
//!   is cut short once it passes the limit.
//! - Raw MIME (E2): the message is already encoded, so its size is its bytes; the whole
//!   request counts (the multipart envelope adds a few hundred bytes).
//! - Drafts (E3): the draft's own message object, through [`cost_from_message_json`].

mod body;
mod cost;
mod framing;
mod inspect;
mod json;
mod mime;
mod route;

pub use body::{Overflow, UpstreamBody};
pub use cost::{
    ADDRESS_OVERHEAD, HEADER_ALLOWANCE, PART_HEADER_ALLOWANCE, Schedule, SendCost,
    base64_decoded_len, base64_mime_len, cost_from_message_bytes, cost_from_message_json,
};
pub use inspect::{
    DEFAULT_JSON_LIMIT, DEFAULT_MAX_HEAD, InspectError, InspectOptions, Inspected, inspect,
};
pub use route::{
    GrantRef, PathSubject, ScheduleCancel, SendKind, SendRoute, classify, classify_draft_change,
    classify_schedule_cancel, grant_ref, path_subjects, query_names_a_counted_field,
};
