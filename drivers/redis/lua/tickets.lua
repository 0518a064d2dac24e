-- tickets.lua: one step on a line of waiting tickets (the admission queue's order
-- across nodes), atomically, on the Redis server's clock.
--
-- KEYS[1]  the held tickets: a sorted set, member the ticket, score rank * 2^40 + ticket
--          (so rank 0, interactive, sorts before rank 1, batch)
-- KEYS[2]  the expiries of its tickets of rank 0: member the ticket, score its expiry
--          (ms); KEYS[3] those of rank 1 (admit.lua reads them: a live ticket refuses
--          an admission in turn)
-- KEYS[4]  the line's sequence: the last ticket given
-- KEYS[5]  the admissions of rank 0 in a row since the last of rank 1 (the batch share)
-- KEYS[6]  (optional) the holder's tickets in every line of the partition: a sorted
--          set, member "<line> <ticket>", score its expiry (ms)
-- ARGV     op ("take", "check", "drop" or "admitted"), ticket, ttl_ms, sequence_ms
--          (how long the sequence outlives the line's last ticket), most (take: no
--          ticket when the holder already holds this many live ones; 0: no bound),
--          line, rank (0 or 1), share (after this many admissions of rank 0 in a row,
--          rank 1's first ticket has the turn; -1: never)
--
-- Returns {ticket, turn}: the ticket taken (or the one given; 0: none taken), and the
-- ticket whose turn it is after the step (0: none held): the lowest of rank 0, unless
-- rank 1 holds tickets and rank 0 none, or share admissions of rank 0 came in a row.
-- Expired tickets are dropped first, at most 100 per rank a call.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, ticket, ttl, sequence = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local most, line, rank, share = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local held, expiry, holder = KEYS[1], KEYS[2 + rank], KEYS[6]
local RANK = 1099511627776 -- 2^40: the score of rank 1's ticket 0

local function turn()
  local first = redis.call('ZRANGEBYSCORE', held, 0, '(' .. RANK, 'LIMIT', 0, 1)[1]
  local batch = redis.call('ZRANGEBYSCORE', held, RANK, '+inf', 'LIMIT', 0, 1)[1]
  if batch then
    local run = tonumber(redis.call('GET', KEYS[5]) or 0)
    if not first or (share >= 0 and run >= share) then
      first = batch
    end
  end
  return first and tonumber(first) or 0
end

for r = 0, 1 do
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2 + r], '-inf', now, 'LIMIT', 0, 100)
  if #expired > 0 then
    redis.call('ZREM', held, unpack(expired))
    redis.call('ZREM', KEYS[2 + r], unpack(expired))
  end
end
if holder then
  redis.call('ZREMRANGEBYSCORE', holder, '-inf', now)
  if op == 'take' and most > 0 and redis.call('ZCARD', holder) >= most then
    return { 0, turn() }
  end
end
if op == 'take' then
  ticket = redis.call('INCR', KEYS[4])
end
local member = line .. ' ' .. string.format('%d', ticket)
if op == 'drop' or op == 'admitted' then
  redis.call('ZREM', held, ticket)
  redis.call('ZREM', expiry, ticket)
  if holder then
    redis.call('ZREM', holder, member)
  end
  if op == 'admitted' then
    if rank == 0 then
      redis.call('INCR', KEYS[5])
    else
      redis.call('SET', KEYS[5], 0)
    end
    redis.call('PEXPIRE', KEYS[5], sequence)
  end
else
  redis.call('ZADD', held, rank * RANK + ticket, ticket)
  redis.call('ZADD', expiry, now + ttl, ticket)
  -- The line lives while a ticket may: its newest expiry.
  local keep = 1
  for r = 0, 1 do
    local newest = redis.call('ZRANGE', KEYS[2 + r], -1, -1, 'WITHSCORES')
    if newest[2] then
      keep = math.max(keep, tonumber(newest[2]) - now)
    end
  end
  redis.call('PEXPIRE', held, keep)
  redis.call('PEXPIRE', KEYS[2], keep)
  redis.call('PEXPIRE', KEYS[3], keep)
  if holder then
    redis.call('ZADD', holder, now + ttl, member)
    local last = redis.call('ZRANGE', holder, -1, -1, 'WITHSCORES')
    redis.call('PEXPIRE', holder, math.max(1, tonumber(last[2]) - now))
  end
end
redis.call('PEXPIRE', KEYS[4], sequence)
return { ticket, turn() }
