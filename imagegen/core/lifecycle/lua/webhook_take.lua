-- Webhook delivery, taking: the first delivery due by A.now, leased for A.lease seconds (its
-- due time moves past the lease, so a delivery process killed mid-send leaves it to be sent
-- again), with its attempt counted. KEYS: webhooks_due. Returns {message id, hash field,
-- value, ...}, or {'', next due time or ''} when none is due. The delivery's hash is named by
-- the id found, so it is not in KEYS.
while true do
  local due = redis.call('ZRANGEBYSCORE', K.webhooks_due, '-inf', A.now, 'LIMIT', 0, 1)
  if not due[1] then
    local first = redis.call('ZRANGE', K.webhooks_due, 0, 0, 'WITHSCORES')
    return {'', first[2] or ''}
  end
  local wk = '{P}:webhook:' .. due[1]
  if redis.call('EXISTS', wk) == 1 then
    redis.call('ZADD', K.webhooks_due, tonumber(A.now) + tonumber(A.lease), due[1])
    redis.call('HINCRBY', wk, 'attempts', 1)
    local entry = redis.call('HGETALL', wk)
    table.insert(entry, 1, due[1])
    return entry
  end
  redis.call('ZREM', K.webhooks_due, due[1])
end
