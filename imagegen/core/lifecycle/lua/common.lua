-- Helpers every script may use.

-- A flat {field, value, ...} list of a JSON object's members, for HSET.
local function pairs_of(object)
  local flat = {}
  for name, value in pairs(object) do
    flat[#flat + 1] = name
    flat[#flat + 1] = value
  end
  return flat
end

-- Wake a waiter blocked on a bell list (idle workers, the webhook sender); the list is kept
-- short and goes away when nobody rings it.
local function ring(bell)
  redis.call('LPUSH', bell, 1)
  redis.call('LTRIM', bell, 0, 63)
  redis.call('EXPIRE', bell, 60)
end
