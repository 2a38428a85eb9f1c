//! Phase 3, admit: the per-message checks (they can never pass on a retry, so 413/422 and
//! no store call), then one reserve, which charges every window all or nothing and returns
//! a [`Lease`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use limits::{
    Allowance, Cost, Decision, Denial, Guarded, LocalBudget, Metric, Millis, Profile, QuotaStore,
    StoreError,
};

use super::charged::Charged;
use super::ctx::{SendCtx, Stop};
use super::schedule;
use crate::config::OnUnavailable;
use crate::error::GatewayError;
use crate::lease::Lease;
use crate::metrics::Outcome;
use crate::scope::Scope;
use crate::send::SendCost;
use crate::state::AppState;

/// How many times a reserve is retried after another replica changed the override.
const OVERRIDE_ATTEMPTS: usize = 3;

/// What a send asks to be admitted for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ask {
    pub cost: SendCost,
    /// Whether `cost.size` covers the whole message.
    pub size_known: bool,
    /// The instant it goes out (ms; `None`: now).
    pub at: Option<Millis>,
    /// How far ahead it may be put off when a full window refuses it now.
    pub defer: Option<Duration>,
}

/// An admitted send.
#[derive(Debug)]
pub(super) struct Admitted {
    /// The charge; `None` when the store failed and `on_unavailable = "allow"` forwards
    /// the send uncounted (or, in shadow, a forced charge failed).
    pub lease: Option<Lease>,
    /// The `send_at` (unix seconds) a deferred send was charged at and must be given.
    pub deferred_to: Option<u64>,
}

/// Admits a send: per-message checks, then one reserve (and, for a send a full window
/// refuses now, possibly a deferral to the first instant it fits). In shadow, what would
/// be refused is reported and goes on.
pub(super) async fn admit(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &mut Charged,
    ask: Ask,
) -> Result<Admitted, Stop> {
    let cost = ask.cost;
    let charge = checked(ctx, charged, ask)?;
    // Every request is charged, idempotency key or not: a repeat whose key Nylas has
    // stored comes back with `Idempotent-Response: true` and is released then. Trusting the
    // key here would let a bigger message, or a retry after a failure Nylas did not store,
    // through uncounted.
    match reserve(state, ctx, charged, cost, charge, ask.at).await? {
        Ok(Decision::Allowed(a)) => {
            match ctx.record.would_deny {
                Some(reason) => ctx.decide(Outcome::ShadowDenied, reason),
                None => ctx.decide(Outcome::Allowed, "within_quota"),
            }
            ctx.record.scheduled_for = ask.at.map(|_| a.reservation.at() / 1000);
            shadow_client(state, ctx, charged, ask.at).await;
            let admitted = admitted(state, charged, a, None);
            kept_first(state, ctx, admitted).await
        }
        Ok(Decision::Denied(d)) if ctx.config.in_shadow(&charged.profile) => {
            ctx.record.scheduled_for = ask.at.map(|at| at / 1000);
            let admitted = shadowed(state, ctx, charged, (charge, ask.at), &d).await?;
            match admitted.lease {
                Some(_) => kept_first(state, ctx, admitted).await,
                None => Ok(admitted),
            }
        }
        Ok(Decision::Denied(d)) => {
            let horizon = ask.defer.filter(|_| d.retry_after.is_some());
            if let Some(horizon) = horizon
                && let Some((a, secs)) =
                    schedule::defer(state, ctx, charged, cost, charge, &d, horizon).await?
            {
                ctx.decide(Outcome::Allowed, "deferred");
                ctx.record.deferred = true;
                ctx.record.scheduled_for = Some(secs);
                shadow_client(state, ctx, charged, Some(secs * 1000)).await;
                let admitted = admitted(state, charged, a, Some(secs));
                return kept_first(state, ctx, admitted).await;
            }
            Err(denied(ctx, d))
        }
        Err(StoreError::Invalid(msg)) => Err(ctx.reject(GatewayError::InvalidSendRequest(msg))),
        // Not an outage: the store answers, it has no room for one more account.
        Err(StoreError::Full(_)) => {
            ctx.decide(Outcome::StoreError, "store_full");
            state.metrics.store_scope_refused();
            Err(Stop::Fail(GatewayError::QuotaStoreFull))
        }
        Err(e) => unavailable(state, ctx, charged, charge, ask.at, &e)
            .await
            .map(|lease| Admitted {
                lease,
                deferred_to: None,
            }),
    }
}

