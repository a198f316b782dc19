-- Trims a shard's usage stream of the entries every named consumer group
-- has acknowledged, in one atomic step: never an entry a group has not
-- read, nor one it read and has not acknowledged.
--
-- KEYS[1]  the usage stream
-- ARGV[1]  entries younger than this many ms (by Redis's clock) stay, so a
--          resend can still read its first call's record
-- ARGV[2..] the consumer groups that must read every entry
--
-- Returns {trimmed, {group, pending, lag}, ...}: how many entries went,
-- and per group the entries delivered and not acknowledged and those not
-- delivered yet (-1: Redis cannot tell); or {-1, group} when a group does
-- not exist on the stream (nothing is trimmed until it does).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0}
end
local groups = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local fields = {}
  for i = 1, #g, 2 do
    fields[g[i]] = g[i + 1]
  end
  groups[fields['name']] = fields
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local floor_ms, floor_seq = nil, nil
local report = {}
for i = 2, #ARGV do
  local g = groups[ARGV[i]]
  if not g then
    return {-1, ARGV[i]}
  end
  local ms, seq
  local pending = tonumber(g['pending'])
  if pending > 0 then
    -- The oldest entry delivered and not acknowledged stays.
    ms, seq = parse(redis.call('XPENDING', KEYS[1], ARGV[i])[2])
  else
    -- Everything delivered is acknowledged: what follows stays.
    ms, seq = parse(g['last-delivered-id'])
    seq = seq + 1
  end
  if floor_ms == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
  local lag = g['lag']
  if type(lag) ~= 'number' then
    lag = -1
  end
  report[#report + 1] = {ARGV[i], pending, lag}
end
local t = redis.call('TIME')
local young = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
if floor_ms ~= nil and young < floor_ms then
  floor_ms, floor_seq = young, 0
end
local trimmed = 0
if floor_ms ~= nil then
  trimmed = redis.call('XTRIM', KEYS[1], 'MINID', string.format('%.0f-%.0f', floor_ms, floor_seq))
end
local out = {trimmed}
for _, r in ipairs(report) do
  out[#out + 1] = r
end
return out
