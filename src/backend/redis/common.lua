-- Shared by every script (prepended when the scripts are built). Mirrors `Header::parse` in
-- src/entry.rs exactly: a record whose header does not parse counts as absent (fence 0).
-- Fences are compared as their 20-digit zero-padded strings, which orders them exactly for
-- every u64; arithmetic on them (the grant) uses Lua numbers, exact below 2^53.
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
