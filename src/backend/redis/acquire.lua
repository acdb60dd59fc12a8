-- try_acquire. KEYS: lease, fence counter, entry.
-- ARGV: token (16 hex), lease ttl ms, seen fence (20 digits), counter ttl ms.
-- Returns {0, pttl, failed (0/1)} held, {1, fence} acquired, {2} refreshed.
local pttl = redis.call('PTTL', KEYS[1])
if pttl == -1 then
  -- A lease without an expiry would block the key for ever: give it one.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  pttl = tonumber(ARGV[2])
end
if pttl >= 0 then
  local v = get(KEYS[1])
  local failed = 0
  if v and string.sub(v, -1) == '!' then
    failed = 1
  end
  return {0, pttl, failed}
end
local stored = header(get(KEYS[3])) or ZERO20
if stored ~= ARGV[3] then
  return {2}
end
local fence = next_fence(KEYS[2], stored)
if not fence then
  return redis.error_reply('stampede: no fence below 2^53 is left to grant')
end
redis.call('SET', KEYS[2], digits(fence, 1), 'PX', ARGV[4])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, fence}
