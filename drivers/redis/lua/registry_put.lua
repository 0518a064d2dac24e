-- registry_put.lua: write one record of the registry (API keys, tiers) and bump the
-- registry's version, atomically, if the record now is what the caller expects.
-- No times. Units: the version is a count of writes; records are opaque JSON text.
-- Standalone: it does not run after counter.lua.
--
-- KEYS[1]  the records: a hash, field "<kind>/<name>" -> record
-- KEYS[2]  the version: an integer (absent = 0); same hash tag as KEYS[1]
-- ARGV[1]  the field ("<kind>/<name>")
-- ARGV[2]  the condition: "any", "absent" (no record now) or "equal" (the record now
--          is ARGV[3])
-- ARGV[3]  the expected record (condition "equal"; ignored otherwise)
-- ARGV[4]  "put" (set the record to ARGV[5]) or "delete"
-- ARGV[5]  the new record (for "put")
--
-- Returns the version after the call, or -1 when the condition failed (nothing
-- written). A record that already is the new one is not written again and its version
-- is returned (a call resent after a lost reply succeeds).

local current = redis.call('HGET', KEYS[1], ARGV[1]) -- false when absent
local new = false
if ARGV[4] == 'put' then
  new = ARGV[5]
end
if current == new then
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
if (ARGV[2] == 'absent' and current) or (ARGV[2] == 'equal' and current ~= ARGV[3]) then
  return -1
end
if new then
  redis.call('HSET', KEYS[1], ARGV[1], new)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return redis.call('INCR', KEYS[2])
