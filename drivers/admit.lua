-- admit.lua: check every row and, only if all fit, add every amount; atomically.
-- Times in milliseconds, from the Redis server's own clock (TIME); amounts in the
-- row's units. Runs after counter.lua (now, a, int, encode, load, keep, newest_live).
--
-- KEYS[i]  the counter hash of row i (see counter.lua)
-- ARGV[1]  five integers per row i, a[5i-4 .. 5i]: bucket_ms, span, limit, amount,
--          enforce (1; 0 = a shadow row: checked, never refuses, consumed only when
--          every row fits, as it would be if it were enforced)
--
-- Returns encode{admitted (1/0: every enforcing row fits), then for each row: used,
-- reset_ms, fits (1/0), retry_ms (-1 = never fits), bucket (the current bucket index;
-- -1 for a shadow row that was not consumed)}. When admitted, the states of consumed
-- rows are those after adding (fits = 1, retry_ms = -1).

-- When a request of `amount` fits, if no other traffic comes: the moment the oldest
-- live buckets (ascending, buckets oldest .. top) have left enough room. Refusals only.
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

-- Per distinct key, indexed by the first row naming it (a key named twice is one
-- counter, as in the memory driver): start, used, newest, stale fields, dirty.
local first, S, U, N, STALE, DIRTY = {}, {}, {}, {}, {}, {}
local out = { 1 }
local everything = true -- every row fits, shadow rows included
for i = 1, #KEYS do
  local key = KEYS[i]
  local bucket_ms, span, limit, amount = a[5 * i - 4], a[5 * i - 3], a[5 * i - 2], a[5 * i - 1]
  local c = math.floor(now / bucket_ms)
  local oldest = c - span
  local f = first[key]
  if f == nil then
    f = i
    first[key] = i
    S[i], U[i], N[i], STALE[i], DIRTY[i] = load(key, oldest, span)
  end
  local used, newest = U[f], N[f]
  local fits = used + amount <= limit
  local retry = -1
  if not fits then
    everything = false
    if a[5 * i] == 1 then
      out[1] = 0
    end
    if amount <= limit then
      retry = retry_ms(key, oldest, math.max(c, newest), span, bucket_ms, used, amount, limit)
    end
  end
  local k = #out
  out[k + 1] = used
  out[k + 2] = newest >= 0 and (newest + span + 1) * bucket_ms - now or 0
  out[k + 3] = fits and 1 or 0
  out[k + 4] = retry
  out[k + 5] = c
end
if out[1] == 0 then
  return encode(out)
end

-- Every enforcing row fits: add every amount (a shadow row's only if every row fits)
-- and report the states after it.
for i = 1, #KEYS do
  local key = KEYS[i]
  local bucket_ms, span, amount = a[5 * i - 4], a[5 * i - 3], a[5 * i - 1]
  local k = 5 * i - 3 -- out[k .. k + 4] is this row's state
  local c = out[k + 4]
  local f = first[key]
  if not everything and a[5 * i] ~= 1 then
    out[k + 4] = -1 -- not consumed: its state stays the one checked
  else
    if STALE[f] then
      redis.call('HDEL', key, unpack(STALE[f]))
      STALE[f] = nil
    end
    if amount ~= 0 then
      local total = redis.call('HINCRBY', key, int(c), amount)
      local before = total - amount
      local change = (total > 0 and total or 0) - (before > 0 and before or 0)
      U[f] = U[f] + change
      local leaves = (c + span + 1) * bucket_ms - now
      if total > 0 and c > N[f] then
        -- A new newest bucket: the key must live until it leaves the window, and no
        -- longer. Within one bucket the TTL is already right.
        N[f] = c
        redis.call('PEXPIRE', key, leaves)
        DIRTY[f] = true
      elseif total <= 0 then -- only with a negative amount
        if c == N[f] then
          N[f] = newest_live(key, c - span)
        end
        keep(key, leaves)
        DIRTY[f] = true
      elseif not DIRTY[f] and change ~= 0 then
        -- the common case: only "u" changes
        redis.call('HINCRBY', key, 'u', change)
      end
    end
    if DIRTY[f] then
      redis.call('HSET', key, 's', int(S[f]), 'u', int(U[f]), 'n', int(N[f]))
      DIRTY[f] = false
    end
    local newest = N[f]
    out[k] = U[f]
    out[k + 1] = newest >= 0 and (newest + span + 1) * bucket_ms - now or 0
    out[k + 2] = 1
    out[k + 3] = -1
  end
end
return encode(out)
