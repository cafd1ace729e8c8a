//! `topk migrate --clickhouse-cluster` on the stack's 2-shard ClickHouse cluster
//! (`scripts/stack up clickhouse-cluster`): every shard gets the schema and the Distributed
//! tables, a re-run changes nothing, and shard URLs that are not the cluster's shards in its
//! order are refused before anything is written through them.

mod common;

use topk::olap::{LayoutError, Olap};

async fn tables(client: &clickhouse::Client, database: &str) -> Vec<String> {
    client
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(database)
        .fetch_all()
        .await
        .expect("system.tables")
}

#[tokio::test]
async fn migrate_on_the_cluster_builds_every_shard_and_checks_the_layout() {
    let args = common::migrated_cluster_database().await;
    let olap = Olap::connect(&args).await.expect("the layout checks out");
    assert_eq!(olap.shards().len(), 2);
    for (index, shard) in olap.shards().iter().enumerate() {
        let names = tables(shard, &args.database).await;
        for table in [
            "plays_minute",
            "plays_daily",
            "plays_minute_all",
            "plays_daily_all",
        ] {
            assert!(
                names.iter().any(|n| n == table),
                "shard {}: {table} in {names:?}",
                index + 1
            );
        }
        let engine: String = shard
            .query(
                "SELECT engine FROM system.tables WHERE database = ? AND name = 'plays_minute_all'",
            )
            .bind(&args.database)
            .fetch_one()
            .await
            .expect("engine");
        assert_eq!(engine, "Distributed");
    }

    // A re-run applies nothing anywhere.
    let again = topk::migrate::run(&args).await.expect("re-run");
    assert!(again.applied.is_empty(), "{again:?}");
    assert_eq!(again.already_applied.len(), topk::migrate::MIGRATIONS.len());

    // The URLs in another order: each user would be read and written on the other shard.
    let mut swapped = args.clone();
    swapped.shard_urls.reverse();
    match topk::migrate::run(&swapped).await {
        Err(topk::migrate::MigrateError::Layout(LayoutError::WrongShard {
            expected: 1,
            found: Some(2),
            ..
        })) => {}
        other => panic!("swapped shard URLs must be refused: {other:?}"),
    }
    assert!(matches!(
        Olap::connect(&swapped).await,
        Err(LayoutError::WrongShard { .. })
    ));
    // One URL too many: a third of the users would go to a server the cluster does not know.
    let mut three = args.clone();
    three.shard_urls.push(args.shard_urls[0].clone());
    assert!(matches!(
        Olap::connect(&three).await,
        Err(LayoutError::ShardCount {
            found: 2,
            given: 3,
            ..
        })
    ));

    // Rows inserted through the Distributed table land where topk places them (the sharding
    // key `user_id` with weights of 1 is `user_id % shards`), so ad-hoc writers agree with it.
    olap.meta()
        .query(
            "INSERT INTO plays_minute_all (user_id, song_id, minute, plays, batch_id) \
             SELECT number, 1, toDateTime(1800000000), 1, 0 FROM system.numbers LIMIT 10",
        )
        .with_setting("insert_distributed_sync", "1")
        .execute()
        .await
        .expect("insert through the Distributed table");
    common::assert_users_on_their_shards(&args, 10).await;
    common::drop_database(&args).await;
}
