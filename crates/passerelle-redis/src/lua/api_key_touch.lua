-- Records when a key was last used, without recreating a record that is gone.
-- KEYS[1] record, ARGV[1] now (ms)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'last_used', ARGV[1])
return 1
