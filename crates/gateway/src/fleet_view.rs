//! The fleet view: which grants, domains and clients are nearest their limits
//! (`GET /v1/usage`, `send-gateway quota top`).
//!
//! A page ([`page`]) reads the store's fleet index ([`limits::fleet`], kept by
//! [`crate::fleet::Indexed`]) busiest first and recomputes each entry's usage. An entry
//! whose bound has gone stale (its sends aged out) is lowered and met again further down,
//! so a page is in order of what is counted now. A page costs at most [`MAX_ROUNDS`] ×
//! `limit` usage reads, however large the fleet.

use std::sync::Arc;

use limits::{FleetCursor, FleetEntry, Profile, StoreError, Usage, utilization_bound};

use crate::error::GatewayError;
use crate::state::AppState;

/// Index reads one page makes at most (each of at most `limit` entries).
pub const MAX_ROUNDS: usize = 4;

/// Largest page.
pub const MAX_LIMIT: usize = 1000;

/// Writes this replica's notes every [`crate::fleet::FLUSH_EVERY`], until aborted.
pub async fn flush_every(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(crate::fleet::FLUSH_EVERY).await;
        state.fleet.flush().await;
    }
}

/// What a page asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// Only scopes at or above this utilization.
    pub min_utilization: f64,
    /// At most this many.
    pub limit: usize,
    /// After this place.
    pub after: Option<FleetCursor>,
}

impl Query {
    /// Reads `min_utilization` (default 0), `limit` (default 100, at most [`MAX_LIMIT`]) and
    /// `cursor` from a query string; anything else is 400.
    ///
    /// # Errors
    /// An unknown key, a value out of range, or an unreadable cursor (not the hex of a
    /// finite bound, a space and a scope).
    pub fn parse(query: &str) -> Result<Query, GatewayError> {
        let bad = |m: &str| GatewayError::InvalidAdminRequest(m.to_owned());
        let mut q = Query {
            min_utilization: 0.0,
            limit: 100,
            after: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "min_utilization" => {
                    q.min_utilization = value
                        .parse::<f64>()
                        .ok()
                        .filter(|v| v.is_finite() && *v >= 0.0)
                        .ok_or_else(|| bad("min_utilization must be a number, 0 or more"))?;
                }
                "limit" => {
                    q.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|v| (1..=MAX_LIMIT).contains(v))
                        .ok_or_else(|| bad("limit must be a whole number from 1 to 1000"))?;
                }
                "cursor" => {
                    q.after = Some(decode_cursor(value).ok_or_else(|| bad("unreadable cursor"))?);
                }
                _ => return Err(bad("usage takes min_utilization, limit and cursor")),
            }
        }
        Ok(q)
    }
}

/// One scope of a page, its usage recomputed.
#[derive(Debug, Clone)]
pub struct Row {
    /// Its index entry, with the bound recomputed.
    pub entry: FleetEntry,
    /// Its usage now.
    pub usage: Usage,
}

/// A page of the fleet view.
#[derive(Debug, Clone)]
pub struct Page {
    /// Busiest first.
    pub rows: Vec<Row>,
    /// Where the next page starts, when there may be one.
    pub next: Option<String>,
}

/// The scopes at or above `q.min_utilization`, busiest first (see the module's doc).
///
/// # Errors
/// The store failed.
pub async fn page(state: &AppState, q: &Query) -> Result<Page, StoreError> {
    state.fleet.flush().await;
    let store = state.store.as_ref();
    let mut rows = Vec::new();
    let mut after = q.after.clone();
    for _ in 0..MAX_ROUNDS {
        let want = q.limit - rows.len();
        // One more than wanted, only to learn whether anything follows.
        let mut batch = store
            .fleet_list(q.min_utilization, after.as_ref(), want + 1)
            .await?;
        let exhausted = batch.len() <= want;
        batch.truncate(want);
        for entry in batch {
            after = Some(FleetCursor::after(&entry));
            if let Some(row) = recompute(state, entry).await?
                && row.entry.utilization >= q.min_utilization
            {
                rows.push(row);
            }
        }
        if exhausted {
            return Ok(Page { rows, next: None });
        }
        if rows.len() == q.limit {
            break;
        }
    }
    Ok(Page {
        rows,
        next: after.as_ref().map(encode_cursor),
    })
}

/// `entry`'s usage now, under the profile it is charged under now; a stale bound is
/// lowered in the index, and the row left for when the scan meets it again (`None`).
async fn recompute(state: &AppState, entry: FleetEntry) -> Result<Option<Row>, StoreError> {
    let profile = current_profile(state, &entry).await?;
    let profile = &profile;
    let usage = state.store.usage(&entry.scope, profile).await?;
    let now = utilization_bound(&usage);
    if now < entry.utilization {
        state
            .store
            .fleet_lower(&entry.scope, entry.version, now)
            .await?;
        return Ok(None);
    }
    let raised = now > entry.utilization;
    let entry = FleetEntry {
        utilization: now,
        profile: profile.name().to_owned(),
        ..entry
    };
    if raised {
        // Over its bound (a limit lowered since it was noted): the index learns it.
        state.store.fleet_note(std::slice::from_ref(&entry)).await?;
    }
    Ok(Some(Row { entry, usage }))
}

/// The profile `entry`'s scope is charged under now: for a grant, as its next send would
/// pick it (an override set or removed since its last charge counts), from what this
/// replica and the store know; else, or when that takes a provider no one knows, the
/// profile it was last charged under, by name (a reload's new limits count).
async fn current_profile(state: &AppState, entry: &FleetEntry) -> Result<Profile, StoreError> {
    let config = state.config();
    let last = config
        .profile(&entry.profile)
        .unwrap_or_else(|| config.default_profile());
    if let Some(name) = entry.scope.strip_prefix("client:") {
        let named = config.clients.iter().find(|c| c.name == name);
        let own = named.and_then(|c| c.profile.as_deref().and_then(|p| config.profile(p)));
        return Ok(own.unwrap_or(last).clone());
    }
    let Some(grant) = entry.scope.strip_prefix("grant:") else {
        return Ok(last.clone());
    };
    let store = state.store.as_ref();
    let stored = crate::selection::stored_override(store, grant).await?;
    let now = state
        .selector
        .select_known(store, &config, grant, stored)
        .await;
    Ok(now.map_or_else(|| last.clone(), |s| s.profile))
}

/// A cursor as handed out: the hex of `<bound> <scope>`.
fn encode_cursor(c: &FleetCursor) -> String {
    format!("{} {}", c.utilization, c.scope)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_cursor(hex: &str) -> Option<FleetCursor> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let (bound, scope) = text.split_once(' ')?;
    let utilization = bound.parse::<f64>().ok().filter(|v| v.is_finite())?;
    Some(FleetCursor {
        utilization,
        scope: scope.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let c = FleetCursor {
            utilization: 0.375,
            scope: "grant:a b".into(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&c)), Some(c));
        for junk in ["", "zz", "abc", "302e35"] {
            assert_eq!(decode_cursor(junk), None, "{junk}");
        }
    }

    #[test]
    fn queries_are_checked() {
        let q = Query::parse("min_utilization=0.8&limit=5").unwrap();
        assert_eq!((q.min_utilization, q.limit), (0.8, 5));
        for bad in [
            "limit=0",
            "limit=1001",
            "min_utilization=-1",
            "min_utilization=NaN",
            "cursor=zz",
            "grant=x",
        ] {
            assert!(Query::parse(bad).is_err(), "{bad}");
        }
    }
}
