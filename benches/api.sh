#!/usr/bin/env bash
# API benchmark (not a test): the API's cached reads vs redis-benchmark running the same Redis
# work, same machine, same run; the latency at half the API's maximum rate; the no-cache path.
#
#   scripts/stack up && eval "$(scripts/stack env)" && benches/api.sh
#
# 1. A fresh ClickHouse database gets TOPK_BENCH_USERS users (10,000), each with 60 songs played
#    within the last hour (distinct counts, so every answer has 50 songs); `topk warmup` fills
#    Redis under a fresh key prefix.
# 2. `topk serve` (release build) answers GET /v1/users/<random user>/top-songs: wrk, 2 threads,
#    TOPK_BENCH_CONNECTIONS (64) connections, TOPK_BENCH_DURATION (10s).
# 3. redis-benchmark, the same connections, runs the API's Redis work per request: one EVAL
#    reading the meta hash and the whole sorted set with scores of one user (the API sends
#    MULTI, HGETALL, ZRANGE WITHSCORES, EXEC in one round trip; EVAL is the same two reads in
#    one round trip).
# 4. wrk again, paced at half the maximum rate found in 2, with --latency: p99. wrk has no
#    open-loop mode and wrk2 is not in Debian, so TOPK_BENCH_HALF_CONNECTIONS (8) connections on
#    one wrk thread each wait between a response and their next request; short calibration runs
#    correct the wait so the rate lands on half (the JSON reports the share reached).
# 5. The no-cache path: a second API with --max-age 1ms, so every request recomputes from
#    ClickHouse (and writes back), wrk with 8 connections.
# Prints the figures and one JSON line. wrk, redis-benchmark and the API share the 2 cores.
#
# Measured 2026-11-30 on the shared 2-core dev machine, quiet, three runs: API 8,123-8,640 req/s
# vs redis-benchmark 12,441-13,393 (0.65-0.67x); paced with 8 connections at 0.45/0.50/0.59 of
# the maximum rate, p99 1.66/1.93/1.77 ms; no-cache path 207-238 req/s (cache 36-39x faster).
# Paced with 64 connections instead (the old step 4), p99 was 3.45 ms at half rate: 64
# connections on 2 cores shared by wrk, the API and Redis queue behind each other.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

USERS="${TOPK_BENCH_USERS:-10000}"
CONNS="${TOPK_BENCH_CONNECTIONS:-64}"
DURATION="${TOPK_BENCH_DURATION:-10s}"
PORT="${TOPK_BENCH_PORT:-18180}"
OLAP_PORT=$((PORT + 1))
CH_URL="${TOPK_CLICKHOUSE_URL:-http://127.0.0.1:8123}"
REDIS_URL="${TOPK_REDIS_URL:-redis://127.0.0.1:6379}"
REDIS_HOSTPORT="${REDIS_URL#redis://}"
REDIS_HOST="${REDIS_HOSTPORT%:*}"
REDIS_PORT="${REDIS_HOSTPORT##*:}"
TAG="bench_api_$$"
DB="$TAG"
PREFIX="$TAG"
WORK="$(mktemp -d)"

cargo build --release --quiet -p topk-cli
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/topk"
export TOPK_CLICKHOUSE_DATABASE="$DB" TOPK_REDIS_PREFIX="$PREFIX" RUST_LOG=error

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  curl -s "$CH_URL" --data-binary "DROP DATABASE IF EXISTS $DB" >/dev/null || true
  redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" --scan --pattern "$PREFIX:*" \
    | xargs -r -n 1000 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" DEL >/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "api bench: seeding $USERS users x 60 songs into ClickHouse database $DB" >&2
"$BIN" migrate >/dev/null
# Plays of song s for user u: 10 + ((u + s) % 60) * 3 + s % 3 (distinct per user), one minute
# row each, 30 minutes ago.
curl -sf "$CH_URL/?database=$DB" --data-binary "INSERT INTO plays_minute (user_id, song_id, minute, plays, batch_id)
  SELECT 1 + intDiv(number, 60) AS u, 1 + number % 60 AS s,
         toStartOfMinute(now() - 1800), 10 + ((u + s) % 60) * 3 + s % 3, 1
  FROM system.numbers LIMIT $((USERS * 60))"
echo "api bench: warming Redis (prefix $PREFIX)" >&2
"$BIN" warmup >/dev/null

"$BIN" serve --listen "127.0.0.1:$PORT" &
pids+=($!)
"$BIN" serve --listen "127.0.0.1:$OLAP_PORT" --max-age 1ms &
pids+=($!)
for port in "$PORT" "$OLAP_PORT"; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
curl -sf "http://127.0.0.1:$PORT/v1/users/1/top-songs" | grep -q '"source":"cache"' \
  || { echo "api bench: user 1 is not served from the cache" >&2; exit 1; }

