-- The webhook outbox, written in the same step as the transition it tells of: if the job's
-- webhook asks for `event`, a delivery (a hash holding a snapshot of the record as it is now)
-- and its due time. Delivery ids name the job, the event and the run: a receiver can drop
-- repeats of one id (deliveries are sent at least once). The delivery's own hash is named by
-- that id, which is made here, so it is the one key of this function not in KEYS; the caller
-- declares webhooks_due and webhooks_bell.
local function outbox(jk, id, event, now)
  local hook = redis.call('HGET', jk, 'webhook')
  if not hook or hook == '' then return end
  local target = cjson.decode(hook)
  local wanted = false
  for _, name in ipairs(target['events']) do
    if name == event then wanted = true end
  end
  if not wanted then return end
  local attempt = redis.call('HGET', jk, 'attempts') or '0'
  local msg = 'msg_' .. string.sub(id, 5) .. '_' .. event .. '_' .. attempt
  local wk = '{P}:webhook:' .. msg
  redis.call('HSET', wk, 'job', id, 'event', event, 'url', target['url'],
    'api_key', redis.call('HGET', jk, 'api_key') or '', 'created_at', now, 'attempts', 0,
    'record', cjson.encode(redis.call('HGETALL', jk)))
  -- A safety net, far past any retry window: a delivery no process ever takes goes away.
  redis.call('EXPIRE', wk, {OUTBOX_TTL})
  redis.call('ZADD', K.webhooks_due, now, msg)
  ring(K.webhooks_bell)
end
