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

/// Where W(c), the sum a rolling window holds when its newest bucket is `c`, changes:
/// `(position, W from there on)`, sorted. A bucket at `s` enters at `s` and leaves at
/// `s + buckets + 1`; after the last point the window is empty. `stored` is every bucket
/// held (past and scheduled), sorted by slot, none empty.
pub(crate) fn change_points(geo: Rolling, stored: &[(u64, [u64; 3])]) -> Vec<(u64, [u64; 3])> {
    let mut points: Vec<(u64, [u64; 3])> = Vec::with_capacity(stored.len() * 2);
    let (mut enter, mut leave) = (0, 0);
    let mut w = [0u64; 3];
    while leave < stored.len() {
        let enter_at = stored.get(enter).map(|b| b.0);
        let leave_at = stored[leave].0 + geo.buckets + 1;
        let pos = enter_at.map_or(leave_at, |e| e.min(leave_at));
        // Leaves before enters at one position: W there is what stays plus what comes.
        while leave < stored.len() && stored[leave].0 + geo.buckets + 1 == pos {
            sub(&mut w, stored[leave].1);
            leave += 1;
        }
        while enter < stored.len() && stored[enter].0 == pos {
            add(&mut w, stored[enter].1);
            enter += 1;
        }
        match points.last_mut() {
            Some(last) if last.0 == pos => last.1 = w,
            _ => points.push((pos, w)),
        }
    }
    points
}

/// The fullest the window gets, metric by metric, over every position that holds slot `s`
/// (`s` to `s + buckets`): what a charge at `s` must fit under.
pub(crate) fn peak(geo: Rolling, points: &[(u64, [u64; 3])], s: u64) -> [u64; 3] {
    let last = s.saturating_add(geo.buckets);
    let mut peak = [0u64; 3];
    for (j, &(pos, w)) in points.iter().enumerate() {
        let end = points.get(j + 1).map_or(u64::MAX, |p| p.0);
        if pos > last {
            break;
        }
        if end > s {
            for m in 0..3 {
                peak[m] = peak[m].max(w[m]);
            }
        }
    }
    peak
}

/// The earliest slot `s >= from` at which `want` fits in every position holding `s`, for
/// metric `m` limited to `limit` (`want[m] <= limit`).
pub(crate) fn earliest_slot(
    geo: Rolling,
    points: &[(u64, [u64; 3])],
    from: u64,
    m: usize,
    room: u64,
) -> u64 {
    let mut s = from;
    for (j, &(pos, w)) in points.iter().enumerate() {
        let end = points.get(j + 1).map_or(u64::MAX, |p| p.0);
        if w[m] <= room || end <= s {
            continue;
        }
        if pos > s.saturating_add(geo.buckets) {
            break;
        }
        s = end;
    }
    s
}

/// A window as one decision sees it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct View {
    /// Counted in the window now (sent, or due by now).
    pub(crate) used: [u64; 3],
    /// Charged for instants after the current bucket or period.
    pub(crate) scheduled: [u64; 3],
    /// The fullest any window holding now gets: what a live send must fit under.
    pub(crate) peak_now: [u64; 3],
    /// When the oldest unit counted now stops counting.
    pub(crate) next_free_at: Option<Millis>,
}

/// Turns per-window views into a [`Usage`].
pub(crate) fn usage_of(profile: &Profile, views: &[View], now_ms: Millis) -> Usage {
    let windows = profile
        .windows()
        .iter()
        .zip(views)
        .map(|(w, v)| window_usage(w, v, now_ms))
        .collect();
    Usage { windows }
}

pub(crate) fn window_usage(w: &Window, v: &View, now_ms: Millis) -> WindowUsage {
    let metrics = Metric::ALL
        .into_iter()
        .filter_map(|m| {
            let limit = w.limit(m)?.get();
            let i = m.index();
            Some(MetricUsage {
                metric: m,
                limit,
                used: v.used[i],
                scheduled: v.scheduled[i],
                remaining: limit.saturating_sub(v.peak_now[i].max(v.used[i])),
            })
        })
        .collect();
    let any_used = v.used.iter().any(|&x| x > 0);
    WindowUsage {
        window_id: Arc::clone(w.id_arc()),
        label: Arc::clone(w.label_arc()),
        seconds: w.nominal_seconds(),
        used: Cost::from_array(v.used),
        scheduled: Cost::from_array(v.scheduled),
        next_free: v
            .next_free_at
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
    /// The earliest instant this window alone would take the charge; `None` when the
    /// request exceeds the limit.
    pub(crate) fits_at: Option<Millis>,
}

/// Picks the denial to report among the windows and metrics that would go over: one that
/// can never pass if there is any, otherwise the one that frees up last. Ties go to the
/// first in profile order.
pub(crate) fn pick_denial(overs: &[Over]) -> Option<Over> {
    let mut best: Option<Over> = None;
    for o in overs {
        best = match best {
            None => Some(*o),
            Some(b) => match (b.fits_at, o.fits_at) {
                (None, _) => Some(b),
                (Some(_), None) => Some(*o),
                (Some(x), Some(y)) if y > x => Some(*o),
                _ => Some(b),
            },
        };
    }
    best
}

/// The earliest instant at or after `from` at which every window takes the charge, given
/// each window's own answer (`fit(i, t)`: the earliest instant at or after `t` that window
/// `i` takes it). Windows are asked in turn until all agree.
pub(crate) fn earliest_for_all(
    windows: usize,
    from: Millis,
    mut fit: impl FnMut(usize, Millis) -> Millis,
) -> Millis {
    let mut t = from;
    // Each round moves past at least one full stretch of some window; the cap is a guard.
    for _ in 0..100_000 {
        let next = (0..windows).fold(t, |acc, i| acc.max(fit(i, acc)));
        if next == t {
            return t;
        }
        t = next;
    }
    t
}

/// The denial for `over`, charging `cost` at `at` (the store's `now` for a live send).
pub(crate) fn denial(
    profile: &Profile,
    over: Over,
    cost: Cost,
    at: Millis,
    now: Millis,
    fits_at: Option<Millis>,
    usage: Usage,
) -> Denial {
    let w = &profile.windows()[over.window];
    let fits_at = fits_at.filter(|_| over.fits_at.is_some());
    Denial {
        window_id: Arc::clone(w.id_arc()),
        window: Arc::clone(w.label_arc()),
        metric: over.metric,
        limit: over.limit,
        used: over.used,
        requested: cost.get(over.metric),
        at,
        fits_at,
        // Waiting only helps a send that goes out now: the windows around a later instant
        // hold what is scheduled there whenever it is asked again.
        retry_after: fits_at
            .filter(|_| at <= now)
            .map(|t| ceil_duration(t.saturating_sub(now))),
        usage,
    }
}

pub(crate) fn add(a: &mut [u64; 3], b: [u64; 3]) {
    for i in 0..3 {
        a[i] = a[i].saturating_add(b[i]);
    }
}

pub(crate) fn sub(a: &mut [u64; 3], b: [u64; 3]) {
    for i in 0..3 {
        a[i] = a[i].saturating_sub(b[i]);
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
        let o = |window, fits_at| Over {
            window,
            metric: Metric::Messages,
            used: 0,
            limit: 1,
            fits_at,
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
