-- settle.lua: add a delta (possibly negative) to the bucket where each row was reserved.
-- Times in milliseconds, from the Redis server's own clock (TIME); amounts in the
-- row's units. Runs after counter.lua (now, a, int, encode, load, keep, newest_live).
--
-- KEYS[i]  the counter hash of row i (see counter.lua)
-- ARGV[1]  four integers per row i, a[4i-3 .. 4i]: bucket_ms, span, bucket, delta
--
-- A bucket that has already left its window is not touched (the refund would land in
-- no window at all); a bucket never goes below 0 (a bucket at 0 is deleted).
-- Returns the number of buckets changed.

local changed = 0
for i = 1, #KEYS do
  local key = KEYS[i]
  local bucket_ms, span, bucket, delta = a[4 * i - 3], a[4 * i - 2], a[4 * i - 1], a[4 * i]
  local oldest = math.floor(now / bucket_ms) - span
  if delta ~= 0 and bucket >= oldest then
    local s, u, n, stale = load(key, oldest, span)
    if bucket >= s then -- (below s only if the server clock went back: already gone)
      if stale then
        redis.call('HDEL', key, unpack(stale))
      end
      local field = int(bucket)
      local before = tonumber(redis.call('HGET', key, field)) or 0
      local after = before + delta
      if after > 0 then
        redis.call('HSET', key, field, int(after))
        -- The key may be new (expired meanwhile) or older than its TTL says.
        keep(key, (bucket + span + 1) * bucket_ms - now)
      else
        after = 0
        redis.call('HDEL', key, field)
      end
      u = u - (before > 0 and before or 0) + after
      if after > 0 and bucket > n then
        n = bucket
      elseif after == 0 and bucket == n then
        n = newest_live(key, oldest)
      end
      redis.call('HSET', key, 's', int(s), 'u', int(u), 'n', int(n))
      if after == 0 then
        keep(key, (bucket + span + 1) * bucket_ms - now) -- never a key without a TTL
      end
      changed = changed + 1
    end
  end
end
return changed
