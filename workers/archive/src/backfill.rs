//! `topk backfill`: rebuilds the per-minute counts of whole UTC days from the archive.
//!
//! Every archived partition is replayed in offset order through the aggregator's own partition
//! state (validation against the recorded broker timestamp, dedup over effective time), so each
//! message is decided exactly as an aggregator decided it. The counts of the days in
//! `[since, until)` go to a staging table, and each of those day partitions of `plays_minute`
//! is then *replaced* by the staging one (`ALTER TABLE … REPLACE PARTITION … FROM`, atomic per
//! day). Whatever the aggregator wrote for those days is gone, so nothing counts twice, and a
//! second run replaces the days with identical rows. See ARCHITECTURE.md, "Backfill".

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use indicatif::{ProgressBar, ProgressStyle};
use object_store::{ObjectStore, ObjectStoreExt as _};
use rdkafka::error::KafkaError;
use serde::Serialize;

use topk::counting::{Counts, Message, Outcome, PartitionState};
use topk::event::MAX_FUTURE_MS;
use topk::olap::Olap;
use topk::olap::tables::{self, PlayRow};

use crate::BackfillArgs;
use crate::events;
use crate::record::{self, DecodeError};
use crate::store::{self, Listed, StoreError};

/// The `batch_id` of every row a backfill writes. Aggregator ids are FNV-1a hashes of a batch's
/// coordinates; a replaced day holds backfill rows only, so one constant id keeps a re-run's
/// rows identical.
pub const BACKFILL_BATCH_ID: u64 = 0;

const DAY_SECS: i64 = topk::window::DAY_SECS as i64;

/// Why a backfill stopped (nothing was replaced unless the error says so).
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("--until ({until}) must be after --since ({since})")]
    EmptyRange {
        since: time::Date,
        until: time::Date,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Layout(#[from] topk::olap::LayoutError),
    #[error("reading the archive")]
    Read(#[from] object_store::Error),
    #[error("archive object {object}")]
    Decode {
        object: String,
        #[source]
        source: DecodeError,
    },
    #[error("reading the committed offsets of group {group}")]
    Committed {
        group: String,
        #[source]
        source: KafkaError,
    },
    #[error(
        "the archive of partition {partition} ends before offset {committed}, which the aggregators already counted: wait until the archiver has caught up"
    )]
    ArchiveBehind { partition: i32, committed: u64 },
    #[error(transparent)]
    Kafka(topk::kafka::KafkaClientError),
    #[error("telling the refreshers which users changed")]
    Touches(#[from] topk::touches::TouchError),
    #[error("ClickHouse (staging table {staging})")]
    ClickHouse {
        staging: String,
        #[source]
        source: clickhouse::error::Error,
    },
}

/// What a backfill did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct BackfillReport {
    /// The UTC days replaced.
    pub days: Vec<String>,
    pub partitions: u64,
    pub objects_read: u64,
    /// Objects too old to matter (every message produced long before `--since`).
    pub objects_skipped: u64,
    pub messages: u64,
    /// Plays counted into the replaced days.
    pub plays: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Rows written to `plays_minute`.
    pub rows: u64,
    /// Users given a touch: those with counts in the replaced days before the
    /// replace or after it, so that the refresher recomputes every answer the backfill changed.
    pub users_touched: u64,
    /// Places where offsets were missing between two objects.
    pub gaps: u64,
}

/// A `--since`/`--until` that is not a `YYYY-MM-DD` day.
#[derive(Debug, thiserror::Error)]
#[error("expected YYYY-MM-DD: {0}")]
pub struct DayError(time::error::Parse);

/// Parses a `YYYY-MM-DD` day.
pub fn parse_day(text: &str) -> Result<time::Date, DayError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(text, &format).map_err(DayError)
}

fn day_secs(day: time::Date) -> i64 {
    day.midnight().assume_utc().unix_timestamp()
}

