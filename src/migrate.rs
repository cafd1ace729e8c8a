//! Numbered, idempotent SQL migrations from `schema/`, applied by `topk migrate`.
//!
//! Every statement is written to run on ClickHouse 18.16 and on a current ClickHouse (no TTL,
//! no LowCardinality, no insert deduplication settings). Applied versions are recorded in
//! `schema_migrations`; statements are `IF NOT EXISTS`, so a migration interrupted half-way is
//! simply applied again. On a cluster every server gets them, then the Distributed tables
//! (ARCHITECTURE.md, "ClickHouse as a sharded cluster").

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use crate::config::ClickHouseArgs;
use crate::olap;

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "plays_minute",
        sql: include_str!("../schema/001_plays_minute.sql"),
    },
    Migration {
        version: 2,
        name: "flush_log",
        sql: include_str!("../schema/002_flush_log.sql"),
    },
    Migration {
        version: 3,
        name: "plays_daily",
        sql: include_str!("../schema/003_plays_daily.sql"),
    },
    Migration {
        version: 4,
        name: "day_touches",
        sql: include_str!("../schema/004_day_touches.sql"),
    },
    Migration {
        version: 5,
        name: "rollup_log",
        sql: include_str!("../schema/005_rollup_log.sql"),
    },
    Migration {
        version: 6,
        name: "user_touches",
        sql: include_str!("../schema/006_user_touches.sql"),
    },
    Migration {
        version: 7,
        name: "flush_log_fence",
        sql: include_str!("../schema/007_flush_log_fence.sql"),
    },
    Migration {
        version: 8,
        name: "utc_day_partitions",
        sql: include_str!("../schema/008_utc_day_partitions.sql"),
    },
    Migration {
        version: 9,
        name: "drop_user_touches",
        sql: include_str!("../schema/009_drop_user_touches.sql"),
    },
];

/// Errors applying migrations.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("database name {0:?} is not a plain identifier ([A-Za-z0-9_]+)")]
    BadDatabaseName(String),
    #[error("migration {version} ({name}) failed")]
    Statement {
        version: u32,
        name: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("cluster name {0:?} is not a plain name ([A-Za-z0-9_.-]+)")]
    BadClusterName(String),
    #[error(transparent)]
    Layout(#[from] olap::LayoutError),
    #[error("ClickHouse error")]
    ClickHouse(#[from] clickhouse::error::Error),
}

#[derive(Debug, Row, Serialize, Deserialize)]
struct AppliedRow {
    version: u32,
    name: String,
    applied_at: u32,
}

/// What one `migrate` run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrateReport {
    pub applied: Vec<u32>,
    pub already_applied: Vec<u32>,
}

/// The statements of a migration file: split on `;`, `--` comment lines dropped.
pub fn statements(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// ClickHouse 18.16 has no `ADD COLUMN IF NOT EXISTS`: migrations add one column per statement,
/// and a column already there (a run interrupted after that statement, or on a replicated table
/// the `ALTER` of another replica) counts as added. 18.16 says so with code 44
/// (ILLEGAL_COLUMN), a current ClickHouse with code 15 (DUPLICATE_COLUMN).
fn column_already_added(statement: &str, error: &clickhouse::error::Error) -> bool {
    statement.to_uppercase().contains(" ADD COLUMN ")
        && matches!(error, clickhouse::error::Error::BadResponse(message)
            if (message.contains("Code: 44,") || message.contains("Code: 15."))
                && message.contains("already exists"))
}

/// Cluster names of `remote_servers` may also hold `-` and `.`; never a quote.
fn check_cluster_name(name: &str) -> Result<(), MigrateError> {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        Ok(())
    } else {
        Err(MigrateError::BadClusterName(name.to_owned()))
    }
}

fn check_identifier(name: &str) -> Result<(), MigrateError> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(())
    } else {
        Err(MigrateError::BadDatabaseName(name.to_owned()))
    }
}

/// Creates the database if needed and applies every migration not yet recorded.
pub async fn run(args: &ClickHouseArgs) -> Result<MigrateReport, MigrateError> {
    run_through(args, u32::MAX).await
}

/// The tables whose rows are split by user across the shards of a cluster; every other table
/// is a protocol table, used on the meta server only.
pub const SHARDED_TABLES: [&str; 2] = ["plays_minute", "plays_daily"];

/// The Distributed table over a sharded table on every shard: `plays_minute_all` for ad-hoc
/// reads of the whole cluster (topk itself reads each user on the user's shard).
pub fn distributed_table(table: &str) -> String {
    format!("{table}_all")
}

