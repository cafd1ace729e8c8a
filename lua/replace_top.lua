-- replace_top.lua: atomically replaces one user's materialised answer, unless a newer one is
-- already stored. One script call is one atomic step, so a reader sees the old answer or the new
-- one, never a mix; both keys carry the user's hash tag, so the call touches one cluster slot.
--
-- KEYS[1]  <prefix>:{<user_id>}:songs  sorted set, member = song_id, score = plays
-- KEYS[2]  <prefix>:{<user_id>}:meta   hash
-- ARGV[1]  computed_at_ms  version of this computation: ms since the epoch at which it read
--                          ClickHouse (integer). A stored version greater than this one wins.
-- ARGV[2]  ttl_ms          TTL of both keys of a non-empty answer (integer ms, > 0)
-- ARGV[3]  tombstone_ttl_ms TTL of the tombstone an empty answer leaves (integer ms, > 0)
-- ARGV[4]  computed_at     RFC 3339
-- ARGV[5]  window_start    RFC 3339
-- ARGV[6]  window_end      RFC 3339
-- ARGV[7…] plays_1, song_id_1, plays_2, song_id_2, … (ZADD order); none: the answer is empty
--
-- Returns 1 when the answer was written, 2 when it was empty (the songs key is deleted and the
-- meta key becomes a tombstone holding only `computed_at_ms`, so that an older non-empty answer
-- still in flight cannot resurrect the user; it expires after tombstone_ttl_ms, leaving no keys),
-- 0 when refused because the stored version is newer. An equal version is rewritten: a retried
-- call is idempotent.
local version = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local tombstone_ttl = tonumber(ARGV[3])
if not version or not ttl or ttl <= 0 or not tombstone_ttl or tombstone_ttl <= 0 or #ARGV % 2 ~= 0 then
  return redis.error_reply('replace_top: bad arguments')
end
local stored = tonumber(redis.call('HGET', KEYS[2], 'computed_at_ms'))
if stored and stored > version then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
if #ARGV == 6 then
  redis.call('HSET', KEYS[2], 'computed_at_ms', ARGV[1])
  redis.call('PEXPIRE', KEYS[2], tombstone_ttl)
  return 2
end
redis.call('ZADD', KEYS[1], unpack(ARGV, 7))
redis.call('HSET', KEYS[2], 'computed_at_ms', ARGV[1], 'computed_at', ARGV[4],
  'window_start', ARGV[5], 'window_end', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
