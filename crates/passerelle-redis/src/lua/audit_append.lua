-- Appends records to one audit partition, if its chain head is the one the writer built on
-- and none of the records is stored already: all or nothing.
-- KEYS[1] the partition's records (hash: id -> compact record), KEYS[2] its time index
-- (sorted set: id by event time in ms), KEYS[3] its chain head ("<seq> <hex link>", absent
-- for an empty partition).
-- ARGV[1] the head the writer read ("" for an empty partition), ARGV[2] the head after these
-- records, then triples: id, event time (ms), record.
-- Returns {1, new head} | {0, current head} (another writer moved the head: rebuild the
-- links on it and try again) | {2, current head, ids already stored...} (idempotent
-- retries: leave them out, rebuild, try again). Nothing is written unless 1.
--
-- Each command takes the whole batch (HMGET, HSET, ZADD with many pairs), in slices that
-- stay under Lua's unpack limit: a call from Lua costs about as much as the work of one
-- small command, so one per record per command would triple the script's time.
local SLICE = 2000
local head = redis.call('GET', KEYS[3]) or ''
local n = (#ARGV - 2) / 3
-- The answer is built as a table (Lua's unpack stops at 7,999 values: a large retry would
-- otherwise fail for good).
local stored = {2, head}
for first = 0, n - 1, SLICE do
  local ids = {}
  for k = first, math.min(first + SLICE, n) - 1 do
    ids[#ids + 1] = ARGV[3 + 3 * k]
  end
  local found = redis.call('HMGET', KEYS[1], unpack(ids))
  for i = 1, #ids do
    if found[i] then
      table.insert(stored, ids[i])
    end
  end
end
if #stored > 2 then
  return stored
end
if head ~= ARGV[1] then
  return {0, head}
end
for first = 0, n - 1, SLICE do
  local fields, members = {}, {}
  for k = first, math.min(first + SLICE, n) - 1 do
    local at = 3 + 3 * k
    fields[#fields + 1] = ARGV[at]
    fields[#fields + 1] = ARGV[at + 2]
    members[#members + 1] = ARGV[at + 1]
    members[#members + 1] = ARGV[at]
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('ZADD', KEYS[2], unpack(members))
end
redis.call('SET', KEYS[3], ARGV[2])
return {1, ARGV[2]}
