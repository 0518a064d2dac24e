-- usage.lua: read rows' current state without consuming anything; read-only.
-- Times in milliseconds, from the Redis server's own clock (TIME); amounts in the
-- row's units. Runs after counter.lua (now, a, int, encode, summary, newest_live,
-- keep, leases).
--
-- KEYS[i]  the counter hash (or, for a lease row, the lease set) of row i
-- ARGV[1]  (packed, see counter.lua) two integers per row i, a[2i-1 .. 2i]: bucket_ms,
--          span (-1: a lease row)
--
-- Returns (packed) for each row: used, reset_ms (when the newest non-empty bucket
-- leaves the window, or the last lease expires; 0 when nothing is used).

local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local bucket_ms, span = a[2 * i - 1], a[2 * i]
  if span < 0 then
    local used = redis.call('ZCOUNT', key, '(' .. int(now), '+inf')
    local reset = 0
    if used > 0 then
      local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      reset = tonumber(last[2]) - now
    end
    out[#out + 1] = used
    out[#out + 1] = reset
  else
    local m = redis.call('HGET', key, 'm')
    local _, used, newest = summary(key, m, math.floor(now / bucket_ms) - span)
    out[#out + 1] = used
    out[#out + 1] = newest >= 0 and (newest + span + 1) * bucket_ms - now or 0
  end
end
return encode(out)