/// The per-message checks of the grant's profile and the client's (each refusing, or in
/// shadow only reporting), and what the send is charged: to the grant (returned) and to
/// the client (set on it).
fn checked(ctx: &mut SendCtx, charged: &mut Charged, ask: Ask) -> Result<Cost, Stop> {
    let cost = ask.cost;
    if let Err(e) = per_message(&charged.profile, cost) {
        ctx.reject_unless_shadow(ctx.config.in_shadow(&charged.profile), e)?;
    }
    if let Some(client) = &mut charged.client {
        if let Err(e) = per_message(&client.profile, cost) {
            ctx.reject_unless_shadow(ctx.config.in_shadow(&client.profile), e)?;
        }
        let bytes = bytes_to_charge(&client.profile, cost, ask.size_known);
        client.charge = Cost::new(1, cost.recipients, bytes);
    }
    let bytes = bytes_to_charge(&charged.profile, cost, ask.size_known);
    Ok(Cost::new(1, cost.recipients, bytes))
}

/// A send its quota refused, in shadow: reported, charged whatever the limits say before
/// it goes (kept or given back on Nylas's answer, as any lease), and forwarded. A client's
/// own quota is charged alike when in shadow too, and enforced otherwise.
async fn shadowed(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &Charged,
    (charge, at): (Cost, Option<Millis>),
    d: &Denial,
) -> Result<Admitted, Stop> {
    ctx.would_deny(shadow_reason(d));
    // The client's first: an enforced client quota that refuses leaves nothing charged.
    let client = match &charged.client {
        Some(c) if ctx.config.in_shadow(&c.profile) => {
            forced(state, ctx, (&c.scope, &c.profile), c.charge, at).await
        }
        Some(_) => enforced_client(state, ctx, charged, at).await?,
        None => None,
    };
    let client = client.zip(charged.client.as_ref().map(|c| c.profile.clone()));
    let grant = forced(state, ctx, (&charged.scope, &charged.profile), charge, at).await;
    let (store, metrics) = (state.store.clone(), state.metrics.clone());
    let lease = match (grant, client) {
        (Some(g), client) => {
            let lease = Lease::new(
                store,
                metrics,
                g.reservation,
                charged.profile.clone(),
                g.usage,
            );
            Some(match client {
                Some((c, profile)) => lease.with_companion(c.reservation, profile),
                None => lease,
            })
        }
        (None, Some((c, profile))) => {
            Some(Lease::new(store, metrics, c.reservation, profile, c.usage))
        }
        (None, None) => None,
    };
    Ok(Admitted {
        lease,
        deferred_to: None,
    })
}

/// Charges `cost` to `scope` under `profile` whatever its limits say (shadow mode). A
/// store failure is logged and leaves that charge out: shadow mode never holds a send up.
async fn forced(
    state: &AppState,
    ctx: &SendCtx,
    (scope, profile): (&Scope, &Profile),
    cost: Cost,
    at: Option<Millis>,
) -> Option<Allowance> {
    let started = Instant::now();
    let result = state.store.charge(scope.as_str(), profile, cost, at).await;
    state.metrics.store_call("charge", started.elapsed());
    result
        .inspect_err(|e| {
            tracing::error!(request_id = %ctx.record.request_id, error = %e, "could not count a send shadow mode lets through");
        })
        .ok()
}

