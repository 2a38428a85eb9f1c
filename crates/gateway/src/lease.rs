//! Settlement by type: an admitted charge is a [`Lease`] that must be kept or released.
//!
//! The reserve that admits a send returns a lease; exactly one of [`Lease::keep`],
//! [`Lease::keep_with`] or [`Lease::release`] consumes it. A lease dropped unsettled (the
//! request's future was cancelled, say by a client that went away while Nylas was sending)
//! keeps its charge, since over-counting is the safe side, and is logged and counted as
//! `sendgw_reservations_settled_total{outcome="dropped"}`. Units are counted when a
//! charge is kept, never before. (After KumoMTA's `LimitLease`.)

use std::sync::Arc;
use std::time::Instant;

use limits::{Cost, Metric, Profile, QuotaStore, Reservation, Usage};

use crate::metrics::{Metrics, Settlement};
use crate::request_id::RequestId;

/// An admitted charge, not yet settled.
#[must_use = "a lease keeps its charge unless settled: call keep() or release()"]
#[derive(Debug)]
pub struct Lease {
    armed: Option<Armed>,
}

#[derive(Debug)]
struct Armed {
    store: Arc<dyn QuotaStore>,
    metrics: Arc<Metrics>,
    reservation: Reservation,
    profile: Profile,
    usage: Usage,
    request_id: RequestId,
    /// A second charge settled with this one: the client's own quota.
    companion: Option<(Reservation, Profile)>,
}

/// What a kept lease charged in the end, and the usage after it.
#[derive(Debug, Clone)]
pub struct Kept {
    /// Everything charged: the reservation plus any correction.
    pub charged: Cost,
    /// Usage after the last charge.
    pub usage: Usage,
}

impl Lease {
    /// Arms a lease for `reservation`, admitted under `profile` with `usage` after it.
    pub fn new(
        store: Arc<dyn QuotaStore>,
        metrics: Arc<Metrics>,
        reservation: Reservation,
        profile: Profile,
        usage: Usage,
    ) -> Self {
        Lease {
            armed: Some(Armed {
                store,
                metrics,
                reservation,
                profile,
                usage,
                request_id: RequestId::current(),
                companion: None,
            }),
        }
    }

    /// Settles `reservation` (made under `profile` in the same store) with this lease:
    /// kept, corrected and released with it, and kept when it is dropped.
    pub fn with_companion(mut self, reservation: Reservation, profile: Profile) -> Self {
        if let Some(armed) = &mut self.armed {
            armed.companion = Some((reservation, profile));
        }
        self
    }

    /// What the reservation charged.
    pub fn cost(&self) -> Cost {
        self.armed
            .as_ref()
            .map_or_else(Cost::default, |a| a.reservation.cost())
    }

    /// The reservation (none once settled).
    pub fn reservation(&self) -> Option<&Reservation> {
        self.armed.as_ref().map(|a| &a.reservation)
    }

    /// The companion's reservation (the client's own quota), while armed.
    pub fn companion(&self) -> Option<&Reservation> {
        self.armed
            .as_ref()
            .and_then(|a| a.companion.as_ref().map(|(r, _)| r))
    }

    /// The usage the reservation left.
    pub fn usage(&self) -> Option<&Usage> {
        self.armed.as_ref().map(|a| &a.usage)
    }

    /// Keeps the charge as reserved.
    pub fn keep(mut self) -> Kept {
        let armed = self.disarm();
        let charged = armed.reservation.cost();
        armed.metrics.settled(Settlement::Kept);
        armed.metrics.units(charged);
        Kept {
            charged,
            usage: armed.usage,
        }
    }

    /// Keeps the charge and adds `extra` to it: the send went out costing more than was
    /// reserved. The extra is charged at the reservation's instant (a scheduled send's
    /// `send_at`), whatever the limits say (the provider counted it), and never given back. When the store fails, the extra is lost and logged; the reserved
    /// charge stays.
    pub async fn keep_with(mut self, extra: Cost) -> Kept {
        if extra == Cost::default() {
            return self.keep();
        }
        let armed = self.disarm();
        let scope = armed.reservation.scope();
        let started = Instant::now();
        let at = Some(armed.reservation.at());
        let result = armed.store.charge(scope, &armed.profile, extra, at).await;
        armed.metrics.store_call("charge", started.elapsed());
        if let Some((r, profile)) = &armed.companion {
            let started = Instant::now();
            if let Err(e) = armed.store.charge(r.scope(), profile, extra, at).await {
                tracing::error!(request_id = %armed.request_id, error = %e, "could not charge the client's quota the difference Nylas reported");
            }
            armed.metrics.store_call("charge", started.elapsed());
        }
        let usage = match result {
            Ok(charged) => {
                for m in Metric::ALL.into_iter().filter(|m| extra.get(*m) > 0) {
                    armed.metrics.correction(m);
                }
                charged.usage
            }
            Err(e) => {
                tracing::error!(request_id = %armed.request_id, error = %e, "could not charge the difference Nylas reported");
                armed.usage
            }
        };
        let r = armed.reservation.cost();
        let charged = Cost::new(
            r.messages + extra.messages,
            r.recipients + extra.recipients,
            r.bytes + extra.bytes,
        );
        armed.metrics.settled(Settlement::Kept);
        armed.metrics.units(charged);
        Kept { charged, usage }
    }

