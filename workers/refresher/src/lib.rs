//! The refresher (`topk refresh`) and the warm-up job (`topk warmup`): they keep Redis equal to
//! what ClickHouse says, one user's top-K at a time, within one refresh interval.
//!
//! # Layout
//!
//! - [`member`]: `topk refresh`, a member of the refreshers' consumer group on
//!   `<topic>.touches`: touched users collected per partition, a cycle every
//!   `--refresh-interval`, commits of the partitions a cycle settled;
//! - [`cycle`]: the cycle over the owned partitions (touched, due, failed before, caught up);
//! - [`ageing`]: the ageing index in Redis, when each answer next changes without new plays;
//! - [`refresh`]: recomputing a set of users with the batch query, storing and scheduling them;
//! - [`changes`]: the users with plays in the window, paged (warm-up, catch-up);
//! - [`warmup`]: every user with plays in the window, paged (each page at its own instant),
//!   with progress;
//! - [`events`]: the log line and metric of each event.
//!
//! Answers are written with `topk::cache::replace_all` (the `replace_top` Lua script: atomic,
//! version-guarded replace with TTL), shared with the API's write-back; schedules with
//! `lua/schedule.lua`, version-guarded the same way.
//!
//! The invariants and the argument for them are in ARCHITECTURE.md ("The refresher").

pub mod ageing;
pub mod changes;
pub mod cycle;
pub mod events;
pub mod member;
pub mod refresh;
pub mod warmup;

use std::time::Duration;

use clap::builder::TypedValueParser as _;

use tokio_util::sync::CancellationToken;
use topk::cache::{CacheError, Redis};
use topk::clock::SharedClock;
use topk::config::{
    CachePolicyArgs, ClickHouseArgs, KafkaArgs, MemberArgs, RedisArgs, TelemetryArgs,
};
use topk::group::MemberError;
use topk::touches::TouchError;

pub use cycle::{CycleReport, Refresher};
pub use member::run;
pub use refresh::{Refresh, Refreshed};
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
    #[error(transparent)]
    Member(#[from] MemberError),
    #[error(transparent)]
    Touches(#[from] TouchError),
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
    /// Users a refresher reads from ClickHouse per cycle for each touches partition it catches
    /// up (one whose touches were lost: a new group, a committed offset past retention).
    #[arg(long, env = "TOPK_REFRESH_CATCH_UP_PAGE", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000).map(|n| n as usize))]
    pub catch_up_page: usize,
}

/// `topk refresh`.
#[derive(Debug, Clone, clap::Args)]
pub struct RefresherArgs {
    /// The plays topic: the refreshers consume its touches, `<topic>.touches`.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Consumer group of the refreshers (independent of the aggregators' and the archivers').
    #[arg(long, env = "TOPK_REFRESH_GROUP", default_value = "topk-refresher")]
    pub group: String,
    #[command(flatten)]
    pub member: MemberArgs,
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
    /// The plays topic: the warm-up schedules answers by the partitions of `<topic>.touches`.
    #[command(flatten)]
    pub kafka: KafkaArgs,
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

/// `topk warmup` as a library call.
pub async fn run_warmup(
    args: WarmupArgs,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<WarmupReport, RefreshError> {
    let producer = topk::kafka::producer(&args.kafka.brokers).map_err(MemberError::from)?;
    let partitions = topk::touches::partitions(&producer, &args.kafka.touches_topic()).await?;
    let redis = Redis::connect(&args.redis)?;
    let olap = topk::olap::Olap::connect(&args.clickhouse)
        .await
        .map_err(MemberError::from)?;
    let refresh = Refresh::new(
        olap.clone(),
        redis,
        &args.redis.prefix,
        partitions,
        &args.settings,
    );
    warmup(&refresh, olap, clock.as_ref(), args.page_size, shutdown).await
}
