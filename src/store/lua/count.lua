-- Counts hits in a fixed window shared by sidecars (the Envoy rate-limit
-- service's windows: one key per rule, request values, unit and window
-- start; it expires a margin after its window ends, so a sidecar whose
-- clock trails still finds it). A sidecar may take hits ahead of use, but
-- only while the count stays within the limit (see engine/window.rs).
--
-- KEYS[1]  the counter
-- ARGV[1]  hits to add, less what the sidecar gives back (may be negative)
-- ARGV[2]  seconds until the key may go (the window's end plus a margin)
-- ARGV[3]  hits to take ahead of use (0: none)
-- ARGV[4]  the window's limit
--
-- Returns {count with the hits, hits granted on top}. Counts stop at 2^53
-- (exact in Lua's numbers, far below INCRBY's limit).
local most = 9007199254740992
local add = tonumber(ARGV[1])
local want = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if add > most - current then
  add = most - current
end
if add < -current then
  add = -current
end
local count = current + add
local granted = 0
if want > 0 and count < limit then
  granted = math.min(want, limit - count)
end
if add + granted ~= 0 then
  redis.call('INCRBY', KEYS[1], add + granted)
end
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return {count, granted}
