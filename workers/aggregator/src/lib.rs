//! The aggregator worker (`topk aggregate`): consumes play events, counts them per
//! (user, song, minute of the event's own timestamp) and flushes the counts to ClickHouse,
//! exactly once. The protocol and the argument for it are in ARCHITECTURE.md
//! ("Exactly-once flush protocol").
//!
//! # Layout
//!
//! The counting itself (batches, dedup, a partition's state) is the library's
//! [`topk::counting`], shared with `topk backfill`.
//!
//! The consumer loop itself is the library's consumer-group kit ([`topk::group`]); this crate
//! keeps the aggregator's own state machine and sink:
//!
//! - [`worker`]: the aggregator's role in the group (timers, background flush, memory cap) and
//!   [`run`];
//! - `held`: the partitions held, their ownership generations and their bytes;
//! - `flush`: the flush protocol, step by step, with its fencing;
//! - `dead_letters`: step 4, the dead-letter topic;
//! - `resume`: replaying intents and rebuilding the dedup memory of a resumed partition;
//! - `rebalance`: the consumer's callbacks (revoke, lost assignment, statistics);
//! - [`store`]: the ClickHouse tables the aggregator writes (`flush_log`, `plays_minute`);
//! - [`events`]: the log line and metric of everything that happens.

mod dead_letters;
pub mod events;
mod flush;
mod held;
mod rebalance;
mod resume;
pub mod store;
pub mod worker;

use std::time::Duration;

use topk::config::{ClickHouseArgs, KafkaArgs, MemberArgs, TelemetryArgs};
use topk::counting::CountingRules;

pub use worker::{AggregatorError, run};

/// `topk aggregate`.
#[derive(Debug, Clone, clap::Args)]
pub struct AggregatorArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Consumer group shared by all aggregators.
    #[arg(long, env = "TOPK_AGGREGATOR_GROUP", default_value = "topk-aggregator")]
    pub group: String,
    #[command(flatten)]
    pub member: MemberArgs,
    /// Deadline of every ClickHouse request of the aggregator. A revoke waits at most twice this
    /// for a flush in flight before it fences the partitions; an intent insert carries a
    /// server-side deadline of this (at most half the session timeout), after which the server
    /// refuses it (ARCHITECTURE.md, "Fencing"). A flush's count insert must fit in it.
    #[arg(long, env = "TOPK_AGGREGATOR_CLICKHOUSE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub clickhouse_timeout: Duration,
    /// How often counts are flushed to ClickHouse (and offsets committed).
    #[arg(long, env = "TOPK_FLUSH_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,
    /// Memory bound of the in-flight state (counts, dead letters, dedup ids), in bytes.
    /// Reaching it flushes early; if the flush fails, consumption pauses until one succeeds.
    #[arg(long, env = "TOPK_MAX_STATE_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_state_bytes: u64,
    #[command(flatten)]
    pub rules: CountingRules,
}