    /// Gives the charge back: nothing was sent. When the store fails the charge stays
    /// (over-counting is the safe side), and the failure is logged.
    pub async fn release(mut self) {
        let armed = self.disarm();
        armed.metrics.settled(Settlement::Released);
        let started = Instant::now();
        let result = armed.store.release(&armed.reservation).await;
        armed.metrics.store_call("release", started.elapsed());
        if let Err(e) = result {
            tracing::error!(request_id = %armed.request_id, error = %e, "release failed; the charge stays");
        }
        if let Some((r, _)) = &armed.companion {
            let started = Instant::now();
            if let Err(e) = armed.store.release(r).await {
                tracing::error!(request_id = %armed.request_id, error = %e, "release of the client's charge failed; it stays");
            }
            armed.metrics.store_call("release", started.elapsed());
        }
    }

    fn disarm(&mut self) -> Armed {
        self.armed
            .take()
            .expect("a lease is armed until it is settled, and settling consumes it")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(armed) = self.armed.take() {
            armed.metrics.settled(Settlement::Dropped);
            armed.metrics.units(armed.reservation.cost());
            tracing::warn!(
                request_id = %armed.request_id,
                "a send ended before its outcome was known; its charge stays"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use limits::{Decision, MemoryStore, ProfileSpec, WindowSpec};
    use std::time::Duration;

    fn profile() -> Profile {
        ProfileSpec::default()
            .window(
                WindowSpec::rolling(Duration::from_secs(3600))
                    .messages(10)
                    .recipients(10),
            )
            .build("p")
            .unwrap()
    }

    async fn lease(store: &Arc<MemoryStore>, metrics: &Arc<Metrics>, cost: Cost) -> Lease {
        let p = profile();
        let Decision::Allowed(a) = store.reserve("g", &p, cost, None).await.unwrap() else {
            panic!("denied")
        };
        let store: Arc<dyn QuotaStore> = store.clone();
        Lease::new(store, Arc::clone(metrics), a.reservation, p, a.usage)
    }

    async fn used(store: &MemoryStore) -> (u64, u64) {
        let u = store.usage("g", &profile()).await.unwrap();
        (u.windows[0].used.messages, u.windows[0].used.recipients)
    }

    #[tokio::test]
    async fn each_settlement_does_what_it_says_and_a_drop_keeps() {
        let store = Arc::new(MemoryStore::new());
        let metrics = Arc::new(Metrics::default());
        lease(&store, &metrics, Cost::new(1, 2, 0))
            .await
            .release()
            .await;
        assert_eq!(used(&store).await, (0, 0), "released");
        let kept = lease(&store, &metrics, Cost::new(1, 2, 0)).await.keep();
        assert_eq!(kept.charged, Cost::new(1, 2, 0));
        assert_eq!(used(&store).await, (1, 2), "kept");
        drop(lease(&store, &metrics, Cost::new(1, 3, 0)).await);
        assert_eq!(
            used(&store).await,
            (2, 5),
            "a dropped lease keeps its charge"
        );
        let kept = lease(&store, &metrics, Cost::new(1, 1, 0))
            .await
            .keep_with(Cost::new(0, 9, 0))
            .await;
        assert_eq!(kept.charged, Cost::new(1, 10, 0));
        assert_eq!(used(&store).await, (3, 15), "corrected past the limit");
        let text = metrics.render();
        for (outcome, n) in [("kept", 2), ("released", 1), ("dropped", 1)] {
            let line = format!("sendgw_reservations_settled_total{{outcome=\"{outcome}\"}} {n}");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        assert!(text.contains("sendgw_charge_corrections_total{metric=\"recipients\"} 1"));
        assert!(text.contains("sendgw_units_total{metric=\"recipients\"} 15"));
    }
}
