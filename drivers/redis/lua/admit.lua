-- admit.lua: check every row and, only if all fit, consume every row; atomically.
-- Times in milliseconds, from the Redis server's own clock (TIME); amounts in the
-- row's units. Runs after counter.lua (now, a, int, encode, summary, newest_live,
-- keep, leases, retry_ms).
--
-- KEYS[i]  the counter hash (or, for a lease row, the lease set) of row i
-- ARGV[1]  (packed, see counter.lua) five integers per row i, a[5i-4 .. 5i]:
--          bucket_ms, span, limit, amount, and alert_at * 2 + enforce (alert_at: 0 =
--          none; enforce: 1, or 0 = a shadow row: checked, never refuses, consumed only
--          when every row fits, as it would be if it were enforced); a lease row has
--          span -1 and its lease time (ms) as bucket_ms. Then the lease id the
--          admission takes in its lease rows (0: none).
--
-- Returns (packed) outcome, now, then the rows' states, then the index (1-based) of
-- every row whose near-limit mark this admission crossed first in its window:
-- * outcome 2, every row fitted and was consumed (the common case, kept short): per
--   row, used and reset_ms after adding; its bucket is floor(now / bucket_ms) (0 for
--   a lease row);
-- * outcome 1 (admitted; some shadow row did not fit) or 0 (refused): per row, used,
--   reset_ms, fits (1/0), retry_ms (-1 = never fits), bucket (the current bucket
--   index; 0 for a lease row; -1 for a row that was not consumed). The states of
--   consumed rows are those after adding (fits = 1, retry_ms = -1).
-- * outcome 3 (refused: a ticket line of admit_in_turn holds a live ticket): as 0,
--   then the 1-based index of the row whose line it is.
--
-- Near-limit: a consumed row with alert_at > 0 whose usage reaches alert_at is
-- reported unless its counter already reported a crossing in a bucket still in the
-- window (the summary's "a"): once per window per counter, whichever node admits.

local rows = #KEYS
local lease_id = a[5 * rows + 1]

-- admit_in_turn: after the lease id, one row index (1-based) per ticket line, whose
-- expiry set (tickets.lua's KEYS[2]) follows the rows' keys in KEYS; so
-- 5 * #KEYS + 1 - #ints = 4 * lines (0 for admit). A live ticket in one of them
-- refuses (outcome 3), consuming nothing.
local ahead = 0 -- the row index of the first line found holding a live ticket
local lines = (5 * rows + 1 - #ARGV[1] / 8) / 4
if lines > 0 then
  rows = rows - lines
  lease_id = a[5 * rows + 1]
  for j = 1, lines do
    if redis.call('ZCOUNT', KEYS[rows + j], '(' .. int(now), '+inf') > 0 then
      ahead = a[5 * rows + 1 + j]
      break
    end
  end
end

-- Per distinct key, a record of its counter, shared by every row naming it (a key
-- named twice is one counter, as in the memory driver): r[S] start, r[U] used, r[N]
-- newest bucket, r[V] the amount in it, r[CUR] the amount in the current bucket, r[AL]
-- alert bucket, r[STALE] fields to delete (false: none), r[CHANGED] the summary must be
-- written, r[NEW] the key has no summary yet. One small array per key, built at once:
-- every row of every admission pays for this bookkeeping, and a table per quantity
-- (grown row by row) or named fields cost a good part of a row's time. Per row: its
-- counter's record, by key, in `first` (a row's current bucket is recomputed where
-- needed, and its usage as checked is its record's before anything is consumed); a
-- lease row's used and reset_ms as checked, in `lease_states`. (Few tables, and no
-- table grown row by row but `first`: growing a Lua table rehashes it, which cost
-- a good part of a row's time.)
local S, U, N, V, CUR, AL, STALE, CHANGED, NEW = 1, 2, 3, 4, 5, 6, 7, 8, 9
local first, lease_states = {}, nil
local floor, call, pack = math.floor, redis.call, struct.pack
local everything, refused = true, false -- every row fits (shadow ones too); refused
for i = 1, rows do
  local key = KEYS[i]
  local bucket_ms, span = a[5 * i - 4], a[5 * i - 3]
  local used
  if span < 0 then
    local reset
    used, reset = leases(key)
    lease_states = lease_states or {}
    lease_states[i] = { used, reset }
  else
    local r = first[key]
    if r == nil then
      local c = floor(now / bucket_ms)
      local m = call('HGET', key, 'm')
      local s, u, n, al, stale, changed, v = summary(key, m, c - span)
      local cur = c == n and v or amount_in(key, c, n, v)
      r = { s, u, n, v, cur, al, stale or false, changed, not m }
      first[key] = r
    end
    used = r[U]
  end
  if used + a[5 * i - 1] > a[5 * i - 2] then
    everything = false
    if a[5 * i] % 2 == 1 then
      refused = true
    end
  end
end

-- The rows' states as checked (nothing consumed yet): outcome, now, then per row used,
-- reset_ms, fits, retry_ms, bucket. Only when some row does not fit.
local function checked(outcome)
  local out = { now, unpack(a, 1, 5 * rows + 1) } -- (its size at once: overwritten)
  out[1], out[2] = outcome, now
  for i = 1, rows do
    local key = KEYS[i]
    local bucket_ms, span, limit, amount = a[5 * i - 4], a[5 * i - 3], a[5 * i - 2], a[5 * i - 1]
    local used, c, reset, retry
    if span < 0 then
      used, reset, c = lease_states[i][1], lease_states[i][2], 0
      retry = amount <= limit and 1000 or -1
    else
      local r = first[key]
      used, c = r[U], floor(now / bucket_ms)
      local newest = r[N]
      reset = newest >= 0 and (newest + span + 1) * bucket_ms - now or 0
      retry = -1
      if used + amount > limit and amount <= limit then
        retry = retry_ms(key, c - span, math.max(c, newest), span, bucket_ms, used, amount, limit)
      end
    end
    local fits = used + amount <= limit
    local k = 5 * i - 2
    out[k] = used
    out[k + 1] = reset
    out[k + 2] = fits and 1 or 0
    out[k + 3] = fits and -1 or retry
    out[k + 4] = c
  end
  return out
end
if refused or ahead > 0 then
  local out = checked(ahead > 0 and 3 or 0)
  if ahead > 0 then
    out[#out + 1] = ahead
  end
  return encode(out)
end

-- Every enforcing row fits: consume every row (a shadow row only if every row fits)
-- and report the states after it: in full when some shadow row did not fit, else
-- only used and reset_ms per row.
local out
if everything then
  out = { now, unpack(a, 1, 2 * rows + 1) } -- (its size at once: overwritten)
  out[1], out[2] = 2, now
else
  out = checked(1)
end
local alerts = nil
for i = 1, rows do
  local key = KEYS[i]
  local bucket_ms, span, amount, flags = a[5 * i - 4], a[5 * i - 3], a[5 * i - 1], a[5 * i]
  local k = everything and 2 * i + 1 or 5 * i - 2 -- out[k], out[k + 1]: used, reset_ms
  local consumed = everything or flags % 2 == 1
  if not consumed then
    out[k + 4] = -1 -- not consumed: its state stays the one checked
  elseif span < 0 then
    local used, reset = lease_states[i][1], lease_states[i][2]
    if amount ~= 0 then
      call('ZADD', key, now + bucket_ms, int(lease_id))
      keep(key, bucket_ms)
      used, reset = used + amount, bucket_ms
    end
    out[k] = used
    out[k + 1] = reset
  else
    local r, c = first[key], floor(now / bucket_ms)
    local field, total = nil, nil -- the current bucket's field and amount, to write
    local expire = 0 -- the key's new TTL (ms), when it must change
    if amount ~= 0 then
      local before = r[CUR]
      total = before + amount
      if total < 0 then
        total = 0 -- (a negative amount only)
      end
      field = int(c)
      r[CUR] = total
      r[U] = r[U] + total - before
      r[CHANGED] = true
      if total > 0 and c > r[N] then
        -- A new newest bucket: the key must live until it leaves the window, and no
        -- longer. Within one bucket the TTL is already right.
        r[N], r[V] = c, total
        expire = (c + span + 1) * bucket_ms - now
      elseif c == r[N] then
        if total > 0 then
          r[V] = total
        else -- (a negative amount only)
          r[N], r[V] = newest_live(key, c - 1, r[S])
          keep(key, (c + span + 1) * bucket_ms - now)
        end
      end
    end
    if flags > 1 then
      local alert_at = (flags - flags % 2) / 2
      if r[U] >= alert_at and r[AL] < c - span then
        r[AL] = c
        alerts = alerts or {}
        alerts[#alerts + 1] = i
        r[CHANGED] = true
      end
    end
    if r[CHANGED] then
      if r[STALE] then
        call('HDEL', key, unpack(r[STALE]))
        r[STALE] = false
      end
      local m = pack(SUMMARY, r[S], r[U], r[N], r[AL], r[V])
      if field then
        call('HSET', key, field, int(total), 'm', m)
      else
        call('HSET', key, 'm', m)
      end
      r[CHANGED] = false
      if expire == 0 and r[NEW] then
        expire = (math.max(c, r[N]) + span + 1) * bucket_ms - now -- never without a TTL
      end
      r[NEW] = false
    end
    if expire > 0 then
      call('PEXPIRE', key, expire)
    end
    local newest = r[N]
    out[k] = r[U]
    out[k + 1] = newest >= 0 and (newest + span + 1) * bucket_ms - now or 0
  end
  if consumed and not everything then
    out[k + 2] = 1
    out[k + 3] = -1
  end
end
if alerts then
  for j = 1, #alerts do
    out[#out + 1] = alerts[j]
  end
end
return encode(out)
