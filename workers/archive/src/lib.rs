//! The raw event archive (`topk archive`) and the rebuild of ClickHouse from it
//! (`topk backfill`). The archive keeps every message of `plays` exactly as received, so an
//! operator can rebuild the per-minute counts after losing ClickHouse, or recount after a bug.
//! The rules and the argument for them are in ARCHITECTURE.md ("The raw event archive",
//! "Backfill").
//!
//! # Layout
//!
//! - [`record`]: one archived message (a JSON line) and the zstd NDJSON object body;
//! - [`layout`]: object names, a function of the offset range they hold;
//! - [`store`]: the object store (local directory or S3) and its listings;
//! - [`archiver`]: the consumer loop: batch, upload, then commit;
//! - [`backfill`]: archive → validation and dedup as the aggregator does → day partitions of
//!   `plays_minute` replaced;
//! - [`events`]: the log line and metric of everything that happens.

pub mod archiver;
pub mod backfill;
pub mod events;
pub mod layout;
pub mod record;
pub mod store;

use std::time::Duration;

use topk::config::{ClickHouseArgs, KafkaArgs, MemberArgs, TelemetryArgs};
use topk::counting::CountingRules;

pub use archiver::{ArchiveError, run};
pub use backfill::{BackfillError, BackfillReport};
pub use store::StoreArgs;

/// `topk archive`.
#[derive(Debug, Clone, clap::Args)]
pub struct ArchiveArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Consumer group of the archivers (independent of the aggregators').
    #[arg(long, env = "TOPK_ARCHIVE_GROUP", default_value = "topk-archive")]
    pub group: String,
    #[command(flatten)]
    pub member: MemberArgs,
    /// Longest a message waits before its batch is uploaded (and its offset committed).
    #[arg(long, env = "TOPK_ARCHIVE_FLUSH_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,
    /// A batch is cut once it holds this many messages.
    #[arg(
        long,
        env = "TOPK_ARCHIVE_MAX_BATCH_MESSAGES",
        default_value_t = 200_000
    )]
    pub max_batch_messages: u64,
    /// A batch is cut once its uncompressed lines reach this many bytes.
    #[arg(long, env = "TOPK_ARCHIVE_MAX_BATCH_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_batch_bytes: u64,
}

/// `topk backfill`.
#[derive(Debug, Clone, clap::Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub rules: CountingRules,
    /// First UTC day to rebuild (YYYY-MM-DD).
    #[arg(long, value_parser = backfill::parse_day)]
    pub since: time::Date,
    /// UTC day after the last one to rebuild (exclusive; default: tomorrow, so today is included).
    #[arg(long, value_parser = backfill::parse_day)]
    pub until: Option<time::Date>,
    /// Rebuild each partition only below the offset this consumer group (the aggregators') has
    /// committed, so aggregators resuming there count the rest: nothing twice, nothing missed.
    /// Without it, everything archived is counted.
    #[arg(long, env = "TOPK_BACKFILL_UP_TO_GROUP")]
    pub up_to_group: Option<String>,
    /// Objects downloaded ahead of the one being processed.
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
}
