//! The ClickHouse a test or bench was given, as `topk` flags, and its database dropped on every
//! server. Self-contained: the benches include it too.

use topk::config::ClickHouseArgs;

/// The `topk` flags naming the ClickHouse of `args` (server or cluster, and database).
pub fn clickhouse_flags(args: &ClickHouseArgs) -> Vec<String> {
    let mut flags = vec![
        format!("--clickhouse-url={}", args.url),
        format!("--clickhouse-database={}", args.database),
    ];
    if let Some(key) = &args.quota_key {
        flags.push(format!("--clickhouse-quota-key={key}"));
    }
    if let Some(cluster) = &args.cluster {
        flags.push(format!("--clickhouse-cluster={cluster}"));
        flags.push(format!(
            "--clickhouse-shard-urls={}",
            args.shard_urls.join(",")
        ));
    }
    flags
}

/// Drops the database of `args` (best effort, at the end of a test or bench: a failure only
/// leaves it behind) on every server: the meta server, each shard and each replica.
pub async fn drop_database(args: &ClickHouseArgs) {
    // The compatibility check replays the suite's statements on the data they ran on, after
    // the suite (scripts/compat drops the databases then).
    if std::env::var_os("TOPK_TEST_KEEP_DATABASES").is_some() {
        return;
    }
    let sql = format!("DROP DATABASE IF EXISTS {}", args.database);
    let _ = topk::olap::server_client(args).query(&sql).execute().await;
    for url in args.shard_urls.iter().chain(&args.replica_urls) {
        let _ = topk::olap::server_client_at(args, url)
            .query(&sql)
            .execute()
            .await;
    }
}
