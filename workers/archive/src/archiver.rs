//! The archiver's consumer loop: every message of `plays` as received, in compressed objects
//! whose names are their offset ranges; offsets committed only after the upload succeeded.
//!
//! Uploads run on the loop's own task, between two `recv()` calls, and librdkafka runs the
//! rebalance callback only inside `recv()`. So no upload is ever in flight when partitions are
//! revoked, and the next owner cannot race a put of this worker (see ARCHITECTURE.md,
//! "The raw event archive").

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::join_all;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::ArchiveArgs;
use crate::events;
use crate::layout::ObjectName;
use crate::record::{self, Record};
use crate::store::{self, StoreError};

/// Errors that stop the archiver.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Kafka(#[from] topk::kafka::KafkaClientError),
    #[error("cannot subscribe to {topic}: {source}")]
    Subscribe {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the final upload did not succeed within the shutdown timeout; the next owner re-reads the uncommitted offsets"
    )]
    FinalUpload,
}

/// The batch being filled for one partition.
#[derive(Debug)]
struct OpenBatch {
    first: u64,
    last: u64,
    max_ts: i64,
    lines: Vec<u8>,
    messages: u64,
    opened: Instant,
    /// Set when an object starting at `first` already exists: this batch must end exactly at
    /// its last offset, so that the rewrite has the same name and the same content.
    forced_last: Option<u64>,
}

/// A cut batch, compressed, named, waiting for its upload.
#[derive(Debug, Clone)]
struct SealedBatch {
    name: ObjectName,
    /// Cheap to clone: a retry re-sends the same bytes.
    body: PutPayload,
    messages: u64,
}

#[derive(Debug, Default)]
struct PartitionArchive {
    open: Option<OpenBatch>,
    sealed: VecDeque<SealedBatch>,
    /// Objects found in the store starting at or after the offset this worker resumed at.
    existing: VecDeque<ObjectName>,
}

impl PartitionArchive {
    /// Adds a message; returns whether a batch was sealed.
    fn push(&mut self, partition: i32, record: &Record, args: &ArchiveArgs) -> bool {
        if self.open.is_none() {
            let forced_last = self.existing_starting_at(record.offset);
            self.open = Some(OpenBatch {
                first: record.offset,
                last: record.offset,
                max_ts: i64::MIN,
                lines: Vec::new(),
                messages: 0,
                opened: Instant::now(),
                forced_last,
            });
        }
        let open = self.open.as_mut().expect("opened above");
        record.write_line(&mut open.lines);
        open.last = record.offset;
        open.messages += 1;
        if let Some(ts) = record.timestamp {
            open.max_ts = open.max_ts.max(ts);
        }
        let full = match open.forced_last {
            Some(last) => open.last >= last,
            None => {
                open.messages >= args.max_batch_messages
                    || open.lines.len() as u64 >= args.max_batch_bytes
            }
        };
        full && self.seal(partition)
    }

    /// The last offset of an existing object starting exactly at `offset`, if any.
    fn existing_starting_at(&mut self, offset: u64) -> Option<u64> {
        while let Some(front) = self.existing.front() {
            if front.first < offset {
                self.existing.pop_front();
                continue;
            }
            if front.first == offset {
                return self.existing.pop_front().map(|name| name.last);
            }
            return None;
        }
        None
    }

    /// Cuts the open batch, unless it must still grow to an existing object's end.
    fn seal(&mut self, partition: i32) -> bool {
        let Some(open) = self.open.as_ref() else {
            return false;
        };
        if open.messages == 0 || open.forced_last.is_some_and(|last| open.last < last) {
            return false;
        }
        let open = self.open.take().expect("checked above");
        self.sealed.push_back(SealedBatch {
            name: ObjectName {
                partition,
                first: open.first,
                last: open.last,
                max_ts: open.max_ts,
            },
            body: PutPayload::from(record::compress(&open.lines)),
            messages: open.messages,
        });
        true
    }

    fn messages(&self) -> u64 {
        self.open.as_ref().map_or(0, |o| o.messages)
            + self.sealed.iter().map(|s| s.messages).sum::<u64>()
    }
}