/// Rebuilds the days `[since, until)` of `plays_minute` from the archive.
pub async fn run(args: &BackfillArgs) -> Result<BackfillReport, BackfillError> {
    let until = args.until.unwrap_or_else(|| {
        time::OffsetDateTime::now_utc()
            .date()
            .next_day()
            .unwrap_or(time::Date::MAX)
    });
    if until <= args.since {
        return Err(BackfillError::EmptyRange {
            since: args.since,
            until,
        });
    }
    let (since_s, until_s) = (day_secs(args.since), day_secs(until));
    let topic = args.kafka.topic.as_str();
    let store = store::open(&args.store)?;
    let listing = store::list_topic(store.as_ref(), topic).await?;

    let cutoffs = match &args.up_to_group {
        Some(group) => Some(committed_offsets(&args.kafka.brokers, group, topic).await?),
        None => None,
    };
    if let Some(cutoffs) = &cutoffs {
        for (&partition, &committed) in cutoffs {
            let archived_end = listing
                .get(&partition)
                .and_then(|objects| objects.iter().map(|l| l.name.last + 1).max())
                .unwrap_or(0);
            if archived_end < committed {
                return Err(BackfillError::ArchiveBehind {
                    partition,
                    committed,
                });
            }
        }
    }

    // An object whose every message was produced before this cannot change a decision about a
    // play of the range (argument in ARCHITECTURE.md, "Backfill"), so a leading run of them is
    // skipped without being downloaded.
    let relevant_from = since_s * 1000 - MAX_FUTURE_MS - args.rules.dedup_window_ms() - 1;
    let mut report = BackfillReport::default();
    let mut plan: Vec<(i32, Option<u64>, Vec<Listed>)> = Vec::new();
    for (&partition, objects) in &listing {
        let cutoff = cutoffs
            .as_ref()
            .map(|c| c.get(&partition).copied().unwrap_or(0));
        let skip = objects
            .iter()
            .take_while(|l| l.name.max_ts < relevant_from)
            .count();
        report.objects_skipped += skip as u64;
        let wanted: Vec<Listed> = objects[skip..]
            .iter()
            .filter(|l| cutoff.is_none_or(|c| l.name.first < c))
            .copied()
            .collect();
        plan.push((partition, cutoff, wanted));
    }
    let total_bytes: u64 = plan.iter().flat_map(|(_, _, o)| o).map(|l| l.size).sum();
    let bar = progress_bar(total_bytes);

    let mut cells = Counts::default();
    for (partition, cutoff, objects) in plan {
        let read = replay_partition(
            &store,
            topic,
            args,
            partition,
            cutoff,
            objects,
            &bar,
            &mut report,
        )
        .await?;
        for ((user, song, minute), plays) in read {
            if (since_s..until_s).contains(&i64::from(minute)) {
                *cells.entry((user, song, minute)).or_default() += plays;
            }
        }
        report.partitions += 1;
        if bar.is_hidden() {
            tracing::info!(
                partition,
                objects_read = report.objects_read,
                messages = report.messages,
                "backfill: partition replayed"
            );
        }
    }
    bar.finish_and_clear();
    report.plays = cells.values().sum();

    let days: Vec<i64> = (since_s..until_s).step_by(DAY_SECS as usize).collect();
    let olap = topk::olap::Olap::connect(&args.clickhouse).await?;
    let replaced = replace_days(&olap, &days, cells).await?;
    report.rows = replaced.rows;
    // The refreshers learn of the replaced counts only through touches (after the counts, as
    // a flush publishes them). A failure here leaves Redis behind until a re-run: the report
    // is not printed, and re-running the backfill replaces the same days identically.
    let producer = topk::kafka::producer(&args.kafka.brokers).map_err(BackfillError::Kafka)?;
    report.users_touched =
        topk::touches::publish(&producer, &args.kafka.touches_topic(), &replaced.users).await?
            as u64;
    report.days = days
        .iter()
        .map(|&d| tables::date_literal(d as u32).trim_matches('\'').to_owned())
        .collect();
    Ok(report)
}

