//! The shared store: quota counters in Redis, for many gateway replicas.
//!
//! Every reservation is one `EVALSHA` of `reserve.lua` (loaded again and retried once on
//! `NOSCRIPT`), which reads the time from Redis, checks every window and metric of the
//! profile, and charges all of them or none. Release is one `EVALSHA` of `release.lua`.
//! The script follows `memory.rs` rule for rule (the differential test holds them to it): a
//! window with nothing scheduled is read in four hash fields; with scheduled buckets, only
//! the buckets around the instants in question are read, and the whole hash only to find the
//! first instant a refused charge would fit.
//!
//! Keys look like `<prefix>:{<scope>}:w:<window id>`: the `{scope}` hash tag keeps all keys
//! of a scope in one Cluster slot, and the window id names the period and bucketing but never
//! the limit, so changing a limit keeps the usage. Every key written gets an absolute expiry
//! in the same script.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{RedisError, Script, ScriptInvocation, Value};

mod fleet;

use crate::clock::{Clock, Millis, SystemClock};
use crate::decision::{Allowance, Charge, Cost, Decision, Probe, Reservation, Usage};
use crate::fleet::{FleetCursor, FleetEntry};
use crate::policy::{Metric, Period, Profile, Window};
use crate::redis_conn::{Client, Conn};
pub use crate::redis_conn::{Topology, check_url};
use crate::store::{
    Guarded, IDEMPOTENCY_TTL, MAX_AHEAD, MAX_SCHEDULED_SLOTS, META_COOLDOWN, META_PROFILE,
    QuotaStore, StoreError, StoreHealth, charge_instant, check_idempotency_key, too_many_scheduled,
};
use crate::window::{Over, View, calendar_bounds, denial, usage_of};

/// Default per-call timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "sendgw";

/// How to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]` or `rediss://...` for one server (or a Sentinel-
    /// managed primary behind a stable address); `redis+cluster://host:port,host:port` for
    /// Redis Cluster (seed nodes).
    pub url: String,
    /// Prefix of every key; must not contain `{` or `}`.
    pub key_prefix: String,
    /// Longest wait for any one call.
    pub timeout: Duration,
    /// TLS material for a `rediss://` URL (the system's roots are trusted by default).
    pub tls: RedisTls,
    /// Sentinel only: the user the sentinels know (the URL's credentials are the data
    /// nodes').
    pub sentinel_username: Option<String>,
    /// Sentinel only: the sentinels' password.
    pub sentinel_password: Option<String>,
    /// Replicas that must hold each charge before it counts (`WAIT`); `None` is 1 for
    /// Sentinel and 0 otherwise. A charge that reaches fewer is answered as an outage and
    /// given back once Redis answers, so a failover cannot lose an admitted charge.
    pub wait_replicas: Option<u32>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: DEFAULT_PREFIX.into(),
            timeout: DEFAULT_TIMEOUT,
            tls: RedisTls::default(),
            sentinel_username: None,
            sentinel_password: None,
            wait_replicas: None,
        }
    }
}

/// How a `rediss://` connection is verified and authenticated. TLS is rustls; without a
/// CA the system's root certificates are trusted.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// PEM certificates to trust instead of the system's roots (a private CA).
    pub ca_pem: Option<Vec<u8>>,
    /// A PEM client certificate and its PEM key, for servers that require mutual TLS.
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Accept any server certificate and host name. For tests only: it gives up what TLS
    /// is for.
    pub insecure_skip_verify: bool,
}

impl RedisTls {
    pub(crate) fn is_set(&self) -> bool {
        self.ca_pem.is_some() || self.client_pem.is_some() || self.insecure_skip_verify
    }
}

impl std::fmt::Debug for RedisTls {
    /// The key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("client_pem", &self.client_pem.as_ref().map(|_| "***"))
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

/// Quota counters in Redis (standalone or Cluster).
pub struct RedisStore {
    client: Client,
    conn: tokio::sync::OnceCell<Conn>,
    prefix: String,
    timeout: Duration,
    /// Replicas each charge must reach (`WAIT`) before it counts.
    wait_replicas: u32,
    reserve: Script,
    release: Script,
    delete_if: Script,
    cool_down: Script,
    reset_mark: Script,
    cancel: Script,
    fleet: fleet::Scripts,
    /// Reserves whose answers were lost, to settle once Redis answers.
    pending: std::sync::Mutex<Vec<Pending>>,
    /// Set only by tests: pass this clock's time to the script instead of Redis `TIME`.
    clock_override: Option<Arc<dyn Clock>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("topology", &self.client.topology())
            .field("wait_replicas", &self.wait_replicas)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to Redis now. The connection is multiplexed and reconnects on its own.
    ///
    /// # Errors
    /// A malformed URL or prefix ([`StoreError::Invalid`]), or Redis unreachable within the
    /// timeout.
    pub async fn connect(config: &RedisConfig) -> Result<Self, StoreError> {
        let store = Self::lazy(config)?;
        store.conn().await?;
        Ok(store)
    }