/// [`run`], but only the migrations up to version `last`: a database as deployed before the
/// later ones existed (the upgrade tests start from one).
///
/// On a cluster (`--clickhouse-cluster`) every server — the meta server and each shard —
/// gets the same migrations, so one schema serves both roles and an upgrade is the same
/// statements everywhere (the protocol tables on the shards stay empty). The shard URLs are
/// checked against the cluster first, then every server gets the Distributed tables
/// (`plays_minute_all`, `plays_daily_all`, sharding key `user_id`). The report is the meta
/// server's.
pub async fn run_through(args: &ClickHouseArgs, last: u32) -> Result<MigrateReport, MigrateError> {
    check_identifier(&args.database)?;
    let database = &args.database;
    let mut servers = vec![olap::server_client(args)];
    if let Some(cluster) = &args.cluster {
        check_cluster_name(cluster)?;
        // The layout check reads each shard with the database as its default: create it first
        // (an empty database on a server that then turns out to be the wrong one harms nothing).
        for url in &args.shard_urls {
            olap::server_client_at(args, url)
                .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
                .execute()
                .await?;
        }
        olap::Olap::open(args).check_layout(args).await?;
        let shards = args.shard_urls.iter().filter(|url| **url != args.url);
        servers.extend(shards.map(|url| olap::server_client_at(args, url)));
    }
    servers.extend(
        args.replica_urls
            .iter()
            .map(|url| olap::server_client_at(args, url)),
    );
    let report = apply(&servers, database, last).await?;
    let Some(cluster) = &args.cluster else {
        return Ok(report);
    };
    for server in &servers {
        for table in SHARDED_TABLES {
            let all = distributed_table(table);
            server
                .query(&format!(
                    "CREATE TABLE IF NOT EXISTS {database}.{all} AS {database}.{table} \
                     ENGINE = Distributed('{cluster}', '{database}', '{table}', user_id)"
                ))
                .execute()
                .await?;
        }
    }
    tracing::info!(
        cluster,
        shards = args.shard_urls.len(),
        "cluster migrated: every shard and the Distributed tables"
    );
    Ok(report)
}

/// One server being migrated: its client on the database, the versions it had applied, and
/// whether its tables are replicated.
struct Target {
    client: Client,
    done: Vec<u32>,
    replicated: bool,
}

/// Every migration up to `last` not yet recorded in `database`, on every server of `servers`,
/// one migration at a time on all of them: a replicated table's replicas must be created with
/// the same structure, so no server may run ahead of another (a replica created after another
/// one's `ALTER` would not match ZooKeeper's metadata). The report is the first server's.
async fn apply(
    servers: &[Client],
    database: &str,
    last: u32,
) -> Result<MigrateReport, MigrateError> {
    let mut targets = Vec::with_capacity(servers.len());
    for server in servers {
        server
            .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
            .execute()
            .await?;
        let client = server.clone().with_database(database);
        // The record of what this server applied stays its own (never replicated).
        client
            .query(
                "CREATE TABLE IF NOT EXISTS schema_migrations \
                 (version UInt32, name String, applied_at DateTime) \
                 ENGINE = ReplacingMergeTree ORDER BY version",
            )
            .execute()
            .await?;
        let done: Vec<u32> = client
            .query("SELECT DISTINCT version FROM schema_migrations ORDER BY version")
            .fetch_all()
            .await?;
        let replicated = replicates(&client).await?;
        targets.push(Target {
            client,
            done,
            replicated,
        });
    }

    let mut report = MigrateReport::default();
    for migration in MIGRATIONS.iter().filter(|m| m.version <= last) {
        for (index, target) in targets.iter().enumerate() {
            let first = index == 0;
            if target.done.contains(&migration.version) {
                if first {
                    report.already_applied.push(migration.version);
                }
                continue;
            }
            apply_one(target, database, migration).await?;
            if first {
                report.applied.push(migration.version);
            }
        }
    }
    Ok(report)
}

async fn apply_one(
    target: &Target,
    database: &str,
    migration: &Migration,
) -> Result<(), MigrateError> {
    let client = &target.client;
    for statement in statements(migration.sql) {
        let statement = if target.replicated {
            replicated(&statement, database)
        } else {
            statement
        };
        match client.query(&statement).execute().await {
            Ok(()) => {}
            Err(source) if column_already_added(&statement, &source) => {}
            Err(source) => {
                return Err(MigrateError::Statement {
                    version: migration.version,
                    name: migration.name,
                    source,
                });
            }
        }
    }
    let mut insert = client.insert::<AppliedRow>("schema_migrations").await?;
    insert
        .write(&AppliedRow {
            version: migration.version,
            name: migration.name.to_owned(),
            applied_at: now_secs(),
        })
        .await?;
    insert.end().await?;
    tracing::info!(
        version = migration.version,
        name = migration.name,
        replicated = target.replicated,
        "migration applied"
    );
    Ok(())
}

