-- Read only: for each queue in KEYS, when its head job was created ('' when it is empty), for
-- the worker's routing by warmth. Returns one value per key. The head jobs' hashes are named
-- by the ids found, so they are not in KEYS.
local out = {}
for i, key in ipairs(KEYS) do
  local head = redis.call('ZRANGE', key, 0, 0)
  local created = ''
  if head[1] then created = redis.call('HGET', '{P}:job:' .. head[1], 'created_at') or '0' end
  out[i] = created
end
return out
