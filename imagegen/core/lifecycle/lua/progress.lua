-- Progress only moves forward and only while running under this owner: a late write never
-- resurrects a canceled job or rolls a finished one back. Returns {the job's status ("lost"
-- if another owner holds it), whether a client watches its previews}, so the worker learns of
-- a cancel, and of a preview watcher, on the round trip it already makes.
-- KEYS: job, events, previews_wanted. A: step, at, owner, fields (more of the record to write
-- with the step: a training's loss and checkpoint).
local status = redis.call('HGET', K.job, 'status')
local wanted = redis.call('EXISTS', K.previews_wanted)
if status ~= 'running' then return {status or '', wanted} end
if redis.call('HGET', K.job, 'owner') ~= A.owner then return {'lost', wanted} end
local cur = tonumber(redis.call('HGET', K.job, 'progress_step') or '0')
if A.step > cur then
  redis.call('HSET', K.job, 'progress_step', A.step, 'progress_at', A.at,
    unpack(pairs_of(A.fields)))
  redis.call('PUBLISH', K.events, 'progress')
end
return {status, wanted}