fn progress_bar(total_bytes: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total_bytes);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} backfill [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta}) {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Replays one partition's objects, in offset order, through a fresh aggregator partition
/// state; returns every count it produced (all days).
#[allow(clippy::too_many_arguments)]
async fn replay_partition(
    store: &Arc<dyn ObjectStore>,
    topic: &str,
    args: &BackfillArgs,
    partition: i32,
    cutoff: Option<u64>,
    objects: Vec<Listed>,
    bar: &ProgressBar,
    report: &mut BackfillReport,
) -> Result<Counts, BackfillError> {
    let mut state = args.rules.partition_state(partition);
    let mut cells = Counts::default();
    let mut next: Option<u64> = None;
    let mut bodies = futures::stream::iter(objects)
        .map(|listed| {
            let store = Arc::clone(store);
            let path = listed.name.path(topic);
            async move {
                let body = store.get(&path).await?.bytes().await?;
                Ok::<_, object_store::Error>((listed, path, body))
            }
        })
        .buffered(args.prefetch.max(1));
    'objects: while let Some((listed, path, body)) = bodies.try_next().await? {
        bar.set_message(format!("partition {partition}"));
        let records = record::decode(&body).map_err(|source| BackfillError::Decode {
            object: path.to_string(),
            source,
        })?;
        report.objects_read += 1;
        for record in records {
            // Objects may overlap (see ARCHITECTURE.md): an offset already replayed is skipped.
            if next.is_some_and(|n| record.offset < n) {
                continue;
            }
            if let Some(n) = next.filter(|&n| record.offset > n) {
                events::archive_gap(partition, n, record.offset);
                report.gaps += 1;
            }
            if cutoff.is_some_and(|c| record.offset >= c) {
                break 'objects;
            }
            // `decode` checked the base64 already.
            let key = record.key_bytes().unwrap_or_default();
            let value = record.value_bytes().unwrap_or_default();
            let outcome = state.process(Message {
                offset: record.offset,
                timestamp: record.timestamp,
                key: key.as_deref(),
                payload: value.as_deref(),
            });
            report.messages += 1;
            match outcome {
                Outcome::Counted => {}
                Outcome::Duplicate => report.duplicates += 1,
                Outcome::DeadLetter(_) => report.rejected += 1,
            }
            next = Some(record.offset + 1);
        }
        drain(&mut state, &mut cells);
        bar.inc(listed.size);
    }
    drain(&mut state, &mut cells);
    Ok(cells)
}

/// Moves the counts processed so far out of the partition state (its dedup memory stays).
fn drain(state: &mut PartitionState, cells: &mut Counts) {
    state.seal();
    for batch in state.take_sealed() {
        for (key, plays) in batch.counts {
            *cells.entry(key).or_default() += plays;
        }
    }
}

/// The offsets `group` has committed on every partition of `topic` (0 where it never did: the
/// aggregators will start there and count everything themselves).
async fn committed_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
) -> Result<BTreeMap<i32, u64>, BackfillError> {
    let (brokers, group_owned, topic) = (brokers.to_owned(), group.to_owned(), topic.to_owned());
    let read = tokio::task::spawn_blocking(move || {
        topk::kafka::committed_offsets(&brokers, &group_owned, &topic, Duration::from_secs(10))
    })
    .await
    .expect("the committed-offsets reader does not panic");
    read.map_err(|source| BackfillError::Committed {
        group: group.to_owned(),
        source,
    })
}

/// What the ClickHouse side of a backfill wrote.
#[derive(Debug, Clone)]
struct Replaced {
    rows: u64,
    /// Users with counts in the replaced days before or after the replace.
    users: BTreeSet<u64>,
}

