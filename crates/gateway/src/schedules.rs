//! Scheduled sends: the charge of a send with `send_at` is remembered by its schedule id,
//! so a cancel or a `message.send_failed` webhook gives it back.
//!
//! A send Nylas schedules is charged at its `send_at` (see `pipeline/schedule.rs`). Its
//! answer carries `data.schedule_id`; the reservation is then kept in the store under the
//! grant's scope as the setting `schedule:<id>` (shared by every replica), until its last
//! charged bucket has stopped counting (giving it back after that would change nothing)
//! plus an hour. A cancel Nylas accepts (2xx), or a `message.send_failed` webhook, takes
//! the record and releases the reservation; `message.send_success` forgets it. Releases
//! happen at most once per reservation, so a second cancel, a duplicate webhook or two
//! replicas racing give back nothing more.

use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::header;
use limits::{Clock, QuotaStore, Reservation, StoreError, SystemClock};

use crate::error::GatewayError;
use crate::grants::Resolution;
use crate::scope::Scope;
use crate::send::{GrantRef, ScheduleCancel, grant_ref};
use crate::state::AppState;

/// What Nylas says became of a scheduled send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It went out (`message.send_success`): the charge stays, the record is forgotten.
    Sent,
    /// It failed (`message.send_failed`): the charge is given back.
    Failed,
}

/// How long a record outlives the buckets it charged.
const MARGIN: Duration = Duration::from_secs(3600);

/// Longest schedule id remembered (Nylas's are far shorter).
const MAX_ID: usize = 256;

fn name(schedule_id: &str) -> String {
    format!("schedule:{schedule_id}")
}

/// The setting that remembers the client's own charge of a scheduled send, beside the
/// grant's: `<client scope> <reservation record>`.
fn companion_name(schedule_id: &str) -> String {
    format!("schedule-client:{schedule_id}")
}

/// What the grant's record holds when only the client's own charge is held (in shadow,
/// when the grant's forced charge failed): nothing of the grant's to give back.
const NO_RESERVATION: &str = "-";

/// Remembers `reservation` as the charge of the scheduled send `schedule_id` of `scope`
/// (`None`: the scope's charge cannot be given back, only the companion's), and
/// `companion`, the client's own charge of it, beside it.
///
/// # Errors
/// The store failed; the charge stays, it just cannot be given back.
pub async fn remember(
    store: &dyn QuotaStore,
    scope: &Scope,
    schedule_id: &str,
    reservation: Option<&Reservation>,
    companion: Option<&Reservation>,
) -> Result<(), StoreError> {
    if schedule_id.is_empty() || schedule_id.len() > MAX_ID {
        return Err(StoreError::Invalid("unusable schedule id".into()));
    }
    let Some(longest) = reservation.or(companion) else {
        return Ok(());
    };
    let left = longest.expires_at_ms().saturating_sub(SystemClock.now_ms());
    let ttl = Duration::from_millis(left) + MARGIN;
    let record = reservation.map_or_else(|| NO_RESERVATION.to_owned(), Reservation::to_record);
    store
        .meta_set(scope.as_str(), &name(schedule_id), &record, Some(ttl))
        .await?;
    if let Some(c) = companion {
        let record = format!("{} {}", c.scope(), c.to_record());
        let key = companion_name(schedule_id);
        store
            .meta_set(scope.as_str(), &key, &record, Some(ttl))
            .await?;
    }
    Ok(())
}

/// Gives back the client's own charge remembered beside a scheduled send's, if any.
async fn refund_companion(
    store: &dyn QuotaStore,
    scope: &Scope,
    schedule_id: &str,
) -> Result<(), StoreError> {
    let key = companion_name(schedule_id);
    let Some(record) = store.meta_get(scope.as_str(), &key).await? else {
        return Ok(());
    };
    let parsed = record
        .split_once(' ')
        .and_then(|(client, r)| Reservation::from_record(client, r));
    if let Some(reservation) = parsed {
        store.release(&reservation).await?;
    }
    store.meta_delete(scope.as_str(), &key).await
}

