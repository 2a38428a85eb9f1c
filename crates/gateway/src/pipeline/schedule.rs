//! When a send goes out: the instant it is charged at (`send_at`), and putting off a send
//! that a full window refuses (opt in), by giving it a `send_at` of the first instant it fits.

use std::time::Duration;

use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use limits::policy::MAX_DEFER;
use limits::{Allowance, Clock, Cost, Decision, Denial, Millis, Profile, SystemClock};

use super::admit;
use super::charged::Charged;
use super::cost::Priced;
use super::ctx::{SendCtx, Stop};
use crate::error::GatewayError;
use crate::send::{Schedule, SendCost, SendRoute, UpstreamBody};
use crate::state::AppState;

/// The request header a client opts in or out of deferral with: `allow` or `never`.
pub const DEFER_HEADER: &str = "send-gateway-defer";

/// The response header of a deferred send: the `send_at` it was given, in unix seconds.
pub const DEFERRED_UNTIL: &str = "send-gateway-deferred-until";

/// Nylas schedules a send only when `send_at` is at least this far ahead; nearer, it sends
/// at once.
const NYLAS_MIN_LEAD_MS: u64 = 120_000;

/// How far ahead a deferred send is put at the least: Nylas's minimum, plus a minute for
/// the request's way there and clocks that differ.
const DEFER_LEAD_MS: u64 = 180_000;

/// How many instants a deferral tries before giving up (each one it is refused at names
/// the next that fits).
const DEFER_ATTEMPTS: usize = 3;

/// The instant (ms) a send is charged at: its `send_at` (a message's, a domain send's, or
/// a draft's own) when Nylas will hold it until then, else `None` (now). A send Nylas then
/// does not confirm as scheduled is counted now as well (see `settle.rs`).
pub(super) fn charge_at(schedule: &Schedule) -> Option<Millis> {
    scheduled_instant(schedule.send_at?)
}

/// The instant (ms) a send with this `send_at` (unix seconds) is charged at: `send_at`
/// when Nylas will hold the send until then, else `None` (now). The explain endpoint
/// judges a `send_at` by the same rule.
pub fn scheduled_instant(send_at: u64) -> Option<Millis> {
    let at = send_at.saturating_mul(1000);
    (at > SystemClock.now_ms().saturating_add(NYLAS_MIN_LEAD_MS)).then_some(at)
}

/// How far ahead a refused send may be put off: `None` when it may not be. Only a JSON
/// message send without `send_at` and `use_draft` may; then the client's header decides
/// (`allow`: up to 30 days, `never`: not at all), else the profile's `defer_up_to`.
///
/// # Errors
/// A header with another value.
pub(super) fn horizon(
    ctx: &mut SendCtx,
    route: &SendRoute,
    headers: &HeaderMap,
    priced: &Priced,
    profile: &Profile,
) -> Result<Option<Duration>, Stop> {
    let asked = match headers.get(DEFER_HEADER).map(|v| v.as_bytes()) {
        None => None,
        Some(v) if v.eq_ignore_ascii_case(b"allow") => Some(true),
        Some(v) if v.eq_ignore_ascii_case(b"never") => Some(false),
        Some(_) => {
            let msg = "the Send-Gateway-Defer header must be `allow` or `never`";
            return Err(ctx.reject(GatewayError::InvalidSendRequest(msg.into())));
        }
    };
    let eligible = matches!(route, SendRoute::Message { .. })
        && priced.body.as_bytes().is_some()
        && !priced.cost.schedule.names_send_at
        && !priced.cost.schedule.use_draft;
    Ok(match asked {
        _ if !eligible => None,
        Some(true) => Some(MAX_DEFER),
        Some(false) => None,
        None => profile.defer_up_to(),
    })
}

/// Tries to charge a send that `denial` refused now at the first instant it fits, within
/// `horizon`. `Some((allowance, send_at in unix seconds))` when it was charged there.
pub(super) async fn defer(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &mut Charged,
    cost: SendCost,
    charge: Cost,
    denial: &Denial,
    horizon: Duration,
) -> Result<Option<(Allowance, u64)>, Stop> {
    let now = SystemClock.now_ms();
    let latest = now.saturating_add(u64::try_from(horizon.as_millis()).unwrap_or(u64::MAX));
    let mut fits = denial.fits_at;
    for _ in 0..DEFER_ATTEMPTS {
        let Some(t) = fits else { return Ok(None) };
        // Whole seconds, as `send_at` is written; never before Nylas would hold the send.
        let secs = t.max(now + DEFER_LEAD_MS).div_ceil(1000);
        if secs * 1000 > latest {
            return Ok(None);
        }
        match admit::reserve(state, ctx, charged, cost, charge, Some(secs * 1000)).await? {
            Ok(Decision::Allowed(a)) => return Ok(Some((a, secs))),
            Ok(Decision::Denied(d)) => fits = d.fits_at,
            // The refusal stands: a deferral is an offer, not a promise.
            Err(_) => return Ok(None),
        }
    }
    Ok(None)
}

/// The body of a deferred send: the buffered JSON with `send_at` added (see [`horizon`]:
/// only such bodies are deferred).
pub(super) fn deferred_body(body: UpstreamBody, secs: u64) -> UpstreamBody {
    match body.as_bytes().and_then(|b| with_send_at(b, secs)) {
        Some(bytes) => body.rewritten(bytes),
        None => body,
    }
}

/// Tells the client of a deferred send that Nylas accepted when it goes out.
pub(super) fn announce(response: &mut Response, secs: u64) {
    if response.status().is_success() {
        response
            .headers_mut()
            .insert(DEFERRED_UNTIL, HeaderValue::from(secs));
    }
}

/// The JSON body with `"send_at": secs` added as the message's first key. Only for a body
/// without `send_at` (see [`horizon`]); `None` when it is not a JSON object.
pub(super) fn with_send_at(body: &Bytes, secs: u64) -> Option<Bytes> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let rest = &body[open + 1..];
    let empty = rest
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'}');
    let field = format!("\"send_at\":{secs}{}", if empty { "" } else { "," });
    let mut out = BytesMut::with_capacity(body.len() + field.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(rest);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_at_is_added_as_the_first_key() {
        let body = Bytes::from_static(b" {\"to\":[{\"email\":\"a@x.com\"}]}");
        let out = with_send_at(&body, 1_800_000_000).unwrap();
        assert_eq!(
            &out[..],
            b" {\"send_at\":1800000000,\"to\":[{\"email\":\"a@x.com\"}]}"
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["send_at"], 1_800_000_000);
        assert_eq!(
            &with_send_at(&Bytes::from_static(b"{ }"), 5).unwrap()[..],
            b"{\"send_at\":5 }"
        );
        assert!(with_send_at(&Bytes::from_static(b"[1]"), 5).is_none());
        assert!(with_send_at(&Bytes::from_static(b"  "), 5).is_none());
    }

    #[test]
    fn only_sends_nylas_holds_are_charged_later() {
        let soon = SystemClock.now_ms() / 1000 + 60;
        let later = SystemClock.now_ms() / 1000 + 3600;
        let at = |secs| {
            charge_at(&Schedule {
                send_at: Some(secs),
                names_send_at: true,
                use_draft: false,
            })
        };
        assert_eq!(at(later), Some(later * 1000));
        assert_eq!(at(soon), None);
        assert_eq!(charge_at(&Schedule::default()), None);
    }
}
