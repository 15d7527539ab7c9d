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
local head = redis.call('GET', KEYS[3]) or ''
-- The answer is built as a table (Lua's unpack stops at 7,999 values: a large retry would
-- otherwise fail for good).
local stored = {2, head}
for i = 3, #ARGV, 3 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    table.insert(stored, ARGV[i])
  end
end
if #stored > 2 then
  return stored
end
if head ~= ARGV[1] then
  return {0, head}
end
for i = 3, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
end
redis.call('SET', KEYS[3], ARGV[2])
return {1, ARGV[2]}
