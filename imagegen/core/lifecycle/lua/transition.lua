-- Any other state change: to A.new_status from one of A.allowed (and, with A.owner, only
-- while that run holds the job), writing A.fields on the record, storing the job's images
-- (KEYS image:<index>; their bytes are ARGV[2], ARGV[3], ... in the order of A.images) and
-- settling the job's books.
-- KEYS: job, events, job_stats, queue, key_queue, running, bell, queue_seq, run_seconds,
-- active, usage_today, usage_charged, key_stats, webhooks_due, webhooks_bell, input:<name>
-- for each input, image:<i> for each image. A: job_id, owner ('' = any), new_status, ttl
-- (record TTL, 0 = none), image_ttl, now, allowed, fields, histogram (the run-seconds
-- buckets the run falls in), run_s, images (their indexes). With KEYS adapter and key_adapters
-- (a training's success): A.adapter_fields registers the adapter it made, A.adapter_id joins
-- its owner's set, in the same step.
-- Returns {1, new status} or {0, current status | 'lost' | ''}.
-- A terminal transition also settles the job's key: one active job fewer, the job counted on
-- today's usage and the key's totals, and a job canceled while queued refunds its
-- megapixel-steps to the day it was charged to.
local cur = redis.call('HGET', K.job, 'status')
if not cur then return {0, ''} end
local ok = false
for _, status in ipairs(A.allowed) do
  if status == cur then ok = true end
end
if not ok then return {0, cur} end
if A.owner ~= '' and redis.call('HGET', K.job, 'owner') ~= A.owner then return {0, 'lost'} end
local id, new = A.job_id, A.new_status
redis.call('HSET', K.job, 'status', new, unpack(pairs_of(A.fields)))
if K.adapter then
  redis.call('HSET', K.adapter, unpack(pairs_of(A.adapter_fields)))
  redis.call('SADD', K.key_adapters, A.adapter_id)
end
for i, index in ipairs(A.images) do
  redis.call('SET', K['image:' .. index], ARGV[1 + i], 'EX', A.image_ttl)
end
if cur == 'queued' then
  redis.call('ZREM', K.queue, id)
  redis.call('ZREM', K.key_queue, id)
end
if cur == 'running' then redis.call('ZREM', K.running, id) end
if new == 'queued' then
  -- Back at the front: it already waited its turn once.
  local head = redis.call('ZRANGE', K.queue, 0, 0, 'WITHSCORES')
  local score = redis.call('INCR', K.queue_seq)
  if head[2] then score = tonumber(head[2]) - 1 end
  redis.call('ZADD', K.queue, score, id)
  redis.call('ZADD', K.key_queue, score, id)
  ring(K.bell)
end
-- The record and the job's input images live exactly as long as each other.
for name, key in pairs(K) do
  if name == 'job' or string.sub(name, 1, 6) == 'input:' then
    if A.ttl > 0 then redis.call('EXPIRE', key, A.ttl) end
    if A.ttl == 0 then redis.call('PERSIST', key) end
  end
end
if new == 'succeeded' or new == 'failed' or new == 'canceled' then
  local model = redis.call('HGET', K.job, 'model')
  local name = redis.call('HGET', K.job, 'api_key') or ''
  -- Cluster-wide job counts by model and final status, for /metrics on any gateway.
  redis.call('HINCRBY', K.job_stats, model .. '|' .. new, 1)
  for _, bucket in ipairs(A.histogram) do
    redis.call('HINCRBY', K.run_seconds, bucket, 1)
  end
  if #A.histogram > 0 then redis.call('HINCRBYFLOAT', K.run_seconds, 'sum', A.run_s) end
  -- The key's books.
  if redis.call('DECR', K.active) <= 0 then redis.call('DEL', K.active) end
  local cost = redis.call('HGET', K.job, 'megapixel_steps') or '0'
  if cur == 'queued' and new == 'canceled' then
    if redis.call('EXISTS', K.usage_charged) == 1 then
      redis.call('HINCRBYFLOAT', K.usage_charged, 'megapixel_steps', '-' .. cost)
    end
  else
    redis.call('HINCRBYFLOAT', K.key_stats, name .. '|megapixel_steps', cost)
  end
  redis.call('HINCRBY', K.usage_today, new, 1)
  redis.call('EXPIRE', K.usage_today, {USAGE_TTL})
  redis.call('HINCRBY', K.key_stats, name .. '|' .. new, 1)
  outbox(K.job, id, new, A.now)
end
redis.call('PUBLISH', K.events, new)
return {1, new}
