-- send-gateway quota script: reserve ("r"), charge regardless ("f"), read usage ("u") or
-- judge as a reserve would and charge nothing ("p", probe) for one scope, atomically. The same rules as memory.rs, which is the reference.
--
-- KEYS[1..n]   one hash per window.
--              rolling: t (sum of every bucket held, "m,r,b"), o (oldest slot), n (newest
--              slot), h (the latest current slot a charge saw: a clock that steps back keeps
--              counting from there), and one field per non-empty bucket ("<slot>" ->
--              "m,r,b"), past and scheduled.
--              calendar: t, o, e (the current period's counts, start and end), f (how many
--              later periods are held) and one field per later period ("p<start>" ->
--              "m,r,b,<end>").
-- KEYS[n+1]    the scope's key index (a set of its window keys, for reset)
-- KEYS[n+2]    the idempotency record (used when ARGV[3] > 0)
-- KEYS[n+3]    the scope's profile override setting
-- KEYS[n+4]    the scope's cool-down setting ("<until ms>")
-- KEYS[n+5]    this reservation's release marker: set before the reserve ran (the gateway
--              gave up waiting and released it by id), it means charge nothing
-- KEYS[n+6]    this reservation's record ("<made at>,<last expiry>,<slot>..."), written when
--              ARGV[14] > 0 so a reserve whose answer was lost can be released by id
-- ARGV[1]      now in ms, or "" to read Redis TIME (the default: one clock for all replicas)
-- ARGV[2]      reservation id
-- ARGV[3]      idempotency TTL in ms, 0 for none
-- ARGV[4..6]   cost: messages, recipients, bytes
-- ARGV[7]      mode: "r" reserve, "u" usage, "f" charge whatever the limits say (a send that
--              already went out cost more than was reserved), "p" probe: answer as "r"
--              would (without its release-marker, guard and idempotency checks) and write
--              nothing
-- ARGV[8]      number of windows n
-- ARGV[9]      "1": check the cool-down and the override first; "0": don't
-- ARGV[10]     the override the caller expects ("" for none)
-- ARGV[11]     the instant to charge at in ms, "" for now (a past instant means now)
-- ARGV[12]     most scheduled buckets or periods per window
-- ARGV[13]     furthest ahead a charge may be, in ms
-- ARGV[14]     how long the reservation's record is kept, in ms (0: none)
-- then 12 per window: kind (0 rolling, 1 calendar), limits m r b (0: none),
--   rolling: bucket ms, buckets, then 6 unused; calendar: three candidate periods around
--   the gateway's clock s0 e0 s1 e1 s2 e2; then the period holding ARGV[11] (sa ea, 0 0 for now)
--
-- Reply: status (1 allowed, 0 denied, 2 usage), reservation id, now, denial window
--   (1-based, 0 none), metric (1-3), used, limit, fits at (ms, -1: never), charged at,
--   then 12 per window: charged slot, its expiry, used m r b, scheduled m r b,
--   peak m r b (the fullest a window holding now gets), next unit frees at (-1: nothing).
-- A repeated idempotency key within its TTL answers {3, "<the first reply joined by commas>"}.
-- With checks on: {5, ms left} while cooling down, {4, "<override>"} when the override differs.
-- {6, window} when a charge would hold too many scheduled buckets there, {7, 0} when the
-- instant is too far ahead; {8, 0} when this reservation was released before it ran.
-- Nothing is charged in any of these cases.

local nwin = tonumber(ARGV[8])
local mode = ARGV[7]
local idem_ttl = tonumber(ARGV[3])
local idx_key = KEYS[nwin + 1]
local max_sched = tonumber(ARGV[12])

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

if mode == 'r' and redis.call('EXISTS', KEYS[nwin + 5]) == 1 then return {8, 0} end

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

local at = tonumber(ARGV[11]) or now
if at < now then at = now end
if at - now > tonumber(ARGV[13]) then return {7, 0} end

local cost = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}

local function parse(s)
  if not s then return {0, 0, 0} end
  local a, b, c = string.match(s, '^(%d+),(%d+),(%d+)')
  return {tonumber(a) or 0, tonumber(b) or 0, tonumber(c) or 0}
end

local function fmt(v)
  return string.format('%d,%d,%d', v[1], v[2], v[3])
end

