-- fail. KEYS: lease. ARGV: token, ttl ms, channel, signal. Returns 1 when the lease was ours and
-- is now marked failed (and the signal published).
if holds(get(KEYS[1]), ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1] .. '!', 'PX', ARGV[2])
  redis.call('{{PUBLISH}}', ARGV[3], ARGV[4])
  return 1
end
return 0
