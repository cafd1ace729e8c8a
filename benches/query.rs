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
//!
//! When `scripts/stack env` names a ClickHouse cluster (`TOPK_TEST_CLICKHOUSE_SHARD_URLS`, from
//! `scripts/stack up clickhouse-cluster`: 2 shards on the same machine), the same rows are
//! also written there, each user's on its shard, and the exact query is timed on both, user by
//! user in turn (`"shards"` in the JSON: cluster over one server).

mod common;

use common::env_or;
use std::time::Instant;

use rand::Rng;
use topk::clock::SystemClock;
use topk::olap::Olap;
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

/// Latencies (ms, sorted) of one side, and its batch throughput.
#[derive(Default)]
struct Timings {
    single: Vec<f64>,
    heavy: Vec<f64>,
    batch_users_per_s: f64,
}

impl Timings {
    fn of(&mut self, heavy: bool) -> &mut Vec<f64> {
        if heavy {
            &mut self.heavy
        } else {
            &mut self.single
        }
    }

    fn sort(&mut self) {
        self.single.sort_by(f64::total_cmp);
        self.heavy.sort_by(f64::total_cmp);
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// The same generated rows on `olap` (one server or every shard), rolled up.
async fn seed(olap: &Olap, window: Window, users: u64, rows: u64, heavy: u64) -> usize {
    common::generate_minute_rows(olap.clone(), window, users, rows).await;
    // Heavy listeners, the users rollups are for: each plays 15 songs on repeat, ~330 times a
    // day, so a day's rollup holds 15 rows where the minute table holds hundreds.
    let heavy_rows = heavy * 3_000;
    let span = 9 * 86_400u64;
    let newest = u64::from(window.end) - 60;
    common::insert_generated(
        olap,
        &format!(
            "SELECT {users} + 1 + number % {heavy} AS user_id, \
                    (({users} + 1 + number % {heavy}) * 7919 + cityHash64(number, 2) % 15) % 2000 + 1 AS song_id, \
                    toStartOfMinute(toDateTime({newest} - (cityHash64(number, 3) % {span}))) AS minute, \
                    1 AS plays, 1000000 + intDiv(number, 100000) AS batch_id \
             FROM numbers({heavy_rows})"
        ),
    )
    .await;
    common::roll_up_and_merge(olap.clone()).await
}

#[tokio::main]
async fn main() {
    let rows: u64 = env_or("TOPK_BENCH_ROWS", 1_000_000);
    let users: u64 = env_or("TOPK_BENCH_USERS", 10_000);
    let samples: usize = env_or("TOPK_BENCH_SAMPLES", 300);
    let heavy: u64 = env_or("TOPK_BENCH_HEAVY_USERS", 100);
    let args = common::clickhouse_args("topk_bench");
    topk::migrate::run(&args).await.expect("migrate");
    let client = topk::olap::client(&args);
    let now = topk::clock::Clock::now_ms(&SystemClock);
    let window = Window::at(now);
    let days = seed(&Olap::from(&client), window, users, rows, heavy).await;
    eprintln!("rolled up {days} days");
    let cluster = common::cluster_args("topk_bench");
    let cluster_query = match &cluster {
        Some(cluster_args) => {
            topk::migrate::run(cluster_args)
                .await
                .expect("migrate the cluster");
            let olap = Olap::connect(cluster_args)
                .await
                .expect("the cluster's layout");
            let days = seed(&olap, window, users, rows, heavy).await;
            eprintln!("rolled up {days} days on {} shards", olap.shards().len());
            Some(TopQuery::new(olap))
        }
        None => None,
    };

    let query = TopQuery::new(client.clone());
    let mut rng = rand::rng();
    let pick: Vec<u64> = (0..samples).map(|_| rng.random_range(1..=users)).collect();
    let heavy_pick: Vec<u64> = (0..samples.min(100))
        .map(|_| users + rng.random_range(1..=heavy.max(1)))
        .collect();

    // One user at a time, the sides in turn, so the machine's noise hits them alike.
    let (mut ours, mut base, mut sharded) =
        (Timings::default(), Timings::default(), Timings::default());
    for (&user, is_heavy) in pick
        .iter()
        .map(|u| (u, false))
        .chain(heavy_pick.iter().map(|u| (u, true)))
    {
        let t = Instant::now();
        std::hint::black_box(query.top_for_user(user, window, 10).await.expect("query"));
        ours.of(is_heavy).push(ms_since(t));
        let t = Instant::now();
        std::hint::black_box(naive(&client, &[user], window, 10).await);
        base.of(is_heavy).push(ms_since(t));
        if let Some(cluster_query) = &cluster_query {
            let t = Instant::now();
            std::hint::black_box(
                cluster_query
                    .top_for_user(user, window, 10)
                    .await
                    .expect("query"),
            );
            sharded.of(is_heavy).push(ms_since(t));
        }
    }

    let batch: Vec<u64> = (1..=users.min(1_000)).collect();
    let rounds = 5;
    let mut elapsed = [0f64; 3];
    for _ in 0..rounds {
        let t = Instant::now();
        std::hint::black_box(
            query
                .top_for_users(&batch, window, 10)
                .await
                .expect("batch"),
        );
        elapsed[0] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        std::hint::black_box(naive(&client, &batch, window, 10).await);
        elapsed[1] += t.elapsed().as_secs_f64();
        if let Some(cluster_query) = &cluster_query {
            let t = Instant::now();
            std::hint::black_box(
                cluster_query
                    .top_for_users(&batch, window, 10)
                    .await
                    .expect("batch"),
            );
            elapsed[2] += t.elapsed().as_secs_f64();
        }
    }
    let per_s = |seconds: f64| (rounds * batch.len()) as f64 / seconds;
    ours.batch_users_per_s = per_s(elapsed[0]);
    base.batch_users_per_s = per_s(elapsed[1]);
    sharded.batch_users_per_s = per_s(elapsed[2]);
    for side in [&mut ours, &mut base, &mut sharded] {
        side.sort();
    }
    common::drop_database(&args).await;
    if let Some(cluster_args) = &cluster {
        common::drop_database(cluster_args).await;
    }

    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let p = |v: &[f64], q: f64| round2(percentile(v, q));
    let shards = cluster_query.as_ref().map(|_| {
        serde_json::json!({
            "shards": cluster.as_ref().map_or(0, |c| c.shard_urls.len()),
            "single_user_ms": {
                "one_server_p50": p(&ours.single, 0.5), "one_server_p99": p(&ours.single, 0.99),
                "cluster_p50": p(&sharded.single, 0.5), "cluster_p99": p(&sharded.single, 0.99),
                "ratio_p50_one_server_over_cluster": round2(percentile(&ours.single, 0.5) / percentile(&sharded.single, 0.5)),
            },
            "heavy_user_ms": {
                "one_server_p50": p(&ours.heavy, 0.5), "cluster_p50": p(&sharded.heavy, 0.5),
                "ratio_p50_one_server_over_cluster": round2(percentile(&ours.heavy, 0.5) / percentile(&sharded.heavy, 0.5)),
            },
            "batch_users_per_s": {
                "one_server": ours.batch_users_per_s.round(), "cluster": sharded.batch_users_per_s.round(),
                "ratio_cluster_over_one_server": round2(sharded.batch_users_per_s / ours.batch_users_per_s),
            },
        })
    });
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "query",
            "rows": rows,
            "users": users,
            "single_user_ms": {
                "exact_p50": p(&ours.single, 0.5), "exact_p99": p(&ours.single, 0.99),
                "naive_p50": p(&base.single, 0.5), "naive_p99": p(&base.single, 0.99),
                "ratio_p50_naive_over_exact": round2(percentile(&base.single, 0.5) / percentile(&ours.single, 0.5)),
            },
            "heavy_user_ms": {
                "users": heavy, "minute_rows_each": 3_000,
                "exact_p50": p(&ours.heavy, 0.5), "exact_p99": p(&ours.heavy, 0.99),
                "naive_p50": p(&base.heavy, 0.5), "naive_p99": p(&base.heavy, 0.99),
                "ratio_p50_naive_over_exact": round2(percentile(&base.heavy, 0.5) / percentile(&ours.heavy, 0.5)),
            },
            "batch_users_per_s": {
                "batch_size": batch.len(),
                "exact": ours.batch_users_per_s.round(), "naive": base.batch_users_per_s.round(),
                "ratio_exact_over_naive": round2(ours.batch_users_per_s / base.batch_users_per_s),
            },
            "shards": shards,
        })
    );
}
