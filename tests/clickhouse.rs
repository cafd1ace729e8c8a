//! The project's ClickHouse code against the real server (18.16 here): migrations are
//! idempotent, and rows written by the aggregator's store read back exactly.

mod common;

use clickhouse::Row;
use serde::Deserialize;
use topk::counting::batch::{Batch, Counts};
use topk_aggregator::store::Store;

#[derive(Debug, Row, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
struct ColumnRow {
    table: String,
    name: String,
    #[serde(rename = "type")]
    column_type: String,
}

async fn schema(args: &topk::config::ClickHouseArgs) -> Vec<ColumnRow> {
    topk::olap::client(args)
        .query(
            "SELECT table, name, type FROM system.columns WHERE database = ? ORDER BY table, name",
        )
        .bind(&args.database)
        .fetch_all()
        .await
        .expect("system.columns")
}

#[tokio::test]
async fn migrate_twice_leaves_the_schema_unchanged() {
    let args = common::clickhouse_args(&common::unique("topk_test"));
    let first = topk::migrate::run(&args).await.expect("first migrate");
    let all: Vec<u32> = topk::migrate::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(first.applied, all);
    assert!(first.already_applied.is_empty());
    let before = schema(&args).await;
    let tables: std::collections::BTreeSet<&str> =
        before.iter().map(|c| c.table.as_str()).collect();
    assert_eq!(
        tables.into_iter().collect::<Vec<_>>(),
        [
            "day_touches",
            "flush_log",
            "plays_daily",
            "plays_minute",
            "rollup_log",
            "schema_migrations",
        ]
    );

    let second = topk::migrate::run(&args).await.expect("second migrate");
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, all);
    assert_eq!(schema(&args).await, before);
    common::drop_database(&args).await;
}

#[derive(Debug, Row, Deserialize, PartialEq, Eq)]
struct Total {
    user_id: u64,
    song_id: u64,
    plays: u64,
}

#[tokio::test]
async fn counts_written_twice_read_back_once() {
    let args = common::migrated_database().await;
    let store = Store::new(topk::olap::client(&args), "plays");
    let minute = 1_764_432_000;
    let mut counts = Counts::default();
    counts.insert((42, 7, minute), 3);
    counts.insert((42, 7, minute + 60), 2);
    counts.insert((42, 9, minute), 1);
    counts.insert((43, 7, minute + 86_400), 5);
    let mut batch = Batch::open(0, 100, 1_764_432_000_000, None);
    batch.end_offset = 111;
    batch.counts = counts;

    assert_eq!(store.write_counts(&[&batch]).await.expect("insert"), 4);
    // A replayed batch carries the same batch_id and collapses into the first copy.
    assert_eq!(
        store.write_counts(&[&batch]).await.expect("insert again"),
        4
    );

    let totals: Vec<Total> = topk::olap::client(&args)
        .query(
            "SELECT user_id, song_id, sum(plays) AS plays FROM plays_minute FINAL \
             GROUP BY user_id, song_id ORDER BY user_id, song_id",
        )
        .fetch_all()
        .await
        .expect("select");
    assert_eq!(
        totals,
        vec![
            Total {
                user_id: 42,
                song_id: 7,
                plays: 5
            },
            Total {
                user_id: 42,
                song_id: 9,
                plays: 1
            },
            Total {
                user_id: 43,
                song_id: 7,
                plays: 5
            },
        ]
    );

    store
        .write_intents(&[&batch], 1_764_432_000)
        .await
        .expect("intent");
    let intents = store.intents_from(0, 100).await.expect("intents");
    assert_eq!(intents.len(), 1);
    assert_eq!((intents[0].start_offset, intents[0].end_offset), (100, 111));
    assert_eq!(
        store
            .intent_ending_at(0, 111)
            .await
            .expect("lookup")
            .map(|i| i.start_offset),
        Some(100)
    );
    assert_eq!(store.intent_ending_at(1, 111).await.expect("lookup"), None);
    common::drop_database(&args).await;
}
