//! Query benchmark: the exact window query (daily rollups + minute rows) against the original
//! design's naive query over minute rows only, same data, same run.
//!
//! ```sh
//! scripts/stack up && eval "$(scripts/stack env)"
//! cargo bench --bench query                                   # 1M rows, 10k users
//! TOPK_BENCH_ROWS=10000000 TOPK_BENCH_USERS=100000 cargo bench --bench query
//! ```
//!
//! Rows are generated inside ClickHouse (`numbers()`), spread over 9 days, each user repeating
//! ~30 favourite songs out of 2,000 (~11 plays a day: about one play per (user, song, day), so
//! a day's rollup saves few rows), plus `TOPK_BENCH_HEAVY_USERS` (100) heavy listeners with
//! 3,000 plays of 15 songs each; every full day is rolled up first. Prints one JSON line: single-user p50/p99 and batch users/s for both.

mod common;

use common::env_or;
use std::time::Instant;

use rand::Rng;
use topk::clock::SystemClock;
use topk::query::TopQuery;
use topk::window::Window;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The original design's read: sum the user's minute rows over the window, every time.
async fn naive(client: &clickhouse::Client, users: &[u64], window: Window, limit: usize) -> usize {
    let list: Vec<String> = users.iter().map(u64::to_string).collect();
    let sql = format!(
        "SELECT user_id, song_id, sum(plays) AS plays FROM plays_minute FINAL \
         WHERE user_id IN ({}) AND minute >= toDateTime({}) AND minute < toDateTime({}) \
         GROUP BY user_id, song_id ORDER BY user_id, plays DESC, song_id LIMIT {limit} BY user_id",
        list.join(","),
        window.start,
        window.end
    );
    #[derive(clickhouse::Row, serde::Deserialize)]
    #[allow(dead_code)]
    struct Row {
        user_id: u64,
        song_id: u64,
        plays: u64,
    }
    client
        .query(&sql)
        .fetch_all::<Row>()
        .await
        .expect("naive query")
        .len()
}

#[tokio::main]
async fn main() {
    let rows: u64 = env_or("TOPK_BENCH_ROWS", 1_000_000);
    let users: u64 = env_or("TOPK_BENCH_USERS", 10_000);
    let samples: usize = env_or("TOPK_BENCH_SAMPLES", 300);
    let args = common::clickhouse_args("topk_bench");
    topk::migrate::run(&args).await.expect("migrate");
    let client = topk::olap::client(&args);
    let now = topk::clock::Clock::now_ms(&SystemClock);
    let window = Window::at(now);
    common::generate_minute_rows(&client, window, users, rows).await;
    // Heavy listeners, the users rollups are for: each plays 15 songs on repeat, ~330 times a
    // day, so a day's rollup holds 15 rows where the minute table holds hundreds.
    let heavy: u64 = env_or("TOPK_BENCH_HEAVY_USERS", 100);
    let heavy_rows = heavy * 3_000;
    let span = 9 * 86_400u64;
    let newest = u64::from(window.end) - 60;
    client
        .query(&format!(
            "INSERT INTO plays_minute (user_id, song_id, minute, plays, batch_id) \
             SELECT {users} + 1 + number % {heavy}, \
                    (({users} + 1 + number % {heavy}) * 7919 + cityHash64(number, 2) % 15) % 2000 + 1, \
                    toStartOfMinute(toDateTime({newest} - (cityHash64(number, 3) % {span}))), \
                    1, 1000000 + intDiv(number, 100000) \
             FROM numbers({heavy_rows})"
        ))
        .execute()
        .await
        .expect("generate heavy listeners");
    let days = common::roll_up_and_merge(&client).await;
    eprintln!("rolled up {days} days");

    let query = TopQuery::new(client.clone());
    let mut rng = rand::rng();
    let pick: Vec<u64> = (0..samples).map(|_| rng.random_range(1..=users)).collect();

    let mut ours = Vec::with_capacity(samples);
    let mut base = Vec::with_capacity(samples);
    for &user in &pick {
        let t = Instant::now();
        let answer = query.top_for_user(user, window, 10).await.expect("query");
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        std::hint::black_box(answer);
        let t = Instant::now();
        std::hint::black_box(naive(&client, &[user], window, 10).await);
        base.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ours.sort_by(f64::total_cmp);
    base.sort_by(f64::total_cmp);

    let (mut heavy_ours, mut heavy_base) = (Vec::new(), Vec::new());
    for _ in 0..samples.min(100) {
        let user = users + rng.random_range(1..=heavy.max(1));
        let t = Instant::now();
        std::hint::black_box(query.top_for_user(user, window, 10).await.expect("query"));
        heavy_ours.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        std::hint::black_box(naive(&client, &[user], window, 10).await);
        heavy_base.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    heavy_ours.sort_by(f64::total_cmp);
    heavy_base.sort_by(f64::total_cmp);

    let batch: Vec<u64> = (1..=users.min(1_000)).collect();
    let t = Instant::now();
    let rounds = 5;
    for _ in 0..rounds {
        std::hint::black_box(
            query
                .top_for_users(&batch, window, 10)
                .await
                .expect("batch"),
        );
    }
    let ours_batch = (rounds * batch.len()) as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(naive(&client, &batch, window, 10).await);
    }
    let naive_batch = (rounds * batch.len()) as f64 / t.elapsed().as_secs_f64();
    common::drop_database(&args).await;

    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "query",
            "rows": rows,
            "users": users,
            "single_user_ms": {
                "exact_p50": round2(percentile(&ours, 0.5)), "exact_p99": round2(percentile(&ours, 0.99)),
                "naive_p50": round2(percentile(&base, 0.5)), "naive_p99": round2(percentile(&base, 0.99)),
                "ratio_p50_naive_over_exact": round2(percentile(&base, 0.5) / percentile(&ours, 0.5)),
            },
            "heavy_user_ms": {
                "users": heavy, "minute_rows_each": 3_000,
                "exact_p50": round2(percentile(&heavy_ours, 0.5)), "exact_p99": round2(percentile(&heavy_ours, 0.99)),
                "naive_p50": round2(percentile(&heavy_base, 0.5)), "naive_p99": round2(percentile(&heavy_base, 0.99)),
                "ratio_p50_naive_over_exact": round2(percentile(&heavy_base, 0.5) / percentile(&heavy_ours, 0.5)),
            },
            "batch_users_per_s": {
                "batch_size": batch.len(),
                "exact": ours_batch.round(), "naive": naive_batch.round(),
                "ratio_exact_over_naive": round2(ours_batch / naive_batch),
            },
        })
    );
}
