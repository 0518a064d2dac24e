-- renew.lua: extend leases that are still held; a lease that expired or was released
-- stays gone. Runs after counter.lua (now, a, int, keep).
--
-- KEYS[i]  a lease set (see counter.lua)
-- ARGV[1]  (packed, see counter.lua) two integers per key i, a[2i-1 .. 2i]: its lease
--          time (ms), the lease id to renew in it.
--
-- Returns the number of leases renewed.

local renewed = 0
for i = 1, #KEYS do
  local key, lease_ms, id = KEYS[i], a[2 * i - 1], int(a[2 * i])
  local expiry = tonumber(redis.call('ZSCORE', key, id))
  if expiry ~= nil and expiry > now then
    redis.call('ZADD', key, 'XX', now + lease_ms, id)
    keep(key, lease_ms)
    renewed = renewed + 1
  end
end
return renewed
