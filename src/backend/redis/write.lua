-- The fenced fill, in one round trip. KEYS: entry, lease, fence counter[, variant].
-- ARGV: fence (20 digits), token (16 hex), entry record, entry ttl ms, release ('1'/'0'),
--       channel, signal, counter ttl ms[, variant record, variant ttl ms].
-- Returns 1 stored, 0 fenced. Releases the lease if still ours (when asked) and publishes the
-- signal either way, as the contract says.
local sf, st = header(get(KEYS[1]))
local ok = (sf == nil) or forged(sf) or (sf < ARGV[1]) or (sf == ARGV[1] and st == ARGV[2])
if ok then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  if KEYS[4] then
    redis.call('SET', KEYS[4], ARGV[9], 'PX', ARGV[10])
  end
  local f = tonumber(ARGV[1])
  if counter(KEYS[3]) < f then
    redis.call('SET', KEYS[3], digits(f, 1), 'PX', ARGV[8])
  end
end
if ARGV[5] == '1' and holds(get(KEYS[2]), ARGV[2]) then
  redis.call('DEL', KEYS[2])
end
redis.call('{{PUBLISH}}', ARGV[6], ARGV[7])
if ok then
  return 1
end
return 0