    /// Checks the configuration and connects on first use, so a gateway can start (and
    /// answer per its `on_unavailable` policy) while Redis is down. A failed first connection
    /// is tried again on the next call.
    ///
    /// # Errors
    /// A malformed URL or prefix ([`StoreError::Invalid`]).
    pub fn lazy(config: &RedisConfig) -> Result<Self, StoreError> {
        if config.key_prefix.contains(['{', '}']) {
            return Err(StoreError::Invalid(
                "key_prefix must not contain '{' or '}'".into(),
            ));
        }
        let client = Client::new(config)?;
        if client.topology() == Topology::Cluster && config.wait_replicas.unwrap_or(0) > 0 {
            return Err(StoreError::Invalid(
                "wait_replicas is not supported on Redis Cluster".into(),
            ));
        }
        let wait_replicas = config
            .wait_replicas
            .unwrap_or(u32::from(client.topology() == Topology::Sentinel));
        Ok(RedisStore {
            client,
            conn: tokio::sync::OnceCell::new(),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            wait_replicas,
            reserve: Script::new(include_str!("reserve.lua")),
            release: Script::new(include_str!("release.lua")),
            delete_if: Script::new(DELETE_IF),
            cool_down: Script::new(COOL_DOWN),
            reset_mark: Script::new(RESET_MARK),
            cancel: Script::new(CANCEL),
            fleet: fleet::Scripts::default(),
            pending: std::sync::Mutex::new(Vec::new()),
            clock_override: None,
        })
    }

    /// The shared connection, opened on first use.
    async fn conn(&self) -> Result<Conn, StoreError> {
        let timeout = self.timeout;
        let conn = self
            .conn
            .get_or_try_init(|| within(timeout, self.client.connect(timeout)))
            .await?;
        // One call's commands all go to one node, so a WAIT covers the write before it.
        within(timeout, conn.pinned()).await
    }

    /// Uses `clock` instead of Redis `TIME`. Meant for tests that move time by hand; in
    /// production the Redis clock keeps replicas with skewed clocks in agreement.
    pub fn with_clock_override(mut self, clock: impl Clock) -> Self {
        self.clock_override = Some(Arc::new(clock));
        self
    }

    fn key(&self, scope: &str, kind: &str, name: &str) -> String {
        format!("{}:{{{scope}}}:{kind}{name}", self.prefix)
    }

    fn window_key(&self, scope: &str, window_id: &str) -> String {
        self.key(scope, "w:", window_id)
    }

    /// The names of the keys holding `scope`'s windows under `profile` (for inspection).
    pub fn window_keys(&self, scope: &str, profile: &Profile) -> Vec<String> {
        profile
            .windows()
            .iter()
            .map(|w| self.window_key(scope, w.id()))
            .collect()
    }

    async fn run_reserve(
        &self,
        scope: &str,
        ask: Ask<'_>,
        key: Option<&str>,
        mode: &str,
        guard: Option<Option<&str>>,
    ) -> Result<Raw, StoreError> {
        let (profile, cost) = (ask.profile, ask.cost);
        let local_now = self.local_now();
        // An instant already past here means now (on Redis's clock, not this host's). A later
        // one is checked here as well as in the script, so the period holding it is computed
        // only for instants the script may charge.
        let at = match ask.at.filter(|&t| t > local_now) {
            Some(t) => Some(charge_instant(Some(t), local_now)?),
            None => None,
        };
        let mut inv = self.reserve.prepare_invoke();
        let id = rand::random::<u64>() >> 2;
        // reserve.lua reads its keys, then its arguments, then the windows', by position.
        let idem_ttl = self.reserve_keys(&mut inv, scope, profile, key, mode);
        let (marker, record) = match mode {
            MODE_RESERVE => (id.to_string(), RECORD_TTL.as_millis() as u64),
            _ => (String::new(), 0),
        };
        inv.key(self.key(scope, "x:", &marker))
            .key(self.key(scope, "c:", &marker));
        inv.arg(self.now_hint())
            .arg(id)
            .arg(idem_ttl)
            .arg(cost.messages)
            .arg(cost.recipients)
            .arg(cost.bytes)
            .arg(mode)
            .arg(profile.windows().len())
            .arg(if guard.is_some() { "1" } else { "0" })
            .arg(guard.flatten().unwrap_or(""))
            .arg(at.map(|t| t.to_string()).unwrap_or_default())
            .arg(MAX_SCHEDULED_SLOTS)
            .arg(MAX_AHEAD.as_millis() as u64)
            .arg(record);
        for w in profile.windows() {
            window_args(&mut inv, w, local_now, at);
        }
        let mut conn = self.conn().await?;
        let mut reply = within(self.timeout, inv.invoke_async::<Value>(&mut conn)).await;
        if reply.is_ok()
            && mode != MODE_USAGE
            && mode != MODE_PROBE
            && let Err(e) = self.replicated(&mut conn).await
        {
            reply = Err(e);
        }
        if let Err(e) = &reply
            && mode == MODE_RESERVE
            && is_outage(e)
        {
            // The script may have run with its answer lost (or on a primary about to be
            // replaced): give it back once Redis answers.
            self.pending_push(Pending::Cancel {
                scope: scope.to_owned(),
                id,
                cost,
                windows: profile
                    .windows()
                    .iter()
                    .map(|w| Arc::from(w.id()))
                    .collect(),
            });
        }
        parse_reserve_reply(&reply?, profile)
    }

