//! The fleet index in Redis (see [`crate::fleet`]): four keys sharing one hash tag, so
//! each script works on Redis Cluster too.
//!
//! - `<prefix>:{!fleet}:u`, a sorted set: scope → bound (its index order is `ZREVRANGE`'s);
//! - `<prefix>:{!fleet}:x`, a sorted set: scope → when its charges stop counting (ms);
//! - `<prefix>:{!fleet}:p`, a hash: scope → the profile it was last charged under;
//! - `<prefix>:{!fleet}:v`, a hash: scope → its version, raised by every note (what a
//!   reader's lower compares).
//!
//! Scripts read the clock with `TIME`, as the reserve script does. The `!` keeps the tag
//! apart from every scope's (scopes are tagged by their own names).

use redis::{Script, Value};

use super::{RedisStore, within};
use crate::fleet::{FleetCursor, FleetEntry};
use crate::store::StoreError;

/// Expired entries one script call drops at most (the rest go with the next call).
const TRIM_BATCH: usize = 1000;

const CLOCK: &str = r"
local now
if ARGV[1] ~= '' then now = tonumber(ARGV[1]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function forget(m)
  redis.call('ZREM', KEYS[1], m); redis.call('ZREM', KEYS[2], m)
  redis.call('HDEL', KEYS[3], m); redis.call('HDEL', KEYS[4], m)
end
";

/// ARGV: clock hint, trim batch, then (scope, bound, expires, profile) per entry.
const NOTE: &str = r"
for i = 3, #ARGV, 4 do
  redis.call('ZADD', KEYS[1], 'GT', ARGV[i + 1], ARGV[i])
  redis.call('ZADD', KEYS[2], 'GT', ARGV[i + 2], ARGV[i])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 3])
  redis.call('HINCRBY', KEYS[4], ARGV[i], 1)
end
local old = redis.call('ZRANGE', KEYS[2], '-inf', now, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(old) do forget(m) end
return #old
";

/// ARGV: clock hint, min, count, cursor bound ('' for none), cursor scope. Answers
/// (scope, bound, profile, expires, version) per entry. Ties are in descending byte order of their
/// names; Lua's `<` follows the locale, so names are compared byte by byte.
const LIST: &str = r"
local function less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = a:byte(i), b:byte(i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local start = 0
if ARGV[4] ~= '' then
  local lo = redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[4], '+inf')
  local hi = lo + redis.call('ZCOUNT', KEYS[1], ARGV[4], ARGV[4])
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local m = redis.call('ZRANGE', KEYS[1], mid, mid, 'REV')[1]
    if less(m, ARGV[5]) then hi = mid else lo = mid + 1 end
  end
  start = lo
end
local flat = redis.call('ZRANGE', KEYS[1], start, start + tonumber(ARGV[3]) - 1, 'REV', 'WITHSCORES')
local out = {}
local min = tonumber(ARGV[2])
for i = 1, #flat, 2 do
  if tonumber(flat[i + 1]) < min then break end
  -- An expired entry is listed too: the reader finds nothing counted and removes it (and
  -- the next note drops it anyway).
  out[#out + 1] = flat[i]
  out[#out + 1] = flat[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[3], flat[i]) or ''
  out[#out + 1] = redis.call('ZSCORE', KEYS[2], flat[i]) or '0'
  out[#out + 1] = redis.call('HGET', KEYS[4], flat[i]) or '0'
end
return out
";

/// ARGV: clock hint, scope, the version read, the new bound.
const LOWER: &str = r"
local v = redis.call('HGET', KEYS[4], ARGV[2])
if not v or v ~= ARGV[3] then return 0 end
if tonumber(ARGV[4]) <= 0 then forget(ARGV[2]) else redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2]) end
return 1
";

/// The fleet scripts, compiled once per store.
#[derive(Debug)]
pub(super) struct Scripts {
    note: Script,
    list: Script,
    lower: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            note: Script::new(&format!("{CLOCK}{NOTE}")),
            list: Script::new(&format!("{CLOCK}{LIST}")),
            lower: Script::new(&format!("{CLOCK}{LOWER}")),
        }
    }
}

impl RedisStore {
    fn fleet_invoke<'a>(&self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for k in ["u", "x", "p", "v"] {
            inv.key(format!("{}:{{!fleet}}:{k}", self.prefix));
        }
        inv.arg(self.now_hint());
        inv
    }

    pub(super) async fn note_fleet(&self, entries: &[FleetEntry]) -> Result<(), StoreError> {
        let mut inv = self.fleet_invoke(&self.fleet.note);
        inv.arg(TRIM_BATCH);
        for e in entries {
            inv.arg(&e.scope)
                .arg(e.utilization.to_string())
                .arg(e.expires_at)
                .arg(&e.profile);
        }
        let mut conn = self.conn().await?;
        let _: Value = within(self.timeout, inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    pub(super) async fn list_fleet(
        &self,
        min: f64,
        after: Option<&FleetCursor>,
        count: usize,
    ) -> Result<Vec<FleetEntry>, StoreError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut inv = self.fleet_invoke(&self.fleet.list);
        inv.arg(min.to_string()).arg(count);
        match after {
            Some(c) => inv.arg(c.utilization.to_string()).arg(&c.scope),
            None => inv.arg("").arg(""),
        };
        let mut conn = self.conn().await?;
        let flat: Vec<String> = within(self.timeout, inv.invoke_async(&mut conn)).await?;
        flat.chunks_exact(5).map(entry).collect()
    }

    pub(super) async fn lower_fleet(
        &self,
        scope: &str,
        seen: u64,
        to: f64,
    ) -> Result<(), StoreError> {
        let mut inv = self.fleet_invoke(&self.fleet.lower);
        inv.arg(scope).arg(seen).arg(to.to_string());
        let mut conn = self.conn().await?;
        let _: Value = within(self.timeout, inv.invoke_async(&mut conn)).await?;
        Ok(())
    }
}

fn entry(f: &[String]) -> Result<FleetEntry, StoreError> {
    let bad = |what: &str| StoreError::Protocol(format!("fleet index: unreadable {what}"));
    Ok(FleetEntry {
        scope: f[0].clone(),
        utilization: f[1].parse().map_err(|_| bad("bound"))?,
        profile: f[2].clone(),
        expires_at: f[3].parse::<f64>().map_err(|_| bad("expiry"))? as u64,
        version: f[4].parse().map_err(|_| bad("version"))?,
    })
}
