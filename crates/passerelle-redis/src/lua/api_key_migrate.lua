-- Moves a key's record from its digest under an old secret to its digest under the newest
-- one (a secret rotation, done as keys are used).
-- KEYS[1] old record, KEYS[2] new record, KEYS[3] id index, ARGV[1] new digest
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('SET', KEYS[3], ARGV[1])
return 1