/// A send its grant's quota refused in shadow still answers to a client quota that is not
/// in shadow: reserved for real, or refused.
async fn enforced_client(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &Charged,
    at: Option<Millis>,
) -> Result<Option<Allowance>, Stop> {
    let Some(c) = &charged.client else {
        return Ok(None);
    };
    let started = Instant::now();
    let result = state
        .store
        .reserve_at(c.scope.as_str(), &c.profile, c.charge, at, None)
        .await;
    state.metrics.store_call("reserve", started.elapsed());
    match result {
        Ok(Decision::Allowed(a)) => Ok(Some(a)),
        Ok(Decision::Denied(d)) => Err(denied(ctx, d)),
        Err(e) if ctx.config.store.on_unavailable == OnUnavailable::Reject => {
            ctx.decide(Outcome::StoreError, store_reason(&e));
            Err(Stop::Fail(GatewayError::QuotaUnavailable(e.to_string())))
        }
        Err(e) => {
            tracing::warn!(error = %e, "the client's quota could not be charged; the send is charged to the grant only");
            Ok(None)
        }
    }
}

/// In shadow, a client's own quota that refused while the grant's admitted: reported, and
/// charged whatever its limits say, its reservation left on the client to settle with the
/// grant's lease.
async fn shadow_client(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &mut Charged,
    at: Option<Millis>,
) {
    let Some(reason) = charged.client.as_mut().and_then(|c| c.shadow_denied.take()) else {
        return;
    };
    ctx.would_deny(reason);
    let Some(c) = &charged.client else {
        return;
    };
    let a = forced(state, ctx, (&c.scope, &c.profile), c.charge, at).await;
    if let Some(c) = &mut charged.client {
        c.reservation = a.map(|a| a.reservation);
    }
}

fn admitted(
    state: &AppState,
    charged: &mut Charged,
    a: Allowance,
    deferred_to: Option<u64>,
) -> Admitted {
    let (store, metrics) = (state.store.clone(), state.metrics.clone());
    let profile = charged.profile.clone();
    let mut lease = Lease::new(store, metrics, a.reservation, profile, a.usage);
    if let Some(client) = &mut charged.client
        && let Some(reservation) = client.reservation.take()
    {
        lease = lease.with_companion(reservation, client.profile.clone());
    }
    Admitted {
        lease: Some(lease),
        deferred_to,
    }
}

/// Makes sure the charge is kept (the memory store's journal written) before the send goes
/// out, so that a crash right after the forward cannot lose it. Refuses the send, giving
/// the charge back, when it cannot be.
async fn kept_first(
    state: &AppState,
    ctx: &mut SendCtx,
    admitted: Admitted,
) -> Result<Admitted, Stop> {
    let Err(e) = state.store.durable().await else {
        return Ok(admitted);
    };
    if let Some(lease) = admitted.lease {
        lease.release().await;
    }
    ctx.decide(Outcome::StoreError, store_reason(&e));
    Err(Stop::Fail(GatewayError::QuotaUnavailable(e.to_string())))
}

