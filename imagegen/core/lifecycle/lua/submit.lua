-- Submit: admit a job (idempotency, the key's active jobs and daily quota, the queue's depth)
-- and, only if all allow it, write it and queue it, in one step.
-- KEYS: queue, job, queue_seq, bell, active, usage, fair_round, key_queue, [idempotency],
-- [index: the key's list of such runs, e.g. its trainings], [key_adapters, with A.max_adapters:
-- refused when the key holds that many], input:<name> for each input. A: job_id, max_depth, max_active (-1: unlimited), quota
-- (-1: unlimited), cost (the job's megapixel-steps), idempotency_value, idempotency_ttl,
-- inputs (names, in the order of their bytes: ARGV[2], ARGV[3], ...), fields (the record).
-- Returns {'created', position} | {'full', depth} | {'exists', idempotency value}
-- | {'too_many_jobs', active} | {'quota_exceeded', used} | {'too_many_adapters', held}.
-- The inputs are written with the record and carry no TTL while the job is queued or running
-- (the record has none either); every terminal transition expires them with the record. Out
-- of memory (noeviction), Redis refuses the script's first write and so the whole job.
--
-- Fair order: a model's queue is served in rounds, one job per key a round. A job goes into
-- the round after its key's last queued job, or, when the key has none queued, into the round
-- being served now (that of the last claimed job); its score is round * ROUND + submit order,
-- so within a round keys go in the order they submitted. A key's thousand queued jobs fill a
-- thousand rounds, and another key's single job joins the current one.
if K.idempotency then
  local existing = redis.call('GET', K.idempotency)
  if existing then return {'exists', existing} end
end
local active = tonumber(redis.call('GET', K.active) or '0')
if A.max_active >= 0 and active >= A.max_active then return {'too_many_jobs', active} end
local used = tonumber(redis.call('HGET', K.usage, 'megapixel_steps') or '0')
if A.quota >= 0 and used + tonumber(A.cost) > A.quota then
  return {'quota_exceeded', tostring(used)}
end
if K.key_adapters then
  local held = redis.call('SCARD', K.key_adapters)
  if held >= tonumber(A.max_adapters) then return {'too_many_adapters', held} end
end
local depth = redis.call('ZCARD', K.queue)
if depth >= A.max_depth then return {'full', depth} end
if K.idempotency then
  redis.call('SET', K.idempotency, A.idempotency_value, 'EX', A.idempotency_ttl)
end
for i, name in ipairs(A.inputs) do
  redis.call('SET', K['input:' .. name], ARGV[1 + i])
end
redis.call('HSET', K.job, unpack(pairs_of(A.fields)))
if K.index then
  redis.call('ZADD', K.index, A.fields.created_at, A.job_id)
  redis.call('EXPIRE', K.index, {INDEX_TTL})  -- its entries are pruned as they are read
end
redis.call('INCR', K.active)
redis.call('HINCRBYFLOAT', K.usage, 'megapixel_steps', A.cost)
redis.call('EXPIRE', K.usage, {USAGE_TTL})
local round = tonumber(redis.call('GET', K.fair_round) or '0')
local last = redis.call('ZRANGE', K.key_queue, -1, -1, 'WITHSCORES')
if last[2] then
  local after = math.floor(tonumber(last[2]) / {ROUND}) + 1
  if after > round then round = after end
end
local score = round * {ROUND} + redis.call('INCR', K.queue_seq) % {ROUND}
redis.call('ZADD', K.queue, score, A.job_id)
redis.call('ZADD', K.key_queue, score, A.job_id)
ring(K.bell)
return {'created', redis.call('ZRANK', K.queue, A.job_id)}
