//! Phase 1, who is charged: the grant behind the path's identifier (resolved to its
//! canonical id, so every spelling of one grant shares one quota) or the sending domain,
//! and the profile it is charged under.

use limits::{Cost, Profile, Reservation};

use crate::selection::Selection;

use super::ctx::{SendCtx, Stop};
use crate::error::GatewayError;
use crate::grants::Resolution;
use crate::scope::{Scope, canonical_domain};
use crate::send::SendRoute;
use crate::state::AppState;

/// Who is charged and under which profile.
#[derive(Debug)]
pub(super) struct Charged {
    pub scope: Scope,
    pub profile: Profile,
    /// The canonical grant id (none for domain sends).
    pub grant: Option<String>,
    /// The override the store is believed to hold for the grant.
    pub override_name: Option<String>,
    /// The client's own quota, when its `[[clients]]` entry names a profile.
    pub client: Option<ClientCharge>,
}

/// What a client with a profile of its own is charged, besides the grant or domain.
#[derive(Debug)]
pub(super) struct ClientCharge {
    pub scope: Scope,
    pub profile: Profile,
    /// What it is charged (set when the send is priced).
    pub charge: Cost,
    /// Its reservation, once the grant's and its own were both made.
    pub reservation: Option<Reservation>,
    /// In shadow: the metric its own windows refused (charged once the send went out).
    pub shadow_denied: Option<&'static str>,
}

/// Resolves who `route` charges. Nylas refusing the look-up ends the send with its answer.
pub(super) async fn who(
    state: &AppState,
    ctx: &mut SendCtx,
    route: &SendRoute,
) -> Result<Charged, Stop> {
    // A domain send without `[domains] profile` is charged to the client's own quota
    // alone (see `domain_charged`); anything else to it as well, when it has one.
    let (mut charged, own_quota_only) = match route {
        SendRoute::Domain { domain } => (
            domain_charged(ctx, domain)?,
            ctx.config.domain_profile().is_none(),
        ),
        SendRoute::Message { grant }
        | SendRoute::Mime { grant }
        | SendRoute::Draft { grant, .. } => (grant_charged(state, ctx, grant).await?, false),
    };
    if !own_quota_only {
        charged.client = client_charge(ctx);
    }
    Ok(charged)
}

/// A domain send: charged to the domain under `[domains] profile`; without one (the
/// router counts it then only for a client with a profile of its own), to the client's
/// own quota alone.
fn domain_charged(ctx: &mut SendCtx, domain: &str) -> Result<Charged, Stop> {
    if canonical_domain(domain).is_empty() {
        let what = "the domain in the path is empty";
        return Err(GatewayError::InvalidSendRequest(what.into()).into());
    }
    ctx.record.subject = Some(domain.to_owned());
    let (scope, profile) = match ctx.config.domain_profile() {
        Some(profile) => (Scope::domain(domain), profile.clone()),
        None => {
            let own = client_charge(ctx).ok_or_else(|| {
                GatewayError::InvalidSendRequest("domain sends are not counted".into())
            })?;
            (own.scope, own.profile)
        }
    };
    Ok(Charged {
        scope,
        profile,
        grant: None,
        override_name: None,
        client: None,
    })
}

async fn grant_charged(
    state: &AppState,
    ctx: &mut SendCtx,
    identifier: &str,
) -> Result<Charged, Stop> {
    let (resolution, provider) = state
        .grants
        .resolve_seen(&state.upstream, identifier, ctx.authorization.as_ref())
        .await?;
    let id = match resolution {
        Resolution::Grant(id) => id,
        Resolution::Refused(resp) => return Err(Stop::Relay(Box::new(resp))),
    };
    // Known from now on, without a look-up of its own (only needed when it picks profiles).
    if let Some(provider) = provider.filter(|_| ctx.config.grants.resolve_provider) {
        let store = state.store.as_ref();
        state
            .selector
            .learn_provider(store, &ctx.config, &id, provider)
            .await;
    }
    ctx.record.subject = Some(id.clone());
    let cached = state.selector.cached_override(&id);
    let selection = select(state, ctx, &id, cached).await;
    Ok(Charged {
        scope: Scope::grant(&id),
        profile: selection.profile,
        grant: Some(id),
        override_name: selection.override_name,
        client: None,
    })
}

/// The client's own quota, when it has one.
fn client_charge(ctx: &SendCtx) -> Option<ClientCharge> {
    let caller = ctx.client.as_ref()?;
    Some(ClientCharge {
        scope: Scope::client(caller.name()),
        profile: caller.profile()?.clone(),
        charge: Cost::default(),
        reservation: None,
        shadow_denied: None,
    })
}

/// The profile `grant` is charged under, given the override the store is believed to hold.
pub(super) async fn select(
    state: &AppState,
    ctx: &SendCtx,
    grant: &str,
    override_name: Option<String>,
) -> Selection {
    state
        .selector
        .select(
            state.store.as_ref(),
            &state.upstream,
            &ctx.config,
            grant,
            override_name,
            ctx.authorization.as_ref(),
        )
        .await
}
