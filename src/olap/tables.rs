//! The rows and day keys of the tables every writer shares: `plays_minute` (the counts, on the
//! shard of each user) and `day_touches` (which rollups are out of date, on the meta server).
//! The aggregator's flush and `topk backfill` write them the same way through here.

use std::collections::BTreeSet;

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use crate::olap::Olap;
use crate::window::DAY_SECS;

/// A row of `plays_minute`.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct PlayRow {
    pub user_id: u64,
    pub song_id: u64,
    /// Start of the minute, seconds since the epoch (ClickHouse `DateTime`).
    pub minute: u32,
    pub plays: u64,
    pub batch_id: u64,
}

impl PlayRow {
    /// The row of one counted cell under `batch_id`.
    pub fn new((user_id, song_id, minute): (u64, u64, u32), plays: u64, batch_id: u64) -> Self {
        PlayRow {
            user_id,
            song_id,
            minute,
            plays,
            batch_id,
        }
    }
}

/// Writes `rows` to `table` (`plays_minute`, or a staging table of its shape) in one insert;
/// returns how many.
pub async fn write_plays(
    client: &Client,
    table: &str,
    rows: impl IntoIterator<Item = PlayRow>,
) -> Result<u64, clickhouse::error::Error> {
    let mut written = 0;
    let mut insert = client.insert::<PlayRow>(table).await?;
    for row in rows {
        insert.write(&row).await?;
        written += 1;
    }
    insert.end().await?;
    Ok(written)
}

/// Writes `rows` to `table` (`plays_minute`, or a staging table of its shape on every shard)
/// with each row on the shard of its user: one insert per shard, side by side. Returns how
/// many. When one shard's insert fails the others may have landed: a retry of the same rows
/// lands them again under the same keys, which `FINAL` reads as one (ARCHITECTURE.md,
/// "ClickHouse as a sharded cluster").
pub async fn write_plays_sharded(
    olap: &Olap,
    table: &str,
    rows: impl IntoIterator<Item = PlayRow>,
) -> Result<u64, clickhouse::error::Error> {
    // One server: the rows stream into its insert, never gathered in a list first.
    if let [server] = olap.shards() {
        return write_plays(server, table, rows).await;
    }
    let inserts = olap
        .by_shard(rows, |row| row.user_id)
        .into_iter()
        .zip(olap.shards())
        .filter(|(rows, _)| !rows.is_empty())
        .map(|(rows, shard)| write_plays(shard, table, rows));
    Ok(futures::future::try_join_all(inserts)
        .await?
        .into_iter()
        .sum())
}

/// Start of the UTC day containing `secs`.
pub fn day_of(secs: u32) -> u32 {
    secs - secs % DAY_SECS
}

/// `'YYYY-MM-DD'` of a day start (seconds since the epoch).
pub fn date_literal(day: u32) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp(i64::from(day)).map(|t| t.date());
    match date {
        Ok(d) => format!(
            "'{:04}-{:02}-{:02}'",
            d.year(),
            u8::from(d.month()),
            d.day()
        ),
        Err(_) => "'1970-01-01'".to_owned(),
    }
}

/// `YYYYMMDD` of the UTC day containing `secs`: the partition id of the day-partitioned tables
/// (`toYYYYMMDD(…, 'UTC')`, schema/008), which `DROP PARTITION` and `REPLACE PARTITION` name.
pub fn day_partition(secs: u32) -> u32 {
    let date = time::OffsetDateTime::from_unix_timestamp(i64::from(secs)).map(|t| t.date());
    date.map(|d| {
        d.year() as u32 * 10_000 + u32::from(u8::from(d.month())) * 100 + u32::from(d.day())
    })
    .unwrap_or(0)
}

/// Marks the UTC days `days` (day starts) as written, after their counts, so that their
/// rollups are known to be out of date (ARCHITECTURE.md, "The exact window from rollups").
pub async fn touch_days(
    client: &Client,
    days: &BTreeSet<u32>,
) -> Result<(), clickhouse::error::Error> {
    if days.is_empty() {
        return Ok(());
    }
    let values: Vec<String> = days
        .iter()
        .map(|&day| format!("({})", date_literal(day)))
        .collect();
    client
        .query(&format!(
            "INSERT INTO day_touches (day) VALUES {}",
            values.join(", ")
        ))
        .execute()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_keys() {
        assert_eq!(day_of(1_795_975_230), 1_795_910_400);
        assert_eq!(date_literal(1_795_910_400), "'2026-11-29'");
        assert_eq!(day_partition(1_795_975_230), 20_261_129);
        assert_eq!(day_partition(0), 19_700_101);
    }
}
