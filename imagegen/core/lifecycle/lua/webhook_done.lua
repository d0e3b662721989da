-- Webhook delivery, an attempt's outcome: recorded on the job (its `webhook_deliveries`, if
-- the record still exists; the last 50 kept) and in the key's totals; 'retrying' puts the
-- delivery back at A.next_at, 'delivered' and 'failed' (given up) end it.
-- KEYS: webhooks_due, delivery, job, key_stats. A: message_id, outcome, next_at, attempt (the
-- attempt's record).
if redis.call('EXISTS', K.delivery) == 0 then return 0 end
local name = redis.call('HGET', K.delivery, 'api_key') or ''
if redis.call('EXISTS', K.job) == 1 then
  local items = {}
  local kept = redis.call('HGET', K.job, 'webhook_deliveries')
  if kept and kept ~= '' then items = cjson.decode(kept) end
  table.insert(items, A.attempt)
  while #items > 50 do table.remove(items, 1) end
  redis.call('HSET', K.job, 'webhook_deliveries', cjson.encode(items))
end
redis.call('HINCRBY', K.key_stats, name .. '|webhook_' .. A.outcome, 1)
if A.outcome == 'retrying' then
  redis.call('ZADD', K.webhooks_due, A.next_at, A.message_id)
else
  redis.call('ZREM', K.webhooks_due, A.message_id)
  redis.call('DEL', K.delivery)
end
return 1
