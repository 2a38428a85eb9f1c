//! Window arithmetic shared by both stores: bucket numbers, calendar periods, and turning
//! raw counters into [`Usage`] and [`Denial`] values.

use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use crate::clock::{Millis, ceil_duration};
use crate::decision::{Cost, Denial, MetricUsage, Usage, WindowUsage};
use crate::policy::{CalendarUnit, Metric, Period, Profile, Window};

/// `[start, end)` of the calendar period containing `now_ms`, in ms since the epoch.
///
/// Days run from local midnight to the next local midnight, so they last 23 or 25 hours on
/// DST changes; where a zone skips midnight, the day starts at the first instant it has.
pub(crate) fn calendar_bounds(
    unit: CalendarUnit,
    tz: &TimeZone,
    now_ms: Millis,
) -> (Millis, Millis) {
    let compute = || -> Result<(i64, i64), jiff::Error> {
        let now = Timestamp::from_millisecond(i64::try_from(now_ms).unwrap_or(i64::MAX))?
            .to_zoned(tz.clone());
        let start = match unit {
            CalendarUnit::Day => now.start_of_day()?,
            CalendarUnit::Month => now.first_of_month()?.start_of_day()?,
        };
        let end = match unit {
            CalendarUnit::Day => start.tomorrow()?.start_of_day()?,
            CalendarUnit::Month => start.checked_add(1.month())?.start_of_day()?,
        };
        Ok((
            start.timestamp().as_millisecond(),
            end.timestamp().as_millisecond(),
        ))
    };
    match compute() {
        Ok((s, e)) if s >= 0 && e > s => (s as u64, e as u64),
        // Only reachable near the ends of jiff's supported range; a UTC day keeps counting.
        _ => {
            let start = now_ms - now_ms % 86_400_000;
            (start, start + 86_400_000)
        }
    }
}

/// Rolling-window geometry: bucket width and how many past buckets stay live.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rolling {
    pub(crate) bucket_ms: u64,
    pub(crate) buckets: u64,
}

impl Rolling {
    pub(crate) fn of(period: &Period) -> Option<Rolling> {
        match period {
            Period::Rolling {
                buckets, bucket_ms, ..
            } => Some(Rolling {
                bucket_ms: bucket_ms.get(),
                buckets: u64::from(buckets.get()),
            }),
            Period::Calendar { .. } => None,
        }
    }

    /// The bucket `now_ms` falls in.
    pub(crate) fn slot(self, now_ms: Millis) -> u64 {
        now_ms / self.bucket_ms
    }

    /// The oldest bucket still counted at `now_ms`: the current one plus `buckets` before
    /// it, so a send counts for at least the window's length and at most one bucket longer.
    pub(crate) fn oldest_live(self, now_ms: Millis) -> u64 {
        self.slot(now_ms).saturating_sub(self.buckets)
    }

    /// When bucket `slot` stops counting.
    pub(crate) fn expiry(self, slot: u64) -> Millis {
        (slot + self.buckets + 1).saturating_mul(self.bucket_ms)
    }
}

/// Turns per-window counters into a [`Usage`]; `raw[i]` is `(used, next_free_at_ms)` of
/// window `i` of `profile`.
pub(crate) fn usage_of(profile: &Profile, raw: &[(Cost, Option<Millis>)], now_ms: Millis) -> Usage {
    let windows = profile
        .windows()
        .iter()
        .zip(raw)
        .map(|(w, (used, next_free_at))| window_usage(w, *used, *next_free_at, now_ms))
        .collect();
    Usage { windows }
}

pub(crate) fn window_usage(
    w: &Window,
    used: Cost,
    next_free_at: Option<Millis>,
    now_ms: Millis,
) -> WindowUsage {
    let metrics = Metric::ALL
        .into_iter()
        .filter_map(|m| {
            let limit = w.limit(m)?.get();
            let used = used.get(m);
            Some(MetricUsage {
                metric: m,
                limit,
                used,
                remaining: limit.saturating_sub(used),
            })
        })
        .collect();
    let any_used = used.to_array().iter().any(|&v| v > 0);
    WindowUsage {
        window_id: Arc::clone(w.id_arc()),
        label: Arc::clone(w.label_arc()),
        seconds: w.nominal_seconds(),
        used,
        next_free: next_free_at
            .filter(|_| any_used)
            .map(|at| Duration::from_millis(at.saturating_sub(now_ms))),
        metrics,
    }
}