/// Gives back the charge of the scheduled send `schedule_id` of `scope`; true when one was
/// remembered.
///
/// # Errors
/// The store failed; nothing was given back.
pub async fn refund(
    store: &dyn QuotaStore,
    scope: &Scope,
    schedule_id: &str,
) -> Result<bool, StoreError> {
    let key = name(schedule_id);
    let Some(record) = store.meta_get(scope.as_str(), &key).await? else {
        return Ok(false);
    };
    // The client's first: once the grant's record is gone, a retry finds nothing.
    refund_companion(store, scope, schedule_id).await?;
    if record != NO_RESERVATION
        && let Some(reservation) = Reservation::from_record(scope.as_str(), &record)
    {
        store.release(&reservation).await?;
    }
    store.meta_delete(scope.as_str(), &key).await?;
    Ok(true)
}

/// Settles the scheduled send `schedule_id` of `grant` (a canonical grant id) on what Nylas
/// says became of it. True when a remembered charge was found (and settled); false when
/// none was (never counted, already settled, or expired).
///
/// # Errors
/// The store failed; nothing was settled, and the caller may try again.
pub async fn settle(
    state: &AppState,
    grant: &str,
    schedule_id: &str,
    outcome: Outcome,
) -> Result<bool, StoreError> {
    let scope = Scope::grant(grant);
    let store = state.store.as_ref();
    let found = match outcome {
        Outcome::Failed => refund(store, &scope, schedule_id).await?,
        Outcome::Sent => {
            let key = name(schedule_id);
            let found = store.meta_get(scope.as_str(), &key).await?.is_some();
            store.meta_delete(scope.as_str(), &key).await?;
            store
                .meta_delete(scope.as_str(), &companion_name(schedule_id))
                .await?;
            found
        }
    };
    if found {
        state.metrics.scheduled(match outcome {
            Outcome::Failed => "failed",
            Outcome::Sent => "sent",
        });
    }
    Ok(found)
}

/// Relays a cancel of a scheduled send, and gives its charge back once Nylas accepted it.
/// The cancel itself is never held up: a grant the gateway cannot resolve, or a store
/// that fails, only keeps the charge.
pub async fn cancel(state: &AppState, cancel: ScheduleCancel, req: Request) -> Response {
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    let resp = match state.upstream.relay(req).await {
        Ok(resp) => resp,
        Err(e) => return GatewayError::upstream("upstream request", &e).into_response(),
    };
    if !resp.status().is_success() {
        return resp;
    }
    // Nylas accepted the cancel, so it knows the grant and the caller: a grant id needs
    // no look-up here.
    let known = match grant_ref(&cancel.grant) {
        GrantRef::Id(id) => Ok(Resolution::Grant(id)),
        _ => {
            state
                .grants
                .resolve(&state.upstream, &cancel.grant, auth.as_ref())
                .await
        }
    };
    let grant = match known {
        Ok(Resolution::Grant(id)) => id,
        Ok(Resolution::Refused(_)) | Err(_) => {
            tracing::warn!(schedule_id = %cancel.schedule_id, "a cancelled schedule's grant could not be resolved; its charge stays");
            return resp;
        }
    };
    let started = Instant::now();
    let result = refund(
        state.store.as_ref(),
        &Scope::grant(&grant),
        &cancel.schedule_id,
    )
    .await;
    state.metrics.store_call("refund", started.elapsed());
    match result {
        Ok(true) => {
            state.metrics.scheduled("cancelled");
            tracing::info!(%grant, schedule_id = %cancel.schedule_id, "scheduled send cancelled; its charge was given back");
        }
        Ok(false) => {
            tracing::debug!(%grant, schedule_id = %cancel.schedule_id, "cancelled schedule had no remembered charge");
        }
        Err(e) => {
            tracing::error!(%grant, schedule_id = %cancel.schedule_id, error = %e, "could not give a cancelled schedule's charge back");
        }
    }
    resp
}