cat >"$WORK/random_user.lua" <<LUA
-- A random seeded user per request; optional pacing (ms between a response and the next request).
local users = $USERS
local pause = tonumber(os.getenv("WRK_DELAY_MS") or "0")
function setup(thread) thread:set("seed", math.random(1, 1e9)) end
function init(args) math.randomseed(seed) end
function request()
  return wrk.format("GET", "/v1/users/" .. math.random(1, users) .. "/top-songs")
end
-- wrk waits whole milliseconds: a fractional mean is drawn from the two whole values around it.
if pause > 0 then
  local whole = math.floor(pause)
  local frac = pause - whole
  function delay() if math.random() < frac then return whole + 1 end return whole end
end
LUA

rps_of() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
p99_of() { awk '$1 == "99%" {print $2}' "$1"; }

echo "api bench: wrk, maximum rate ($CONNS connections, $DURATION)" >&2
wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$WORK/random_user.lua" "http://127.0.0.1:$PORT" | tee "$WORK/max.txt" >&2
API_RPS="$(rps_of "$WORK/max.txt")"

echo "api bench: redis-benchmark, the same reads as one EVAL per request" >&2
READ='return {redis.call("HGETALL", KEYS[1]), redis.call("ZRANGE", KEYS[2], 0, -1, "WITHSCORES")}'
redis-benchmark -h "$REDIS_HOST" -p "$REDIS_PORT" -c "$CONNS" -n 400000 --threads 2 -q \
  EVAL "$READ" 2 "$PREFIX:{1}:meta" "$PREFIX:{1}:songs" | tr '\r' '\n' | grep -v '^$' | tail -1 | tee "$WORK/redis.txt" >&2
REDIS_RPS="$(grep -o '[0-9.]* requests per second' "$WORK/redis.txt" | awk '{print $1}')"

# Half the maximum rate: HALF_CONNS connections (8), one wrk thread, each connection waiting
# between a response and its next request. The wait that gives half the rate is the connection's
# share of the time (HALF_CONNS / rate) less its round trip: three 3 s calibration runs each
# correct the wait by what the rate missed, then the measured run uses it.
HALF_CONNS="${TOPK_BENCH_HALF_CONNECTIONS:-8}"
paced() { # paced DELAY_MS DURATION OUT
  WRK_DELAY_MS="$1" wrk -t1 -c"$HALF_CONNS" -d"$2" --latency -s "$WORK/random_user.lua" \
    "http://127.0.0.1:$PORT" >"$3"
}
DELAY_MS="$(awk -v c="$HALF_CONNS" -v r="$API_RPS" 'BEGIN { printf "%.3f", 2 * c * 1000 / r }')"
for _ in 1 2 3; do
  paced "$DELAY_MS" 3s "$WORK/calibrate.txt"
  # Per connection, the time between requests must grow (or shrink) by what it missed.
  DELAY_MS="$(awk -v c="$HALF_CONNS" -v r="$API_RPS" -v d="$DELAY_MS" -v got="$(rps_of "$WORK/calibrate.txt")" \
    'BEGIN { d += 2 * c * 1000 / r - c * 1000 / got; printf "%.3f", (d < 0 ? 0 : d) }')"
done
echo "api bench: wrk paced at half rate ($HALF_CONNS connections, each waits ${DELAY_MS} ms on average)" >&2
paced "$DELAY_MS" "$DURATION" "$WORK/half.txt"
cat "$WORK/half.txt" >&2
HALF_RPS="$(rps_of "$WORK/half.txt")"
HALF_P99="$(p99_of "$WORK/half.txt")"

echo "api bench: the no-cache path (every request computed by ClickHouse), 8 connections" >&2
wrk -t2 -c8 -d"$DURATION" --latency -s "$WORK/random_user.lua" "http://127.0.0.1:$OLAP_PORT" | tee "$WORK/olap.txt" >&2
OLAP_RPS="$(rps_of "$WORK/olap.txt")"
OLAP_P99="$(p99_of "$WORK/olap.txt")"

awk -v api="$API_RPS" -v redis="$REDIS_RPS" -v half="$HALF_RPS" -v p99="$HALF_P99" \
    -v olap="$OLAP_RPS" -v olap_p99="$OLAP_P99" -v users="$USERS" -v conns="$CONNS" -v half_conns="$HALF_CONNS" 'BEGIN {
  printf "{\"users\": %d, \"connections\": %d, \"api_rps\": %.0f, \"redis_benchmark_rps\": %.0f, \"api_vs_redis\": %.2f, \"half_rate_connections\": %d, \"half_rate_rps\": %.0f, \"half_rate_share_of_max\": %.2f, \"half_rate_p99\": \"%s\", \"olap_rps\": %.0f, \"olap_p99\": \"%s\", \"cache_vs_olap\": %.1f}\n",
    users, conns, api, redis, api / redis, half_conns, half, half / api, p99, olap, olap_p99, api / olap
}'