/// Whether the server replicates its tables: its `shard` and `replica` macros are set (they
/// name its replica in ZooKeeper). A server with the macros whose ZooKeeper does not answer is
/// an error, not a reason to create tables that would never replicate.
async fn replicates(client: &Client) -> Result<bool, MigrateError> {
    let macros: u64 = client
        .query("SELECT count() FROM system.macros WHERE macro IN ('shard', 'replica')")
        .fetch_one()
        .await?;
    if macros < 2 {
        return Ok(false);
    }
    let _: u64 = client
        .query("SELECT count() FROM system.zookeeper WHERE path = '/'")
        .fetch_one()
        .await?;
    Ok(true)
}

/// The engine of `plays_minute` as migration 008 creates it, unreplicated: the engine of a
/// staging table whose partitions replace `plays_minute`'s (`CREATE TABLE … AS plays_minute`
/// alone would copy a replicated engine with its ZooKeeper path, and join the table's replicas).
pub const PLAYS_MINUTE_ENGINE: &str = "ReplacingMergeTree\nPARTITION BY toYYYYMMDD(minute, 'UTC')\nORDER BY (user_id, song_id, minute, batch_id)\nSETTINGS index_granularity = 1024";

/// The ZooKeeper path of a replicated table: per shard (the server's `{shard}` macro),
/// database and table (the name it was created with: a later `RENAME` keeps the path).
pub fn zookeeper_path(database: &str, table: &str) -> String {
    format!("/clickhouse/tables/{{shard}}/{database}/{table}")
}

/// `statement` for a server that replicates: a `CREATE TABLE`'s `MergeTree` or
/// `ReplacingMergeTree` engine becomes its `Replicated…` twin at [`zookeeper_path`], replica
/// `{replica}`, with the same engine arguments after those two. Every other statement is
/// unchanged (ALTER, RENAME and partition operations of replicated tables replicate
/// themselves).
pub fn replicated(statement: &str, database: &str) -> String {
    let Some(rest) = statement.strip_prefix("CREATE TABLE IF NOT EXISTS ") else {
        return statement.to_owned();
    };
    let table: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let Some(at) = statement.find("ENGINE = ") else {
        return statement.to_owned();
    };
    let engine_start = at + "ENGINE = ".len();
    let tail = &statement[engine_start..];
    let name: String = tail
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    if name != "MergeTree" && name != "ReplacingMergeTree" {
        return statement.to_owned();
    }
    let after_name = &tail[name.len()..];
    let (engine_args, rest) = match after_name.strip_prefix('(') {
        Some(inner) => {
            let close = inner.find(')').expect("engine arguments are closed");
            (&inner[..close], &inner[close + 1..])
        }
        None => ("", after_name),
    };
    let path = zookeeper_path(database, &table);
    let extra = if engine_args.is_empty() {
        String::new()
    } else {
        format!(", {engine_args}")
    };
    format!(
        "{}ENGINE = Replicated{name}('{path}', '{{replica}}'{extra}){rest}",
        &statement[..at]
    )
}