/// One reserve (guarded for grants: cool-downs and overrides checked in the same step),
/// retried under the new profile when another replica changed the grant's override.
pub(super) async fn reserve(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &mut Charged,
    cost: SendCost,
    charge: Cost,
    at: Option<Millis>,
) -> Result<Result<Decision, StoreError>, Stop> {
    // In shadow a cool-down is only reported: the reserve is then made unguarded.
    let mut guarded = true;
    for _ in 0..OVERRIDE_ATTEMPTS {
        let started = Instant::now();
        let scope = charged.scope.as_str();
        let result = match &charged.grant {
            _ if !guarded => state
                .store
                .reserve_at(scope, &charged.profile, charge, at, None)
                .await
                .map(Guarded::Decided),
            None => state
                .store
                .reserve_at(scope, &charged.profile, charge, at, None)
                .await
                .map(Guarded::Decided),
            Some(_) => {
                let expected = charged.override_name.as_deref();
                state
                    .store
                    .reserve_guarded(scope, &charged.profile, charge, at, None, expected)
                    .await
            }
        };
        state.metrics.store_call("reserve", started.elapsed());
        match result {
            Ok(Guarded::Decided(Decision::Allowed(a))) => {
                let on_unavailable = ctx.config.store.on_unavailable;
                return Ok(client_too(state, ctx, charged, (at, on_unavailable), a).await);
            }
            Ok(Guarded::Decided(d)) => return Ok(Ok(d)),
            Ok(Guarded::CoolingDown(_)) if ctx.config.in_shadow(&charged.profile) => {
                ctx.would_deny("provider_throttled");
                guarded = false;
            }
            Ok(Guarded::CoolingDown(left)) => {
                ctx.decide(Outcome::Denied, "provider_throttled");
                let err = GatewayError::ProviderThrottled { retry_after: left };
                return Err(Stop::Fail(err));
            }
            // Another replica changed the grant's override: charge under the new profile.
            Ok(Guarded::OverrideChanged(name)) => {
                reselect(state, ctx, charged, name).await;
                if let Err(e) = per_message(&charged.profile, cost) {
                    ctx.reject_unless_shadow(ctx.config.in_shadow(&charged.profile), e)?;
                }
            }
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Err(StoreError::Protocol(
        "profile override kept changing".into(),
    )))
}

/// Charges the client's own quota too, when it has one, after the grant's (a Redis
/// Cluster keeps the two scopes on different slots, so they cannot share one script).
/// All or nothing: when the client's refuses, the grant's charge goes back. Neither is
/// ever over-charged; a send racing this one may see the grant's charge for the moment it
/// lasts and be refused. When the client's scope fails alone, `on_unavailable` decides
/// for it: `reject` gives the grant's charge back and refuses; otherwise the send goes on
/// charged to the grant only.
async fn client_too(
    state: &AppState,
    ctx: &SendCtx,
    charged: &mut Charged,
    (at, on_unavailable): (Option<Millis>, OnUnavailable),
    a: Allowance,
) -> Result<Decision, StoreError> {
    let Some(client) = &mut charged.client else {
        return Ok(Decision::Allowed(a));
    };
    let shadow = ctx.config.in_shadow(&client.profile);
    let started = Instant::now();
    let (scope, profile) = (client.scope.as_str(), &client.profile);
    let result = state
        .store
        .reserve_at(scope, profile, client.charge, at, None)
        .await;
    state.metrics.store_call("reserve", started.elapsed());
    match result {
        Ok(Decision::Allowed(c)) => {
            client.reservation = Some(c.reservation);
            return Ok(Decision::Allowed(a));
        }
        // In shadow, reported, and charged whatever its limits say (see `shadow_client`).
        Ok(Decision::Denied(d)) if shadow => {
            client.shadow_denied = Some(shadow_reason(&d));
            return Ok(Decision::Allowed(a));
        }
        Err(e) if on_unavailable != OnUnavailable::Reject => {
            tracing::warn!(error = %e, scope, "the client's quota could not be charged; the send is charged to the grant only");
            return Ok(Decision::Allowed(a));
        }
        _ => {}
    }
    let started = Instant::now();
    if let Err(e) = state.store.release(&a.reservation).await {
        tracing::error!(error = %e, "the grant's charge of a send its client's quota refused could not be given back");
    }
    state.metrics.store_call("release", started.elapsed());
    result
}

async fn reselect(state: &AppState, ctx: &SendCtx, charged: &mut Charged, name: Option<String>) {
    let grant = charged.grant.clone().unwrap_or_default();
    state.selector.learn_override(&grant, name.clone());
    let selection = super::charged::select(state, ctx, &grant, name).await;
    charged.profile = selection.profile;
    charged.override_name = selection.override_name;
}

/// What a window's refusal is reported as in shadow, as [`denied`] would answer it: more
/// than a whole window is a per-message refusal.
fn shadow_reason(d: &Denial) -> &'static str {
    match d.metric {
        Metric::Bytes if d.fits_at.is_none() => "message_too_large",
        Metric::Recipients if d.fits_at.is_none() => "too_many_recipients",
        m => m.as_str(),
    }
}

/// A window's quota refused the send.
fn denied(ctx: &mut SendCtx, d: Denial) -> Stop {
    // More than a window's whole limit: no retry can ever pass, so this is a per-message
    // rejection (422/413), not a 429 that has no `Retry-After` to give.
    if d.fits_at.is_none() && d.metric != Metric::Messages {
        let err = if d.metric == Metric::Bytes {
            GatewayError::MessageTooLarge {
                size: d.requested,
                limit: d.limit,
            }
        } else {
            GatewayError::TooManyRecipients {
                count: d.requested,
                limit: d.limit,
            }
        };
        return ctx.reject(err);
    }
    ctx.decide(Outcome::Denied, d.metric.as_str());
    Stop::Fail(GatewayError::QuotaExceeded(Box::new(d)))
}

