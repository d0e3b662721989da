-- Claim: the head of the queue (when A.batch_key is '') and then, or only, queued jobs of
-- batch key A.batch_key that fit the image budget, among the first A.scan of the queue, oldest
-- first. KEYS: queue, running, running_models, fair_round, webhooks_due, webhooks_bell.
-- A: worker, now, model, batch_key, budget, scan.
-- Returns {others_waiting (0/1), {job id, record field, value, ...}, ...}.
-- The job hashes it reads and each job's key queue are named by the ids it finds in the
-- queue, so they are not in KEYS (a Redis Cluster refuses this script: see the lifecycle docs).
local want = A.batch_key
local budget = A.budget
local now = tonumber(A.now)
local out = {0}
local round = tonumber(redis.call('GET', K.fair_round) or '0')
local served = round
local ids = redis.call('ZRANGE', K.queue, 0, A.scan - 1, 'WITHSCORES')
for i = 1, #ids, 2 do
  local id = ids[i]
  local jk = '{P}:job:' .. id
  local f = redis.call('HMGET', jk, 'status', 'batch_key', 'n', 'attempts', 'timeout_s', 'api_key')
  if f[1] ~= 'queued' then
    redis.call('ZREM', K.queue, id)  -- its record expired: nothing to run
  elseif want == '' or (f[2] == want and tonumber(f[3]) <= budget) then
    if want == '' then want = f[2] end
    budget = budget - tonumber(f[3])
    local attempt = tonumber(f[4] or '0') + 1
    local timeout = tonumber(f[5] or '0')
    local deadline = 0
    if timeout > 0 then deadline = now + timeout end
    redis.call('HSET', jk, 'status', 'running', 'started_at', A.now, 'worker', A.worker,
      'owner', A.worker .. '#' .. attempt, 'attempts', attempt, 'progress_step', 0,
      'progress_at', '', 'deadline', deadline)
    redis.call('ZREM', K.queue, id)
    redis.call('ZREM', '{P}:queue:' .. A.model .. ':key:' .. (f[6] or ''), id)
    local job_round = math.floor(tonumber(ids[i + 1]) / {ROUND})
    if job_round > served then served = job_round end
    local score = deadline
    if score == 0 then score = now + 1e9 end
    redis.call('ZADD', K.running, score, id)
    redis.call('PUBLISH', jk .. ':events', 'running')
    outbox(jk, id, 'running', A.now)
    local entry = redis.call('HGETALL', jk)
    table.insert(entry, 1, id)
    table.insert(out, entry)
    if budget <= 0 then break end
  else
    out[1] = 1
  end
end
if served > round then redis.call('SET', K.fair_round, served) end
if #out > 1 then redis.call('SADD', K.running_models, A.model) end
return out