    /// Waits until `wait_replicas` replicas hold this connection's writes so far.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when fewer replicas acknowledged within the timeout: the
    /// write may be lost in a failover, so it must not count as done.
    async fn replicated(&self, conn: &mut Conn) -> Result<(), StoreError> {
        let want = self.wait_replicas;
        if want == 0 {
            return Ok(());
        }
        let ms = u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut wait = redis::cmd("WAIT");
        wait.arg(want).arg(ms);
        let limit = self.timeout + Duration::from_millis(50);
        let got: u32 = within(limit, wait.query_async(conn)).await?;
        if got < want {
            return Err(StoreError::Unavailable(format!(
                "a write reached {got} of {want} replicas within {ms} ms"
            )));
        }
        Ok(())
    }

    fn pending_push(&self, p: Pending) {
        let mut pending = lock(&self.pending);
        if pending.len() >= MAX_PENDING {
            // Over-counting is the safe side: the oldest unsettled charge stays.
            pending.remove(0);
        }
        pending.push(p);
    }

    /// Settles the reserves whose answers were lost (timeouts, dropped connections): each
    /// is released by its id if it ran, and marked so that it charges nothing if it runs
    /// later. Called after every successful ping; returns how many were released.
    ///
    /// # Errors
    /// The store failed again; what was not settled is kept for the next call.
    pub async fn settle_pending(&self) -> Result<usize, StoreError> {
        let todo = std::mem::take(&mut *lock(&self.pending));
        let mut released = 0;
        let mut left = todo.into_iter();
        while let Some(p) = left.next() {
            match self.settle_one(&p).await {
                Ok(r) => released += usize::from(r),
                // An answer that cannot be read will not read better later: the charge
                // stays (the safe side) rather than blocking every later ping.
                Err(StoreError::Protocol(_) | StoreError::Invalid(_)) => {}
                Err(e) => {
                    let mut pending = lock(&self.pending);
                    pending.push(p);
                    pending.extend(left);
                    return Err(e);
                }
            }
        }
        Ok(released)
    }

    async fn settle_one(&self, p: &Pending) -> Result<bool, StoreError> {
        let reservation = match p {
            Pending::Release(r) => r.clone(),
            Pending::Cancel {
                scope,
                id,
                cost,
                windows,
            } => {
                let mut inv = self.cancel.prepare_invoke();
                inv.key(self.key(scope, "x:", &id.to_string()))
                    .key(self.key(scope, "c:", &id.to_string()))
                    .arg(RECORD_TTL.as_millis() as u64);
                let mut conn = self.conn().await?;
                let record: Option<String> =
                    within(self.timeout, inv.invoke_async(&mut conn)).await?;
                let Some(record) = record else {
                    return Ok(false);
                };
                recorded_reservation(scope, *id, *cost, windows, &record)?
            }
        };
        match self.release(&reservation).await {
            Err(e) if is_outage(&e) => {
                self.pending_push(Pending::Release(reservation));
                Err(e)
            }
            other => other.map(|()| true),
        }
    }

    fn local_now(&self) -> Millis {
        match &self.clock_override {
            Some(c) => c.now_ms(),
            None => SystemClock.now_ms(),
        }
    }

    /// One reserve-script call that must answer with fields (no guard).
    async fn fields(
        &self,
        scope: &str,
        ask: Ask<'_>,
        mode: &str,
    ) -> Result<(Vec<i64>, bool), StoreError> {
        match self.run_reserve(scope, ask, None, mode, None).await? {
            Raw::Fields(f, replay) => Ok((f, replay)),
            Raw::CoolingDown(_) | Raw::OverrideChanged(_) => {
                Err(protocol("guard reply to an unguarded call"))
            }
        }
    }

