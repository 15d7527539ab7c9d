-- Writes some of one user's preferences, all or nothing, if none of them changed since the
-- version the writer read (JSON Merge Patch semantics are the caller's; this applies the
-- result name by name).
-- KEYS[1] the user's hash: one field per preference, "<version>:<value>", and "#v", the
-- document's version (preference names never contain '#'). A removed preference stays as
-- a tombstone, "<version>:" (no value), so that a writer who read an older version still
-- learns that it changed; tombstones count towards no limit, and are dropped when there
-- are more of them than preferences allowed (a whole-document write replaces the old ones
-- with those of the values it removes).
-- ARGV[1] if-match version ("" for none), ARGV[2] "strict" (any change since conflicts) or
-- "fields" (only a change of a touched preference conflicts), ARGV[3] most preferences,
-- ARGV[4] most bytes (values summed), ARGV[5] TTL in ms (0: none), ARGV[6] "clear" to
-- remove every preference first (a whole-document PUT or DELETE) or "", then pairs: name,
-- value ("" deletes the preference).
-- Returns {1, new version, the hash after the write (HGETALL)} |
-- {0, current version, conflicting names...} (412) |
-- {-1, current version, "count" or "bytes"} (over a limit; nothing written).
local key = KEYS[1]
local current = tonumber(redis.call('HGET', key, '#v') or '0')
local if_match = ARGV[1]
local strict = ARGV[2] == 'strict'
local max_count = tonumber(ARGV[3])
local max_bytes = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local clear = ARGV[6] == 'clear'

local function version_of(stored)
  if not stored then return 0 end
  local sep = string.find(stored, ':', 1, true)
  return tonumber(string.sub(stored, 1, sep - 1))
end

if if_match ~= '' then
  local since = tonumber(if_match)
  if strict then
    if current ~= since then
      return {0, current}
    end
  elseif since > current then
    -- A version the document never had: nothing can be known unchanged since it.
    return {0, current}
  else
    local conflicts = {0, current}
    for i = 7, #ARGV, 2 do
      local stored = redis.call('HGET', key, ARGV[i])
      if version_of(stored) > since then
        table.insert(conflicts, ARGV[i])
      end
    end
    if #conflicts > 2 then
      return conflicts
    end
  end
end

-- What the document will hold: every preference's size, after the writes.
local sizes = {}
local tombstones = {}
local live = {}
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  if all[i] ~= '#v' then
    local v = all[i + 1]
    if string.sub(v, -1) == ':' then
      table.insert(tombstones, all[i])
    else
      table.insert(live, all[i])
      if not clear then
        sizes[all[i]] = #v
      end
    end
  end
end
-- A document that expires starts its versions from the clock (milliseconds), so one that
-- expired and is written again never hands out an ETag its previous life did (a client
-- holding it would get 304s and pass If-Match): that life ended at least a TTL after its
-- last write, and it would have needed more than a write per millisecond to catch up.
-- Documents that never expire start from 1: their key, with its version, stays.
local base = current
if base == 0 and ttl > 0 then
  local now = redis.call('TIME')
  base = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
local next_version = base + 1
local prefix_len = #tostring(next_version) + 1
for i = 7, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    sizes[ARGV[i]] = nil
  else
    sizes[ARGV[i]] = prefix_len + #ARGV[i + 1]
  end
end
local count, bytes = 0, 0
for _, size in pairs(sizes) do
  count = count + 1
  bytes = bytes + size
end
if count > max_count then
  return {-1, current, 'count'}
end
if bytes > max_bytes then
  return {-1, current, 'bytes'}
end

if clear then
  -- Every value removed leaves a tombstone (older ones go), so that a PATCH made from an
  -- earlier read of a cleared preference conflicts instead of bringing it back unseen.
  if #tombstones > 0 then
    redis.call('HDEL', key, unpack(tombstones))
  end
  for _, name in ipairs(live) do
    redis.call('HSET', key, name, next_version .. ':')
  end
elseif #tombstones > max_count then
  redis.call('HDEL', key, unpack(tombstones))
end
for i = 7, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HSET', key, ARGV[i], next_version .. ':')
  else
    redis.call('HSET', key, ARGV[i], next_version .. ':' .. ARGV[i + 1])
  end
end
redis.call('HSET', key, '#v', next_version)
if ttl > 0 then
  redis.call('PEXPIRE', key, ttl)
end
-- The document as it is now, so the writer answers without reading it again.
return {1, next_version, redis.call('HGETALL', key)}
