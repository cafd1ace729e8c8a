//! Daily rollups: `plays_daily` for the full days of the window whose rollup is missing or out
//! of date (a flush touched the day after its last rollup started).
//!
//! Order of a day's rollup: read the server clock (`started_at`), rewrite the day's rows from
//! `plays_minute FINAL` under a new version, then log the rollup. A crash in between leaves the
//! day dirty (queries read its minute rows) or, when it was clean already, rewrites identical
//! content; a re-run never double counts because readers use `plays_daily FINAL`. A key that left
//! the minutes gets no row in the new version, and readers skip the older versions' rows of a
//! clean day (`version >= ` the certified one), so the day reads as its minutes do.
//!
//! On a cluster each shard rolls up its own users from its own minute rows (the same
//! statements, side by side) and the meta server's clock and `rollup_log` certify the day: a
//! crash before the log leaves the day dirty whichever shards finished.

use clickhouse::Client;
use serde::Serialize;
use topk::clock::Clock;
use topk::olap::Olap;
use topk::olap::tables::date_literal;
use topk::query::TopQuery;
use topk::window::{DAY_SECS, Window};

use crate::MaintenanceError;

/// What one rollup round did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RollupReport {
    /// (day start in seconds, rows written) of each day rolled up.
    pub days: Vec<(u32, u64)>,
}

/// Rolls up the window's full days that need it (all of them with `force`).
pub async fn rollup(
    olap: impl Into<Olap>,
    clock: &dyn Clock,
    force: bool,
) -> Result<RollupReport, MaintenanceError> {
    let olap = olap.into();
    let window = Window::at(clock.now_ms());
    let clean = TopQuery::new(olap.clone()).clean_days(window).await?;
    let mut report = RollupReport::default();
    for day in window.full_days() {
        if !force && clean.iter().any(|c| c.day == day) {
            continue;
        }
        let rows = rollup_day(&olap, day).await?;
        report.days.push((day, rows));
        metrics::counter!("topk_rollup_days_total").increment(1);
        tracing::info!(day = %date_literal(day), rows, "day rolled up");
    }
    Ok(report)
}

async fn rollup_day(olap: &Olap, day: u32) -> Result<u64, MaintenanceError> {
    // The clock the day's touches are stamped with: the meta server's.
    let started_at: u32 = olap
        .meta()
        .query("SELECT toUInt32(now())")
        .fetch_one()
        .await?;
    // Versions only need to grow between rollups of the same day: nanoseconds of this host.
    let version =
        u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos()).unwrap_or(0);
    let rolled = olap
        .shards()
        .iter()
        .map(|shard| rollup_day_on(shard, day, version));
    let rows: u64 = futures::future::try_join_all(rolled)
        .await?
        .into_iter()
        .sum();
    let date = date_literal(day);
    olap.meta()
        .query(&format!(
            "INSERT INTO rollup_log (day, version, started_at, rows) \
             VALUES ({date}, {version}, toDateTime({started_at}), {rows})"
        ))
        .execute()
        .await?;
    Ok(rows)
}

/// One shard's rows of `day` under `version`; returns how many.
async fn rollup_day_on(
    client: &Client,
    day: u32,
    version: u64,
) -> Result<u64, clickhouse::error::Error> {
    let end = day + DAY_SECS;
    client
        .query(&format!(
            "INSERT INTO plays_daily (user_id, song_id, day, plays, version) \
             SELECT user_id, song_id, toDate(minute, 'UTC') AS day, sum(plays), {version} \
             FROM plays_minute FINAL \
             WHERE minute >= toDateTime({day}) AND minute < toDateTime({end}) \
             GROUP BY user_id, song_id, day"
        ))
        .execute()
        .await?;
    let date = date_literal(day);
    client
        .query(&format!(
            "SELECT count() FROM plays_daily WHERE day = {date} AND version = {version}"
        ))
        .fetch_one()
        .await
}
