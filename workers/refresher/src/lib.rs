//! The refresher (`topk refresh`) and the warm-up job (`topk warmup`): they keep Redis equal to
//! what ClickHouse says, one user's top-K at a time, within one refresh interval.
//!
//! # Layout
//!
//! - [`changes`]: which users may have a new answer (touched by a flush; window moved);
//! - [`refresh`]: recomputing a set of users with the batch query, and the refresher's cursors;
//! - [`warmup`]: every user with plays in the window, paged (each page at its own instant),
//!   with progress;
//! - [`events`]: the log line and metric of each event;
//! - [`run`]: a cycle every `--refresh-interval` until shutdown.
//!
//! Answers are written with `topk::cache::replace_all` (the `replace_top` Lua script: atomic,
//! version-guarded replace with TTL), shared with the API's write-back.
//!
//! The invariants and the argument for them are in ARCHITECTURE.md ("The refresher").

pub mod changes;
pub mod events;
pub mod refresh;
pub mod warmup;

use std::time::Duration;

use clap::builder::TypedValueParser as _;

use tokio_util::sync::CancellationToken;
use topk::cache::{CacheError, Redis};
use topk::clock::SharedClock;
use topk::config::{CachePolicyArgs, ClickHouseArgs, RedisArgs, TelemetryArgs};

pub use refresh::{CycleReport, Refresh, Refreshed, Refresher};
pub use warmup::{Warmup, WarmupPage, WarmupReport, warmup};

/// Errors of the refresher and the warm-up.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("ClickHouse error")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error(transparent)]
    Query(#[from] topk::query::QueryError),
    #[error("Redis error")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// How answers are computed and stored: shared by `topk refresh` and `topk warmup`.
#[derive(Debug, Clone, clap::Args)]
pub struct RefreshSettings {
    /// Users per ClickHouse batch query.
    #[arg(long, env = "TOPK_REFRESH_BATCH_SIZE", default_value_t = 2_000,
          value_parser = clap::value_parser!(u32).range(1..=100_000).map(|n| n as usize))]
    pub batch_size: usize,
    /// Batch queries in flight at once (bounds the load on ClickHouse).
    #[arg(long, env = "TOPK_REFRESH_CONCURRENCY", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64).map(|n| n as usize))]
    pub concurrency: usize,
    /// How long the answers written are kept (`--key-ttl`, `--tombstone-ttl`: the API's
    /// write-back has the same policy, flags and variables).
    #[command(flatten)]
    pub cache: CachePolicyArgs,
    /// Overlap of consecutive reads of the users touched by flushes: longer than an insert into
    /// ClickHouse can take to become visible (the aggregator already assumes its inserts finish
    /// within its 10 s session timeout). A touched user is recomputed up to
    /// 1 + margin / interval times.
    #[arg(long, env = "TOPK_REFRESH_TOUCH_MARGIN", default_value = "30s", value_parser = topk::config::duration)]
    pub touch_margin: Duration,
    /// How far back the first cycle of a process looks (touches and window movement). After a
    /// longer outage, run `topk warmup`.
    #[arg(long, env = "TOPK_REFRESH_CATCH_UP", default_value = "1h", value_parser = topk::config::duration)]
    pub catch_up: Duration,
}

/// `topk refresh`.
#[derive(Debug, Clone, clap::Args)]
pub struct RefresherArgs {
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub settings: RefreshSettings,
    /// Time between the starts of two cycles (a cycle that takes longer delays the next one).
    #[arg(long, env = "TOPK_REFRESH_INTERVAL", default_value = "60s", value_parser = topk::config::duration)]
    pub refresh_interval: Duration,
}

/// `topk warmup`.
#[derive(Debug, Clone, clap::Args)]
pub struct WarmupArgs {
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub settings: RefreshSettings,
    /// Users read from ClickHouse per page (each page is refreshed in batches).
    #[arg(long, env = "TOPK_WARMUP_PAGE_SIZE", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000).map(|n| n as usize))]
    pub page_size: usize,
}

/// Runs a refresh cycle every `refresh_interval` until `shutdown`. A failing ClickHouse or
/// Redis is logged and retried at the next cycle; the process never stops for it. Stopping in
/// the middle of a cycle is safe: every stored answer is complete and versioned.
pub async fn run(
    args: RefresherArgs,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<(), RefreshError> {
    let redis = Redis::connect(&args.redis)?;
    let client = topk::olap::client(&args.clickhouse);
    let mut refresher = Refresher::new(client, redis, &args.redis.prefix, &args.settings);
    let mut tick = tokio::time::interval(args.refresh_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            result = refresher.cycle(clock.as_ref()) => {
                if let Err(error) = result {
                    events::cycle_failed(&error);
                }
            }
        }
    }
    tracing::info!("refresher stopped");
    Ok(())
}

/// `topk warmup` as a library call.
pub async fn run_warmup(
    args: WarmupArgs,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<WarmupReport, RefreshError> {
    let redis = Redis::connect(&args.redis)?;
    let client = topk::olap::client(&args.clickhouse);
    let refresh = Refresh::new(client.clone(), redis, &args.redis.prefix, &args.settings);
    warmup(&refresh, &client, clock.as_ref(), args.page_size, shutdown).await
}