/// Writes `cells` to a staging table and replaces each day partition of `plays_minute` with
/// the staging one (an empty day too: its partition is then dropped), on every shard with that
/// shard's users. Marks the days touched so their rollups are recomputed, then the users whose
/// counts were replaced so the refresher recomputes their answers.
///
/// On a cluster the shards are replaced one after the other: a crash in between leaves some
/// shards with the new days and some with the old. A user's rows are all on one shard, so each
/// user reads either the old or the new counts of a day, never a mix, until the re-run replaces
/// the rest (as on one server, a day rolled up before stays answered by its rollup until the
/// days are touched).
async fn replace_days(olap: &Olap, days: &[i64], cells: Counts) -> Result<Replaced, BackfillError> {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64;
    let staging = format!(
        "plays_minute_backfill_{:016x}",
        nanos ^ u64::from(std::process::id()).rotate_left(32)
    );
    let rows = cells.len() as u64;
    let mut users: BTreeSet<u64> = cells.keys().map(|&(user, _, _)| user).collect();
    let split = olap.by_shard(cells, |&((user, _, _), _)| user);
    for (shard, cells) in olap.shards().iter().zip(split) {
        let result = write_and_replace(shard, &staging, days, cells).await;
        // Best effort: a leftover staging table holds no counts anyone reads.
        let _ = shard
            .query(&format!("DROP TABLE IF EXISTS {staging}"))
            .execute()
            .await;
        users.extend(result.map_err(|source| BackfillError::ClickHouse {
            staging: staging.clone(),
            source,
        })?);
    }
    // After the counts, as the aggregator does: the rollups of these days are out of date.
    // Before the users' touches, which `run` publishes once this returns, so that a
    // recomputation they trigger never reads a replaced day from its old rollup.
    let touched_days: BTreeSet<u32> = days.iter().map(|&d| d as u32).collect();
    tables::touch_days(olap.meta(), &touched_days)
        .await
        .map_err(|source| BackfillError::ClickHouse { staging, source })?;
    Ok(Replaced { rows, users })
}

/// Replaces `days` on one shard with `cells` (that shard's users); returns the users that had
/// rows in those days before.
async fn write_and_replace(
    client: &clickhouse::Client,
    staging: &str,
    days: &[i64],
    cells: Vec<((u64, u64, u32), u64)>,
) -> Result<Vec<u64>, clickhouse::error::Error> {
    client
        .query(&format!(
            "CREATE TABLE {staging} AS plays_minute ENGINE = {}",
            topk::migrate::PLAYS_MINUTE_ENGINE
        ))
        .execute()
        .await?;
    // Every user whose counts in these days the replace may change: those with rows there now
    // (their rows may vanish: plays the archive does not hold, or that it decides otherwise) and
    // those with rows after it. Read before the first replace; nothing else writes these days
    // while a backfill runs (ARCHITECTURE.md, "Backfill", limits).
    let mut before = Vec::new();
    if let (Some(&first), Some(&last)) = (days.first(), days.last()) {
        let end = last + DAY_SECS;
        before = client
            .query(&format!(
                "SELECT DISTINCT user_id FROM plays_minute \
                 WHERE minute >= toDateTime({first}) AND minute < toDateTime({end})"
            ))
            .fetch_all()
            .await?;
    }
    let staged_days: std::collections::BTreeSet<i64> = cells
        .iter()
        .map(|((_, _, minute), _)| i64::from(*minute).div_euclid(DAY_SECS) * DAY_SECS)
        .collect();
    let staged = cells
        .into_iter()
        .map(|(cell, plays)| PlayRow::new(cell, plays, BACKFILL_BATCH_ID));
    tables::write_plays(client, staging, staged).await?;
    for &day in days {
        // A day the archive holds no counts for is dropped, not replaced: a current ClickHouse
        // (25.x) refuses `REPLACE PARTITION` from an empty source partition
        // (`allow_replace_partition_from_empty_source`), and both mean the day is empty now.
        let partition = tables::day_partition(day as u32);
        let sql = if staged_days.contains(&day) {
            format!("ALTER TABLE plays_minute REPLACE PARTITION {partition} FROM {staging}")
        } else {
            format!("ALTER TABLE plays_minute DROP PARTITION {partition}")
        };
        client.query(&sql).execute().await?;
    }
    Ok(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_partitions() {
        let day = parse_day("2026-11-29").unwrap();
        assert_eq!(day_secs(day), 1_795_910_400);
        assert_eq!(tables::day_partition(day_secs(day) as u32), 20_261_129);
        assert!(parse_day("29/11/2026").is_err());
    }
}
