//! The aggregator worker (`topk aggregate`): consumes play events, counts them per
//! (user, song, minute of the event's own timestamp) and flushes the counts to ClickHouse,
//! exactly once. The protocol and the argument for it are in ARCHITECTURE.md
//! ("Exactly-once flush protocol").
//!
//! # Layout
//!
//! - [`batch`]: a processed offset range and its deterministic identity;
//! - [`dedup`]: duplicate detection over the partition's effective time;
//! - [`partition`]: one assigned partition (open batch, sealed batches, replay of intents);
//! - [`store`]: the ClickHouse tables the aggregator writes (`flush_log`, `plays_minute`);
//! - [`worker`]: the consumer loop, flushes, commits and rebalances;
//! - [`events`]: the log line and metric of everything that happens.

pub mod batch;
pub mod dedup;
pub mod events;
pub mod partition;
pub mod store;
pub mod worker;

use std::time::Duration;

use topk::config::{ClickHouseArgs, KafkaArgs, TelemetryArgs};

pub use worker::{AggregatorError, run};

/// What decides whether a message counts: shared by `topk aggregate` and `topk backfill`, which
/// must decide every message identically.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct CountingRules {
    /// A repeated event_id within this much (Kafka) time is counted once.
    #[arg(long, env = "TOPK_DEDUP_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub dedup_window: Duration,
    /// Events older than this when produced are rejected as `too_old`.
    #[arg(long, env = "TOPK_RETENTION", default_value = "8days", value_parser = humantime::parse_duration)]
    pub retention: Duration,
}

impl CountingRules {
    pub fn validator(&self) -> topk::event::Validator {
        topk::event::Validator {
            retention_ms: duration_ms(self.retention),
        }
    }

    pub fn dedup_window_ms(&self) -> i64 {
        duration_ms(self.dedup_window)
    }

    /// A fresh partition state deciding exactly as an aggregator does from the log's start.
    pub fn partition_state(&self, partition: i32) -> partition::PartitionState {
        partition::PartitionState::new(
            partition,
            self.validator(),
            self.dedup_window_ms(),
            None,
            Vec::new(),
        )
    }
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

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
    /// Kafka consumer-group session timeout: how long a dead worker keeps its partitions.
    #[arg(long, env = "TOPK_KAFKA_SESSION_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub kafka_session_timeout: Duration,
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
    /// How long SIGTERM may spend on the final flush before giving up (nothing is lost: the
    /// uncommitted range is replayed by the next owner).
    #[arg(long, env = "TOPK_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Test hook: sleep this long between writing a flush and committing its offsets, to widen
    /// the window a crash test aims `kill -9` at.
    #[arg(long, env = "TOPK_TEST_PAUSE_BEFORE_COMMIT", value_parser = humantime::parse_duration, hide = true)]
    pub test_pause_before_commit: Option<Duration>,
}
