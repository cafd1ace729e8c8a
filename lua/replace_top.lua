-- replace_top.lua: atomically replaces the materialised answers of one or more users, each
-- unless a newer one is already stored. One script call is one atomic step, so a reader sees a
-- user's old answer or the new one, never a mix. A user's two keys carry its hash tag: on a
-- cluster a call names one user (one slot); on one server a call names many, which spreads the
-- cost of a script call over them (a refresh stores 100k answers in seconds).
--
-- KEYS[2i-1]  <prefix>:{<user_id>}:songs  user i's sorted set, member = song_id, score = plays
-- KEYS[2i]    <prefix>:{<user_id>}:meta   user i's hash
-- ARGV[1]  computed_at_ms   version of this computation: ms since the epoch at which it read
--                           ClickHouse (integer). A stored version greater than this one wins,
--                           unless it is more than max_ahead_ms greater (see ARGV[7]).
-- ARGV[2]  ttl_ms           TTL of both keys of a non-empty answer (integer ms, > 0)
-- ARGV[3]  tombstone_ttl_ms TTL of the tombstone an empty answer leaves (integer ms, > 0)
-- ARGV[4]  computed_at      RFC 3339
-- ARGV[5]  window_start     RFC 3339
-- ARGV[6]  window_end       RFC 3339
-- ARGV[7]  max_ahead_ms     how far a stored version may be ahead of this writer's clock (integer
--                           ms, >= 0). Versions are writers' clocks, synchronised within this
--                           bound; one further ahead was not written by a writer (a hand-written
--                           or poisoned meta, a clock years off) and would refuse every honest
--                           rewrite forever, so it is treated as corrupt and overwritten.
-- then, for each user i in KEYS order: n_i (its number of songs, >= 0), its fingerprint (a
-- digest of the answer's songs and plays, the empty string for none), followed by n_i pairs
-- plays, song_id (ZADD order).
--
-- An answer whose fingerprint equals the stored one is the stored answer: only its version,
-- times and TTLs are renewed (most refreshes of an active user change nothing the answer holds,
-- and rewriting its songs is most of a write's Redis time). The songs are rewritten whenever
-- their key is gone (evicted) or the stored version is corrupt.
--
-- Returns one code per user, in KEYS order: 1 when the answer was written, 5 when it was
-- renewed unchanged, 2 when it was empty
-- (the songs key is deleted and the meta key becomes a tombstone holding only `computed_at_ms`,
-- so that an older non-empty answer still in flight cannot resurrect the user; it expires after
-- tombstone_ttl_ms, leaving no keys), 0 when refused because the stored version is newer; 3 and
-- 4 are 1 and 2 written over a corrupt version (more than max_ahead_ms ahead). An
-- equal version is rewritten: a retried call is idempotent. Arguments are checked before any
-- write: a malformed call changes nothing.
local version = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local tombstone_ttl = tonumber(ARGV[3])
local max_ahead = tonumber(ARGV[7])
local users = #KEYS / 2
if not version or not ttl or ttl <= 0 or not tombstone_ttl or tombstone_ttl <= 0
    or not max_ahead or max_ahead < 0 or #ARGV < 7 or users < 1 or #KEYS % 2 ~= 0 then
  return redis.error_reply('replace_top: bad arguments')
end
local counts = {}
local next_arg = 8
for i = 1, users do
  local n = tonumber(ARGV[next_arg])
  if not n or n < 0 or n % 1 ~= 0 then
    return redis.error_reply('replace_top: bad arguments')
  end
  counts[i] = n
  next_arg = next_arg + 2 + 2 * n
end
if next_arg ~= #ARGV + 1 then
  return redis.error_reply('replace_top: bad arguments')
end

local codes = {}
next_arg = 8
for i = 1, users do
  local songs, meta, n = KEYS[2 * i - 1], KEYS[2 * i], counts[i]
  local fingerprint = ARGV[next_arg + 1]
  local stored_meta = redis.call('HMGET', meta, 'computed_at_ms', 'fingerprint')
  local stored = tonumber(stored_meta[1])
  local corrupt = stored ~= nil and stored > version + max_ahead
  if stored and stored > version and not corrupt then
    codes[i] = 0
  elseif n > 0 and not corrupt and fingerprint ~= '' and stored_meta[2] == fingerprint
      and redis.call('PEXPIRE', songs, ttl) == 1 then
    redis.call('HSET', meta, 'computed_at_ms', ARGV[1], 'computed_at', ARGV[4],
      'window_start', ARGV[5], 'window_end', ARGV[6])
    redis.call('PEXPIRE', meta, ttl)
    codes[i] = 5
  else
    redis.call('DEL', songs, meta)
    if n == 0 then
      redis.call('HSET', meta, 'computed_at_ms', ARGV[1])
      redis.call('PEXPIRE', meta, tombstone_ttl)
      codes[i] = 2
    else
      redis.call('ZADD', songs, unpack(ARGV, next_arg + 2, next_arg + 1 + 2 * n))
      redis.call('HSET', meta, 'computed_at_ms', ARGV[1], 'computed_at', ARGV[4],
        'window_start', ARGV[5], 'window_end', ARGV[6], 'fingerprint', fingerprint)
      redis.call('PEXPIRE', songs, ttl)
      redis.call('PEXPIRE', meta, ttl)
      codes[i] = 1
    end
    if corrupt then codes[i] = codes[i] + 2 end
  end
  next_arg = next_arg + 2 + 2 * n
end
return codes
