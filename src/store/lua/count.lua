-- Adds hits to a fixed-window counter and answers its count: the Envoy
-- rate-limit service's windows (one key per rule, request values and
-- window start; it expires with its window).
--
-- KEYS[1]  the counter
-- ARGV[1]  hits to add (0: only read)
-- ARGV[2]  seconds until the window ends (the key's time to live)
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return n
