-- Rate-limit decision for the limits of one request that share a hash tag, so that one
-- script may touch them all, in Redis Cluster too. All or nothing: the request is admitted
-- only when every limit admits it, and only then is anything written, so a refused request
-- consumes nothing. Time is Redis's clock (TIME), never a client's.
--
-- ARGV[1]: "check" (decide and consume), "peek" (decide, write nothing) or "refund" (give
-- back one request admitted earlier). Then 4 values per key: algorithm ("gcra", "sliding",
-- "fixed"), limit, period in microseconds, burst (GCRA only).
-- Returns {admitted (1 or 0), then per key: remaining, reset_ms, retry_after_ms}.
--
-- GCRA keys hold one number, the theoretical arrival time (TAT) in microseconds. Window
-- keys are hashes {w = window number, c = its count, p = previous window's count}. Every
-- key expires when its state no longer matters.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local admitted = 1
local out = {0}
local writes = {}
local EPS = 1e-6

local function ms(us)
  if us <= 0 then return 0 end
  return math.ceil(us / 1000)
end

for i, key in ipairs(KEYS) do
  local a = 2 + (i - 1) * 4
  local alg = ARGV[a]
  local limit = tonumber(ARGV[a + 1])
  local period = tonumber(ARGV[a + 2])
  local burst = tonumber(ARGV[a + 3])
  local remaining, reset, retry = 0, 0, 0
  if alg == 'gcra' then
    local interval = period / limit
    local tolerance = interval * burst
    local tat = tonumber(redis.call('GET', key)) or now
    if tat < now then tat = now end
    if mode == 'refund' then
      local back = tat - interval
      if back > now then
        writes[#writes + 1] = {'gcra', key, back, back - now}
      else
        writes[#writes + 1] = {'del', key}
      end
    else
      local new_tat = tat + interval
      local allow_at = new_tat - tolerance
      if allow_at - now > EPS then
        admitted = 0
        retry = math.max(allow_at - now, 1000)
        reset = tat - now
      else
        remaining = math.floor((now - allow_at) / interval + EPS)
        reset = new_tat - now
        writes[#writes + 1] = {'gcra', key, new_tat, new_tat - now}
      end
    end
  else
    local w = math.floor(now / period)
    local elapsed = now - w * period
    local h = redis.call('HMGET', key, 'w', 'c', 'p')
    local sw, sc, sp = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
    local cur, prev = 0, 0
    if sw == w then
      cur, prev = sc, sp
    elseif sw == w - 1 then
      prev = sc
    end
    local sliding = alg == 'sliding'
    if not sliding then prev = 0 end
    local ttl = period - elapsed
    if sliding then ttl = ttl + period end
    local used = cur + prev * (period - elapsed) / period
    reset = period - elapsed
    if mode == 'refund' then
      if cur > 0 then
        writes[#writes + 1] = {'win', key, w, cur - 1, prev, ttl}
      end
    elseif used + 1 > limit + EPS then
      admitted = 0
      if not sliding then
        retry = period - elapsed
      elseif cur + 1 > limit then
        -- Next window: this window's count becomes the weighted previous one.
        retry = period - elapsed + math.max(0, period * (1 - (limit - 1) / cur))
      else
        -- This window: wait until the previous window's weight has fallen enough.
        retry = period * (1 - (limit - 1 - cur) / prev) - elapsed
      end
      retry = math.max(retry, 1000)
    else
      remaining = math.floor(limit - used - 1 + EPS)
      writes[#writes + 1] = {'win', key, w, cur + 1, prev, ttl}
    end
  end
  out[#out + 1] = remaining
  out[#out + 1] = ms(reset)
  out[#out + 1] = ms(retry)
end

out[1] = admitted
if mode == 'refund' or (mode == 'check' and admitted == 1) then
  for _, wr in ipairs(writes) do
    if wr[1] == 'gcra' then
      redis.call('SET', wr[2], string.format('%.17g', wr[3]), 'PX', math.max(1, ms(wr[4])))
    elseif wr[1] == 'del' then
      redis.call('DEL', wr[2])
    else
      redis.call('HSET', wr[2], 'w', wr[3], 'c', wr[4], 'p', wr[5])
      redis.call('PEXPIRE', wr[2], math.max(1, ms(wr[6])))
    end
  end
end
return out
