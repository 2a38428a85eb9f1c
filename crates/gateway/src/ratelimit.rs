//! `RateLimit-Policy` and `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers-10).
//!
//! One item per window and limited metric, named `<metric>-<window>` (for example
//! `messages-24h`): the policy gives the quota `q` and window `w` in seconds, the state the
//! remaining `r` and the seconds `t` until more quota frees up.

use http::{HeaderName, HeaderValue};
use limits::Usage;

/// `RateLimit-Policy`.
pub const POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub const STATE: HeaderName = HeaderName::from_static("ratelimit");

/// The two headers for `usage`; none when the profile has no windows.
pub fn headers(usage: &Usage) -> Vec<(HeaderName, HeaderValue)> {
    let mut policy = Vec::new();
    let mut state = Vec::new();
    for w in &usage.windows {
        let t = w
            .next_free
            .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
        for m in &w.metrics {
            let name = format!("{}-{}", m.metric, w.label);
            policy.push(format!("\"{name}\";q={};w={}", m.limit, w.seconds));
            state.push(format!("\"{name}\";r={};t={t}", m.remaining));
        }
    }
    if policy.is_empty() {
        return Vec::new();
    }
    [(POLICY, policy.join(", ")), (STATE, state.join(", "))]
        .into_iter()
        .filter_map(|(k, v)| HeaderValue::from_str(&v).ok().map(|v| (k, v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use limits::{Cost, MemoryStore, Profile, QuotaStore};

    #[tokio::test]
    async fn one_item_per_window_and_metric() {
        let store = MemoryStore::new();
        let p = Profile::builtin("icloud").unwrap();
        let d = store
            .reserve("g", &p, Cost::new(1, 12, 0), None)
            .await
            .unwrap();
        let h = headers(d.usage());
        assert_eq!(h[0].0, POLICY);
        assert_eq!(
            h[0].1,
            "\"messages-24h\";q=1000;w=86400, \"recipients-24h\";q=1000;w=86400"
        );
        let state = h[1].1.to_str().unwrap();
        assert!(state.starts_with("\"messages-24h\";r=999;t="), "{state}");
        assert!(state.contains("\"recipients-24h\";r=988;t="), "{state}");
    }
}
