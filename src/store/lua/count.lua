-- Adds hits to a fixed-window counter and answers its count: the Envoy
-- rate-limit service's windows (one key per rule, request values, unit and
-- window start; it expires a margin after its window ends, so a sidecar
-- whose clock trails still finds it).
--
-- KEYS[1]  the counter
-- ARGV[1]  hits to add (0: only read)
-- ARGV[2]  seconds until the key may go (the window's end plus a margin)
--
-- Counts stop at 2^53 (exact in Lua's numbers, far below INCRBY's limit).
local most = 9007199254740992
local add = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if add > most - current then
  add = most - current
end
local n = redis.call('INCRBY', KEYS[1], add)
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return n
