//! Replication: `topk migrate --clickhouse-replica-urls` on the stack's two ClickHouse servers
//! replicating one shard through ZooKeeper (`scripts/stack up clickhouse-replicas`). Every table
//! becomes its ReplicatedMergeTree twin on both servers (the record of applied migrations stays
//! each server's own), and what the aggregator's store, a replayed flush and a rollup write on
//! the first replica reads back on the second, exactly.

mod common;

use common::plays::{DAY, MINUTE, Play, oracle};
use rand::Rng;
use topk::clock::SystemClock;
use topk::config::ClickHouseArgs;
use topk::olap::Olap;
use topk::query::TopQuery;
use topk::window::{MAX_LIMIT, Window};
use topk_aggregator::store::Store;

/// The replicas' HTTP endpoints (`scripts/stack env`).
fn replica_urls() -> Vec<String> {
    std::env::var("TOPK_TEST_CLICKHOUSE_REPLICA_URLS")
        .unwrap_or_else(|_| "http://127.0.0.1:8141,http://127.0.0.1:8142".into())
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// `(name, engine)` of every table of `database` on the server of `args`.
async fn engines(args: &ClickHouseArgs) -> Vec<(String, String)> {
    topk::olap::server_client(args)
        .query("SELECT name, engine FROM system.tables WHERE database = ? ORDER BY name")
        .bind(&args.database)
        .fetch_all()
        .await
        .expect("system.tables")
}

#[tokio::test]
async fn replicas_get_replicated_tables_and_read_back_the_same_exact_counts() {
    let urls = replica_urls();
    assert!(urls.len() >= 2, "two replicas: {urls:?}");
    let database = common::unique("topk_test");
    let on = |url: &str| ClickHouseArgs {
        url: url.to_owned(),
        ..common::clickhouse_args(&database)
    };
    let first = ClickHouseArgs {
        replica_urls: urls[1..].to_vec(),
        ..on(&urls[0])
    };
    let report = topk::migrate::run(&first)
        .await
        .expect("migrate both replicas (scripts/stack up clickhouse-replicas)");
    assert_eq!(report.applied.len(), topk::migrate::MIGRATIONS.len());

    let tables = [
        ("day_touches", "ReplicatedMergeTree"),
        ("flush_log", "ReplicatedReplacingMergeTree"),
        ("plays_daily", "ReplicatedReplacingMergeTree"),
        ("plays_minute", "ReplicatedReplacingMergeTree"),
        ("rollup_log", "ReplicatedMergeTree"),
        ("schema_migrations", "ReplacingMergeTree"),
    ];
    for url in &urls {
        let found = engines(&on(url)).await;
        let want: Vec<(String, String)> = tables
            .iter()
            .map(|&(t, e)| (t.to_owned(), e.to_owned()))
            .collect();
        assert_eq!(found, want, "tables of {url}");
        let applied: u64 = topk::olap::client(&on(url))
            .query("SELECT count() FROM schema_migrations FINAL")
            .fetch_one()
            .await
            .expect("applied");
        assert_eq!(applied as usize, topk::migrate::MIGRATIONS.len(), "{url}");
        // 007's columns reached both replicas' flush_log (one ALTER replicated, one tolerated).
        let fence: u64 = topk::olap::client(&on(url))
            .query("SELECT count() FROM system.columns WHERE database = currentDatabase() AND table = 'flush_log' AND name = 'fence'")
            .fetch_one()
            .await
            .expect("columns");
        assert_eq!(fence, 1, "{url}");
    }
    let again = topk::migrate::run(&first).await.expect("re-run");
    assert!(again.applied.is_empty(), "{again:?}");

    // The aggregator's writes on the first replica, the same batch twice (a replay), then a
    // rollup of every full day.
    let now = common::workload::now_ms();
    let window = Window::at(now);
    let mut rng = rand::rng();
    let plays: Vec<Play> = (0..2_000)
        .map(|_| Play {
            user: rng.random_range(1..=30),
            song: rng.random_range(1..=60),
            ts: now - MINUTE - rng.random_range(0..9 * DAY),
        })
        .collect();
    let store = Store::new(Olap::open(&first), "plays");
    common::plays::flush(&store, &plays, 0).await;
    common::plays::flush(&store, &plays, 0).await;
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let rolled = topk_maintenance::rollup(Olap::open(&first), &SystemClock, false)
        .await
        .expect("rollup");
    assert_eq!(rolled.days.len(), window.full_days().count());

    let second = on(&urls[1]);
    let client = topk::olap::client(&second);
    for (table, _) in tables.iter().filter(|(t, _)| *t != "schema_migrations") {
        client
            .query(&format!("SYSTEM SYNC REPLICA {table}"))
            .execute()
            .await
            .expect("sync replica");
    }
    let expected = oracle(&plays, window, MAX_LIMIT);
    let users: Vec<u64> = (1..=30).collect();
    for args in [&first, &second] {
        let total: u64 = topk::olap::client(args)
            .query("SELECT sum(plays) FROM plays_minute FINAL")
            .fetch_one()
            .await
            .expect("total");
        assert_eq!(total, plays.len() as u64, "every play once on {}", args.url);
        let answers = TopQuery::new(Olap::open(args))
            .top_for_users(&users, window, MAX_LIMIT)
            .await
            .expect("query");
        for &user in &users {
            assert_eq!(
                answers[&user],
                expected.get(&user).cloned().unwrap_or_default(),
                "user {user} on {}",
                args.url
            );
        }
    }
    // The second replica answers from the rollups the first one wrote.
    let clean = TopQuery::new(Olap::open(&second))
        .clean_days(window)
        .await
        .expect("clean days");
    assert_eq!(clean.len(), window.full_days().count(), "{clean:?}");

    common::drop_database(&first).await;
}
