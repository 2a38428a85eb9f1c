-- send-gateway quota script: reserve ("r") or read usage ("u") for one scope, atomically.
--
-- KEYS[1..n]   one hash per window: fields t (totals "m,r,b"), o (oldest slot), n (newest slot)
--              and, for rolling windows, one field per non-empty bucket ("<slot>" -> "m,r,b");
--              calendar windows keep t, o (period start) and e (period end) only
-- KEYS[n+1]    the scope's key index (a set of its window keys, for reset)
-- KEYS[n+2]    the idempotency record (used when ARGV[3] > 0)
-- KEYS[n+3]    the scope's profile override setting
-- KEYS[n+4]    the scope's cool-down setting ("<until ms>")
-- ARGV[1]      now in ms, or "" to read Redis TIME (the default: one clock for all replicas)
-- ARGV[2]      reservation id
-- ARGV[3]      idempotency TTL in ms, 0 for none
-- ARGV[4..6]   cost: messages, recipients, bytes
-- ARGV[7]      mode: "r" reserve, "u" usage, "f" charge whatever the limits say (a send that
--              already went out cost more than was reserved)
-- ARGV[8]      number of windows n
-- ARGV[9]      "1": check the cool-down and the override first; "0": don't
-- ARGV[10]     the override the caller expects ("" for none)
-- then 10 per window: kind (0 rolling, 1 calendar), limits m r b (0: none),
--   rolling: bucket ms, buckets; calendar: three candidate periods s0 e0 s1 e1 s2 e2
--
-- Reply: status (1 allowed, 0 denied, 2 usage), reservation id, now,
--   denial window (1-based, 0 none), metric (1-3), used, limit, retry ms (-1: never),
--   then 6 per window: charged slot, its expiry, used m r b, next unit frees at (-1: nothing)
-- A repeated idempotency key within its TTL answers {3, "<the first reply joined by commas>"}.
-- With checks on: {5, ms left} while cooling down, {4, "<override>"} when the override differs;
-- nothing is charged in either case.

local nwin = tonumber(ARGV[8])
local mode = ARGV[7]
local idem_ttl = tonumber(ARGV[3])
local idx_key = KEYS[nwin + 1]

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

if mode == 'r' and ARGV[9] == '1' then
  local cool = tonumber(redis.call('GET', KEYS[nwin + 4]) or '')
  if cool and cool > now then return {5, cool - now} end
  local override = redis.call('GET', KEYS[nwin + 3]) or ''
  if override ~= ARGV[10] then return {4, override} end
end

if mode == 'r' and idem_ttl > 0 then
  -- "<expires at ms>;<first reply>": the stored instant keeps the TTL exact on the script's
  -- clock; the key's own PX is a backstop.
  local prior = redis.call('GET', KEYS[nwin + 2])
  if prior then
    local expires, first = string.match(prior, '^(%d+);(.*)$')
    if expires and tonumber(expires) > now then return {3, first} end
  end
end

local cost = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}

local function parse(s)
  if not s then return {0, 0, 0} end
  local a, b, c = string.match(s, '^(%d+),(%d+),(%d+)$')
  return {tonumber(a) or 0, tonumber(b) or 0, tonumber(c) or 0}
end

local function fmt(v)
  return string.format('%d,%d,%d', v[1], v[2], v[3])
end

