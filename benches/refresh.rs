//! Refresh benchmark: users refreshed per second by the refresher (batch query in chunks,
//! guarded script writes) against a baseline that queries ClickHouse once per user and writes
//! the same script, same data, same run, same concurrency; then the ClickHouse bytes a
//! steady-state cycle reads (issue 17: a cycle costs what changed, not what is stored).
//!
//! ```sh
//! scripts/stack up && eval "$(scripts/stack env)"
//! cargo bench --bench refresh                       # 100k changed users, ~20 rows each
//! TOPK_BENCH_USERS=1000000 cargo bench --bench refresh
//! ```
//!
//! A second cycle over the same users, nothing played since, measures the refresh of unchanged
//! answers (`"refresher_unchanged"`: `replace_top.lua` renews them by fingerprint instead of
//! rewriting their songs); both cycles are reported against the batch query alone.
//!
//! Knobs: `TOPK_BENCH_USERS` (100,000), `TOPK_BENCH_ROWS_PER_USER` (20), `TOPK_BENCH_BATCH`
//! (users per query, 2,000), `TOPK_BENCH_CONCURRENCY` (queries in flight, 2),
//! `TOPK_BENCH_BASELINE_USERS` (users timed for the per-user baseline, 2,000),
//! `TOPK_BENCH_PARTITIONS` (touches partitions, 8). Every user is handed to the cycle as
//! touched, so one refresher cycle recomputes (and schedules) all of them; keys get a 10-minute
//! TTL.
//! `TOPK_BENCH_KEEP=1` keeps the ClickHouse database for a closer look;
//! `TOPK_BENCH_REDIS_CLUSTER=1` writes to the stack's Redis Cluster.
//!
//! Bytes per cycle (`"cycle_reads"` in the JSON): a second refresher over the same keys (so
//! the ageing index holds every user, as in steady state), on a client that logs its queries
//! (`log_queries=1`, a unique product name in its User-Agent, so `system.query_log` holds its
//! queries and nobody else's), runs `TOPK_BENCH_CYCLES` (3) cycles. Before each,
//! `TOPK_BENCH_TOUCHED` (100) users spread over the id range are touched and its injected clock
//! moves `TOPK_BENCH_MOVE_MINUTES` (0) minutes: with 0 every cycle recomputes the same number
//! of users whatever the table's size; with 1 (a `topk refresh` at a one-minute interval) the
//! users the ageing index says are due come on top, and they grow with the users. From
//! `system.query_log` (QueryFinish rows, after `SYSTEM FLUSH LOGS`) each cycle's `read_rows`,
//! `read_bytes` and `result_rows` are summed (`recompute`: the batch query and its clean-days
//! lookup, the only ClickHouse reads a cycle makes; the due users come from Redis). The summary
//! (`"per_cycle"`) is the median cycle. Run it at two sizes (e.g. `TOPK_BENCH_USERS=50000` and
//! `500000`) and compare. Keep the touched users fewer than the table's granules (rows / 8,192):
//! beyond that, users spread over the id range hit every granule and the read saturates at the
//! table's size, whatever the design.
//!
//! Prints one JSON line.

mod common;

use common::env_or;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use topk::cache::{Answer, Target, replace};
use topk::clock::{Clock, ManualClock, SystemClock};
use topk::query::TopQuery;
use topk::window::{MAX_LIMIT, Window};
use topk_refresher::{RefreshSettings, Refresher};

