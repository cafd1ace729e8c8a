//! Resuming a partition: the intents recorded from the committed offset on (replayed exactly)
//! and the dedup memory rebuilt by re-reading the log before it (ARCHITECTURE.md, "Resume").

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message as _, Offset, TopicPartitionList};

use topk::counting::partition::{Message, PartitionState};

use crate::events;
use crate::worker::Worker;

/// Why a partition could not be resumed (retried with the same message).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResumeError {
    #[error("reading flush intents")]
    Intents(#[from] clickhouse::error::Error),
    #[error("re-reading the dedup window")]
    Rebuild(#[from] KafkaError),
    #[error("re-reading the dedup window timed out at offset {0}")]
    RebuildTimeout(u64),
}

/// Builds the state of a partition the first time one of its messages arrives at `offset`:
/// reads the recorded intents and rebuilds the dedup memory (retried by `group::resume` until
/// it succeeds: counting without knowing the intents could break exactly-once).
pub(crate) async fn try_resume(
    worker: &Worker,
    partition: i32,
    offset: u64,
) -> Result<PartitionState, ResumeError> {
    let resume = worker.store.intent_ending_at(partition, offset).await?;
    let replay = worker.store.intents_from(partition, offset).await?;
    let replay_count = replay.len();
    let mut state = PartitionState::new(
        partition,
        worker.validator,
        worker.dedup_window_ms,
        resume.as_ref(),
        replay,
    );
    let mut rebuilt = 0;
    if let Some(resume) = resume.filter(|r| r.dedup_from < offset) {
        rebuilt = rebuild_dedup(worker, &mut state, partition, resume.dedup_from, offset).await?;
        state.resume_clock(resume.max_ts);
    }
    events::partition_resumed(partition, offset, replay_count, rebuilt);
    Ok(state)
}

/// Re-reads `[from, until)` of the partition with a consumer outside the group, feeding the
/// dedup memory without counting anything.
async fn rebuild_dedup(
    worker: &Worker,
    state: &mut PartitionState,
    partition: i32,
    from: u64,
    until: u64,
) -> Result<u64, ResumeError> {
    let reader: StreamConsumer =
        topk::kafka::consumer_config(&worker.brokers, &format!("{}-rebuild", worker.group))
            .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&worker.topic, partition, Offset::Offset(from as i64))?;
    reader.assign(&assignment)?;
    let mut read = 0;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), reader.recv())
            .await
            .map_err(|_| ResumeError::RebuildTimeout(from + read))??;
        let offset = u64::try_from(message.offset()).unwrap_or(0);
        if offset >= until {
            break;
        }
        state.remember(view(&message));
        read += 1;
        if offset + 1 >= until {
            break;
        }
    }
    Ok(read)
}

/// The partition state's view of a Kafka message.
pub(crate) fn view<'a>(message: &'a BorrowedMessage<'_>) -> Message<'a> {
    Message {
        offset: u64::try_from(message.offset()).unwrap_or(0),
        timestamp: message.timestamp().to_millis(),
        key: message.key(),
        payload: message.payload(),
    }
}