fn now_secs() -> u32 {
    let secs = time::OffsetDateTime::now_utc().unix_timestamp();
    u32::try_from(secs).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages of both servers for an `ADD COLUMN` of a column that exists, as each
    /// returns them (docs/clickhouse-versions.md); any other error is not "already added".
    #[test]
    fn a_column_already_there_is_added_on_both_servers() {
        let statement = "ALTER TABLE flush_log ADD COLUMN retention_ms Int64 DEFAULT 0";
        let error = |m: &str| clickhouse::error::Error::BadResponse(m.to_owned());
        let on_18_16 = "Code: 44, e.displayText() = DB::Exception: Cannot add column a: \
                        column with this name already exists, e.what() = DB::Exception";
        let on_26_9 = "Code: 15. DB::Exception: Cannot add column `a`: column with this name \
                       already exists. (DUPLICATE_COLUMN)";
        assert!(column_already_added(statement, &error(on_18_16)));
        assert!(column_already_added(statement, &error(on_26_9)));
        assert!(!column_already_added(
            statement,
            &error("Code: 60. DB::Exception: Table flush_log does not exist. (UNKNOWN_TABLE)")
        ));
        assert!(!column_already_added(
            "CREATE TABLE t (a UInt8)",
            &error(on_26_9)
        ));
    }

    #[test]
    fn versions_are_numbered_in_order_and_files_match() {
        for (index, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version as usize, index + 1);
            assert!(
                !statements(migration.sql).is_empty(),
                "{} has no statement",
                migration.name
            );
        }
    }

    #[test]
    fn statements_skip_comments_and_blank_parts() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE a (x UInt8) ENGINE = Memory;\n\n;SELECT 1";
        assert_eq!(
            statements(sql),
            vec![
                "CREATE TABLE a (x UInt8) ENGINE = Memory".to_owned(),
                "SELECT 1".to_owned()
            ]
        );
    }

    #[test]
    fn no_statement_uses_what_clickhouse_18_16_lacks() {
        for migration in MIGRATIONS {
            let upper = migration.sql.to_uppercase();
            for banned in ["TTL", "LOWCARDINALITY", "DATETIME64", "DEDUPLICATION"] {
                assert!(!upper.contains(banned), "{} uses {banned}", migration.name);
            }
        }
    }

    #[test]
    fn day_partitions_from_008_on_are_utc_days() {
        // 001 and 006 partition by the server's day; 008 rebuilds both with explicit UTC keys,
        // and a later table partitioned by a day of a DateTime must name UTC too (issue 16,
        // item 9): prune and backfill address partitions by UTC day.
        let mut keys = 0;
        for migration in MIGRATIONS.iter().filter(|m| m.version >= 8) {
            for line in migration.sql.lines().map(str::trim) {
                if line.starts_with("PARTITION BY toYYYYMMDD(") {
                    keys += 1;
                    assert!(line.ends_with(", 'UTC')"), "{}: {line}", migration.name);
                }
            }
        }
        assert_eq!(
            keys, 2,
            "008 rebuilds plays_minute and user_touches (dropped by 009)"
        );
    }

    #[test]
    fn replicated_twins_keep_the_engine_arguments_and_the_rest() {
        assert_eq!(
            replicated(
                "CREATE TABLE IF NOT EXISTS plays_daily\n(\n    day Date\n)\nENGINE = ReplacingMergeTree(version)\nPARTITION BY toYYYYMM(day)",
                "topk"
            ),
            "CREATE TABLE IF NOT EXISTS plays_daily\n(\n    day Date\n)\nENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/topk/plays_daily', '{replica}', version)\nPARTITION BY toYYYYMM(day)"
        );
        assert_eq!(
            replicated(
                "CREATE TABLE IF NOT EXISTS day_touches (day Date) ENGINE = MergeTree ORDER BY day",
                "db"
            ),
            "CREATE TABLE IF NOT EXISTS day_touches (day Date) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/db/day_touches', '{replica}') ORDER BY day"
        );
        for unchanged in [
            "ALTER TABLE flush_log ADD COLUMN x UInt8",
            "RENAME TABLE a TO b",
            "CREATE TABLE IF NOT EXISTS m (x UInt8) ENGINE = Memory",
        ] {
            assert_eq!(replicated(unchanged, "db"), unchanged);
        }
        // Every table of the migrations has a replicated twin.
        let creates = MIGRATIONS
            .iter()
            .flat_map(|m| statements(m.sql))
            .filter(|s| s.starts_with("CREATE TABLE"))
            .collect::<Vec<_>>();
        assert!(creates.len() >= 8);
        for create in creates {
            assert!(
                replicated(&create, "db").contains("ENGINE = Replicated"),
                "{create}"
            );
        }
    }

    #[test]
    fn the_staging_engine_is_plays_minutes() {
        let create = statements(MIGRATIONS[7].sql)
            .into_iter()
            .find(|s| s.starts_with("CREATE TABLE IF NOT EXISTS plays_minute_utc"))
            .expect("008 creates plays_minute");
        assert!(
            create.ends_with(&format!("ENGINE = {PLAYS_MINUTE_ENGINE}")),
            "{create}"
        );
    }

    #[test]
    fn database_names_are_checked() {
        assert!(check_identifier("topk_test_1").is_ok());
        assert!(check_identifier("topk; DROP").is_err());
        assert!(check_identifier("").is_err());
        assert!(check_cluster_name("topk-eu.1").is_ok());
        assert!(check_cluster_name("topk'").is_err());
    }
}