#[tokio::main]
async fn main() {
    topk::telemetry::init_logging();
    let users: u64 = env_or("TOPK_BENCH_USERS", 100_000);
    let per_user: u64 = env_or("TOPK_BENCH_ROWS_PER_USER", 20);
    let batch_size: usize = env_or("TOPK_BENCH_BATCH", 2_000);
    let concurrency: usize = env_or("TOPK_BENCH_CONCURRENCY", 2);
    let baseline_users: u64 = env_or("TOPK_BENCH_BASELINE_USERS", 2_000);
    let rows = users * per_user;
    let args = common::clickhouse_args("topk_bench");
    // TOPK_BENCH_REDIS_CLUSTER=1: write to the stack's Redis Cluster instead of the one server.
    let cluster = std::env::var_os("TOPK_BENCH_REDIS_CLUSTER").is_some();
    let redis_args = topk::config::RedisArgs {
        url: if cluster {
            std::env::var("TOPK_TEST_REDIS_CLUSTER_URLS").unwrap_or_else(|_| {
                "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002".into()
            })
        } else {
            std::env::var("TOPK_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
        },
        prefix: format!("topk_bench_{:08x}", rand::random::<u32>()),
        pool_size: 4,
        cluster,
        auth: Default::default(),
    };
    topk::migrate::run(&args).await.expect("migrate");
    let client = topk::olap::client(&args);
    let now = SystemClock.now_ms();
    let window = Window::at(now);
    common::generate_minute_rows(&client, window, users, rows).await;
    common::roll_up_and_merge(&client).await;
    let partitions: u32 = env_or("TOPK_BENCH_PARTITIONS", 8);

    let settings = RefreshSettings {
        batch_size,
        concurrency,
        cache: topk::config::CachePolicyArgs {
            key_ttl: Duration::from_secs(600),
            tombstone_ttl: Duration::from_secs(600),
        },
        catch_up_page: 20_000,
    };
    let redis = topk::cache::Redis::connect(&redis_args).expect("redis");

    // The refresher: one cycle over every changed user.
    let mut refresher = Refresher::new(
        client.clone(),
        redis.clone(),
        &redis_args.prefix,
        partitions,
        &settings,
    );
    let owned: Vec<i32> = (0..partitions as i32).collect();
    let everyone = touched_users((1..=users).collect(), partitions);
    let t = Instant::now();
    let report = refresher
        .cycle(&SystemClock, &owned, &everyone)
        .await
        .expect("cycle");
    let cycle_s = t.elapsed().as_secs_f64();
    assert!(report.refreshed.failed.is_empty(), "no chunk may fail");
    let refreshed = report.refreshed.done();

    // The same users again with nothing played since: every answer is the stored one (its
    // fingerprint matches), so Redis only renews versions, times and TTLs: the refresh of an
    // active user whose plays did not change what the answer holds.
    let t = Instant::now();
    let again = refresher
        .cycle(&SystemClock, &owned, &everyone)
        .await
        .expect("cycle");
    let unchanged_s = t.elapsed().as_secs_f64();
    assert!(again.refreshed.failed.is_empty(), "no chunk may fail");

    // Memory per cached user: what Redis reports for both keys of a sample of users.
    let bytes_per_user = {
        let mut conn = redis.get().await.expect("redis connection");
        let sampled: Vec<u64> = (1..=users).step_by((users as usize / 200).max(1)).collect();
        let mut total = 0u64;
        for &user in &sampled {
            for key in [
                topk::cache::songs_key(&redis_args.prefix, user),
                topk::cache::meta_key(&redis_args.prefix, user),
            ] {
                let bytes: Option<u64> = redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("MEMORY USAGE");
                total += bytes.unwrap_or(0);
            }
        }
        total / sampled.len().max(1) as u64
    };

    // Where the time goes: the same chunks through the batch query alone, without Redis.
    let query = TopQuery::new(client.clone());
    let all: Vec<u64> = (1..=users).collect();
    let t = Instant::now();
    futures::stream::iter(all.chunks(batch_size))
        .map(|chunk| {
            let query = &query;
            async move {
                query
                    .top_for_users(chunk, window, MAX_LIMIT)
                    .await
                    .expect("batch query")
                    .len()
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<usize>>()
        .await;
    let query_only_s = t.elapsed().as_secs_f64();

    // The baseline: one ClickHouse query per user, same writes, same concurrency.
    let target = Target {
        prefix: format!("{}_baseline", redis_args.prefix),
        ttl: settings.cache.key_ttl,
        tombstone_ttl: settings.cache.tombstone_ttl,
    };
    let conn = redis.get().await.expect("redis connection");
    let computed_at = SystemClock.now_ms();
    let t = Instant::now();
    let sample: Vec<u64> = (1..=baseline_users.min(users)).collect();
    futures::stream::iter(&sample)
        .map(|&user_id| {
            let (query, target, mut conn) = (&query, &target, conn.clone());
            async move {
                let songs = query
                    .top_for_user(user_id, window, MAX_LIMIT)
                    .await
                    .expect("per-user query");
                let answer = Answer {
                    user_id,
                    songs: &songs,
                };
                replace(&mut conn, target, &answer, window, computed_at)
                    .await
                    .expect("write");
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    let baseline_s = t.elapsed().as_secs_f64();

    let cycle_reads = cycle_reads(
        &args,
        &redis,
        &redis_args.prefix,
        &settings,
        users,
        partitions,
    )
    .await;

    if std::env::var_os("TOPK_BENCH_KEEP").is_none() {
        common::drop_database(&args).await;
    } else {
        eprintln!("kept database {}", args.database);
    }
    let ours = refreshed as f64 / cycle_s;
    let unchanged = again.refreshed.done() as f64 / unchanged_s;
    let query_alone = users as f64 / query_only_s;
    let base = sample.len() as f64 / baseline_s;
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "refresh",
            "redis": if cluster { "cluster" } else { "single" },
            "rows": rows,
            "changed_users": report.users,
            "refreshed": refreshed,
            "batch_size": batch_size,
            "concurrency": concurrency,
            "refresher": {"seconds": round2(cycle_s), "users_per_s": ours.round()},
            "refresher_unchanged": {"seconds": round2(unchanged_s), "users_per_s": unchanged.round(), "unchanged": again.refreshed.unchanged, "written": again.refreshed.written},
            "batch_query_alone": {"seconds": round2(query_only_s), "users_per_s": query_alone.round()},
            "ratio_refresher_over_query_alone": round2(ours / query_alone),
            "ratio_unchanged_over_query_alone": round2(unchanged / query_alone),
            "per_user_baseline": {"users": sample.len(), "seconds": round2(baseline_s), "users_per_s": base.round()},
            "ratio_refresher_over_baseline": round2(ours / base),
            "redis_bytes_per_cached_user": bytes_per_user,
            "cycle_reads": cycle_reads,
        })
    );
}

/// One part's reads in one cycle, summed over its queries (`system.query_log`, QueryFinish).
#[derive(Debug, Default, Clone, Copy, clickhouse::Row, serde::Deserialize, serde::Serialize)]
struct PartReads {
    queries: u64,
    read_rows: u64,
    read_bytes: u64,
    result_rows: u64,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct LoggedPart {
    part: String,
    queries: u64,
    read_rows: u64,
    read_bytes: u64,
    result_rows: u64,
}

/// The parts of a cycle, by the text of the refresher's queries: a steady-state cycle reads
/// ClickHouse only to recompute (a catch-up's pages would be `catch_up`).
const PARTS: &str = "multiIf(\
    position(query, 'SELECT DISTINCT user_id FROM plays_minute') > 0, 'catch_up', \
    'recompute')";

/// `users` as touches, per partition.
fn touched_users(users: Vec<u64>, partitions: u32) -> BTreeMap<i32, BTreeSet<u64>> {
    let mut touched: BTreeMap<i32, BTreeSet<u64>> = BTreeMap::new();
    for user in users {
        touched
            .entry(topk::touches::partition_of(user, partitions))
            .or_default()
            .insert(user);
    }
    touched
}

/// Steady-state cycles of a refresher whose queries are logged, and what each read from
/// ClickHouse (see the header). Returns the JSON of `"cycle_reads"`.
async fn cycle_reads(
    args: &topk::config::ClickHouseArgs,
    redis: &topk::cache::Redis,
    prefix: &str,
    settings: &RefreshSettings,
    users: u64,
    partitions: u32,
) -> serde_json::Value {
    let touched: u64 = env_or("TOPK_BENCH_TOUCHED", 100).clamp(1, users);
    let cycles: usize = env_or("TOPK_BENCH_CYCLES", 3).max(1);
    let move_minutes: i64 = env_or("TOPK_BENCH_MOVE_MINUTES", 0);
    let marker = common::unique("topk-bench-reads");
    let logged = topk::olap::client(args)
        .with_setting("log_queries", "1")
        .with_product_info(marker.as_str(), "1");
    let mut refresher = Refresher::new(logged, redis.clone(), prefix, partitions, settings);
    let owned: Vec<i32> = (0..partitions as i32).collect();
    let clock = ManualClock::at(SystemClock.now_ms());
    // The users that came due since the refresher above computed everyone (its window has
    // moved on since): after this cycle nothing is due at this clock.
    let first = refresher
        .cycle(&clock, &owned, &BTreeMap::new())
        .await
        .expect("first cycle");
    assert_eq!(first.users, first.due, "nothing touched yet");
    let server_now = || async {
        topk::olap::server_client(args)
            .query("SELECT toUInt32(now())")
            .fetch_one::<u32>()
            .await
            .expect("server clock")
    };
    // A cycle's queries start within [from, to] of the server clock; the pauses of a second
    // keep the ranges of two cycles (and the touches' seconds) apart.
    let stride = (users / touched).max(1);
    let mut ranges = Vec::with_capacity(cycles);
    let mut changed = Vec::with_capacity(cycles);
    let mut due = Vec::with_capacity(cycles);
    for k in 0..cycles as u64 {
        let touches = touched_users(
            (0..touched).map(|n| (n * stride + k) % users + 1).collect(),
            partitions,
        );
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        clock.advance_ms(move_minutes * 60_000);
        let from = server_now().await;
        let report = refresher
            .cycle(&clock, &owned, &touches)
            .await
            .expect("cycle");
        let to = server_now().await;
        assert!(report.refreshed.failed.is_empty(), "no chunk may fail");
        ranges.push((from, to));
        changed.push(report.users as u64);
        due.push(report.due as u64);
    }

    let server = topk::olap::server_client(args);
    server
        .query("SYSTEM FLUSH LOGS")
        .execute()
        .await
        .expect("flush logs");
    let mut per_cycle: Vec<BTreeMap<String, PartReads>> = Vec::with_capacity(cycles);
    for &(from, to) in &ranges {
        let rows: Vec<LoggedPart> = server
            .query(&format!(
                "SELECT {PARTS} AS part, count() AS queries, sum(read_rows) AS read_rows, \
                        sum(read_bytes) AS read_bytes, sum(result_rows) AS result_rows \
                 FROM system.query_log \
                 WHERE event_date >= yesterday() AND type = 2 \
                   AND position(http_user_agent, '{marker}') > 0 \
                   AND query_start_time >= toDateTime({from}) \
                   AND query_start_time <= toDateTime({to}) \
                 GROUP BY part"
            ))
            .fetch_all()
            .await
            .expect("query log");
        let mut parts: BTreeMap<String, PartReads> = ["catch_up", "recompute"]
            .iter()
            .map(|p| (p.to_string(), PartReads::default()))
            .collect();
        for row in rows {
            parts.insert(
                row.part,
                PartReads {
                    queries: row.queries,
                    read_rows: row.read_rows,
                    read_bytes: row.read_bytes,
                    result_rows: row.result_rows,
                },
            );
        }
        let total = parts.values().fold(PartReads::default(), |a, p| PartReads {
            queries: a.queries + p.queries,
            read_rows: a.read_rows + p.read_rows,
            read_bytes: a.read_bytes + p.read_bytes,
            result_rows: a.result_rows + p.result_rows,
        });
        parts.insert("total".into(), total);
        per_cycle.push(parts);
    }
    // The median cycle of each part (the cycles differ only by which users they touch).
    let median: BTreeMap<&str, PartReads> = per_cycle[0]
        .keys()
        .map(|part| {
            let mut of_part: Vec<PartReads> = per_cycle.iter().map(|c| c[part]).collect();
            of_part.sort_by_key(|p| p.read_bytes);
            (part.as_str(), of_part[of_part.len() / 2])
        })
        .collect();
    for (part, reads) in &median {
        eprintln!(
            "cycle reads, {part}: {} bytes, {} rows, {} queries, {} result rows",
            reads.read_bytes, reads.read_rows, reads.queries, reads.result_rows
        );
    }
    serde_json::json!({
        "touched_per_cycle": touched,
        "window_move_minutes": move_minutes,
        "changed_users": changed,
        "due_users": due,
        "per_cycle": median,
        "cycles": per_cycle,
    })
}
