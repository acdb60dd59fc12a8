-- extend. KEYS: lease. ARGV: token, lease ttl ms. Returns 1 when extended (never a failed lease:
-- its value is the token and '!').
if get(KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
