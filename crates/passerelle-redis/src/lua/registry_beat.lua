-- One heartbeat of a service instance, on Redis's clock (hosts' clocks never compared).
-- KEYS[1] the service's set; ARGV[1] the instance's address; ARGV[2] forget after (ms).
-- Members silent for longer than "forget after" are removed, so the set holds the live
-- instances and the recently dead ones only; the set itself expires with its last
-- heartbeat. Returns Redis's time (ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local forget = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - forget))
redis.call('PEXPIRE', KEYS[1], forget)
return now
