//! What the aggregator reads from and writes to ClickHouse: flush intents (`flush_log`, its
//! row here) and play counts (`plays_minute`, `day_touches`: rows and writes shared with the
//! backfill in `topk::olap::tables`).

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use topk::counting::batch::{Batch, Rules};
use topk::counting::partition::Intent;
use topk::olap::Olap;
use topk::olap::tables::{self, PlayRow};

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
    /// The rules the batch was decided with (schema/007; 0 in rows recorded before).
    pub dedup_window_ms: i64,
    pub retention_ms: i64,
    /// The server refuses the row (and the whole insert with it) once its clock is past this
    /// second: the `fence` column of schema/007. 0 (older rows) is never refused.
    pub write_deadline: u32,
}

impl IntentRow {
    pub fn of(topic: &str, batch: &Batch, logged_at: u32, write_deadline: u32) -> Self {
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
            dedup_window_ms: batch.rules.dedup_window_ms,
            retention_ms: batch.rules.retention_ms,
            write_deadline,
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
            // A retention of 0 would reject every play: it marks a row without recorded rules.
            rules: (self.retention_ms > 0).then_some(Rules {
                dedup_window_ms: self.dedup_window_ms,
                retention_ms: self.retention_ms,
            }),
        }
    }
}

/// The `plays_minute` rows of `batches`, each under its batch's id. (A named function rather
/// than a closure, so that the flush future that holds the iterator stays `Send`.)
fn play_rows<'a>(
    batches: &'a [&'a Batch],
    topic: &'a str,
) -> impl Iterator<Item = PlayRow> + Send + 'a {
    batches
        .iter()
        .flat_map(move |batch| batch_rows(batch, topic))
}

fn batch_rows<'a>(batch: &'a Batch, topic: &str) -> impl Iterator<Item = PlayRow> + Send + 'a {
    let batch_id = batch.batch_id(topic);
    batch
        .counts
        .iter()
        .map(move |(&cell, &plays)| PlayRow::new(cell, plays, batch_id))
}

fn partition_u32(partition: i32) -> u32 {
    u32::try_from(partition).unwrap_or(0)
}

/// The aggregator's view of ClickHouse.
#[derive(Clone)]
pub struct Store {
    /// The meta server: `flush_log`, `day_touches` and the clock of the fence.
    client: Client,
    /// Where the counts go: each user's on the user's shard.
    olap: Olap,
    topic: String,
    /// Deadline of every request (`--clickhouse-timeout`): a flush whose server stalls gives up
    /// instead of holding the flush lock past a rebalance (ARCHITECTURE.md, "Fencing").
    timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("topic", &self.topic)
            .field("timeout", &self.timeout)
            .finish()
    }
}

const INTENT_COLUMNS: &str = "topic, src_partition, start_offset, end_offset, batch_id, first_ts, \
     max_ts, dedup_from, dedup_from_max_ts, events, rows, logged_at, dedup_window_ms, retention_ms, \
     write_deadline";

/// Requests without a deadline of their own (tests and tools that build a `Store`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The users `batches` count plays for: whom a flush touches.
pub fn touched_users(batches: &[&Batch]) -> BTreeSet<u64> {
    batches
        .iter()
        .flat_map(|batch| batch.counts.keys().map(|&(user_id, _, _)| user_id))
        .collect()
}

