//! Observability of the archiver and the backfill: each function is one event, emitting its log
//! line and its metric together so the two cannot drift apart.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use topk::telemetry::Chain;

use crate::layout::ObjectName;

pub fn archived(name: &ObjectName, messages: u64, bytes: u64, took: Duration) {
    tracing::debug!(
        partition = name.partition,
        first = name.first,
        last = name.last,
        messages,
        bytes,
        took_ms = took.as_millis() as u64,
        "object archived"
    );
    counter!("topk_archive_messages_total").increment(messages);
    counter!("topk_archive_objects_total").increment(1);
    counter!("topk_archive_bytes_total").increment(bytes);
    histogram!("topk_archive_upload_seconds").record(took.as_secs_f64());
}

pub fn upload_failed(name: &ObjectName, error: &dyn std::error::Error) {
    tracing::warn!(
        partition = name.partition,
        first = name.first,
        last = name.last,
        error = %Chain(error),
        "upload failed; the object is kept and retried, its offsets stay uncommitted"
    );
    counter!("topk_archive_upload_failures_total").increment(1);
}

pub fn commit_failed(error: &dyn std::error::Error) {
    tracing::warn!(error = %Chain(error), "offset commit failed; the objects are durable and a rewrite lands on the same names");
    counter!("topk_archive_commit_failures_total").increment(1);
}

pub fn backpressure(on: bool) {
    if on {
        tracing::warn!("uploads fail: consumption paused until they succeed");
    } else {
        tracing::info!("uploads succeed again: consumption resumed");
    }
    gauge!("topk_archive_paused").set(if on { 1.0 } else { 0.0 });
}

pub fn partition_resumed(partition: i32, offset: u64, existing: usize) {
    tracing::info!(
        partition,
        offset,
        existing,
        "partition resumed (existing objects from this offset on are rewritten to the same names)"
    );
    counter!("topk_archive_partitions_resumed_total").increment(1);
}

pub fn partitions_released(partitions: &[i32], dropped_messages: u64) {
    tracing::info!(
        ?partitions,
        dropped_messages,
        "partitions released; uncommitted messages are re-read by the next owner"
    );
}

pub fn archive_gap(partition: i32, expected: u64, found: u64) {
    tracing::warn!(
        partition,
        expected,
        found,
        "offsets missing from the archive (compaction, transaction markers, or lost objects)"
    );
    counter!("topk_backfill_gaps_total").increment(1);
}
