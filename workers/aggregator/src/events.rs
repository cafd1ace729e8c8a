//! Observability of the aggregator: each function is one event, emitting its log line and its
//! metric together so the two cannot drift apart.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use topk::event::Rejection;
use topk::telemetry::Chain;

pub fn consumed(n: u64) {
    counter!("topk_aggregator_consumed_total").increment(n);
}

pub fn counted(n: u64) {
    counter!("topk_aggregator_counted_total").increment(n);
}

pub fn duplicate(partition: i32, offset: u64) {
    tracing::debug!(partition, offset, "duplicate event ignored");
    counter!("topk_aggregator_duplicates_total").increment(1);
}

/// A dead letter refused by the broker even with its payload cut (see `Worker::write`).
pub fn dead_letter_dropped(partition: i32, offset: u64) {
    tracing::error!(
        partition,
        offset,
        "dead letter refused as too large even when cut; the message stays in the source topic"
    );
    counter!("topk_aggregator_dead_letters_dropped_total").increment(1);
}

pub fn dead_letter(partition: i32, offset: u64, reason: Rejection) {
    tracing::debug!(partition, offset, %reason, "event sent to the dead-letter topic");
    counter!("topk_aggregator_dead_letters_total", "reason" => reason.as_str()).increment(1);
}

pub fn flushed(batches: usize, rows: u64, dead_letters: usize, took: Duration) {
    tracing::debug!(
        batches,
        rows,
        dead_letters,
        took_ms = took.as_millis() as u64,
        "flushed"
    );
    histogram!("topk_aggregator_flush_seconds").record(took.as_secs_f64());
    histogram!("topk_aggregator_flush_rows").record(rows as f64);
    counter!("topk_aggregator_flushes_total").increment(1);
}

pub fn flush_failed(error: &dyn std::error::Error) {
    tracing::warn!(error = %Chain(error), "flush failed; batches kept for the next attempt");
    counter!("topk_aggregator_flush_failures_total").increment(1);
}

pub fn commit_failed(error: &dyn std::error::Error) {
    tracing::warn!(error = %Chain(error), "offset commit failed; the batches are durable and will be replayed idempotently if needed");
    counter!("topk_aggregator_commit_failures_total").increment(1);
}

pub fn state_bytes(bytes: u64) {
    gauge!("topk_aggregator_state_bytes").set(bytes as f64);
}

pub fn backpressure(on: bool, bytes: u64) {
    if on {
        tracing::warn!(
            bytes,
            "state at its cap and flushing fails: consumption paused"
        );
    } else {
        tracing::info!(bytes, "flush succeeded: consumption resumed");
    }
    gauge!("topk_aggregator_paused").set(if on { 1.0 } else { 0.0 });
}

pub fn consumer_lag(partition: i32, lag: i64) {
    gauge!("topk_aggregator_consumer_lag", "partition" => partition.to_string()).set(lag as f64);
}

pub fn partition_resumed(partition: i32, offset: u64, replay_intents: usize, rebuilt: u64) {
    tracing::info!(
        partition,
        offset,
        replay_intents,
        rebuilt,
        "partition resumed"
    );
    counter!("topk_aggregator_partitions_resumed_total").increment(1);
}

pub fn partitions_released(partitions: &[i32], flushed: bool) {
    tracing::info!(?partitions, flushed, "partitions released");
}
