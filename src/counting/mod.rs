//! The counting core: how a partition's log becomes per-(user, song, minute) counts, decided
//! identically by every program that counts (`topk aggregate` live, `topk backfill` from the
//! archive). Pure logic, no I/O: the roles bring the messages and take the batches.
//!
//! - [`batch`]: a processed offset range and its deterministic identity;
//! - [`dedup`]: duplicate detection over the partition's effective time;
//! - [`partition`]: one partition's state (open batch, sealed batches, replay of intents).

pub mod batch;
pub mod dedup;
pub mod partition;

use std::time::Duration;

pub use batch::{Batch, Counts, DeadLetter};
pub use partition::{Intent, Message, Outcome, PartitionState};

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
    pub fn validator(&self) -> crate::event::Validator {
        crate::event::Validator {
            retention_ms: duration_ms(self.retention),
        }
    }

    pub fn dedup_window_ms(&self) -> i64 {
        duration_ms(self.dedup_window)
    }

    /// A fresh partition state deciding exactly as an aggregator does from the log's start.
    pub fn partition_state(&self, partition: i32) -> PartitionState {
        PartitionState::new(
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