    /// Adds reserve.lua's KEYS: the windows', the key index, the idempotency record (a
    /// placeholder without a key, or outside reserve mode), the override and the cool-down.
    /// Returns the idempotency record's TTL in ms, 0 for none.
    fn reserve_keys(
        &self,
        inv: &mut ScriptInvocation<'_>,
        scope: &str,
        profile: &Profile,
        key: Option<&str>,
        mode: &str,
    ) -> u64 {
        for w in profile.windows() {
            inv.key(self.window_key(scope, w.id()));
        }
        inv.key(self.key(scope, "k", ""));
        let idem_ttl = match key {
            Some(k) if mode == MODE_RESERVE => {
                inv.key(self.key(scope, "i:", k));
                IDEMPOTENCY_TTL.as_millis() as u64
            }
            _ => {
                inv.key(self.key(scope, "i:", ""));
                0
            }
        };
        inv.key(self.meta_key(scope, META_PROFILE));
        inv.key(self.meta_key(scope, META_COOLDOWN));
        idem_ttl
    }

    fn meta_key(&self, scope: &str, name: &str) -> String {
        self.key(scope, "m:", name)
    }

    fn now_hint(&self) -> String {
        self.clock_override
            .as_ref()
            .map(|c| c.now_ms().to_string())
            .unwrap_or_default()
    }
}

/// A reserve whose answer was lost, to settle once Redis answers.
#[derive(Debug)]
enum Pending {
    /// Release it if it ran; mark it so it charges nothing if it runs later.
    Cancel {
        scope: String,
        id: u64,
        cost: Cost,
        windows: Vec<Arc<str>>,
    },
    /// It ran (its record was read); give its charge back.
    Release(Reservation),
}

/// Most lost reserves remembered for settling; beyond, the oldest keeps its charge.
const MAX_PENDING: usize = 100_000;

/// How long a reservation's record (and a cancelled one's marker) is kept: a reserve whose
/// answer was lost is given back if Redis answers again within this time.
pub const RECORD_TTL: Duration = Duration::from_secs(600);

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn is_outage(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_) | StoreError::Timeout(_))
}

/// Takes a reservation's record ("<made at>,<last expiry>,<slot>...") and deletes it, or,
/// with none, marks the reservation released so a late reserve charges nothing. KEYS[1] the
/// marker, KEYS[2] the record; ARGV[1] the marker's lifetime in ms.
const CANCEL: &str = r"
local record = redis.call('GET', KEYS[2])
if record then
  redis.call('DEL', KEYS[2])
  return record
end
redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
return false
";

/// The reservation a record names.
fn recorded_reservation(
    scope: &str,
    id: u64,
    cost: Cost,
    windows: &[Arc<str>],
    record: &str,
) -> Result<Reservation, StoreError> {
    let nums: Vec<u64> = record
        .split(',')
        .map(|v| v.parse().map_err(|_| protocol("reservation record")))
        .collect::<Result<_, _>>()?;
    let [made_at, expires_at_ms, slots @ ..] = nums.as_slice() else {
        return Err(protocol("reservation record"));
    };
    if slots.len() != windows.len() {
        return Err(protocol("reservation record"));
    }
    let charges = windows
        .iter()
        .zip(slots)
        .map(|(w, &slot)| Charge {
            window_id: Arc::clone(w),
            slot,
            expires_at_ms: *expires_at_ms,
        })
        .collect();
    Ok(Reservation {
        id,
        scope: Arc::from(scope),
        cost,
        at: *made_at,
        made_at: *made_at,
        charges,
        idempotency_key: None,
    })
}

/// Sets a cool-down's end on the script's clock, keeping a later one already set.
/// KEYS[1] the setting; ARGV[1] now in ms or "" for Redis TIME; ARGV[2] its length in ms.
const COOL_DOWN: &str = r"
local now
if ARGV[1] ~= '' then now = tonumber(ARGV[1]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local untl = now + tonumber(ARGV[2])
local current = tonumber(redis.call('GET', KEYS[1]) or '')
if current and current >= untl then return 0 end
redis.call('SET', KEYS[1], string.format('%d', untl), 'PX', ARGV[2])
return 1
";

/// What one reserve-script call asks for.
#[derive(Debug, Clone, Copy)]
struct Ask<'a> {
    profile: &'a Profile,
    cost: Cost,
    at: Option<Millis>,
}