/// The consumer's context: the partitions' state, shared with the rebalance callback.
struct Archiver {
    partitions: Mutex<HashMap<i32, PartitionArchive>>,
    topic: String,
}

impl Archiver {
    fn partitions(&self) -> MutexGuard<'_, HashMap<i32, PartitionArchive>> {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ClientContext for Archiver {}

impl ConsumerContext for Archiver {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        // No upload is in flight here (uploads never overlap `recv()`), so dropping is safe:
        // whatever was not committed is re-read by the next owner, which rewrites any object
        // already put under the same name.
        let revoked: Vec<i32> = list
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let mut partitions = self.partitions();
        let dropped = revoked
            .iter()
            .filter_map(|p| partitions.remove(p))
            .map(|state| state.messages())
            .sum();
        events::partitions_released(&revoked, dropped);
    }
}

type ArchiveConsumer = StreamConsumer<Archiver>;

/// Runs an archiver until `shutdown` fires; uploads and commits what it holds before returning.
pub async fn run(args: ArchiveArgs, shutdown: CancellationToken) -> Result<(), ArchiveError> {
    let store = store::open(&args.store)?;
    let context = Archiver {
        partitions: Mutex::new(HashMap::new()),
        topic: args.kafka.topic.clone(),
    };
    let config =
        topk::kafka::member_config(&args.kafka.brokers, &args.group, args.kafka_session_timeout);
    let consumer: ArchiveConsumer = topk::kafka::consumer_with_context(&config, context)?;
    consumer
        .subscribe(&[&args.kafka.topic])
        .map_err(|source| ArchiveError::Subscribe {
            topic: args.kafka.topic.clone(),
            source,
        })?;
    tracing::info!(topic = %args.kafka.topic, group = %args.group, "archiver started");

    // Ticks often enough that a batch is cut close to its age limit.
    let mut tick = tokio::time::interval(
        args.flush_interval
            .clamp(Duration::from_millis(50), Duration::from_secs(1)),
    );
    let mut paused = false;
    let mut retry_at: Option<tokio::time::Instant> = None;

    loop {
        let mut upload_due = false;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let mut partitions = consumer.context().partitions();
                for (&p, state) in partitions.iter_mut() {
                    if state.open.as_ref().is_some_and(|o| o.opened.elapsed() >= args.flush_interval) {
                        state.seal(p);
                    }
                }
                upload_due = partitions.values().any(|s| !s.sealed.is_empty());
            }
            received = consumer.recv() => {
                // Drain what is already fetched in one go (up to a burst).
                let mut next = Some(received);
                let mut burst = 0;
                let mut stopping = false;
                while let Some(received) = next.take() {
                    let message = match received {
                        Ok(message) => message,
                        Err(error) => {
                            tracing::warn!(%error, "consumer error");
                            break;
                        }
                    };
                    let partition = message.partition();
                    let record = Record::new(
                        partition,
                        u64::try_from(message.offset()).unwrap_or(0),
                        message.timestamp().to_millis(),
                        message.key(),
                        message.payload(),
                    );
                    let known = consumer.context().partitions().contains_key(&partition);
                    if !known {
                        let Some(state) = resume_partition(store.as_ref(), &args.kafka.topic, partition, record.offset, &shutdown).await else {
                            stopping = true;
                            break;
                        };
                        consumer.context().partitions().insert(partition, state);
                    }
                    if let Some(state) = consumer.context().partitions().get_mut(&partition) {
                        upload_due |= state.push(partition, &record, &args);
                    }
                    burst += 1;
                    if burst < 1_024 && !paused {
                        next = consumer.recv().now_or_never();
                    }
                }
                if stopping {
                    break;
                }
            }
        }
        let retry_wait = retry_at.is_some_and(|at| tokio::time::Instant::now() < at);
        if upload_due && !retry_wait {
            match upload(&consumer, store.as_ref(), &args).await {
                Ok(()) => {
                    retry_at = None;
                    set_paused(&consumer, &mut paused, false);
                }
                Err(()) => {
                    retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    set_paused(&consumer, &mut paused, true);
                }
            }
        }
    }

    // Shutdown: cut what is open, upload and commit it, retrying until the deadline. A batch
    // that must still grow to an existing object's end is left to the next owner.
    let deadline = tokio::time::Instant::now() + args.shutdown_timeout;
    for (&p, state) in consumer.context().partitions().iter_mut() {
        state.seal(p);
    }
    let mut done = false;
    while tokio::time::Instant::now() < deadline {
        if upload(&consumer, store.as_ref(), &args).await.is_ok() {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    consumer.context().partitions().clear();
    consumer.unsubscribe();
    drop(consumer);
    if done {
        tracing::info!("archiver stopped after its final upload");
        Ok(())
    } else {
        Err(ArchiveError::FinalUpload)
    }
}

/// Uploads every sealed batch (partitions in parallel, each partition's in offset order) and
/// commits after each round of successful puts. `Err` when some upload failed: its batch stays
/// first in line, so a partition's offsets are never committed past an object not written.
async fn upload(
    consumer: &ArchiveConsumer,
    store: &dyn ObjectStore,
    args: &ArchiveArgs,
) -> Result<(), ()> {
    let topic = &args.kafka.topic;
    loop {
        let round: Vec<SealedBatch> = consumer
            .context()
            .partitions()
            .values()
            .filter_map(|state| state.sealed.front().cloned())
            .collect();
        if round.is_empty() {
            return Ok(());
        }
        let puts = round.iter().map(|batch| async move {
            let started = Instant::now();
            store
                .put(&batch.name.path(topic), batch.body.clone())
                .await
                .map(|_| started.elapsed())
        });
        let results = join_all(puts).await;
        let mut offsets = TopicPartitionList::new();
        let mut failed = false;
        {
            let mut partitions = consumer.context().partitions();
            for (batch, result) in round.iter().zip(results) {
                match result {
                    Ok(took) => {
                        events::archived(
                            &batch.name,
                            batch.messages,
                            batch.body.content_length() as u64,
                            took,
                        );
                        let Some(state) = partitions.get_mut(&batch.name.partition) else {
                            continue;
                        };
                        if state.sealed.front().is_some_and(|s| s.name == batch.name) {
                            state.sealed.pop_front();
                        }
                        let next = Offset::Offset(batch.name.last as i64 + 1);
                        if let Err(error) =
                            offsets.add_partition_offset(topic, batch.name.partition, next)
                        {
                            events::commit_failed(&error);
                        }
                    }
                    Err(error) => {
                        events::upload_failed(&batch.name, &error);
                        failed = true;
                    }
                }
            }
        }
        if let Some(pause) = args.test_pause_before_commit {
            tokio::time::sleep(pause).await;
        }
        if offsets.count() > 0 {
            if let Err(error) = consumer.commit(&offsets, CommitMode::Sync) {
                events::commit_failed(&error);
            }
        }
        if failed {
            return Err(());
        }
    }
}

/// Pauses or resumes fetching on every assigned partition (backpressure while uploads fail).
fn set_paused(consumer: &ArchiveConsumer, paused: &mut bool, pause: bool) {
    if *paused == pause {
        return;
    }
    if let Err(error) = topk::kafka::pause_assignment(consumer, pause) {
        tracing::warn!(%error, pause, "cannot change the paused state of the assignment");
    }
    *paused = pause;
    events::backpressure(pause);
}

/// State of a partition whose first message arrived at `offset` (the committed offset): the
/// objects already in the store from there on, whose ranges the next batches must reproduce.
/// Retries until the listing succeeds or the worker shuts down (`None`).
async fn resume_partition(
    store: &dyn ObjectStore,
    topic: &str,
    partition: i32,
    offset: u64,
    shutdown: &CancellationToken,
) -> Option<PartitionArchive> {
    loop {
        match store::list_from(store, topic, partition, offset).await {
            Ok(existing) => {
                events::partition_resumed(partition, offset, existing.len());
                return Some(PartitionArchive {
                    existing: existing.into(),
                    ..PartitionArchive::default()
                });
            }
            Err(error) => {
                tracing::warn!(partition, offset, %error, "cannot list the archive yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
