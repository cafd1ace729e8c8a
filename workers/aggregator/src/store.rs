//! What the aggregator reads from and writes to ClickHouse: flush intents (`flush_log`) and
//! play counts (`plays_minute`). One `Row` struct per table.

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use crate::batch::Batch;
use crate::partition::Intent;

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

/// A row of `user_touches` (`touched_at` is the server's `now()` at insert).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct UserTouchRow {
    pub user_id: u64,
}

/// A row of `flush_log`.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct IntentRow {
    pub topic: String,
    pub src_partition: u32,
    pub start_offset: u64,
    pub end_offset: u64,
    pub batch_id: u64,
    pub first_ts: i64,
    pub max_ts: i64,
    pub dedup_from: u64,
    pub dedup_from_max_ts: i64,
    pub events: u64,
    pub rows: u64,
    pub logged_at: u32,
}

impl IntentRow {
    pub fn of(topic: &str, batch: &Batch, logged_at: u32) -> Self {
        IntentRow {
            topic: topic.to_owned(),
            src_partition: partition_u32(batch.partition),
            start_offset: batch.start_offset,
            end_offset: batch.end_offset,
            batch_id: batch.batch_id(topic),
            first_ts: batch.first_ts,
            max_ts: batch.max_ts,
            dedup_from: batch.dedup_from,
            dedup_from_max_ts: batch.dedup_from_max_ts,
            events: batch.counted,
            rows: batch.counts.len() as u64,
            logged_at,
        }
    }

    fn intent(&self) -> Intent {
        Intent {
            start_offset: self.start_offset,
            end_offset: self.end_offset,
            first_ts: self.first_ts,
            max_ts: self.max_ts,
            dedup_from: self.dedup_from,
            dedup_from_max_ts: self.dedup_from_max_ts,
        }
    }
}

fn partition_u32(partition: i32) -> u32 {
    u32::try_from(partition).unwrap_or(0)
}

/// The aggregator's view of ClickHouse.
#[derive(Clone)]
pub struct Store {
    client: Client,
    topic: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("topic", &self.topic).finish()
    }
}

const INTENT_COLUMNS: &str = "topic, src_partition, start_offset, end_offset, batch_id, first_ts, \
     max_ts, dedup_from, dedup_from_max_ts, events, rows, logged_at";

impl Store {
    pub fn new(client: Client, topic: &str) -> Self {
        Store {
            client,
            topic: topic.to_owned(),
        }
    }

    /// Intents of `partition` starting at or after `offset`, in offset order.
    pub async fn intents_from(
        &self,
        partition: i32,
        offset: u64,
    ) -> Result<Vec<Intent>, clickhouse::error::Error> {
        let rows: Vec<IntentRow> = self
            .client
            .query(&format!(
                "SELECT {INTENT_COLUMNS} FROM flush_log FINAL \
                 WHERE topic = ? AND src_partition = ? AND start_offset >= ? \
                 ORDER BY start_offset, logged_at"
            ))
            .bind(&self.topic)
            .bind(partition_u32(partition))
            .bind(offset)
            .fetch_all()
            .await?;
        Ok(rows.iter().map(IntentRow::intent).collect())
    }

    /// The intent of `partition` that ended at `offset` (the batch the committed offset came
    /// from), if it is still recorded.
    pub async fn intent_ending_at(
        &self,
        partition: i32,
        offset: u64,
    ) -> Result<Option<Intent>, clickhouse::error::Error> {
        let row: Option<IntentRow> = self
            .client
            .query(&format!(
                "SELECT {INTENT_COLUMNS} FROM flush_log FINAL \
                 WHERE topic = ? AND src_partition = ? AND end_offset = ? \
                 ORDER BY logged_at DESC LIMIT 1"
            ))
            .bind(&self.topic)
            .bind(partition_u32(partition))
            .bind(offset)
            .fetch_optional()
            .await?;
        Ok(row.as_ref().map(IntentRow::intent))
    }

    /// Records the intents of `batches` (step 1 of a flush).
    pub async fn write_intents(
        &self,
        batches: &[&Batch],
        logged_at: u32,
    ) -> Result<(), clickhouse::error::Error> {
        let mut insert = self.client.insert::<IntentRow>("flush_log").await?;
        for batch in batches {
            insert
                .write(&IntentRow::of(&self.topic, batch, logged_at))
                .await?;
        }
        insert.end().await
    }

    /// Writes the counts of `batches` (step 2 of a flush). Returns the number of rows.
    pub async fn write_counts(&self, batches: &[&Batch]) -> Result<u64, clickhouse::error::Error> {
        let mut rows = 0u64;
        let mut insert = self.client.insert::<PlayRow>("plays_minute").await?;
        for batch in batches {
            let batch_id = batch.batch_id(&self.topic);
            for (&(user_id, song_id, minute), &plays) in &batch.counts {
                insert
                    .write(&PlayRow {
                        user_id,
                        song_id,
                        minute,
                        plays,
                        batch_id,
                    })
                    .await?;
                rows += 1;
            }
        }
        insert.end().await?;
        Ok(rows)
    }

    /// Records that the flush wrote counts for these UTC days (step 3 of a flush, after the
    /// counts), so that rollups of those days are known to be out of date.
    pub async fn write_touches(&self, batches: &[&Batch]) -> Result<(), clickhouse::error::Error> {
        let days: std::collections::BTreeSet<u32> = batches
            .iter()
            .flat_map(|batch| {
                batch
                    .counts
                    .keys()
                    .map(|&(_, _, minute)| topk::query::day_of(minute))
            })
            .collect();
        if days.is_empty() {
            return Ok(());
        }
        let values: Vec<String> = days
            .iter()
            .map(|&day| format!("({})", topk::query::date_literal(day)))
            .collect();
        self.client
            .query(&format!(
                "INSERT INTO day_touches (day) VALUES {}",
                values.join(", ")
            ))
            .execute()
            .await
    }

    /// Records the users the flush wrote counts for (after the counts, before the commit), so
    /// that the refresher recomputes exactly those users. A replay writes them again: harmless.
    pub async fn write_user_touches(
        &self,
        batches: &[&Batch],
    ) -> Result<(), clickhouse::error::Error> {
        let users: std::collections::BTreeSet<u64> = batches
            .iter()
            .flat_map(|batch| batch.counts.keys().map(|&(user_id, _, _)| user_id))
            .collect();
        if users.is_empty() {
            return Ok(());
        }
        // A typed insert: one RowBinary stream however many users, `touched_at` from DEFAULT.
        let mut insert = self.client.insert::<UserTouchRow>("user_touches").await?;
        for user_id in users {
            insert.write(&UserTouchRow { user_id }).await?;
        }
        insert.end().await
    }
}