/// Reads the run id and persistence out of `INFO server`, `INFO persistence` and
/// `CONFIG GET save` (`None` when CONFIG is not allowed).
fn health_of(server: &str, persistence: &str, save: Option<&[String]>) -> StoreHealth {
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    let aof = field(persistence, "aof_enabled").is_some_and(|v| v == "1");
    let rdb = save.map(|s| s.get(1).is_some_and(|v| !v.trim().is_empty()));
    let persistent = match (aof, rdb) {
        (true, _) | (_, Some(true)) => Some(true),
        (false, Some(false)) => Some(false),
        (false, None) => None,
    };
    StoreHealth {
        persistent,
        run_id: field(server, "run_id"),
    }
}

/// Fields of a reply before the per-window ones, and per window.
const HEAD: usize = 9;
const PER_WINDOW: usize = 12;

/// A reply of the reserve script.
enum Raw {
    Fields(Vec<i64>, bool),
    CoolingDown(u64),
    OverrideChanged(String),
}

/// Records a reset's instant in KEYS[1]. ARGV[1] now in ms or "" for Redis TIME; ARGV[2] how
/// long the mark is kept in ms.
const RESET_MARK: &str = r"
local now
if ARGV[1] ~= '' then now = tonumber(ARGV[1]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
redis.call('SET', KEYS[1], string.format('%d', now), 'PX', ARGV[2])
return now
";

/// How long a reset's mark outlives it: as long as a reservation made before it can hold a
/// charge (the furthest ahead a charge goes, plus the longest window).
const RESET_MARK_TTL: Duration = Duration::from_secs((366 + 32) * 24 * 3600);

/// Deletes KEYS[1] only while it holds ARGV[1]; 1 when deleted.
const DELETE_IF: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// `reserve.lua` modes: reserve within the limits, read usage, charge regardless.
const MODE_RESERVE: &str = "r";
const MODE_USAGE: &str = "u";
const MODE_FORCE: &str = "f";
/// Judge as a reserve would, and charge nothing.
const MODE_PROBE: &str = "p";

fn protocol(what: &str) -> StoreError {
    StoreError::Protocol(format!("unexpected {what} from Redis"))
}

fn map_err(e: RedisError, timeout: Duration) -> StoreError {
    use redis::{ErrorKind, ServerErrorKind as S};
    // A primary that moved or is not ready yet: as good as down, for the breaker and for
    // `on_unavailable` (a write refused with READONLY charged nothing).
    let not_serving = matches!(
        e.kind(),
        ErrorKind::Server(
            S::ReadOnly | S::BusyLoading | S::TryAgain | S::ClusterDown | S::MasterDown
        )
    );
    if e.is_timeout() {
        StoreError::Timeout(timeout)
    } else if not_serving
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Protocol(e.to_string())
    }
}

async fn within<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(map_err(e, timeout)),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

fn ints(items: &[Value]) -> Result<Vec<i64>, StoreError> {
    items
        .iter()
        .map(|item| match item {
            Value::Int(i) => Ok(*i),
            Value::BulkString(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| protocol("reply field")),
            _ => Err(protocol("reply field")),
        })
        .collect()
}

/// Adds reserve.lua's 12 arguments for window `w`: kind, limits m r b (0: none), then the
/// bucketing of a rolling window, or three candidate periods of a calendar one around
/// `local_now` and the period holding `at` (0 0 for a send going out now).
fn window_args(inv: &mut ScriptInvocation<'_>, w: &Window, local_now: Millis, at: Option<Millis>) {
    let lim = |m: Metric| w.limit(m).map_or(0, |v| v.get());
    let (kind, p) = match w.period() {
        Period::Rolling {
            bucket_ms, buckets, ..
        } => (
            0,
            [bucket_ms.get(), u64::from(buckets.get()), 0, 0, 0, 0, 0, 0],
        ),
        Period::Calendar { unit, tz, .. } => {
            // The script picks whichever period holds the Redis time.
            let (s1, e1) = calendar_bounds(*unit, tz, local_now);
            let (s0, e0) = calendar_bounds(*unit, tz, s1.saturating_sub(1));
            let (s2, e2) = calendar_bounds(*unit, tz, e1);
            let (sa, ea) = at.map_or((0, 0), |t| calendar_bounds(*unit, tz, t));
            (1, [s0, e0, s1, e1, s2, e2, sa, ea])
        }
    };
    inv.arg(kind)
        .arg(lim(Metric::Messages))
        .arg(lim(Metric::Recipients))
        .arg(lim(Metric::Bytes));
    for v in p {
        inv.arg(v);
    }
}

