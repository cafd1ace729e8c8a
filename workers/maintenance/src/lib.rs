//! The maintenance worker (`topk maintain`, and the one-shot `topk rollup` / `topk prune`):
//! keeps `plays_daily` current for the days the window covers and drops the day partitions that
//! can no longer touch the window. Retention without TTL (ClickHouse 18.16 has none).
//!
//! # Layout
//!
//! - [`rollup`]: (re-)rolls up the window's dirty full days;
//! - [`prune`]: drops expired day partitions;
//! - [`run`]: both, every `--interval`, until shutdown.

pub mod prune;
pub mod rollup;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use topk::clock::SharedClock;
use topk::config::{ClickHouseArgs, TelemetryArgs};
use topk::telemetry::Chain;

pub use prune::{PruneReport, prune};
pub use rollup::{RollupReport, rollup};

/// Errors of maintenance tasks.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("ClickHouse error")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error(transparent)]
    Query(#[from] topk::query::QueryError),
}

/// `topk maintain`.
#[derive(Debug, Clone, clap::Args)]
pub struct MaintenanceArgs {
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Time between two rounds of rollup and prune.
    #[arg(long, env = "TOPK_MAINTENANCE_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

/// Rolls up and prunes every `interval` until `shutdown`. A failed round is logged and retried
/// at the next one: maintenance only ever makes queries cheaper, never changes their answer.
pub async fn run(args: MaintenanceArgs, clock: SharedClock, shutdown: CancellationToken) {
    let olap = match topk::olap::Olap::connect(&args.clickhouse).await {
        Ok(olap) => olap,
        Err(error) => {
            tracing::error!(error = %Chain(&error), "maintenance cannot start");
            return;
        }
    };
    let mut tick = tokio::time::interval(args.interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        match rollup(olap.clone(), clock.as_ref(), false).await {
            Ok(report) => tracing::info!(days = report.days.len(), "rollup round done"),
            Err(error) => tracing::warn!(error = %Chain(&error), "rollup round failed"),
        }
        match prune(olap.clone(), clock.as_ref()).await {
            Ok(report) => tracing::info!(dropped = report.dropped.len(), "prune round done"),
            Err(error) => tracing::warn!(error = %Chain(&error), "prune round failed"),
        }
    }
    tracing::info!("maintenance stopped");
}
