-- Revokes an API key by id: marks its record and bumps the revocation generation that every
-- gateway polls (the bound on a lost pub/sub message).
-- KEYS[1] id index (id:<id>), KEYS[2] generation counter, ARGV[1] record key prefix
-- (…:h:), ARGV[2] revoked at (ms)
-- Returns the key's digest, or false when no key has this id.
local digest = redis.call('GET', KEYS[1])
if not digest then
  return false
end
redis.call('HSET', ARGV[1] .. digest, 'revoked', ARGV[2])
redis.call('INCR', KEYS[2])
return digest