/// reserve.lua's reply for `profile`.
fn parse_reserve_reply(reply: &Value, profile: &Profile) -> Result<Raw, StoreError> {
    let Value::Array(items) = reply else {
        return Err(protocol("reply"));
    };
    let text = |i: usize| match items.get(i) {
        Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
        Some(Value::Int(n)) => Ok(n.to_string()),
        _ => Err(protocol("reply field")),
    };
    let (fields, replay) = match items.first() {
        Some(Value::Int(8)) => {
            return Err(StoreError::Unavailable(
                "reservation released before it reached Redis".into(),
            ));
        }
        Some(Value::Int(7)) => return Err(charge_instant(Some(u64::MAX), 0).unwrap_err()),
        Some(Value::Int(6)) => {
            let i: usize = text(1)?.parse().map_err(|_| protocol("window"))?;
            let w = profile.windows().get(i.wrapping_sub(1));
            return Err(too_many_scheduled(w.map_or("", |w| w.label())));
        }
        Some(Value::Int(5)) => {
            let ms = text(1)?.parse().map_err(|_| protocol("cool-down"))?;
            return Ok(Raw::CoolingDown(ms));
        }
        Some(Value::Int(4)) => return Ok(Raw::OverrideChanged(text(1)?)),
        // An idempotent repeat: the first reply, stored as text.
        Some(Value::Int(3)) => {
            let fields = text(1)?
                .split(',')
                .map(|s| s.parse::<i64>().map_err(|_| protocol("idempotent record")))
                .collect::<Result<Vec<_>, _>>()?;
            (fields, true)
        }
        _ => (ints(items)?, false),
    };
    if fields.len() != HEAD + PER_WINDOW * profile.windows().len() {
        return Err(protocol("reply length does not match the profile"));
    }
    Ok(Raw::Fields(fields, replay))
}

/// Builds the decision out of a reserve reply.
fn decision_of(
    f: &[i64],
    replay: bool,
    scope: &str,
    ask: Ask<'_>,
    idempotency_key: Option<&str>,
) -> Result<Decision, StoreError> {
    let (profile, cost) = (ask.profile, ask.cost);
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    let (now, at) = (u(f[2]), u(f[8]));
    let windows: Vec<(u64, u64, View)> = windows_of(f).collect();
    let views: Vec<View> = windows.iter().map(|w| w.2).collect();
    let usage = usage_of(profile, &views, now);
    match f[0] {
        1 => {
            let charges = profile
                .windows()
                .iter()
                .zip(&windows)
                .map(|(w, &(slot, expires_at_ms, _))| Charge {
                    window_id: Arc::from(w.id()),
                    slot,
                    expires_at_ms,
                })
                .collect();
            let reservation = Reservation {
                id: u64::try_from(f[1]).map_err(|_| protocol("reservation id"))?,
                scope: Arc::from(scope),
                cost,
                at,
                made_at: now,
                charges,
                idempotency_key: idempotency_key.map(Arc::from),
            };
            Ok(Decision::Allowed(Allowance {
                reservation,
                usage,
                replay,
            }))
        }
        0 => {
            let over = over_of(f, profile)?;
            let d = denial(profile, over, cost, at, now, over.fits_at, usage);
            Ok(Decision::Denied(d))
        }
        _ => Err(protocol("decision status")),
    }
}

/// The denying window and metric of a reply; `fits_at` is the instant every window takes it.
fn over_of(f: &[i64], profile: &Profile) -> Result<Over, StoreError> {
    let window = usize::try_from(f[3] - 1).map_err(|_| protocol("denial window"))?;
    let metric = usize::try_from(f[4] - 1)
        .ok()
        .and_then(|m| Metric::ALL.get(m).copied())
        .ok_or_else(|| protocol("denial metric"))?;
    if window >= profile.windows().len() {
        return Err(protocol("denial window"));
    }
    Ok(Over {
        window,
        metric,
        used: u64::try_from(f[5]).unwrap_or(0),
        limit: u64::try_from(f[6]).unwrap_or(0),
        fits_at: u64::try_from(f[7]).ok(),
    })
}

/// Reads the per-window part of a reply: charged slot, its expiry, and the view.
fn windows_of(fields: &[i64]) -> impl Iterator<Item = (u64, u64, View)> + '_ {
    fields[HEAD..].chunks_exact(PER_WINDOW).map(|c| {
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        let three = |i: usize| [u(c[i]), u(c[i + 1]), u(c[i + 2])];
        let view = View {
            used: three(2),
            scheduled: three(5),
            peak_now: three(8),
            next_free_at: u64::try_from(c[11]).ok(),
        };
        (u(c[0]), u(c[1]), view)
    })
}

