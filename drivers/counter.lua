-- counter.lua: the sliding-window counter, shared by admit.lua, settle.lua and usage.lua
-- (the driver prepends it to each, so each is still ONE script run atomically).
-- Times in milliseconds, from the Redis server's own clock (TIME); amounts in the
-- row's units (requests or tokens). Same arithmetic as drivers/memory.py:
--   current bucket c = floor(now / bucket_ms), span = ceil(window_ms / bucket_ms),
--   live buckets: c - span .. (newer), amount > 0; used = their sum;
--   bucket b leaves the window when the clock reaches (b + span + 1) * bucket_ms.
--
-- One hash per counter. Fields:
--   "<b>"  the amount admitted in bucket b (an absolute bucket index, in decimal)
--   "s"    start: every bucket field below it has been deleted
--   "u"    used: the sum of the positive bucket fields at or above "s"
--   "n"    the newest bucket with a positive amount (-1: none)
-- so an admission reads three fields, not every bucket of the window: its cost does
-- not grow with window / bucket. The key expires when its newest bucket leaves the
-- window, so idle counters vanish.

if redis.replicate_commands then
  redis.replicate_commands() -- TIME before writes: replicate effects (no-op on Redis 7)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- ARGV[1]: the integers of every row, separated by spaces.
local a = {}
for word in string.gmatch(ARGV[1], '%S+') do
  a[#a + 1] = tonumber(word)
end

-- %d, not tostring: exact for every integer below 2^53 (tostring rounds to 14 digits)
local function int(x)
  return string.format('%d', x)
end

-- Integers as one string separated by spaces (a bulk reply parses much faster than an
-- array of integers).
local function encode(values)
  return string.format('%d' .. string.rep(' %d', #values - 1), unpack(values))
end

-- The newest bucket at or above `oldest` with a positive amount (-1: none), by reading
-- every field. Only when that bucket was emptied, which is rare.
local function newest_live(key, oldest)
  local newest = -1
  local flat = redis.call('HGETALL', key)
  for j = 1, #flat, 2 do
    local b = tonumber(flat[j])
    if b ~= nil and b >= oldest and b > newest and tonumber(flat[j + 1]) > 0 then
      newest = b
    end
  end
  return newest
end

-- The counter as seen from bucket `oldest` (the oldest live one):
-- start, used, newest, stale (bucket fields to delete, or nil), dirty (whether "s",
-- "u", "n" must be written back). Reads only; the caller writes.
local function load(key, oldest, span)
  local m = redis.call('HMGET', key, 's', 'u', 'n')
  local s, u, n = tonumber(m[1]), tonumber(m[2]), tonumber(m[3])
  if s == nil or u == nil or n == nil or oldest - s > span + 1 then
    -- A new key (or one without its summary): count every field.
    local stale = nil
    s, u, n = oldest, 0, -1
    local flat = redis.call('HGETALL', key)
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
    return s, u, n, stale, #flat > 0
  end
  if s >= oldest then
    return s, u, n, nil, false
  end
  -- Buckets s .. oldest-1 have left the window since the last write: at most span + 1.
  local fields = {}
  for b = s, oldest - 1 do
    fields[#fields + 1] = int(b)
  end
  local values = redis.call('HMGET', key, unpack(fields))
  local stale = nil
  for j = 1, #fields do
    local v = tonumber(values[j])
    if v ~= nil then
      stale = stale or {}
      stale[#stale + 1] = fields[j]
      if v > 0 then
        u = u - v
      end
    end
  end
  if n < oldest then
    n = -1
  end
  return oldest, u, n, stale, true
end

-- Make sure the key lives at least `ttl` more milliseconds.
local function keep(key, ttl)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end