-- Reads one window, dropping what no longer counts. Returns its state table.
local function load(i)
  local base = 10 + (i - 1) * 10
  local w = {key = KEYS[i], kind = tonumber(ARGV[base + 1]),
    limit = {tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])}}
  if w.kind == 0 then
    w.width = tonumber(ARGV[base + 5])
    w.nb = tonumber(ARGV[base + 6])
    w.cur = math.floor(now / w.width)
    w.min_live = w.cur - w.nb
    local h = redis.call('HMGET', w.key, 't', 'o', 'n')
    w.totals = parse(h[1])
    w.oldest = tonumber(h[2])
    w.newest = tonumber(h[3])
    w.exists = h[1] ~= false
    if w.oldest and w.oldest < w.min_live then
      -- At least one bucket expired: rebuild from the buckets that are left. This happens
      -- at most once per bucket width, so the common path reads three fields.
      local all = redis.call('HGETALL', w.key)
      local dead = {}
      local totals, oldest, newest = {0, 0, 0}, nil, nil
      for j = 1, #all, 2 do
        local slot = tonumber(all[j])
        if slot then
          if slot < w.min_live then
            dead[#dead + 1] = all[j]
          else
            local v = parse(all[j + 1])
            for m = 1, 3 do totals[m] = totals[m] + v[m] end
            if not oldest or slot < oldest then oldest = slot end
            if not newest or slot > newest then newest = slot end
          end
        end
      end
      if #dead > 0 then redis.call('HDEL', w.key, unpack(dead)) end
      w.totals, w.oldest, w.newest = totals, oldest, newest
      if oldest then
        redis.call('HSET', w.key, 't', fmt(totals), 'o', oldest, 'n', newest)
      else
        redis.call('DEL', w.key)
        w.exists = false
      end
    end
    w.next_free = w.oldest and (w.oldest + w.nb + 1) * w.width or -1
  else
    local s, e
    for k = 0, 2 do
      local ks, ke = tonumber(ARGV[base + 5 + 2 * k]), tonumber(ARGV[base + 6 + 2 * k])
      if now >= ks and now < ke then s, e = ks, ke end
    end
    local h = redis.call('HMGET', w.key, 't', 'o', 'e')
    w.exists = h[1] ~= false
    local stored_end = tonumber(h[3])
    if w.exists and stored_end and now < stored_end then
      -- Still in the stored period (also when the clock stepped back: count longer, never less).
      w.totals, w.start, w.finish = parse(h[1]), tonumber(h[2]), stored_end
    else
      if not s then
        return redis.error_reply('calendar window: Redis time is more than a day from the gateway clock')
      end
      w.totals, w.start, w.finish = {0, 0, 0}, s, e
      w.fresh = true
    end
    local any = w.totals[1] + w.totals[2] + w.totals[3] > 0
    w.next_free = any and w.finish or -1
  end
  return w
end

-- Instant at which at least `need` units of metric m will have expired in window w.
local function free_at(w, m, need)
  if w.kind == 1 then return w.finish end
  local all = redis.call('HGETALL', w.key)
  local slots = {}
  for j = 1, #all, 2 do
    local slot = tonumber(all[j])
    if slot and slot >= w.min_live then slots[#slots + 1] = {slot, parse(all[j + 1])[m]} end
  end
  table.sort(slots, function(a, b) return a[1] < b[1] end)
  local freed = 0
  for _, s in ipairs(slots) do
    freed = freed + s[2]
    if freed >= need then return (s[1] + w.nb + 1) * w.width end
  end
  return (w.cur + w.nb + 1) * w.width
end

local windows = {}
local over = nil
for i = 1, nwin do
  local w = load(i)
  if type(w) ~= 'table' or w.err then return w end
  windows[i] = w
  if mode == 'r' then
    for m = 1, 3 do
      local lim = w.limit[m]
      if lim > 0 and w.totals[m] + cost[m] > lim then
        local retry = -1
        if cost[m] <= lim then retry = free_at(w, m, w.totals[m] + cost[m] - lim) - now end
        -- Report one that can never pass first, else the one that frees up last.
        local better = not over
          or (over.retry >= 0 and (retry < 0 or retry > over.retry))
        if better then over = {win = i, m = m, used = w.totals[m], limit = lim, retry = retry} end
      end
    end
  end
end

local status = 1
if mode == 'u' then status = 2 elseif over then status = 0 end
-- Mode "f" never looks at the limits: `over` stays nil and the cost is charged.
local reply = {status, ARGV[2], now, 0, 0, 0, 0, 0}
if over then
  reply[4], reply[5], reply[6], reply[7], reply[8] = over.win, over.m, over.used, over.limit, over.retry
end

local idx_expiry = 0
for i = 1, nwin do
  local w = windows[i]
  local slot, expiry, extend = 0, 0, false
  if status == 1 then
    if w.kind == 0 then
      slot = w.cur
      -- A clock that stepped back charges the newest bucket: counted longer, never less.
      if w.newest and w.newest > slot then slot = w.newest end
      local v = parse(redis.call('HGET', w.key, slot))
      for m = 1, 3 do
        v[m] = v[m] + cost[m]
        w.totals[m] = w.totals[m] + cost[m]
      end
      local oldest = w.oldest
      if not oldest or slot < oldest then oldest = slot end
      expiry = (slot + w.nb + 1) * w.width
      -- The key's expiry only moves when a newer bucket opens (once per bucket width).
      extend = not w.exists or w.newest ~= slot
      if extend then
        redis.call('HSET', w.key, slot, fmt(v), 't', fmt(w.totals), 'o', oldest, 'n', slot)
      else
        redis.call('HSET', w.key, slot, fmt(v), 't', fmt(w.totals))
      end
      w.next_free = (oldest + w.nb + 1) * w.width
    else
      slot, expiry = w.start, w.finish
      for m = 1, 3 do w.totals[m] = w.totals[m] + cost[m] end
      extend = not w.exists or w.fresh
      if extend then
        redis.call('HSET', w.key, 't', fmt(w.totals), 'o', w.start, 'e', w.finish)
      else
        redis.call('HSET', w.key, 't', fmt(w.totals))
      end
      w.next_free = w.finish
    end
    if extend then
      -- Relative to the script's clock, which is Redis TIME in production: the same instant
      -- as PEXPIREAT, and still right when a test passes its own clock.
      redis.call('PEXPIRE', w.key, math.max(1, expiry - now))
      redis.call('SADD', idx_key, w.key)
      if expiry > idx_expiry then idx_expiry = expiry end
    end
  end
  local base = 8 + (i - 1) * 6
  reply[base + 1], reply[base + 2] = slot, expiry
  reply[base + 3], reply[base + 4], reply[base + 5] = w.totals[1], w.totals[2], w.totals[3]
  reply[base + 6] = w.next_free
end

if idx_expiry > 0 then
  local pttl = redis.call('PTTL', idx_key)
  if pttl < 0 or now + pttl < idx_expiry then redis.call('PEXPIRE', idx_key, math.max(1, idx_expiry - now)) end
end

-- Only admitted requests are remembered: a denied one retried after retry_after is judged afresh.
if status == 1 and idem_ttl > 0 then
  local parts = {}
  for j = 1, #reply do
    local v = reply[j]
    if type(v) == 'number' then parts[j] = string.format('%d', v) else parts[j] = v end
  end
  local record = string.format('%d', now + idem_ttl) .. ';' .. table.concat(parts, ',')
  redis.call('SET', KEYS[nwin + 2], record, 'PX', idem_ttl)
end
return reply
