-- One round trip for a cache miss: read the entry and try to take the right to fetch it.
-- KEYS[1] = entry key, KEYS[2] = its lease key (same hash tag, same slot).
-- ARGV[1] = owner token, ARGV[2] = lease TTL in milliseconds.
-- Returns { entry or false, 1 if this caller now holds the lease else 0 }.
-- Reading and leasing together closes the gap where a replica would take the lease just
-- after another stored the entry and released it, and fetch the origin a second time.
local entry = redis.call('GET', KEYS[1])
local taken = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
if taken then
  return { entry, 1 }
end
return { entry, 0 }