/// The store failed: refuse, forward uncounted, or admit from this replica's own budget,
/// as `[store] on_unavailable` says.
async fn unavailable(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &Charged,
    charge: Cost,
    at: Option<Millis>,
    e: &StoreError,
) -> Result<Option<Lease>, Stop> {
    let reason = store_reason(e);
    match (ctx.config.store.on_unavailable, &state.local) {
        (OnUnavailable::Allow, _) => {
            tracing::warn!(request_id = %ctx.record.request_id, error = %e, "quota store failed; send forwarded uncounted");
            ctx.decide(Outcome::AllowedUncounted, reason);
            Ok(None)
        }
        (OnUnavailable::Local, Some(local)) => {
            admit_locally(state, ctx, charged, charge, at, (local, e)).await
        }
        (OnUnavailable::Reject | OnUnavailable::Local, _) => {
            ctx.decide(Outcome::StoreError, reason);
            Err(Stop::Fail(GatewayError::QuotaUnavailable(e.to_string())))
        }
    }
}

/// Admits from this replica's own share of each limit (`on_unavailable = "local"`); the
/// lease settles against that budget, which is written back to the store when it returns.
async fn admit_locally(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &Charged,
    charge: Cost,
    at: Option<Millis>,
    (local, e): (&Arc<LocalBudget>, &StoreError),
) -> Result<Option<Lease>, Stop> {
    let scope = charged.scope.as_str();
    match local
        .reserve_at(scope, &charged.profile, charge, at, None)
        .await
    {
        Ok(Decision::Allowed(a)) => {
            ctx.decide(Outcome::Allowed, "local_budget");
            state.metrics.local_admission();
            let store: Arc<dyn QuotaStore> = Arc::clone(local) as Arc<dyn QuotaStore>;
            let profile = charged.profile.clone();
            let lease = Lease::new(
                store,
                state.metrics.clone(),
                a.reservation,
                profile,
                a.usage,
            );
            Ok(Some(lease))
        }
        Ok(Decision::Denied(_)) => {
            ctx.decide(Outcome::StoreError, "local_budget_spent");
            Err(Stop::Fail(GatewayError::QuotaUnavailable(format!(
                "{e}; this replica's local budget for the grant is spent"
            ))))
        }
        Err(local_err) => {
            ctx.decide(Outcome::StoreError, store_reason(e));
            Err(Stop::Fail(GatewayError::QuotaUnavailable(format!(
                "{e}; local budget: {local_err}"
            ))))
        }
    }
}

/// Bytes to charge. A body of unknown length (chunked, as the Node SDK sends) is only
/// partly read before the reservation; where a window limits bytes, it is charged at the
/// most it may grow to (the per-message cap), since charging what was read so far would
/// under-count. Without a bytes window the figure is informational and stays as read.
fn bytes_to_charge(profile: &Profile, cost: SendCost, size_known: bool) -> u64 {
    match profile.max_message_size() {
        Some(max) if !size_known && limits_bytes(profile) => cost.size.max(max.get()),
        _ => cost.size,
    }
}

/// Whether any window of `profile` limits bytes.
pub(super) fn limits_bytes(profile: &Profile) -> bool {
    profile
        .windows()
        .iter()
        .any(|w| w.limit(Metric::Bytes).is_some())
}

/// The profile's per-message caps.
fn per_message(profile: &Profile, cost: SendCost) -> Result<(), GatewayError> {
    if let Some(max) = profile.max_recipients_per_message()
        && cost.recipients > max.get()
    {
        return Err(GatewayError::TooManyRecipients {
            count: cost.recipients,
            limit: max.get(),
        });
    }
    if let Some(max) = profile.max_message_size()
        && cost.size > max.get()
    {
        return Err(GatewayError::MessageTooLarge {
            size: cost.size,
            limit: max.get(),
        });
    }
    Ok(())
}

fn store_reason(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Timeout(_) => "timeout",
        StoreError::Protocol(_) => "protocol",
        StoreError::Invalid(_) => "invalid",
        StoreError::Full(_) => "store_full",
    }
}
