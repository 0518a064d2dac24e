-- usage.lua: read rows' current state without consuming anything; read-only.
-- Times in milliseconds, from the Redis server's own clock (TIME); amounts in the
-- row's units. Runs after counter.lua (now, a, int, encode, summary, newest_live,
-- keep, leases, retry_ms).
--
-- KEYS[i]  the counter hash (or, for a lease row, the lease set) of row i
-- ARGV[1]  (packed, see counter.lua) four integers per row i, a[4i-3 .. 4i]:
--          bucket_ms, span (-1: a lease row), limit, amount
--
-- Returns (packed) for each row: used, reset_ms (when the newest non-empty bucket
-- leaves the window, or the last lease expires; 0 when nothing is used), fits (1/0:
-- whether `amount` more would fit, as admit.lua checks it) and retry_ms (for a row
-- that does not fit, when it would, as admit.lua reports it; -1: never, or it fits).

local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local bucket_ms, span, limit, amount = a[4 * i - 3], a[4 * i - 2], a[4 * i - 1], a[4 * i]
  local used, reset, retry = 0, 0, -1
  if span < 0 then
    used = redis.call('ZCOUNT', key, '(' .. int(now), '+inf')
    if used > 0 then
      local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      reset = tonumber(last[2]) - now
    end
    if used + amount > limit and amount <= limit then
      retry = 1000
    end
  else
    local c = math.floor(now / bucket_ms)
    local m = redis.call('HGET', key, 'm')
    local _, u, newest = summary(key, m, c - span)
    used = u
    reset = newest >= 0 and (newest + span + 1) * bucket_ms - now or 0
    if used + amount > limit and amount <= limit then
      retry = retry_ms(key, c - span, math.max(c, newest), span, bucket_ms, used, amount, limit)
    end
  end
  out[#out + 1] = used
  out[#out + 1] = reset
  out[#out + 1] = used + amount <= limit and 1 or 0
  out[#out + 1] = retry
end
return encode(out)
