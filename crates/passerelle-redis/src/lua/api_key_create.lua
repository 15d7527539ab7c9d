-- Stores a new API key: its record, its id → digest index, its place in the listing.
-- KEYS[1] record hash (h:<digest>), KEYS[2] id index (id:<id>), KEYS[3] listing zset
-- ARGV[1] digest, ARGV[2] id, ARGV[3] created (ms), ARGV[4..] field/value pairs
-- Returns 1, or 0 when the id is taken (a new key must be generated).
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
local fields = {}
for i = 4, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return 1
