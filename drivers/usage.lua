-- usage.lua: read rows' current state without consuming anything; read-only.
-- Times in milliseconds, from the Redis server's own clock (TIME); amounts in the
-- row's units. Runs after counter.lua (now, a, int, encode, load, keep, newest_live).
--
-- KEYS[i]  the counter hash of row i (see counter.lua)
-- ARGV[1]  two integers per row i, a[2i-1 .. 2i]: bucket_ms, span
--
-- Returns encode{for each row: used, reset_ms (when the newest non-empty bucket leaves
-- the window; 0 when nothing is used)}.

local out = {}
for i = 1, #KEYS do
  local bucket_ms, span = a[2 * i - 1], a[2 * i]
  local _, used, newest = load(KEYS[i], math.floor(now / bucket_ms) - span, span)
  out[#out + 1] = used
  out[#out + 1] = newest >= 0 and (newest + span + 1) * bucket_ms - now or 0
end
return encode(out)