#[async_trait]
impl QuotaStore for RedisStore {
    async fn reserve_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        idempotency_key: Option<&str>,
    ) -> Result<Decision, StoreError> {
        check_idempotency_key(idempotency_key)?;
        let ask = Ask { profile, cost, at };
        match self
            .run_reserve(scope, ask, idempotency_key, MODE_RESERVE, None)
            .await?
        {
            Raw::Fields(f, replay) => decision_of(&f, replay, scope, ask, idempotency_key),
            Raw::CoolingDown(_) | Raw::OverrideChanged(_) => {
                Err(protocol("guard reply to an unguarded call"))
            }
        }
    }

    async fn reserve_guarded(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        idempotency_key: Option<&str>,
        expected_override: Option<&str>,
    ) -> Result<Guarded, StoreError> {
        check_idempotency_key(idempotency_key)?;
        let ask = Ask { profile, cost, at };
        let guard = Some(expected_override);
        let raw = self
            .run_reserve(scope, ask, idempotency_key, MODE_RESERVE, guard)
            .await?;
        Ok(match raw {
            Raw::Fields(f, replay) => {
                Guarded::Decided(decision_of(&f, replay, scope, ask, idempotency_key)?)
            }
            Raw::CoolingDown(ms) => Guarded::CoolingDown(Duration::from_millis(ms)),
            Raw::OverrideChanged(name) => {
                Guarded::OverrideChanged(Some(name).filter(|n| !n.is_empty()))
            }
        })
    }

    async fn cool_down(&self, scope: &str, duration: Duration) -> Result<(), StoreError> {
        let ms = u64::try_from(duration.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut inv = self.cool_down.prepare_invoke();
        inv.key(self.meta_key(scope, META_COOLDOWN))
            .arg(self.now_hint())
            .arg(ms);
        let mut conn = self.conn().await?;
        let _: Value = within(self.timeout, inv.invoke_async(&mut conn)).await?;
        self.replicated(&mut conn).await
    }

    async fn meta_ttl(&self, scope: &str, name: &str) -> Result<Option<Duration>, StoreError> {
        let mut conn = self.conn().await?;
        let ms: i64 = within(
            self.timeout,
            redis::cmd("PTTL")
                .arg(self.meta_key(scope, name))
                .query_async(&mut conn),
        )
        .await?;
        // -2: no such key; -1: kept forever.
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }

    async fn meta_get(&self, scope: &str, name: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn().await?;
        within(
            self.timeout,
            redis::cmd("GET")
                .arg(self.meta_key(scope, name))
                .query_async(&mut conn),
        )
        .await
    }

    async fn meta_set(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.meta_key(scope, name)).arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX")
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        let mut conn = self.conn().await?;
        let _: Value = within(self.timeout, cmd.query_async(&mut conn)).await?;
        self.replicated(&mut conn).await
    }

    async fn meta_set_new(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.meta_key(scope, name))
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        let mut conn = self.conn().await?;
        let reply: Value = within(self.timeout, cmd.query_async(&mut conn)).await?;
        self.replicated(&mut conn).await?;
        Ok(!matches!(reply, Value::Nil))
    }

    async fn meta_delete_if(
        &self,
        scope: &str,
        name: &str,
        value: &str,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let mut inv = self.delete_if.prepare_invoke();
        inv.key(self.meta_key(scope, name)).arg(value);
        let removed: i64 = within(self.timeout, inv.invoke_async(&mut conn)).await?;
        Ok(removed == 1)
    }

    async fn meta_delete(&self, scope: &str, name: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: i64 = within(
            self.timeout,
            redis::cmd("DEL")
                .arg(self.meta_key(scope, name))
                .query_async(&mut conn),
        )
        .await?;
        Ok(())
    }

    async fn charge(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Allowance, StoreError> {
        let ask = Ask { profile, cost, at };
        let (f, _) = self.fields(scope, ask, MODE_FORCE).await?;
        match decision_of(&f, false, scope, ask, None)? {
            Decision::Allowed(a) => Ok(a),
            Decision::Denied(_) => Err(protocol("a forced charge was denied")),
        }
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), StoreError> {
        if reservation.charges.is_empty() {
            return Ok(());
        }
        let scope = reservation.scope();
        let mut inv = self.release.prepare_invoke();
        for c in &reservation.charges {
            inv.key(self.window_key(scope, &c.window_id));
        }
        inv.key(self.key(scope, "x:", &reservation.id.to_string()));
        inv.key(self.key(scope, "r", ""));
        if let Some(k) = reservation.idempotency_key() {
            inv.key(self.key(scope, "i:", k));
        }
        // The marker must outlive the charged buckets; a minute's margin covers clock skew
        // between this host and Redis.
        let until = reservation
            .charges
            .iter()
            .map(|c| c.expires_at_ms)
            .max()
            .unwrap_or(0);
        let now = self
            .clock_override
            .as_ref()
            .map_or_else(|| SystemClock.now_ms(), |c| c.now_ms());
        let marker_ttl = until.saturating_sub(now) + 60_000;
        let cost = reservation.cost;
        inv.arg(marker_ttl)
            .arg(cost.messages)
            .arg(cost.recipients)
            .arg(cost.bytes)
            .arg(reservation.charges.len());
        for c in &reservation.charges {
            // Calendar slots are period starts in ms; rolling slots are bucket numbers.
            let kind = u8::from(c.window_id.contains('@'));
            inv.arg(kind).arg(c.slot);
        }
        inv.arg(reservation.id).arg(reservation.made_at);
        let mut conn = self.conn().await?;
        let _: Value = within(self.timeout, inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn usage(&self, scope: &str, profile: &Profile) -> Result<Usage, StoreError> {
        let ask = Ask {
            profile,
            cost: Cost::default(),
            at: None,
        };
        let (f, _) = self.fields(scope, ask, MODE_USAGE).await?;
        let now = u64::try_from(f[2]).unwrap_or(0);
        let views: Vec<View> = windows_of(&f).map(|w| w.2).collect();
        Ok(usage_of(profile, &views, now))
    }

    async fn probe_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Probe, StoreError> {
        let ask = Ask { profile, cost, at };
        let (f, _) = self.fields(scope, ask, MODE_PROBE).await?;
        // The allowance of a probe charged nothing: only its usage is kept.
        Ok(match decision_of(&f, false, scope, ask, None)? {
            Decision::Allowed(a) => Probe::Fits(a.usage),
            Decision::Denied(d) => Probe::Refused(d),
        })
    }

    async fn fleet_note(&self, entries: &[FleetEntry]) -> Result<(), StoreError> {
        self.note_fleet(entries).await
    }

    async fn fleet_list(
        &self,
        min: f64,
        after: Option<&FleetCursor>,
        count: usize,
    ) -> Result<Vec<FleetEntry>, StoreError> {
        self.list_fleet(min, after, count).await
    }

    async fn fleet_lower(&self, scope: &str, seen: u64, to: f64) -> Result<(), StoreError> {
        self.lower_fleet(scope, seen, to).await
    }

    async fn reset(&self, scope: &str) -> Result<(), StoreError> {
        let index = self.key(scope, "k", "");
        let mut conn = self.conn().await?;
        // First the instant of the reset, on the script's clock: a release of a reservation
        // made until then gives nothing back (its charge is gone with the counters).
        let mut mark = self.reset_mark.prepare_invoke();
        mark.key(self.key(scope, "r", ""))
            .arg(self.now_hint())
            .arg(RESET_MARK_TTL.as_millis() as u64);
        let _: Value = within(self.timeout, mark.invoke_async(&mut conn)).await?;
        let members: Vec<String> = within(
            self.timeout,
            redis::cmd("SMEMBERS").arg(&index).query_async(&mut conn),
        )
        .await?;
        let mut del = redis::cmd("DEL");
        del.arg(&index);
        for k in members {
            del.arg(k);
        }
        let _: i64 = within(self.timeout, del.query_async(&mut conn)).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if let Client::Sentinel(s) = &self.client {
            within(self.timeout, s.follow()).await?;
        }
        let mut conn = self.conn().await?;
        let _: String = within(self.timeout, redis::cmd("PING").query_async(&mut conn)).await?;
        self.settle_pending().await?;
        Ok(())
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        self.ping().await?;
        let mut conn = self.conn().await?;
        let server: String = within(
            self.timeout,
            redis::cmd("INFO").arg("server").query_async(&mut conn),
        )
        .await?;
        let persistence: String = within(
            self.timeout,
            redis::cmd("INFO").arg("persistence").query_async(&mut conn),
        )
        .await?;
        // Managed offerings often disable CONFIG; then only AOF can be seen.
        let save: Option<Vec<String>> = within(
            self.timeout,
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("save")
                .query_async(&mut conn),
        )
        .await
        .ok();
        Ok(health_of(&server, &persistence, save.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn calendar_ids_carry_an_at_and_rolling_ids_do_not() {
        use crate::{CalendarUnit, ProfileSpec, WindowSpec};
        let p = ProfileSpec::default()
            .window(WindowSpec::rolling(std::time::Duration::from_secs(60)).messages(1))
            .window(WindowSpec::calendar(CalendarUnit::Day, "Europe/Berlin").messages(1))
            .build("p")
            .unwrap();
        assert!(!p.windows()[0].id().contains('@'));
        assert!(p.windows()[1].id().contains('@'));
    }
}
