//! The fleet index: which scopes are busiest, without reading every scope.
//!
//! Each entry holds a scope, the profile it was last charged under, an *upper bound* on its
//! utilization and when its last charge stops counting. The bound is
//! [`utilization_bound`] of the usage right after a charge: the busiest window's fraction,
//! counting what was sent and what is scheduled. Without new charges that figure can only
//! fall (buckets expire, scheduled sends only move from `scheduled` into `used`), so an
//! entry does not understate its scope (unless its limits were lowered since: the gateway
//! notes refusals too, and raises an entry a reader finds above its bound). Notes only ever raise an entry; only
//! [`QuotaStore::fleet_lower`](crate::QuotaStore::fleet_lower), given the version it read,
//! lowers one, so a reader that recomputed a scope's usage can tighten its entry without
//! undoing a charge noted meanwhile.
//!
//! Entries are listed in *index order*: highest bound first, ties by scope name, highest
//! first (Redis's reverse sorted-set order). An entry whose charges have all expired is
//! dropped, so the index holds at most one entry per scope with something counted.

use crate::clock::Millis;
use crate::decision::Usage;

/// One scope in the fleet index.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetEntry {
    /// The scope.
    pub scope: String,
    /// The profile it was last charged under.
    pub profile: String,
    /// An upper bound on its [`utilization_bound`] now.
    pub utilization: f64,
    /// When everything charged so far stops counting, in ms since the epoch.
    pub expires_at: Millis,
    /// Changes with every note of the scope: what a reader compares to lower it (set by the
    /// store when listing; ignored by [`QuotaStore::fleet_note`](crate::QuotaStore::fleet_note)).
    pub version: u64,
}

/// A place in index order: entries after it have a lower bound, or the same bound and a
/// lower scope name.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetCursor {
    /// The bound of the last entry read.
    pub utilization: f64,
    /// Its scope.
    pub scope: String,
}

impl FleetCursor {
    /// The place just after `entry`.
    pub fn after(entry: &FleetEntry) -> Self {
        FleetCursor {
            utilization: entry.utilization,
            scope: entry.scope.clone(),
        }
    }

    /// Whether `(utilization, scope)` comes after this place in index order.
    pub fn precedes(&self, utilization: f64, scope: &str) -> bool {
        match utilization.total_cmp(&self.utilization) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Equal => scope < self.scope.as_str(),
            std::cmp::Ordering::Greater => false,
        }
    }
}

/// The busiest window's fraction of its limit, counting what was sent and what is scheduled:
/// the largest `(used + scheduled) / limit` over every limited metric of every window.
/// Zero when nothing is counted; above 1 when a send went over (a correction, say).
pub fn utilization_bound(usage: &Usage) -> f64 {
    usage
        .windows
        .iter()
        .flat_map(|w| w.metrics.iter())
        .map(|m| m.used.saturating_add(m.scheduled) as f64 / m.limit.max(1) as f64)
        .fold(0.0, f64::max)
}

/// The fleet index of a store in this process ([`crate::MemoryStore`]).
#[derive(Debug, Default)]
pub(crate) struct MemoryFleet {
    /// Index order is this set's order reversed.
    order: std::collections::BTreeSet<(Bound, String)>,
    entries: std::collections::HashMap<String, (Bound, String, Millis)>,
    by_expiry: std::collections::BTreeSet<(Millis, String)>,
    /// Each scope's [`FleetEntry::version`].
    versions: std::collections::HashMap<String, u64>,
}

/// An `f64` ordered by [`f64::total_cmp`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bound(f64);

impl Eq for Bound {}

impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl MemoryFleet {
    /// Raises `e.scope`'s entry to `e` (bound and expiry only ever rise).
    pub(crate) fn note(&mut self, e: &FleetEntry, now: Millis) {
        let (bound, expires) = match self.entries.get(&e.scope) {
            Some(&(b, _, x)) => (Bound(b.0.max(e.utilization)), x.max(e.expires_at)),
            None => (Bound(e.utilization), e.expires_at),
        };
        self.put(&e.scope, bound, e.profile.clone(), expires);
        *self.versions.entry(e.scope.clone()).or_default() += 1;
        self.trim(now);
    }

    /// Sets `scope`'s bound to `to` if its version still is `seen` (no note since it was
    /// listed); removes the entry when `to` is 0.
    pub(crate) fn lower(&mut self, scope: &str, seen: u64, to: f64) {
        if self.versions.get(scope) != Some(&seen) {
            return;
        }
        let Some((_, profile, expires)) = self.entries.get(scope).cloned() else {
            return;
        };
        if to > 0.0 {
            self.put(scope, Bound(to), profile, expires);
        } else {
            self.remove(scope);
        }
    }

    /// `scope`'s entry now: its bound, profile and expiry.
    pub(crate) fn get(&self, scope: &str) -> Option<(f64, &str, Millis)> {
        let (bound, profile, expires) = self.entries.get(scope)?;
        Some((bound.0, profile, *expires))
    }

    /// Up to `count` entries at or above `min`, after `after`, in index order.
    pub(crate) fn list(
        &self,
        min: f64,
        after: Option<&FleetCursor>,
        count: usize,
        now: Millis,
    ) -> Vec<FleetEntry> {
        let upto = match after {
            Some(c) => std::ops::Bound::Excluded((Bound(c.utilization), c.scope.clone())),
            None => std::ops::Bound::Unbounded,
        };
        self.order
            .range((std::ops::Bound::Unbounded, upto))
            .rev()
            .take_while(|(b, _)| b.0 >= min)
            .filter_map(|(_, s)| {
                let (b, profile, expires) = self.entries.get(s)?;
                (*expires > now).then(|| FleetEntry {
                    scope: s.clone(),
                    profile: profile.clone(),
                    utilization: b.0,
                    expires_at: *expires,
                    version: self.versions.get(s).copied().unwrap_or(0),
                })
            })
            .take(count)
            .collect()
    }

    /// Forgets `scope`.
    pub(crate) fn remove(&mut self, scope: &str) {
        self.unplace(scope);
        self.versions.remove(scope);
    }

    /// Takes `scope`'s entry out of the orders (its version stays).
    fn unplace(&mut self, scope: &str) {
        if let Some((bound, _, expires)) = self.entries.remove(scope) {
            self.order.remove(&(bound, scope.to_owned()));
            self.by_expiry.remove(&(expires, scope.to_owned()));
        }
    }

    fn put(&mut self, scope: &str, bound: Bound, profile: String, expires: Millis) {
        self.unplace(scope);
        self.order.insert((bound, scope.to_owned()));
        self.by_expiry.insert((expires, scope.to_owned()));
        self.entries
            .insert(scope.to_owned(), (bound, profile, expires));
    }

    /// Drops every entry whose charges have all expired.
    fn trim(&mut self, now: Millis) {
        while let Some((x, s)) = self.by_expiry.first().cloned() {
            if x > now {
                break;
            }
            self.remove(&s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(scope: &str, utilization: f64, expires_at: Millis) -> FleetEntry {
        FleetEntry {
            scope: scope.into(),
            profile: "p".into(),
            utilization,
            expires_at,
            version: 0,
        }
    }

    fn scopes(list: &[FleetEntry]) -> Vec<&str> {
        list.iter().map(|e| e.scope.as_str()).collect()
    }

    #[test]
    fn lists_in_index_order_from_a_cursor() {
        let mut f = MemoryFleet::default();
        for (s, u) in [("a", 0.5), ("b", 0.9), ("c", 0.5), ("d", 0.1)] {
            f.note(&entry(s, u, 100), 0);
        }
        assert_eq!(scopes(&f.list(0.0, None, 10, 0)), ["b", "c", "a", "d"]);
        assert_eq!(scopes(&f.list(0.5, None, 10, 0)), ["b", "c", "a"]);
        let after_c = FleetCursor {
            utilization: 0.5,
            scope: "c".into(),
        };
        assert_eq!(scopes(&f.list(0.0, Some(&after_c), 1, 0)), ["a"]);
        assert_eq!(f.list(0.0, None, 10, 100), []);
    }

    #[test]
    fn notes_only_raise_and_lowering_needs_the_version_read() {
        let mut f = MemoryFleet::default();
        f.note(&entry("a", 0.8, 100), 0);
        f.note(&entry("a", 0.3, 50), 0);
        let listed = f.list(0.0, None, 1, 0);
        assert_eq!((listed[0].utilization, listed[0].expires_at), (0.8, 100));
        let seen = listed[0].version;
        // A note after the listing, even of the same bound, wins over the reader's lower.
        f.note(&entry("a", 0.8, 100), 0);
        f.lower("a", seen, 0.2);
        assert_eq!(f.list(0.0, None, 1, 0)[0].utilization, 0.8);
        let seen = f.list(0.0, None, 1, 0)[0].version;
        f.lower("a", seen, 0.2);
        assert_eq!(f.list(0.0, None, 1, 0)[0].utilization, 0.2);
        f.lower("a", seen, 0.0);
        assert_eq!(f.list(0.0, None, 1, 0), []);
    }

    #[test]
    fn expired_entries_are_dropped() {
        let mut f = MemoryFleet::default();
        f.note(&entry("old", 0.9, 10), 0);
        f.note(&entry("new", 0.1, 1000), 20);
        assert_eq!(scopes(&f.list(0.0, None, 10, 20)), ["new"]);
        assert_eq!(f.entries.len(), 1);
    }
}
