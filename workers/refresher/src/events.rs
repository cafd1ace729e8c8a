//! The log line and the metric of everything the refresher does, in one place each.

use std::time::Duration;

use topk::telemetry::Chain;

use crate::RefreshError;
use crate::refresh::CycleReport;
use crate::warmup::WarmupReport;

/// A cycle ended.
pub fn cycle_done(report: &CycleReport, elapsed: Duration) {
    let r = &report.refreshed;
    metrics::counter!("topk_refresh_users_total", "outcome" => "written").increment(r.written);
    metrics::counter!("topk_refresh_users_total", "outcome" => "emptied").increment(r.emptied);
    metrics::counter!("topk_refresh_users_total", "outcome" => "refused").increment(r.refused);
    metrics::counter!("topk_refresh_users_total", "outcome" => "failed")
        .increment(r.failed.len() as u64);
    metrics::histogram!("topk_refresh_cycle_seconds").record(elapsed.as_secs_f64());
    metrics::gauge!("topk_refresh_changed_users").set(report.users as f64);
    tracing::info!(
        users = report.users,
        written = r.written,
        emptied = r.emptied,
        refused = r.refused,
        failed = r.failed.len(),
        seconds = elapsed.as_secs_f64(),
        window_end = %report.window.end_rfc3339(),
        "refresh cycle done"
    );
}

/// A cycle could not find the changed users (nothing written; the cursors did not move).
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
        emptied = report.emptied,
        refused = report.refused,
        failed = report.failed,
        complete = report.complete,
        "warm-up done"
    );
}
