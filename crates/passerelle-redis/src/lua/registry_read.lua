-- The instances of a service and Redis's time, read together (one clock for both).
-- KEYS[1] the service's set; ARGV[1] most members returned.
-- Returns { now (ms), { member, score, member, score, ... } }, newest heartbeats first.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local most = tonumber(ARGV[1])
return { now, redis.call('ZREVRANGE', KEYS[1], 0, most - 1, 'WITHSCORES') }
