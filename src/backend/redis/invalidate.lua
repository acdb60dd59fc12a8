-- invalidate. KEYS: entry, fence counter. ARGV: tombstone ttl ms, counter ttl ms.
-- Bumps the fence past the counter, the stored entry and the server's clock, writes a tombstone
-- (kind 'T', no token, epoch = fence so older variants stop counting) and returns its fence.
local stored = header(get(KEYS[1])) or ZERO20
local fence = next_fence(KEYS[2], stored)
if not fence then
  return redis.error_reply('stampede: no fence below 2^53 is left to grant')
end
local f20 = digits(fence, 20)
redis.call('SET', KEYS[2], digits(fence, 1), 'PX', ARGV[2])
redis.call('SET', KEYS[1], MAGIC .. 'T' .. f20 .. '0000000000000000' .. f20, 'PX', ARGV[1])
return fence
