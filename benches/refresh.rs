//! Refresh benchmark: users refreshed per second by the refresher (batch query in chunks,
//! guarded script writes) against a baseline that queries ClickHouse once per user and writes
//! the same script, same data, same run, same concurrency.
//!
//! ```sh
//! scripts/stack up && eval "$(scripts/stack env)"
//! cargo bench --bench refresh                       # 100k changed users, ~20 rows each
//! TOPK_BENCH_USERS=1000000 cargo bench --bench refresh
//! ```
//!
//! Knobs: `TOPK_BENCH_USERS` (100,000), `TOPK_BENCH_ROWS_PER_USER` (20), `TOPK_BENCH_BATCH`
//! (users per query, 2,000), `TOPK_BENCH_CONCURRENCY` (queries in flight, 2),
//! `TOPK_BENCH_BASELINE_USERS` (users timed for the per-user baseline, 2,000). Every user is
//! marked touched, so one refresher cycle recomputes all of them; keys get a 10-minute TTL.
//! `TOPK_BENCH_KEEP=1` keeps the ClickHouse database for a closer look;
//! `TOPK_BENCH_REDIS_CLUSTER=1` writes to the stack's Redis Cluster.
//! Prints one JSON line.

mod common;

use common::env_or;
use std::time::{Duration, Instant};

use futures::StreamExt;
use topk::cache::{Answer, Target, replace};
use topk::clock::{Clock, SystemClock};
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
    client
        .query(&format!(
            "INSERT INTO user_touches (user_id) SELECT number + 1 FROM numbers({users})"
        ))
        .execute()
        .await
        .expect("user touches");

    let settings = RefreshSettings {
        batch_size,
        concurrency,
        cache: topk::config::CachePolicyArgs {
            key_ttl: Duration::from_secs(600),
            tombstone_ttl: Duration::from_secs(600),
        },
        touch_margin: Duration::from_secs(120),
        catch_up: Duration::from_secs(3600),
    };
    let redis = topk::cache::Redis::connect(&redis_args).expect("redis");

    // The refresher: one cycle over every changed user.
    let mut refresher =
        Refresher::new(client.clone(), redis.clone(), &redis_args.prefix, &settings);
    let t = Instant::now();
    let report = refresher.cycle(&SystemClock).await.expect("cycle");
    let cycle_s = t.elapsed().as_secs_f64();
    assert!(report.refreshed.failed.is_empty(), "no chunk may fail");
    let refreshed = report.refreshed.done();

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

    if std::env::var_os("TOPK_BENCH_KEEP").is_none() {
        common::drop_database(&args).await;
    } else {
        eprintln!("kept database {}", args.database);
    }
    let ours = refreshed as f64 / cycle_s;
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
            "batch_query_alone": {"seconds": round2(query_only_s), "users_per_s": (users as f64 / query_only_s).round()},
            "per_user_baseline": {"users": sample.len(), "seconds": round2(baseline_s), "users_per_s": base.round()},
            "ratio_refresher_over_baseline": round2(ours / base),
            "redis_bytes_per_cached_user": bytes_per_user,
        })
    );
}
