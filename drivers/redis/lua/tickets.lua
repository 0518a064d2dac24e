-- tickets.lua: one step on a line of waiting tickets (the admission queue's order
-- across nodes), atomically, on the Redis server's clock.
--
-- KEYS[1]  the held tickets: a sorted set, member and score the ticket
-- KEYS[2]  their expiries: a sorted set, member the ticket, score its expiry (ms)
-- KEYS[3]  the line's sequence: the last ticket given
-- KEYS[4]  (optional) the holder's tickets in every line of the partition: a sorted
--          set, member "<line> <ticket>", score its expiry (ms)
-- ARGV     op ("take", "check" or "drop"), ticket, ttl_ms, sequence_ms (how long the
--          sequence outlives the line's last ticket), most (take: no ticket when the
--          holder already holds this many live ones; 0: no bound), line
--
-- Returns {ticket, first}: the ticket taken (or the one given; 0: none taken), and the
-- lowest ticket held after the step (0: none). Expired tickets are dropped first, at
-- most 100 a call.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, ticket, ttl, sequence = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local most, holder = tonumber(ARGV[5] or 0), KEYS[4]
local function first()
  local lowest = redis.call('ZRANGE', KEYS[1], 0, 0)
  return lowest[1] and tonumber(lowest[1]) or 0
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
if #expired > 0 then
  redis.call('ZREM', KEYS[1], unpack(expired))
  redis.call('ZREM', KEYS[2], unpack(expired))
end
if holder then
  redis.call('ZREMRANGEBYSCORE', holder, '-inf', now)
  if op == 'take' and most > 0 and redis.call('ZCARD', holder) >= most then
    return { 0, first() }
  end
end
if op == 'take' then
  ticket = redis.call('INCR', KEYS[3])
end
local member = ARGV[6] .. ' ' .. string.format('%d', ticket)
if op == 'drop' then
  redis.call('ZREM', KEYS[1], ticket)
  redis.call('ZREM', KEYS[2], ticket)
  if holder then
    redis.call('ZREM', holder, member)
  end
else
  redis.call('ZADD', KEYS[1], ticket, ticket)
  redis.call('ZADD', KEYS[2], now + ttl, ticket)
  -- The line lives while a ticket may: its newest expiry.
  local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  local keep = math.max(1, tonumber(newest[2]) - now)
  redis.call('PEXPIRE', KEYS[1], keep)
  redis.call('PEXPIRE', KEYS[2], keep)
  if holder then
    redis.call('ZADD', holder, now + ttl, member)
    local last = redis.call('ZRANGE', holder, -1, -1, 'WITHSCORES')
    redis.call('PEXPIRE', holder, math.max(1, tonumber(last[2]) - now))
  end
end
redis.call('PEXPIRE', KEYS[3], sequence)
return { ticket, first() }
