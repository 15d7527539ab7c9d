-- Adds a cache entry to the set of one tag and keeps the set's TTL at least as long as the
-- entry's, atomically: a set never exists without a TTL, even for an instant, whatever
-- happens to the connection. One key per call, so that it runs on any cluster slot.
-- KEYS[1] = tag set; ARGV[1] = entry hash; ARGV[2] = the set's TTL in milliseconds.
-- Returns the set's size afterwards (the caller keeps sets bounded).
-- PEXPIRE NX (a new set gets its TTL) and GT (an existing one is extended, never
-- shortened) need Redis 7.0: see client::MIN_VERSION.
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2], 'NX')
redis.call('PEXPIRE', KEYS[1], ARGV[2], 'GT')
return redis.call('SCARD', KEYS[1])
