-- settle.lua: add a delta (possibly negative) to the bucket where each row was
-- reserved, and release the reservation's lease; atomically.
-- Times in milliseconds, from the Redis server's own clock (TIME); amounts in the
-- row's units. Runs after counter.lua (now, a, int, encode, summary, newest_live,
-- keep, leases).
--
-- KEYS[i]  the counter hash (or, for a lease row, the lease set) of row i
-- ARGV[1]  (packed, see counter.lua) four integers per row i, a[4i-3 .. 4i]:
--          bucket_ms, span, bucket, delta (a lease row: span -1, the rest ignored);
--          then the lease id to release from every lease row (0: none).
--
-- A refund (delta < 0) to a bucket that has already left its window is dropped (it
-- would land in no window at all); a charge (delta > 0) to such a bucket is added to
-- the current bucket instead: what was really used is never dropped. A bucket of -1
-- (NOT_RESERVED: a shadow row that was not consumed) is never touched. A bucket never
-- goes below 0 (a bucket at 0 is deleted). Rows may name the same counter, even in
-- different buckets (a write-back after an outage): they are applied one after the
-- other.
-- Returns the number of buckets changed and leases released.

local lease_id = a[4 * #KEYS + 1]
local changed = 0
for i = 1, #KEYS do
  local key = KEYS[i]
  local bucket_ms, span, bucket, delta = a[4 * i - 3], a[4 * i - 2], a[4 * i - 1], a[4 * i]
  local current = math.floor(now / bucket_ms)
  local oldest = current - span
  if span >= 0 and delta > 0 and bucket >= 0 and bucket < oldest then
    bucket = current
  end
  if span < 0 then
    changed = changed + redis.call('ZREM', key, int(lease_id))
  elseif delta ~= 0 and bucket >= oldest then
    local field = int(bucket)
    local m = redis.call('HGET', key, 'm')
    local s, u, n, al, stale, _, v = summary(key, m, oldest)
    if bucket >= s then -- (below s only if the server clock went back: already gone)
      if stale then
        redis.call('HDEL', key, unpack(stale))
      end
      local before = amount_in(key, bucket, n, v)
      local after = before + delta
      -- The key may be new (expired meanwhile) or its TTL shorter than this bucket
      -- needs; otherwise it already lives until its newest bucket leaves.
      local extend = not m or bucket > n
      u = u - (before > 0 and before or 0) + (after > 0 and after or 0)
      if after > 0 then
        if bucket >= n then
          n, v = bucket, after
        end
        redis.call('HSET', key, field, int(after), 'm', struct.pack(SUMMARY, s, u, n, al, v))
      else
        redis.call('HDEL', key, field)
        if bucket == n then
          n, v = newest_live(key, bucket - 1, oldest)
        end
        redis.call('HSET', key, 'm', struct.pack(SUMMARY, s, u, n, al, v))
      end
      if extend then
        keep(key, (bucket + span + 1) * bucket_ms - now) -- never a key without a TTL
      end
      changed = changed + 1
    end
  end
end
return changed