/// One metric of one window that would go over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Over {
    pub(crate) window: usize,
    pub(crate) metric: Metric,
    pub(crate) used: u64,
    pub(crate) limit: u64,
    /// Ms from now until enough frees up; `None` when the request exceeds the limit.
    pub(crate) retry_ms: Option<u64>,
}

/// Picks the denial to report among the windows and metrics that would go over: one that
/// can never pass if there is any, otherwise the one that frees up last (the request is
/// admitted only when every window has room). Ties go to the first in profile order.
pub(crate) fn pick_denial(overs: &[Over]) -> Option<Over> {
    let mut best: Option<Over> = None;
    for o in overs {
        best = match best {
            None => Some(*o),
            Some(b) => match (b.retry_ms, o.retry_ms) {
                (None, _) => Some(b),
                (Some(_), None) => Some(*o),
                (Some(x), Some(y)) if y > x => Some(*o),
                _ => Some(b),
            },
        };
    }
    best
}

pub(crate) fn denial(profile: &Profile, over: Over, cost: Cost, usage: Usage) -> Denial {
    let w = &profile.windows()[over.window];
    Denial {
        window_id: Arc::clone(w.id_arc()),
        window: Arc::clone(w.label_arc()),
        metric: over.metric,
        limit: over.limit,
        used: over.used,
        requested: cost.get(over.metric),
        retry_after: over.retry_ms.map(ceil_duration),
        usage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> u64 {
        s.parse::<Timestamp>().unwrap().as_millisecond() as u64
    }

    #[test]
    fn new_york_dst_days_have_23_and_25_hours() {
        let tz = TimeZone::get("America/New_York").unwrap();
        let (s, e) = calendar_bounds(CalendarUnit::Day, &tz, ms("2026-03-08T12:00:00Z"));
        assert_eq!(s, ms("2026-03-08T05:00:00Z"));
        assert_eq!(e - s, 23 * 3_600_000);
        let (s, e) = calendar_bounds(CalendarUnit::Day, &tz, ms("2026-11-01T12:00:00Z"));
        assert_eq!(s, ms("2026-11-01T04:00:00Z"));
        assert_eq!(e - s, 25 * 3_600_000);
    }

    #[test]
    fn berlin_months_cross_dst() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let (s, e) = calendar_bounds(CalendarUnit::Month, &tz, ms("2026-03-31T21:59:59Z"));
        assert_eq!(s, ms("2026-02-28T23:00:00Z"));
        assert_eq!(e, ms("2026-03-31T22:00:00Z"));
        let (s2, _) = calendar_bounds(CalendarUnit::Month, &tz, ms("2026-03-31T22:00:00Z"));
        assert_eq!(s2, e);
    }

    #[test]
    fn rolling_geometry() {
        let r = Rolling {
            bucket_ms: 900_000,
            buckets: 96,
        };
        assert_eq!(r.slot(899_999), 0);
        assert_eq!(r.expiry(0), 97 * 900_000);
        assert_eq!(r.oldest_live(97 * 900_000), 1);
    }

    #[test]
    fn pick_prefers_impossible_then_latest() {
        let o = |window, retry_ms| Over {
            window,
            metric: Metric::Messages,
            used: 0,
            limit: 1,
            retry_ms,
        };
        assert_eq!(
            pick_denial(&[o(0, Some(5)), o(1, Some(9)), o(2, Some(9))])
                .unwrap()
                .window,
            1
        );
        assert_eq!(
            pick_denial(&[o(0, Some(5)), o(1, None), o(2, None)])
                .unwrap()
                .window,
            1
        );
        assert!(pick_denial(&[]).is_none());
    }
}
