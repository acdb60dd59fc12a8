-- Shared by every script (prepended when the scripts are built). Mirrors `Header::parse` in
-- src/entry.rs exactly: a record whose header does not parse counts as absent (fence 0).
-- Fences are compared as their 20-digit zero-padded strings, which orders them exactly for
-- every u64; arithmetic on them (the grant) uses Lua numbers, exact below 2^53.
-- Effects replication, so the TIME read below may come before writes on a Redis 5 or 6 whose
-- lua-replicate-commands is off (Redis 7 replicates effects only; the call does nothing there).
if redis.replicate_commands then
  redis.replicate_commands()
end

local MAGIC = '{{MAGIC}}'
local ZERO20 = '00000000000000000000'
local MAXU64 = '18446744073709551615'

local function digits20(s)
  if not string.find(s, '^%d+$') or s > MAXU64 then
    return nil
  end
  return s
end

-- (fence, token) of a stored record's header, or nil.
local function header(v)
  if type(v) ~= 'string' or #v < 60 or string.sub(v, 1, 3) ~= MAGIC then
    return nil
  end
  local kind = string.sub(v, 4, 4)
  if kind ~= 'E' and kind ~= 'V' and kind ~= 'P' and kind ~= 'T' then
    return nil
  end
  local fence = digits20(string.sub(v, 5, 24))
  local token = string.sub(v, 25, 40)
  if not fence or not string.find(token, '^[0-9a-f]+$') or not digits20(string.sub(v, 41, 60)) then
    return nil
  end
  return fence, token
end

-- GET that reads a key of another type (foreign data) as absent instead of failing.
local function get(key)
  local v = redis.pcall('GET', key)
  if type(v) ~= 'string' then
    return nil
  end
  return v
end

-- The server's clock in microseconds: the floor of every grant. The counter and the stored
-- entry keep grants growing while they live; when both are gone (a restart without
-- persistence, a failover to a replica that had not seen them, eviction) the clock still
-- puts the next grant above every grant made before, as long as the server's clock does not
-- step back by more than the time since that grant. Exact in Lua numbers until 2255.
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Fence arithmetic is exact below 2^53.
local EXACT = 9007199254740992

-- The fence counter at `key`: 0 when absent or not a plain number in range (bytes another
-- client wrote there, 'nan', '1e30'), so garbage never turns into a grant.
local function counter(key)
  local v = get(key)
  if type(v) ~= 'string' or not string.find(v, '^%d+$') or #v > 16 then
    return 0
  end
  local n = tonumber(v)
  if n >= EXACT then
    return 0
  end
  return n
end

-- A stored fence at or above 2^53 (20 digits): never granted (grants stop below it), so only
-- forged or damaged bytes hold one. It counts as no fence: grants go on from the counter and the
-- clock, a write may replace it, and an invalidation does; else the key would refuse every
-- grant for as long as the bytes live (for ever, without a TTL).
local EXACT20 = '00009007199254740992'
local function forged(fence20)
  return fence20 ~= nil and fence20 >= EXACT20
end

-- The next grant above the counter at `counter_key`, the stored fence `stored` (20 digits; a
-- forged one counts as none) and the server's clock, or nil when that would leave exact
-- arithmetic (not before the year 2255); nothing is written before it is known.
local function next_fence(counter_key, stored)
  local s = 0
  if not forged(stored) then
    s = tonumber(stored)
  end
  local above = math.max(counter(counter_key), s, now_us())
  -- At 2^53 itself `+ 1` rounds back down, so the test is on the operand; and a grant of 2^53
  -- would be refused as a counter and a stored fence afterwards, so the last grant is below.
  if above >= EXACT - 1 then
    return nil
  end
  return above + 1
end

-- A fence as decimal digits, `width` wide with leading zeros. `%d` goes through a C long, 32
-- bits on some builds; `%.0f` is exact for every fence below 2^53.
local function digits(fence, width)
  return string.format('%0' .. width .. '.0f', fence)
end

-- Does `token` hold the lease whose value is `v`? A failed lease (fail.lua) holds its token
-- and '!', so `try_acquire` can tell every instance that the fill failed.
local function holds(v, token)
  return v == token or v == token .. '!'
end
