-- registry_load.lua: read the registry's version and every record at once (read-only).
-- No times. Units: the version is a count of writes; records are opaque JSON text.
-- Standalone: it does not run after counter.lua.
--
-- KEYS[1]  the records: a hash, field "<kind>/<name>" -> record
-- KEYS[2]  the version: an integer (absent = 0); same hash tag as KEYS[1]
--
-- Returns {version (a string of digits), {field1, record1, field2, record2, ...}}.

return { redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1]) }
