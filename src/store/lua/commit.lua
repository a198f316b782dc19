-- Commits a new state of one record (a shared account, or the published
-- price versions) if nobody changed it since it was read: optimistic
-- concurrency, so the accounting itself runs in the sidecar's engine and
-- the script only guards the write. With it, in the same atomic step, the
-- usage records the change applied are added to the usage stream, as one
-- entry (one XADD per commit, however many records).
--
-- KEYS[1]  the record: a hash with v (version), state (JSON), at (ms), s
--          (the schema it was written in; none: 1)
-- KEYS[2]  the usage stream of the record's shard (same hash tag), if any
-- KEYS[3]  the shard's index of records (a sorted set), if any: the record
--          is added to it as ARGV[10] when its hash gains the field `i`
--          (indexed), at its first commit, or at its next change for a
--          record written before the index existed
-- ARGV[1]  the version the change was computed from (0: must not exist)
-- ARGV[2]  the new state
-- ARGV[3]  the instant the change was computed at, ms since the epoch
-- ARGV[4]  how far that instant may be from Redis's clock, ms (0: unchecked)
-- ARGV[5]  channel announcing the change ("" for none)
-- ARGV[6]  the announcement
-- ARGV[7]  how many records the entry holds (0: no entry)
-- ARGV[8]  the audit records as a JSON array ("" for none)
-- ARGV[9]  the usage records as a tollgate.v1.UsageRecordBatch protobuf
--          message ("" for none): each record is encoded once
-- KEYS[4]  the current answer bucket: a hash of request-id fingerprint to
--          the stream entry id its record went to, if any
-- KEYS[5..] the sets of request-id fingerprints committed in the last
--          idempotency window, one per time bucket, the current bucket
--          first, if any
-- ARGV[10] the name to index the record under, with KEYS[3] ("" for none)
-- ARGV[11] the fingerprints of the records' request ids, 12 bytes each, in
--          the records' order ("" for none)
-- ARGV[12] when the current bucket's set may go, ms since the epoch
-- ARGV[13] when the current answer bucket may go, ms since the epoch
-- ARGV[14] the schema this writer writes, stored as s
--
-- Returns {1, new version} when committed; {0, current version, current
-- state, its schema} when the record moved on (the caller recomputes from
-- that state, if it reads that schema);
-- or {2, current version, {i, ...}} when records i (from 1) are of request
-- ids committed already, or earlier in this entry: nothing is written, and
-- the caller recomputes with those records taken as repeats.
local t = redis.call('TIME')
local redis_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local at = tonumber(ARGV[3])
local bound = tonumber(ARGV[4])
if bound > 0 and math.abs(redis_ms - at) > bound then
  return redis.error_reply('CLOCK change computed at ' .. ARGV[3] .. ' ms, Redis time is ' .. redis_ms ..
    ' ms: more than ' .. ARGV[4] .. ' ms apart')
end
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if current ~= tonumber(ARGV[1]) then
  -- One command either way; HGETALL keeps HMGET for the sidecars' reads,
  -- so the commands Redis counts tell the two apart.
  local all, state, schema = redis.call('HGETALL', KEYS[1]), '', ''
  for i = 1, #all, 2 do
    if all[i] == 'state' then
      state = all[i + 1]
    elseif all[i] == 's' then
      schema = all[i + 1]
    end
  end
  return {0, current, state, schema}
end
local fingerprints = ARGV[11] or ''
local n = #fingerprints / 12
local function fingerprint(i)
  return string.sub(fingerprints, i * 12 - 11, i * 12)
end
-- Fingerprints are checked 512 at a time with one SMISMEMBER per bucket
-- (Redis 6.2 or later): a few calls per commit, not per record.
local CHUNK = 512
if n > 0 then
  local repeated, here = {}, {}
  for first = 1, n, CHUNK do
    local last = math.min(n, first + CHUNK - 1)
    local members = {}
    for i = first, last do
      members[#members + 1] = fingerprint(i)
    end
    local seen = {}
    for k = 5, #KEYS do
      local found = redis.call('SMISMEMBER', KEYS[k], unpack(members))
      for j = 1, #found do
        if found[j] == 1 then
          seen[j] = true
        end
      end
    end
    for j = 1, #members do
      local fp = members[j]
      if seen[j] or here[fp] then
        repeated[#repeated + 1] = first + j - 1
      end
      here[fp] = true
    end
  end
  if #repeated > 0 then
    return {2, current, repeated}
  end
end
-- HSET answers how many fields it added: `i` is new only to a record
-- not indexed yet, so the index is written once per record, not per commit.
local fields = {'v', current + 1, 'state', ARGV[2], 'at', ARGV[3], 's', ARGV[14]}
local indexed = KEYS[3] and (ARGV[10] or '') ~= ''
if indexed then
  fields[#fields + 1] = 'i'
  fields[#fields + 1] = '1'
end
if redis.call('HSET', KEYS[1], unpack(fields)) > 0 and indexed then
  redis.call('ZADD', KEYS[3], 0, ARGV[10])
end
if n > 0 then
  for first = 1, n, CHUNK do
    local members = {}
    for i = first, math.min(n, first + CHUNK - 1) do
      members[#members + 1] = fingerprint(i)
    end
    redis.call('SADD', KEYS[5], unpack(members))
  end
  redis.call('PEXPIREAT', KEYS[5], ARGV[12])
end
local entry = nil
if tonumber(ARGV[7] or '0') > 0 then
  -- Entries of usage records alone share their field names with the
  -- first entry of their stream node, which Redis then stores once.
  local fields = {'count', ARGV[7]}
  if ARGV[9] ~= '' then
    fields[#fields + 1] = 'pb'
    fields[#fields + 1] = ARGV[9]
  end
  if ARGV[8] ~= '' then
    fields[#fields + 1] = 'audit'
    fields[#fields + 1] = ARGV[8]
  end
  entry = redis.call('XADD', KEYS[2], '*', unpack(fields))
end
if n > 0 and entry then
  for first = 1, n, CHUNK do
    local where = {}
    for i = first, math.min(n, first + CHUNK - 1) do
      where[#where + 1] = fingerprint(i)
      where[#where + 1] = entry
    end
    redis.call('HSET', KEYS[4], unpack(where))
  end
  redis.call('PEXPIREAT', KEYS[4], ARGV[13])
end
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return {1, current + 1}