impl Store {
    /// The store over `olap`'s tables (a `Client` is a single server).
    pub fn new(olap: impl Into<Olap>, topic: &str) -> Self {
        let olap = olap.into();
        Store {
            client: olap.meta().clone(),
            olap,
            topic: topic.to_owned(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same store with `timeout` on every request.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The request deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `request` under the store's deadline. Dropping the request closes its connection; the
    /// server may still finish it, which is why intents carry a server-side deadline as well.
    async fn timed<T>(
        &self,
        request: impl Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> Result<T, clickhouse::error::Error> {
        tokio::time::timeout(self.timeout, request)
            .await
            .unwrap_or(Err(clickhouse::error::Error::TimedOut))
    }

    /// The server's clock (whole seconds since the epoch): intents' write deadlines are set on
    /// it, so that no clock of this host is compared with the server's.
    pub async fn server_now(&self) -> Result<u32, clickhouse::error::Error> {
        self.timed(
            self.client
                .query("SELECT toUInt32(now())")
                .fetch_one::<u32>(),
        )
        .await
    }

    /// Intents of `partition` starting at or after `offset`, in offset order.
    pub async fn intents_from(
        &self,
        partition: i32,
        offset: u64,
    ) -> Result<Vec<Intent>, clickhouse::error::Error> {
        let query = self
            .client
            .query(&format!(
                "SELECT {INTENT_COLUMNS} FROM flush_log FINAL \
                 WHERE topic = ? AND src_partition = ? AND start_offset >= ? \
                 ORDER BY start_offset, logged_at"
            ))
            .bind(&self.topic)
            .bind(partition_u32(partition))
            .bind(offset);
        let rows: Vec<IntentRow> = self.timed(query.fetch_all()).await?;
        Ok(rows.iter().map(IntentRow::intent).collect())
    }

    /// The intent of `partition` that ended at `offset` (the batch the committed offset came
    /// from), if it is still recorded.
    pub async fn intent_ending_at(
        &self,
        partition: i32,
        offset: u64,
    ) -> Result<Option<Intent>, clickhouse::error::Error> {
        let query = self
            .client
            .query(&format!(
                "SELECT {INTENT_COLUMNS} FROM flush_log FINAL \
                 WHERE topic = ? AND src_partition = ? AND end_offset = ? \
                 ORDER BY logged_at DESC LIMIT 1"
            ))
            .bind(&self.topic)
            .bind(partition_u32(partition))
            .bind(offset);
        let row: Option<IntentRow> = self.timed(query.fetch_optional()).await?;
        Ok(row.as_ref().map(IntentRow::intent))
    }

    /// Records the intents of `batches` without a write deadline (tools and tests; the
    /// aggregator's flush uses [`Store::write_intents_before`]).
    pub async fn write_intents(
        &self,
        batches: &[&Batch],
        logged_at: u32,
    ) -> Result<(), clickhouse::error::Error> {
        self.write_intents_before(batches, logged_at, 0).await
    }

    /// Records the intents of `batches` (step 2 of a flush, as ARCHITECTURE.md "Flush" numbers
    /// them). The server applies the insert only while its clock is at or before
    /// `write_deadline` (seconds, server clock; 0: no deadline): later, the `fence` column's
    /// `throwIf` refuses it whole, so an insert stalled past the handover of its partitions can
    /// never land (ARCHITECTURE.md, "Fencing").
    pub async fn write_intents_before(
        &self,
        batches: &[&Batch],
        logged_at: u32,
        write_deadline: u32,
    ) -> Result<(), clickhouse::error::Error> {
        self.timed(async {
            let mut insert = self.client.insert::<IntentRow>("flush_log").await?;
            for batch in batches {
                insert
                    .write(&IntentRow::of(
                        &self.topic,
                        batch,
                        logged_at,
                        write_deadline,
                    ))
                    .await?;
            }
            insert.end().await
        })
        .await
    }

    /// Writes the counts of `batches` (step 3 of a flush). Returns the number of rows.
    pub async fn write_counts(&self, batches: &[&Batch]) -> Result<u64, clickhouse::error::Error> {
        self.timed(self.write_counts_untimed(batches)).await
    }

    async fn write_counts_untimed(
        &self,
        batches: &[&Batch],
    ) -> Result<u64, clickhouse::error::Error> {
        tables::write_plays_sharded(&self.olap, "plays_minute", play_rows(batches, &self.topic))
            .await
    }

    /// Records that the flush wrote counts for these UTC days (step 3 of a flush, after the
    /// counts), so that rollups of those days are known to be out of date.
    pub async fn write_touches(&self, batches: &[&Batch]) -> Result<(), clickhouse::error::Error> {
        let days: BTreeSet<u32> = batches
            .iter()
            .flat_map(|batch| {
                batch
                    .counts
                    .keys()
                    .map(|&(_, _, minute)| tables::day_of(minute))
            })
            .collect();
        self.timed(tables::touch_days(&self.client, &days)).await
    }
}
