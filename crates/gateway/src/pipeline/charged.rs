//! Phase 1, who is charged: the grant behind the path's identifier (resolved to its
//! canonical id, so every spelling of one grant shares one quota) or the sending domain,
//! and the profile it is charged under.

use limits::Profile;

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
}

/// Resolves who `route` charges. Nylas refusing the look-up ends the send with its answer.
pub(super) async fn who(
    state: &AppState,
    ctx: &mut SendCtx,
    route: &SendRoute,
) -> Result<Charged, Stop> {
    let charged = match route {
        SendRoute::Domain { domain } => {
            // The router relays domain sends when `[domains] profile` is unset.
            let profile = ctx.config.domain_profile().cloned().ok_or_else(|| {
                GatewayError::InvalidSendRequest("domain sends are not counted".into())
            })?;
            if canonical_domain(domain).is_empty() {
                return Err(GatewayError::InvalidSendRequest(
                    "the domain in the path is empty".into(),
                )
                .into());
            }
            ctx.record.subject = Some(domain.clone());
            Charged {
                scope: Scope::domain(domain),
                profile,
                grant: None,
                override_name: None,
            }
        }
        SendRoute::Message { grant }
        | SendRoute::Mime { grant }
        | SendRoute::Draft { grant, .. } => grant_charged(state, ctx, grant).await?,
    };
    Ok(charged)
}

async fn grant_charged(
    state: &AppState,
    ctx: &mut SendCtx,
    identifier: &str,
) -> Result<Charged, Stop> {
    let resolution = state
        .grants
        .resolve(&state.upstream, identifier, ctx.authorization.as_ref())
        .await?;
    let id = match resolution {
        Resolution::Grant(id) => id,
        Resolution::Refused(resp) => return Err(Stop::Relay(Box::new(resp))),
    };
    ctx.record.subject = Some(id.clone());
    let cached = state.selector.cached_override(&id);
    let selection = select(state, ctx, &id, cached).await;
    Ok(Charged {
        scope: Scope::grant(&id),
        profile: selection.profile,
        grant: Some(id),
        override_name: selection.override_name,
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
