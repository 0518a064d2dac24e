-- counter.lua: the sliding-window counters and leases, shared by admit.lua, settle.lua,
-- usage.lua and renew.lua (the driver prepends it to each, so each is still ONE script
-- run atomically).
-- Times in milliseconds, from the Redis server's own clock (TIME); amounts in the
-- row's units (requests or tokens). Same arithmetic as drivers/memory.py:
--   current bucket c = floor(now / bucket_ms), span = ceil(window_ms / bucket_ms),
--   live buckets: c - span .. (newer), amount > 0; used = their sum;
--   bucket b leaves the window when the clock reaches (b + span + 1) * bucket_ms.
--
-- One hash per counter (KEYS[i] of row i). Fields:
--   "<b>"  the amount admitted in bucket b (an absolute bucket index, in decimal;
--          0 after a full refund: counts nothing, deleted when b leaves the window)
--   "m"    the summary, five little-endian 64-bit integers (struct '<i8i8i8i8i8'):
--          s  start: every bucket field below it has been deleted
--          u  used: the sum of the bucket fields at or above s
--          n  the newest bucket with a positive amount (-1: none); every bucket field
--             lies within s .. n (a field above n can only hold 0)
--          a  the bucket in which the row last crossed its near-limit mark (-1: never;
--             admit.lua)
--          v  the amount in bucket n (0 when n is -1): a copy of its field, so that an
--             admission in the newest bucket (nearly all of them) needs only "m"
-- so an admission reads one field ("m") and writes two (the current bucket and "m"),
-- in one HGET and one HSET per row: its cost does not grow with window / bucket, and
-- few values cross between Lua and Redis (each crossing costs about as much as the
-- arithmetic of a row). The key expires when its newest bucket leaves the window, so
-- idle counters vanish. A summary of four integers (no v: written by an older
-- version, which also ignores v) is read too; its v is then read from field n. Every
-- bucket field is still written, so older versions reading this layout count right.
--
-- A lease row (span -1) is a sorted set instead: lease id -> expiry (ms); expired
-- leases are pruned on every admission. It expires with its last lease.
--
-- Arguments and replies are little-endian 64-bit integers (struct 'i8'), packed by
-- the driver: ARGV[1] holds every integer of the call (see each script).

if redis.replicate_commands then
  redis.replicate_commands() -- TIME before writes: replicate effects (no-op on Redis 7)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- ARGV[1]: the call's integers (struct.unpack also returns the next position: ignored).
local a = { struct.unpack('<' .. string.rep('i8', #ARGV[1] / 8), ARGV[1]) }

-- %d, not tostring: exact for every integer below 2^53 (tostring rounds to 14 digits)
local function int(x)
  return string.format('%d', x)
end

-- The reply: integers packed as the arguments are.
local function encode(values)
  return struct.pack('<' .. string.rep('i8', #values), unpack(values))
end

local SUMMARY = '<i8i8i8i8i8'
local SUMMARY_WITHOUT_V = '<i8i8i8i8' -- (written by an older version)

-- A counter's summary, given its field "m" as read (false: none), as seen from bucket
-- `oldest` (the oldest live one): start, used, newest, alert, the bucket fields that
-- left the window (to delete; nil if none), whether it differs from what is stored
-- (to write back), and the amount in the newest bucket. Reads (the stale fields'
-- values, rare: once per bucket that left the window; field n of a summary without
-- v); never writes.
local function summary(key, m, oldest)
  local s, u, n, al, v
  if m then
    if #m >= 40 then
      s, u, n, al, v = struct.unpack(SUMMARY, m)
    else
      s, u, n, al = struct.unpack(SUMMARY_WITHOUT_V, m)
      v = n >= 0 and tonumber(redis.call('HGET', key, int(n))) or 0
    end
  else
    -- No summary: a new counter, or one written by an older version (fields "s", "u",
    -- "n"): count its bucket fields once.
    local flat = redis.call('HGETALL', key)
    local stale = nil
    u, n, v = 0, -1, 0
    for j = 1, #flat, 2 do
      local b = tonumber(flat[j])
      if b ~= nil then
        if b < oldest then
          stale = stale or {}
          stale[#stale + 1] = flat[j]
        else
          local amount = tonumber(flat[j + 1])
          if amount > 0 then
            u = u + amount
            if b > n then
              n, v = b, amount
            end
          end
        end
      end
    end
    return oldest, u, n, -1, stale, true, v
  end
  if s >= oldest then
    return s, u, n, al, nil, false, v
  end
  if n < s then
    return oldest, 0, -1, al, nil, true, 0 -- no bucket fields at all
  end
  local stale = {}
  if n < oldest then
    -- Every bucket left the window: delete them all, nothing to read.
    for b = s, n do
      stale[#stale + 1] = int(b)
    end
    return oldest, 0, -1, al, stale, true, 0
  end
  -- Buckets s .. oldest-1 have left the window since the last write: at most span + 1.
  for b = s, oldest - 1 do
    stale[#stale + 1] = int(b)
  end
  local values = redis.call('HMGET', key, unpack(stale))
  for j = 1, #stale do
    local amount = tonumber(values[j])
    if amount ~= nil and amount > 0 then
      u = u - amount
    end
  end
  return oldest, u, n, al, stale, true, v
end

-- The amount in bucket `b` of a counter whose newest bucket is `n`, holding `v`: from
-- the summary when b is n (no field read); 0 above n (nothing lives there).
local function amount_in(key, b, n, v)
  if b == n then
    return v
  elseif b > n then
    return 0
  end
  return tonumber(redis.call('HGET', key, int(b))) or 0
end

-- The newest bucket from `top` down to `oldest` with a positive amount (-1: none) and
-- its amount (0: none). Only when the newest bucket was emptied (a full refund), which
-- is rare.
local function newest_live(key, top, oldest)
  if top < oldest then
    return -1, 0
  end
  local fields = {}
  for b = top, oldest, -1 do
    fields[#fields + 1] = int(b)
  end
  local values = redis.call('HMGET', key, unpack(fields))
  for j = 1, #fields do
    local amount = tonumber(values[j])
    if amount ~= nil and amount > 0 then
      return top - j + 1, amount
    end
  end
  return -1, 0
end

-- Make sure the key lives at least `ttl` more milliseconds.
local function keep(key, ttl)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end

-- The live leases of a lease set (expired ones are pruned) and when the last expires
-- (ms from now; 0 when none).
local function leases(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local used = redis.call('ZCARD', key)
  local reset = 0
  if used > 0 then
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    reset = tonumber(last[2]) - now
  end
  return used, reset
end

-- When a request of `amount` fits, if no other traffic comes: the moment the oldest
-- live buckets (ascending, buckets oldest .. top) have left enough room (ms from now;
-- -1: never within them). For a row that does not fit only.
local function retry_ms(key, oldest, top, span, bucket_ms, used, amount, limit)
  local fields = {}
  for b = oldest, top do
    fields[#fields + 1] = int(b)
  end
  local values = redis.call('HMGET', key, unpack(fields))
  local freed = 0
  for j = 1, #fields do
    local v = tonumber(values[j])
    if v ~= nil and v > 0 then
      freed = freed + v
      if used - freed + amount <= limit then
        return (oldest + j + span) * bucket_ms - now -- bucket oldest + j - 1 leaves
      end
    end
  end
  return -1
end
