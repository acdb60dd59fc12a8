-- invalidate. KEYS: entry, fence counter, lease. ARGV: tombstone ttl ms, counter ttl ms, channel,
-- signal.
-- Bumps the fence past the counter, the stored entry and the server's clock, writes a tombstone
-- (kind 'T', no token, epoch = fence so older variants stop counting) and returns its fence.
-- The lease ends with it, live or failed (fail.lua): the next caller fills anew, and a fill from
-- before can neither mark it failed nor hold callers up; its write the tombstone fences.
local stored = header(get(KEYS[1])) or ZERO20
local fence = next_fence(KEYS[2], stored)
if not fence then
  return redis.error_reply('stampede: no fence below 2^53 is left to grant')
end
local f20 = digits(fence, 20)
redis.call('SET', KEYS[2], digits(fence, 1), 'PX', ARGV[2])
redis.call('SET', KEYS[1], MAGIC .. 'T' .. f20 .. '0000000000000000' .. f20, 'PX', ARGV[1])
if redis.call('DEL', KEYS[3]) == 1 then
  redis.call('{{PUBLISH}}', ARGV[3], ARGV[4])
end
return fence
