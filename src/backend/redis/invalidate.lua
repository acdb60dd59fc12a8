-- invalidate. KEYS: entry, fence counter. ARGV: tombstone ttl ms, counter ttl ms.
-- Bumps the fence past the counter and the stored entry, writes a tombstone (kind 'T', no token,
-- epoch = fence so older variants stop counting) and returns its fence.
local stored = header(get(KEYS[1])) or ZERO20
local counter = tonumber(get(KEYS[2]) or '0') or 0
local fence = math.max(counter, tonumber(stored)) + 1
local f20 = string.format('%020d', fence)
redis.call('SET', KEYS[2], string.format('%d', fence), 'PX', ARGV[2])
redis.call('SET', KEYS[1], MAGIC .. 'T' .. f20 .. '0000000000000000' .. f20, 'PX', ARGV[1])
return fence