local function add(a, b) for m = 1, 3 do a[m] = a[m] + b[m] end end

-- Every bucket of a rolling window, sorted: {{slot, {m, r, b}}, ...}. Read once per call.
local function stored(w)
  if w.list then return w.list end
  local all = redis.call('HGETALL', w.key)
  local list = {}
  for j = 1, #all, 2 do
    local slot = tonumber(all[j])
    if slot then list[#list + 1] = {slot, parse(all[j + 1])} end
  end
  table.sort(list, function(a, b) return a[1] < b[1] end)
  w.list = list
  return list
end

-- The buckets with slots from lo to hi, sorted: read field by field when that is fewer
-- fields than the hash holds (a grant with many scheduled sends), else the whole hash.
local function range(w, lo, hi)
  local list = {}
  if w.list or not w.count or hi - lo + 1 >= w.count then
    for _, b in ipairs(stored(w)) do
      if b[1] >= lo and b[1] <= hi then list[#list + 1] = b end
    end
    return list
  end
  local from = lo
  while from <= hi do
    local to = math.min(hi, from + 3999)
    local fields = {}
    for slot = from, to do fields[#fields + 1] = slot end
    local vals = redis.call('HMGET', w.key, unpack(fields))
    for j = 1, #fields do
      if vals[j] then list[#list + 1] = {fields[j], parse(vals[j])} end
    end
    from = to + 1
  end
  return list
end

-- Where W(c), the sum the window holds when its newest bucket is c, changes, over the
-- buckets `list`: {{pos, {w}}}.
local function points(w, list)
  local pts, acc = {}, {0, 0, 0}
  local enter, leave = 1, 1
  while leave <= #list do
    local pos = list[leave][1] + w.nb + 1
    if enter <= #list and list[enter][1] < pos then pos = list[enter][1] end
    while leave <= #list and list[leave][1] + w.nb + 1 == pos do
      for m = 1, 3 do acc[m] = acc[m] - list[leave][2][m] end
      leave = leave + 1
    end
    while enter <= #list and list[enter][1] == pos do
      add(acc, list[enter][2])
      enter = enter + 1
    end
    if #pts > 0 and pts[#pts][1] == pos then
      pts[#pts][2] = {acc[1], acc[2], acc[3]}
    else
      pts[#pts + 1] = {pos, {acc[1], acc[2], acc[3]}}
    end
  end
  return pts
end

-- The fullest the window gets over every position holding slot s (which only the buckets
-- from s - nb to s + nb reach).
local function peak(w, s)
  local pts, last, best = points(w, range(w, s - w.nb, s + w.nb)), s + w.nb, {0, 0, 0}
  for j = 1, #pts do
    local pos = pts[j][1]
    if pos > last then break end
    local finish = pts[j + 1] and pts[j + 1][1] or math.huge
    if finish > s then
      for m = 1, 3 do if pts[j][2][m] > best[m] then best[m] = pts[j][2][m] end end
    end
  end
  return best
end

-- The earliest slot >= from at which metric m stays within `room` in every position, over
-- every bucket held.
local function earliest_slot_full(w, from, m, room)
  w.pts = w.pts or points(w, stored(w))
  local pts, s = w.pts, from
  for j = 1, #pts do
    local finish = pts[j + 1] and pts[j + 1][1] or math.huge
    if pts[j][2][m] > room and finish > s then
      if pts[j][1] > s + w.nb then break end
      s = finish
    end
  end
  return s
end

-- The same, reading only the buckets one window length around a candidate at a time: a
-- refused send costs little however much is scheduled further on. Positions s to s + nb
-- depend only on the buckets from s - nb to s + nb; a position there over `room` rules out
-- every candidate up to it. After a few steps, the whole hash is read instead.
local function earliest_slot(w, from, m, room)
  local s = from
  for _ = 1, 4 do
    local pts, bad = points(w, range(w, s - w.nb, s + w.nb)), nil
    for j = 1, #pts do
      local pos = pts[j][1]
      if pos > s + w.nb then break end
      local finish = pts[j + 1] and pts[j + 1][1] or math.huge
      if pts[j][2][m] > room and finish > s then bad = math.min(finish, s + w.nb + 1) - 1 end
    end
    if not bad then return s end
    s = bad + 1
  end
  return earliest_slot_full(w, s, m, room)
end

-- Later periods of a calendar window: {{start, end, {m, r, b}}, ...}, sorted.
local function periods(w)
  if w.later then return w.later end
  local later = {}
  if w.nfut > 0 then
    local all = redis.call('HGETALL', w.key)
    for j = 1, #all, 2 do
      local s = string.match(all[j], '^p(%d+)$')
      if s then
        local v = parse(all[j + 1])
        local e = tonumber(string.match(all[j + 1], ',(%d+)$'))
        later[#later + 1] = {tonumber(s), e, v, all[j]}
      end
    end
    table.sort(later, function(a, b) return a[1] < b[1] end)
  end
  w.later = later
  return later
end

-- The counts of the calendar period holding t, and its end (nil: nothing held there).
local function period_at(w, t)
  if t >= w.start and t < w.finish then return w.totals, w.finish end
  for _, p in ipairs(periods(w)) do
    if t >= p[1] and t < p[2] then return p[3], p[2] end
  end
  return nil, nil
end

local function load_rolling(w, base)
  w.width = tonumber(ARGV[base + 5])
  w.nb = tonumber(ARGV[base + 6])
  local h = redis.call('HMGET', w.key, 't', 'o', 'n', 'h')
  w.totals, w.oldest, w.newest = parse(h[1]), tonumber(h[2]), tonumber(h[3])
  w.meta = 0
  for j = 1, 4 do if h[j] then w.meta = w.meta + 1 end end
  w.high = tonumber(h[4]) or w.newest or 0
  w.has_high = h[4] ~= false
  w.exists = h[1] ~= false
  w.cur = math.max(math.floor(now / w.width), w.high)
  w.min_live = w.cur - w.nb
  if w.oldest and w.oldest < w.min_live then
    -- At least one bucket expired: rebuild from the buckets that are left. This happens
    -- at most once per bucket width, so the common path reads four fields.
    local dead, kept, totals = {}, {}, {0, 0, 0}
    for _, b in ipairs(stored(w)) do
      if b[1] < w.min_live then dead[#dead + 1] = b[1] else kept[#kept + 1] = b; add(totals, b[2]) end
    end
    if #dead > 0 then redis.call('HDEL', w.key, unpack(dead)) end
    w.list, w.totals = kept, totals
    w.oldest = kept[1] and kept[1][1]
    w.newest = kept[#kept] and kept[#kept][1]
    if w.oldest then
      redis.call('HSET', w.key, 't', fmt(totals), 'o', w.oldest, 'n', w.newest)
    else
      redis.call('DEL', w.key)
      w.exists = false
    end
  end
  w.slot_at = math.max(math.floor(at / w.width), w.cur)
  w.fast = (not w.newest or w.newest <= w.cur) and w.slot_at == w.cur
  if not w.fast then w.count = redis.call('HLEN', w.key) - w.meta end
end

local function load_calendar(w, base)
  local s, e
  for k = 0, 2 do
    local ks, ke = tonumber(ARGV[base + 5 + 2 * k]), tonumber(ARGV[base + 6 + 2 * k])
    if now >= ks and now < ke then s, e = ks, ke end
  end
  w.sa, w.ea = tonumber(ARGV[base + 11]), tonumber(ARGV[base + 12])
  local h = redis.call('HMGET', w.key, 't', 'o', 'e', 'f')
  w.exists = h[1] ~= false
  w.nfut = tonumber(h[4]) or 0
  local stored_end = tonumber(h[3])
  if w.exists and stored_end and now < stored_end then
    -- Still in the stored period (also when the clock stepped back: count longer, never less).
    w.totals, w.start, w.finish = parse(h[1]), tonumber(h[2]), stored_end
    return
  end
  if not s then
    return redis.error_reply('calendar window: Redis time is more than a day from the gateway clock')
  end
  w.totals, w.start, w.finish, w.fresh = {0, 0, 0}, s, e, true
  -- The stored period ended: a later period that now holds the clock becomes the current one,
  -- and periods that ended are dropped.
  local later, gone = {}, {}
  for _, p in ipairs(periods(w)) do
    if p[2] <= now then
      gone[#gone + 1] = p[4]
    elseif p[1] <= now then
      w.totals, w.start, w.finish = p[3], p[1], p[2]
      gone[#gone + 1] = p[4]
    else
      later[#later + 1] = p
    end
  end
  if #gone > 0 then redis.call('HDEL', w.key, unpack(gone)) end
  w.later, w.nfut = later, #later
  if w.exists then
    redis.call('HSET', w.key, 't', fmt(w.totals), 'o', w.start, 'e', w.finish, 'f', w.nfut)
  end
end

-- Reads one window, dropping what no longer counts.
local function load(i)
  local base = 14 + (i - 1) * 12
  local w = {key = KEYS[i], kind = tonumber(ARGV[base + 1]),
    limit = {tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])}}
  local err
  if w.kind == 0 then load_rolling(w, base) else err = load_calendar(w, base) end
  if err then return err end
  return w
end

-- What a charge at `at` must fit under.
local function load_at(w)
  if w.kind == 1 then return period_at(w, at) or {0, 0, 0} end
  if w.fast then return w.totals end
  return peak(w, w.slot_at)
end

-- The earliest instant >= t at which window w takes the cost (within each limit).
local function fits_from(w, t)
  if w.kind == 1 then
    for _ = 0, #periods(w) + 1 do
      local v, finish = period_at(w, t)
      if not v then return t end
      local ok = true
      for m = 1, 3 do
        if w.limit[m] > 0 and v[m] + cost[m] > w.limit[m] then ok = false end
      end
      if ok then return t end
      t = finish
    end
    return t
  end
  local first = math.max(math.floor(t / w.width), w.cur)
  local s = first
  repeat
    local before = s
    for m = 1, 3 do
      if w.limit[m] > 0 then s = earliest_slot(w, s, m, w.limit[m] - cost[m]) end
    end
  until s == before
  if s == first then return t end
  return s * w.width
end

-- The window as reported: used, scheduled, peak at now, next unit frees at.
local function view(w)
  if w.kind == 1 then
    local sched = {0, 0, 0}
    for _, p in ipairs(periods(w)) do add(sched, p[3]) end
    local any = w.totals[1] + w.totals[2] + w.totals[3] > 0
    return w.totals, sched, w.totals, any and w.finish or -1
  end
  if not w.newest or w.newest <= w.cur then
    local nf = w.oldest and (w.oldest + w.nb + 1) * w.width or -1
    return w.totals, {0, 0, 0}, w.totals, nf
  end
  local used, nf = {0, 0, 0}, -1
  for _, b in ipairs(range(w, w.cur - w.nb, w.cur)) do
    add(used, b[2])
    if nf < 0 then nf = (b[1] + w.nb + 1) * w.width end
  end
  local sched = {0, 0, 0}
  for m = 1, 3 do sched[m] = math.max(0, w.totals[m] - used[m]) end
  return used, sched, peak(w, w.cur), nf
end

-- Whether charging w at `at` would hold one scheduled bucket or period too many.
local function too_many(w)
  if w.kind == 1 then
    if at < w.finish or period_at(w, at) then return false end
    return w.nfut >= max_sched
  end
  if w.slot_at <= w.cur then return false end
  if redis.call('HEXISTS', w.key, w.slot_at) == 1 then return false end
  local live = #range(w, w.cur - w.nb, w.cur)
  return w.count - live >= max_sched
end

local function charge_rolling(w)
  local slot = w.slot_at
  local raw = redis.call('HGET', w.key, slot)
  if not raw and w.count then w.count = w.count + 1 end
  local v = parse(raw)
  add(v, cost)
  add(w.totals, cost)
  local oldest = w.oldest
  if not oldest or slot < oldest then oldest = slot end
  local newest = w.newest
  local extend = not w.exists or not newest or slot > newest
  if extend then newest = slot end
  redis.call('HSET', w.key, slot, fmt(v), 't', fmt(w.totals), 'o', oldest, 'n', newest)
  if w.cur > w.high or not w.has_high then redis.call('HSET', w.key, 'h', w.cur) end
  w.oldest, w.newest, w.list, w.pts = oldest, newest, nil, nil
  -- The key lives as long as its newest bucket counts.
  return slot, (slot + w.nb + 1) * w.width, extend, (newest + w.nb + 1) * w.width
end

local function charge_calendar(w)
  if at < w.finish then
    add(w.totals, cost)
    redis.call('HSET', w.key, 't', fmt(w.totals), 'o', w.start, 'e', w.finish, 'f', w.nfut)
    return w.start, w.finish, not w.exists or w.fresh, w.finish
  end
  local field = 'p' .. string.format('%d', w.sa)
  local raw = redis.call('HGET', w.key, field)
  if not raw then w.nfut = w.nfut + 1 end
  local v = parse(raw)
  add(v, cost)
  redis.call('HSET', w.key, field, fmt(v) .. ',' .. string.format('%d', w.ea),
    't', fmt(w.totals), 'o', w.start, 'e', w.finish, 'f', w.nfut)
  w.later = nil
  return w.sa, w.ea, true, w.ea
end

local windows = {}
local over = nil
for i = 1, nwin do
  local w = load(i)
  if type(w) ~= 'table' or w.err then return w end
  windows[i] = w
  if mode == 'r' or mode == 'p' then
    local load_v = load_at(w)
    for m = 1, 3 do
      local lim = w.limit[m]
      if lim > 0 and load_v[m] + cost[m] > lim then
        local fit = -1
        if cost[m] <= lim then fit = fits_from(w, at) end
        -- Report one that can never pass first, else the one that frees up last.
        local better = not over or (over.fit >= 0 and (fit < 0 or fit > over.fit))
        if better then over = {win = i, m = m, used = load_v[m], limit = lim, fit = fit} end
        if fit < 0 then windows.never = true end
      end
    end
  end
end

local status = 1
if mode == 'u' then status = 2 elseif over then status = 0 end
-- Mode "f" never looks at the limits: `over` stays nil and the cost is charged.
local reply = {status, ARGV[2], now, 0, 0, 0, 0, -1, at}
if over then
  local fit = -1
  if not windows.never then
    -- The earliest instant every window takes the charge: ask each in turn until all agree.
    fit = at
    for _ = 1, 100000 do
      local next_t = fit
      for i = 1, nwin do next_t = math.max(next_t, fits_from(windows[i], next_t)) end
      if next_t == fit then break end
      fit = next_t
    end
  end
  reply[4], reply[5], reply[6], reply[7], reply[8] = over.win, over.m, over.used, over.limit, fit
end

if status == 1 then
  for i = 1, nwin do
    if too_many(windows[i]) then return {6, i} end
  end
end

local idx_expiry = 0
for i = 1, nwin do
  local w = windows[i]
  local slot, expiry = 0, 0
  if status == 1 and mode ~= 'p' then
    local extend, key_expiry
    if w.kind == 0 then
      slot, expiry, extend, key_expiry = charge_rolling(w)
    else
      slot, expiry, extend, key_expiry = charge_calendar(w)
    end
    if extend then
      -- Relative to the script's clock, which is Redis TIME in production: the same instant
      -- as PEXPIREAT, and still right when a test passes its own clock.
      local pttl = redis.call('PTTL', w.key)
      if pttl < 0 or now + pttl < key_expiry then
        redis.call('PEXPIRE', w.key, math.max(1, key_expiry - now))
      end
      redis.call('SADD', idx_key, w.key)
      if key_expiry > idx_expiry then idx_expiry = key_expiry end
    end
  end
  local used, sched, pk, nf = view(w)
  local base = 9 + (i - 1) * 12
  reply[base + 1], reply[base + 2] = slot, expiry
  for m = 1, 3 do
    reply[base + 2 + m], reply[base + 5 + m], reply[base + 8 + m] = used[m], sched[m], pk[m]
  end
  reply[base + 12] = nf
end

if idx_expiry > 0 then
  local pttl = redis.call('PTTL', idx_key)
  if pttl < 0 or now + pttl < idx_expiry then redis.call('PEXPIRE', idx_key, math.max(1, idx_expiry - now)) end
end

local record_ttl = tonumber(ARGV[14]) or 0
if status == 1 and mode == 'r' and record_ttl > 0 then
  local parts, last = {string.format('%d', now), '0'}, 0
  for i = 1, nwin do
    local base = 9 + (i - 1) * 12
    parts[#parts + 1] = string.format('%d', reply[base + 1])
    if reply[base + 2] > last then last = reply[base + 2] end
  end
  parts[2] = string.format('%d', last)
  redis.call('SET', KEYS[nwin + 6], table.concat(parts, ','), 'PX', record_ttl)
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
