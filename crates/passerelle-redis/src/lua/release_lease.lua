-- Release a lease only if we still own it.
-- KEYS[1] = lease key; ARGV[1] = owner token.
-- Returns 1 when released, 0 when the lease had expired or belongs to someone else.
-- A plain GET-then-DEL from the client would race with the lease expiring and being
-- taken by another owner between the two commands.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
