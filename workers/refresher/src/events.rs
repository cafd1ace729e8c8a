//! The log line and the metric of everything the refresher does, in one place each.

use std::time::Duration;

use topk::telemetry::Chain;

use crate::RefreshError;
use crate::cycle::CycleReport;
use crate::warmup::WarmupReport;

/// A cycle ended.
pub fn cycle_done(report: &CycleReport, elapsed: Duration) {
    let r = &report.refreshed;
    metrics::counter!("topk_refresh_users_total", "outcome" => "written").increment(r.written);
    metrics::counter!("topk_refresh_users_total", "outcome" => "unchanged").increment(r.unchanged);
    metrics::counter!("topk_refresh_users_total", "outcome" => "emptied").increment(r.emptied);
    metrics::counter!("topk_refresh_users_total", "outcome" => "refused").increment(r.refused);
    metrics::counter!("topk_refresh_users_total", "outcome" => "failed")
        .increment(r.failed.len() as u64);
    metrics::histogram!("topk_refresh_cycle_seconds").record(elapsed.as_secs_f64());
    metrics::gauge!("topk_refresh_changed_users").set(report.users as f64);
    metrics::counter!("topk_refresh_due_users_total").increment(report.due as u64);
    tracing::info!(
        users = report.users,
        due = report.due,
        settled = report.settled.len(),
        written = r.written,
        unchanged = r.unchanged,
        emptied = r.emptied,
        refused = r.refused,
        failed = r.failed.len(),
        seconds = elapsed.as_secs_f64(),
        window_end = %report.window.end_rfc3339(),
        "refresh cycle done"
    );
}

/// The touches partitions this member owns this cycle: how the group splits the users.
pub fn owned(partitions: &[i32]) {
    metrics::gauge!("topk_refresh_owned_partitions").set(partitions.len() as f64);
}

/// A cycle could not find the changed users (nothing written, nothing committed).
pub fn cycle_failed(error: &RefreshError) {
    metrics::counter!("topk_refresh_cycle_failures_total").increment(1);
    tracing::warn!(error = %Chain(error), "refresh cycle failed; retrying next cycle");
}

/// A chunk of users could not be refreshed; they are retried.
pub fn chunk_failed(users: usize, error: &RefreshError) {
    metrics::counter!("topk_refresh_chunk_failures_total").increment(1);
    tracing::warn!(users, error = %Chain(error), "refresh of a chunk failed; its users are retried");
}

/// A warm-up ended (completely or interrupted).
pub fn warmup_done(report: &WarmupReport) {
    metrics::counter!("topk_warmup_users_total").increment(report.users);
    tracing::info!(
        users = report.users,
        written = report.written,
        unchanged = report.unchanged,
        emptied = report.emptied,
        refused = report.refused,
        failed = report.failed,
        complete = report.complete,
        "warm-up done"
    );
}

/// A touch that is not a user id (nothing of topk's writes it): skipped.
pub fn bad_touch(partition: i32, offset: u64, error: &topk::touches::BadTouch) {
    metrics::counter!("topk_refresh_bad_touches_total").increment(1);
    tracing::warn!(partition, offset, error = %error, "skipped a touch that names no user");
}

/// Partitions of the touches topic were revoked; their uncommitted touches go to the next owner.
pub fn partitions_released(partitions: &[i32], dropped_users: usize) {
    tracing::info!(?partitions, dropped_users, "touches partitions released");
}

/// The consumer could not say its assignment: this cycle owns nothing.
pub fn assignment_unknown(error: &rdkafka::error::KafkaError) {
    tracing::warn!(error = %Chain(error), "cannot read the assignment; skipping this cycle's partitions");
}

/// Kafka did not say where newly assigned partitions start; checked again next cycle.
pub fn starts_unknown(partitions: &[i32], error: &rdkafka::error::KafkaError) {
    tracing::warn!(?partitions, error = %Chain(error), "cannot read committed offsets and watermarks; checking again next cycle");
}

/// A newly assigned partition lost touches: its users are caught up from ClickHouse.
pub fn touches_lost(partition: i32, committed: Option<u64>, low_watermark: u64) {
    metrics::counter!("topk_refresh_catch_ups_total").increment(1);
    tracing::warn!(
        partition,
        committed,
        low_watermark,
        "touches lost (no committed offset, or one the log no longer holds); catching up the partition's users from ClickHouse"
    );
}

/// A partition's catch-up read its last page.
pub fn caught_up(partition: i32) {
    tracing::info!(partition, "touches partition caught up");
}

/// A commit of touches failed; a later one covers it.
pub fn commit_failed(error: &rdkafka::error::KafkaError) {
    metrics::counter!("topk_refresh_commit_failures_total").increment(1);
    tracing::warn!(error = %Chain(error), "commit of touches failed; a later commit covers it");
}

/// The touches topic is unknown (Kafka down, topic not created yet); retried.
pub fn topic_unknown(error: &topk::touches::TouchError) {
    tracing::warn!(error = %Chain(error), "cannot read the touches topic's partitions; retrying");
}
