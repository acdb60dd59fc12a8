-- release. KEYS: lease. ARGV: token, channel, signal. Returns 1 when released (and signalled),
-- failed or not.
if holds(get(KEYS[1]), ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('{{PUBLISH}}', ARGV[2], ARGV[3])
  return 1
end
return 0
