-- schedule.lua: records when users' answers next change without new plays, each unless a newer
-- computation already scheduled the user. One call names users of one touches partition: both
-- keys carry the partition's hash tag, so on a cluster a call is one slot.
--
-- KEYS[1]  <prefix>:{ageing.<p>}:due       sorted set, member = user_id, score = when its answer
--                                          next changes (seconds since the epoch)
-- KEYS[2]  <prefix>:{ageing.<p>}:versions  sorted set, member = user_id, score = computed_at_ms
--                                          of the computation that scheduled it
-- ARGV[1]  computed_at_ms  version of this computation (integer ms since the epoch)
-- ARGV[2]  max_ahead_ms    a stored version more than this ahead of ARGV[1] was not written by a
--                          writer of this system (a clock years off, a hand edit) and is
--                          overwritten instead of refusing every honest schedule forever
-- then pairs user_id, changes_at (seconds; -1 when nothing stored can change the answer: the
-- user leaves the index).
--
-- Returns how many users were scheduled (or removed); the others had a newer version. An equal
-- version is rewritten: a retried call is idempotent. Arguments are checked before any write.
local version = tonumber(ARGV[1])
local max_ahead = tonumber(ARGV[2])
if not version or not max_ahead or max_ahead < 0 or #ARGV % 2 ~= 0 or #KEYS ~= 2 then
  return redis.error_reply('schedule: bad arguments')
end
for i = 3, #ARGV, 2 do
  if not tonumber(ARGV[i + 1]) then
    return redis.error_reply('schedule: bad arguments')
  end
end
local scheduled = 0
for i = 3, #ARGV, 2 do
  local user = ARGV[i]
  local at = tonumber(ARGV[i + 1])
  local stored = tonumber(redis.call('ZSCORE', KEYS[2], user))
  if not stored or stored <= version or stored > version + max_ahead then
    if at < 0 then
      redis.call('ZREM', KEYS[1], user)
      redis.call('ZREM', KEYS[2], user)
    else
      redis.call('ZADD', KEYS[1], at, user)
      redis.call('ZADD', KEYS[2], version, user)
    end
    scheduled = scheduled + 1
  end
end
return scheduled
