local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local charge = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate / 1000000)
end
tokens = math.max(-burst, tokens - charge)
local granted = 0
if want > 0 then
  granted = math.max(0, math.min(want, math.floor(tokens)))
  tokens = tokens - granted
else
  tokens = math.min(burst, tokens - want)
end
local wait = 0
if tokens < 1 then
  wait = math.ceil((1 - tokens) * 1000000 / rate)
end
local ttl = math.min(math.ceil((burst - tokens) * 1000 / rate) + 1000, 1e12)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl))
return {granted, wait, math.max(0, math.floor(tokens))}
