//! Retention without TTL: drops whole day partitions that can no longer touch the window.
//!
//! The cut-off is one day before the window's first (partial) day. The aggregator rejects
//! events older than its retention (8 days by default), so nothing is written below the
//! cut-off while it is dropped.

use clickhouse::Client;
use serde::Serialize;
use topk::clock::Clock;
use topk::olap::Olap;
use topk::olap::tables::{day_of, day_partition};
use topk::window::{DAY_SECS, Window};

use crate::MaintenanceError;

/// Tables partitioned by `toYYYYMMDD(<day>)`, and whether they are count tables (on every
/// shard) or protocol tables (on the meta server).
const DAY_PARTITIONED: [(&str, Where); 3] = [
    ("plays_minute", Where::Shards),
    ("day_touches", Where::Meta),
    ("rollup_log", Where::Meta),
];
/// Tables partitioned by `toYYYYMM(<day>)`: a month goes once all of it is below the cut-off.
const MONTH_PARTITIONED: [(&str, Where); 1] = [("plays_daily", Where::Shards)];

#[derive(Debug, Clone, Copy)]
enum Where {
    Shards,
    Meta,
}

/// What one prune round dropped: (table, partition).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    pub cutoff_yyyymmdd: u32,
    pub dropped: Vec<(String, u32)>,
}

/// Drops the expired partitions of every day-partitioned table, `plays_daily` months that
/// ended before the cut-off, and `flush_log` months that ended before the cut-off's previous
/// month.
///
/// Dropping is the one step that cannot be undone, so it acts on the *earlier* of this host's
/// clock and the ClickHouse server's: a clock running ahead on either side (a maintenance host
/// days fast) only delays retention, never drops a day still inside the window.
pub async fn prune(
    olap: impl Into<Olap>,
    clock: &dyn Clock,
) -> Result<PruneReport, MaintenanceError> {
    let olap = olap.into();
    let server_secs: u32 = olap
        .meta()
        .query("SELECT toUnixTimestamp(now())")
        .fetch_one()
        .await?;
    let host_ms = clock.now_ms();
    let now_ms = host_ms.min(i64::from(server_secs) * 1_000);
    if host_ms - now_ms > 60_000 {
        tracing::warn!(
            ahead_ms = host_ms - now_ms,
            "this host's clock is ahead of ClickHouse's; pruning by ClickHouse's"
        );
    }
    let window = Window::at(now_ms);
    let cutoff = day_partition(day_of(window.start).saturating_sub(DAY_SECS));
    let mut report = PruneReport {
        cutoff_yyyymmdd: cutoff,
        dropped: Vec::new(),
    };
    let month = cutoff / 100;
    let previous_month = if month % 100 == 1 {
        month - 100 + 11
    } else {
        month - 1
    };
    let bounds = DAY_PARTITIONED
        .iter()
        .map(|&(table, at)| (table, at, cutoff))
        .chain(
            MONTH_PARTITIONED
                .iter()
                .map(|&(table, at)| (table, at, month)),
        )
        .chain([("flush_log", Where::Meta, previous_month)]);
    for (table, at, bound) in bounds {
        let servers = match at {
            Where::Shards => olap.shards(),
            Where::Meta => std::slice::from_ref(olap.meta()),
        };
        let mut dropped = std::collections::BTreeSet::new();
        for client in servers {
            for partition in partitions(client, table).await? {
                if partition < bound {
                    drop_partition(client, table, partition).await?;
                    dropped.insert(partition);
                }
            }
        }
        report
            .dropped
            .extend(dropped.into_iter().map(|p| (table.to_owned(), p)));
    }
    Ok(report)
}

async fn partitions(client: &Client, table: &str) -> Result<Vec<u32>, MaintenanceError> {
    let names: Vec<String> = client
        .query(
            "SELECT DISTINCT partition FROM system.parts \
             WHERE database = currentDatabase() AND table = ? AND active",
        )
        .bind(table)
        .fetch_all()
        .await?;
    Ok(names
        .iter()
        .filter_map(|p| p.trim_matches('\'').parse().ok())
        .collect())
}

async fn drop_partition(
    client: &Client,
    table: &str,
    partition: u32,
) -> Result<(), MaintenanceError> {
    client
        .query(&format!("ALTER TABLE {table} DROP PARTITION {partition}"))
        .execute()
        .await?;
    metrics::counter!("topk_prune_partitions_total", "table" => table.to_owned()).increment(1);
    tracing::info!(table, partition, "partition dropped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_match_clickhouse() {
        assert_eq!(day_partition(1_795_975_230), 20_261_129);
        assert_eq!(day_partition(0), 19_700_101);
    }
}
