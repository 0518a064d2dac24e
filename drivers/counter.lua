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
--   "m"    the summary, four little-endian 64-bit integers (struct '<i8i8i8i8'):
--          s  start: every bucket field below it has been deleted
--          u  used: the sum of the bucket fields at or above s
--          n  the newest bucket with a positive amount (-1: none); every bucket field
--             lies within s .. n
--          a  the bucket in which the row last crossed its near-limit mark (-1: never;
--             admit.lua)
-- so an admission reads two fields ("m" and the current bucket) and writes them back,
-- in one HMGET and one HSET per row: its cost does not grow with window / bucket, and
-- few values cross between Lua and Redis (each crossing costs about as much as the
-- arithmetic of a row). The key expires when its newest bucket leaves the window, so
-- idle counters vanish.
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

local SUMMARY = '<i8i8i8i8'

-- A counter's summary, given its field "m" as read (false: none), as seen from bucket
-- `oldest` (the oldest live one): start, used, newest, alert, the bucket fields that
-- left the window (to delete; nil if none), and whether it differs from what is stored
-- (to write back). Reads (the stale fields' values, rare: once per bucket that left
-- the window); never writes.
local function summary(key, m, oldest)
  local s, u, n, al
  if m then
    s, u, n, al = struct.unpack(SUMMARY, m)
  else
    -- No summary: a new counter, or one written by an older version (fields "s", "u",
    -- "n"): count its bucket fields once.
    local flat = redis.call('HGETALL', key)
    local stale = nil
    u, n = 0, -1
    for j = 1, #flat, 2 do
      local b = tonumber(flat[j])
      if b ~= nil then
        if b < oldest then
          stale = stale or {}
          stale[#stale + 1] = flat[j]
        else
          local v = tonumber(flat[j + 1])
          if v > 0 then
            u = u + v
            if b > n then
              n = b
            end
          end
        end
      end
    end
    return oldest, u, n, -1, stale, true
  end
  if s >= oldest then
    return s, u, n, al, nil, false
  end
  if n < s then
    return oldest, 0, -1, al, nil, true -- no bucket fields at all
  end
  local stale = {}
  if n < oldest then
    -- Every bucket left the window: delete them all, nothing to read.
    for b = s, n do
      stale[#stale + 1] = int(b)
    end
    return oldest, 0, -1, al, stale, true
  end
  -- Buckets s .. oldest-1 have left the window since the last write: at most span + 1.
  for b = s, oldest - 1 do
    stale[#stale + 1] = int(b)
  end
  local values = redis.call('HMGET', key, unpack(stale))
  for j = 1, #stale do
    local v = tonumber(values[j])
    if v ~= nil and v > 0 then
      u = u - v
    end
  end
  return oldest, u, n, al, stale, true
end

-- The newest bucket from `top` down to `oldest` with a positive amount (-1: none).
-- Only when the newest bucket was emptied (a full refund), which is rare.
local function newest_live(key, top, oldest)
  if top < oldest then
    return -1
  end
  local fields = {}
  for b = top, oldest, -1 do
    fields[#fields + 1] = int(b)
  end
  local values = redis.call('HMGET', key, unpack(fields))
  for j = 1, #fields do
    local v = tonumber(values[j])
    if v ~= nil and v > 0 then
      return top - j + 1
    end
  end
  return -1
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
