-- send-gateway release script: give back one reservation, at most once.
--
-- KEYS[1..n]  the window hashes that were charged
-- KEYS[n+1]   the release marker of this reservation
-- KEYS[n+2]   the scope's reset mark ("<ms>"): a reservation made until then gives nothing back
-- KEYS[n+3]   its idempotency record, if it was admitted under a key: forgotten here, so a
--             retry of a send that did not happen is counted again
-- ARGV[1]     the marker's lifetime in ms (until the last charged bucket expires, plus a margin)
-- ARGV[2..4]  the cost: messages, recipients, bytes
-- ARGV[5]     n
-- then 2 per window: kind (0 rolling, 1 calendar), charged slot; last, the reservation id and
-- the instant it was made (ms)
-- Reply: 1 released, 0 already released (or made before the scope was reset).

local nwin = tonumber(ARGV[5])
local reset_at = tonumber(redis.call('GET', KEYS[nwin + 2]) or '')
if reset_at and tonumber(ARGV[7 + nwin * 2]) <= reset_at then return 0 end
if not redis.call('SET', KEYS[nwin + 1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
local cost = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])}

if KEYS[nwin + 3] then
  -- The record reads "<expires>;<status>,<reservation id>,...": drop it only if it is ours.
  local record = redis.call('GET', KEYS[nwin + 3])
  if record and string.match(record, '^%d+;%d+,(%d+),') == ARGV[6 + nwin * 2] then
    redis.call('DEL', KEYS[nwin + 3])
  end
end

local function parse(s)
  if not s then return {0, 0, 0} end
  local a, b, c = string.match(s, '^(%d+),(%d+),(%d+)')
  return {tonumber(a) or 0, tonumber(b) or 0, tonumber(c) or 0}
end

local function fmt(v)
  return string.format('%d,%d,%d', v[1], v[2], v[3])
end

for i = 1, nwin do
  local key = KEYS[i]
  local kind, slot = tonumber(ARGV[6 + (i - 1) * 2]), ARGV[7 + (i - 1) * 2]
  if kind == 0 then
    local raw = redis.call('HGET', key, slot)
    if raw then
      local v, totals = parse(raw), parse(redis.call('HGET', key, 't'))
      for m = 1, 3 do
        local taken = math.min(v[m], cost[m])
        v[m] = v[m] - taken
        totals[m] = math.max(0, totals[m] - taken)
      end
      if v[1] + v[2] + v[3] == 0 then
        redis.call('HDEL', key, slot)
        -- Keep o and n naming buckets that exist, so "next unit frees at" stays exact.
        local oldest, newest = nil, nil
        for _, f in ipairs(redis.call('HKEYS', key)) do
          local s = tonumber(f)
          if s then
            if not oldest or s < oldest then oldest = s end
            if not newest or s > newest then newest = s end
          end
        end
        if oldest then
          redis.call('HSET', key, 't', fmt(totals), 'o', oldest, 'n', newest)
        else
          redis.call('DEL', key)
        end
      else
        redis.call('HSET', key, slot, fmt(v), 't', fmt(totals))
      end
    end
  else
    -- The current period keeps its counts in t; a later one in its own field "p<start>".
    local h = redis.call('HMGET', key, 't', 'o', 'p' .. slot)
    if h[1] and h[2] == slot then
      local totals = parse(h[1])
      for m = 1, 3 do totals[m] = math.max(0, totals[m] - cost[m]) end
      redis.call('HSET', key, 't', fmt(totals))
    elseif h[3] then
      local v = parse(h[3])
      local finish = string.match(h[3], ',(%d+)$')
      for m = 1, 3 do v[m] = math.max(0, v[m] - cost[m]) end
      redis.call('HSET', key, 'p' .. slot, fmt(v) .. ',' .. finish)
    end
  end
end
return 1
