//! The consumer loop: receive, count, flush, commit; flush before partitions are revoked.
//!
//! All partition state lives in the consumer's context so that the rebalance callback, which
//! librdkafka runs inside `recv()` on this same task, can flush it synchronously before the
//! partitions go to another worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::join_all;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;

use topk::event::Validator;

use crate::AggregatorArgs;
use crate::batch::{Batch, DeadLetter};
use crate::events;
use crate::partition::{Message, Outcome, PartitionState};
use crate::store::Store;

/// Payload bytes kept in a dead letter the broker refused as too large (see `write`).
const DEAD_LETTER_MAX_PAYLOAD: usize = 64 * 1024;

/// Errors that stop the aggregator.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error(transparent)]
    Kafka(#[from] topk::kafka::KafkaClientError),
    #[error("cannot subscribe to {topic}: {source}")]
    Subscribe {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error(
        "the final flush did not succeed within the shutdown timeout; the next owner replays the uncommitted offsets"
    )]
    FinalFlush,
}

/// Why a flush failed (the batches are kept and retried).
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("writing flush intents: {0}")]
    Intents(#[source] clickhouse::error::Error),
    #[error("writing counts: {0}")]
    Counts(#[source] clickhouse::error::Error),
    #[error("recording the days a flush touched: {0}")]
    Touches(#[source] clickhouse::error::Error),
    #[error("producing to the dead-letter topic: {0}")]
    DeadLetters(#[source] KafkaError),
    #[error("the flush task panicked: {0}")]
    Panicked(String),
}

/// Why a partition could not be resumed (retried with the same message).
#[derive(Debug, thiserror::Error)]
enum ResumeError {
    #[error("reading flush intents: {0}")]
    Intents(#[from] clickhouse::error::Error),
    #[error("re-reading the dedup window: {0}")]
    Rebuild(#[from] KafkaError),
    #[error("re-reading the dedup window timed out at offset {0}")]
    RebuildTimeout(u64),
}

#[derive(Default)]
struct Core {
    partitions: HashMap<i32, PartitionState>,
    /// Ownership generation of each held partition: a new number each time it is resumed. A
    /// flush writes and commits a partition's batches only while the partition is still held in
    /// the generation it took them from, and puts them back only into that generation (fencing:
    /// a flush that outlives its partitions writes nothing more of them).
    generations: HashMap<i32, u64>,
    next_generation: u64,
    /// Until when (this host's monotonic clock) an intent insert already sent may still be
    /// applied by the server; `None` when none is unsettled. A revoke lets its partitions go only
    /// after this instant, so no intent of theirs can land after the handover.
    intent_pending_until: Option<Instant>,
    /// Bytes of all partitions' state, and the part of it a flush can free: kept current by
    /// [`Core::process`] per message and recounted by [`Core::recount`] after anything else
    /// changes the partitions, so the per-message cap check does not walk every partition.
    bytes: u64,
    flushable: u64,
}

impl Core {
    fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Recounts the sizes after partitions were added, removed, flushed or restored.
    fn recount(&mut self) {
        (self.bytes, self.flushable) =
            self.partitions
                .values()
                .fold((0, 0), |(all, flushable), state| {
                    let batches = state.flushable_bytes();
                    (all + batches + state.dedup_bytes(), flushable + batches)
                });
    }

    /// Holds a resumed partition in a generation of its own.
    fn hold(&mut self, partition: i32, state: PartitionState) {
        self.next_generation += 1;
        self.generations.insert(partition, self.next_generation);
        self.partitions.insert(partition, state);
        self.recount();
    }

    /// Gives partitions up: their state goes, and a flush holding batches of them (of the
    /// generation that ends here) writes, commits and restores nothing more of them.
    fn give_up(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.partitions.remove(p);
            self.generations.remove(p);
        }
        self.recount();
    }

    /// Keeps only the batches of partitions still held in the generation they were taken from;
    /// nothing at all once the consumer says the whole assignment is lost (the group gave it
    /// away; the revoke callback that follows gives the partitions up).
    fn retain_held(&self, taken: &mut Vec<Taken>, assignment_lost: bool) {
        if assignment_lost {
            taken.clear();
        }
        taken.retain(|t| self.generations.get(&t.partition) == Some(&t.generation));
    }

    /// Processes one message of a known partition, returning its outcome with the state bytes
    /// and the flushable bytes after it; `None` if the partition is not assigned.
    fn process(&mut self, partition: i32, message: Message<'_>) -> Option<(Outcome, u64, u64)> {
        let state = self.partitions.get_mut(&partition)?;
        let (batches, dedup) = (state.flushable_bytes(), state.dedup_bytes());
        let outcome = state.process(message);
        let (batches_now, dedup_now) = (state.flushable_bytes(), state.dedup_bytes());
        self.flushable = self.flushable + batches_now - batches;
        self.bytes = self.bytes + batches_now + dedup_now - batches - dedup;
        Some((outcome, self.bytes, self.flushable))
    }
}

/// The sealed batches of one partition a flush has taken out, and the generation they are of.
struct Taken {
    partition: i32,
    generation: u64,
    batches: Vec<Batch>,
}

/// Everything the loop and the rebalance callback share.
struct Worker {
    core: Mutex<Core>,
    /// Held for the whole of a flush (seal to commit): flushes of the loop's background task,
    /// of the rebalance callback and of shutdown run one at a time, in offset order.
    flush_lock: tokio::sync::Mutex<()>,
    /// Bytes of the batches a flush has taken out of `core` and not yet released; they still
    /// count against `--max-state-bytes`.
    in_flight_bytes: AtomicU64,
    store: Store,
    producer: FutureProducer,
    topic: String,
    dlq_topic: String,
    handle: Handle,
    test_pause_before_commit: Option<Duration>,
    validator: Validator,
    dedup_window_ms: i64,
    brokers: String,
    group: String,
    /// How long a revoke waits for a flush in flight before it fences the partitions anyway
    /// (twice the ClickHouse request deadline, so a flush stalled in one request has ended).
    handover_wait: Duration,
    /// Whole seconds (server clock) an intent insert may take to be applied (see
    /// `Worker::write_intents`).
    intent_budget_secs: u32,
}

impl Worker {
    fn core(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock aborts the flush protocol anyway; the data is safe.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// State bytes held, including the batches of a flush in flight.
    fn state_bytes(&self) -> u64 {
        self.core().bytes() + self.in_flight_bytes.load(Ordering::Relaxed)
    }

    /// Seals and flushes the batches of `only` (all partitions when `None`): intents, counts,
    /// dead letters, then the offset commit. On failure the batches are put back.
    async fn flush<C: Consumer<Worker>>(
        &self,
        consumer: &C,
        only: Option<&[i32]>,
    ) -> Result<(), FlushError> {
        let _one_at_a_time = self.flush_lock.lock().await;
        self.flush_locked(consumer, only).await
    }

    /// [`Worker::flush`] for a caller that holds `flush_lock`.
    async fn flush_locked<C: Consumer<Worker>>(
        &self,
        consumer: &C,
        only: Option<&[i32]>,
    ) -> Result<(), FlushError> {
        let started = Instant::now();
        let mut taken: Vec<Taken> = {
            let mut core = self.core();
            let core = &mut *core;
            core.partitions
                .iter_mut()
                .filter(|(p, _)| only.is_none_or(|list| list.contains(p)))
                .filter_map(|(&p, state)| {
                    state.seal();
                    let batches = state.take_sealed();
                    let generation = *core.generations.get(&p)?;
                    (!batches.is_empty()).then_some(Taken {
                        partition: p,
                        generation,
                        batches,
                    })
                })
                .collect()
        };
        if taken.is_empty() {
            return Ok(());
        }
        let taken_bytes: u64 = taken
            .iter()
            .flat_map(|t| t.batches.iter().map(Batch::bytes))
            .sum();
        {
            // Moving bytes from `core` to `in_flight_bytes` under the lock keeps their sum
            // whole for a reader on another thread.
            let mut core = self.core();
            core.recount();
            self.in_flight_bytes.store(taken_bytes, Ordering::Relaxed);
        }
        let batches_taken: usize = taken.iter().map(|t| t.batches.len()).sum();
        let result = self.write(consumer, &mut taken).await;
        match result {
            Ok((rows, dead_letters)) => {
                if let Some(pause) = self.test_pause_before_commit {
                    tokio::time::sleep(pause).await;
                }
                self.commit(consumer, &mut taken);
                self.in_flight_bytes.store(0, Ordering::Relaxed);
                events::flushed(batches_taken, rows, dead_letters, started.elapsed());
                events::state_bytes(self.state_bytes());
                Ok(())
            }
            Err(error) => {
                let mut core = self.core();
                // Only into the generation the batches came from: a partition given up and
                // resumed since has a new state, rebuilt from the committed offset, that must
                // not receive the old one's batches.
                core.retain_held(&mut taken, consumer.assignment_lost());
                for t in taken {
                    if let Some(state) = core.partitions.get_mut(&t.partition) {
                        state.restore_sealed(t.batches);
                    }
                }
                core.recount();
                self.in_flight_bytes.store(0, Ordering::Relaxed);
                Err(error)
            }
        }
    }

    /// Drops from `taken` the partitions given up since the flush took their batches (checked
    /// before every step: a flush that outlives its partitions writes nothing more of them).
    fn retain_held<C: Consumer<Worker>>(&self, consumer: &C, taken: &mut Vec<Taken>) {
        self.core().retain_held(taken, consumer.assignment_lost());
    }

    /// Step 1: the intents, with a write deadline on the server's clock. The server read
    /// `server_now` before it answered at `answered`, so its clock is past `server_now +
    /// budget` (where the `fence` column refuses the insert) once `budget` + 1 s (the clock's
    /// resolution) has passed here; one more second covers clock rates and the server writing
    /// the one-row part after its check. Until then the insert counts as pending, unless the
    /// server answered it (applied, or refused for good).
    async fn write_intents<C: Consumer<Worker>>(
        &self,
        consumer: &C,
        taken: &mut Vec<Taken>,
    ) -> Result<(), FlushError> {
        let server_now = self.store.server_now().await.map_err(FlushError::Intents)?;
        let answered = Instant::now();
        let deadline = server_now.saturating_add(self.intent_budget_secs);
        let settled_by = answered + Duration::from_secs(u64::from(self.intent_budget_secs) + 2);
        let before = {
            let mut core = self.core();
            core.retain_held(taken, consumer.assignment_lost());
            if taken.is_empty() {
                return Ok(());
            }
            // Under the same lock as the ownership check: a revoke that gives the partitions up
            // after it sees this instant and waits for it.
            let before = core.intent_pending_until;
            core.intent_pending_until = Some(before.map_or(settled_by, |b| b.max(settled_by)));
            before
        };
        let batches: Vec<&Batch> = taken.iter().flat_map(|t| t.batches.iter()).collect();
        let logged_at =
            u32::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0);
        let result = self
            .store
            .write_intents_before(&batches, logged_at, deadline)
            .await;
        if matches!(
            result,
            Ok(()) | Err(clickhouse::error::Error::BadResponse(_))
        ) {
            let mut core = self.core();
            core.intent_pending_until = before.filter(|b| *b > Instant::now());
        }
        result.map_err(FlushError::Intents)
    }

    async fn write<C: Consumer<Worker>>(
        &self,
        consumer: &C,
        taken: &mut Vec<Taken>,
    ) -> Result<(u64, usize), FlushError> {
        self.write_intents(consumer, taken).await?;
        // From here on a late write is harmless: it repeats rows the intent fixed, which a
        // replay of the intent writes identically. Partitions given up are still skipped, for
        // their new owner replays them anyway.
        self.retain_held(consumer, taken);
        let batches: Vec<&Batch> = taken.iter().flat_map(|t| t.batches.iter()).collect();
        let rows = if batches.is_empty() {
            0
        } else {
            self.store
                .write_counts(&batches)
                .await
                .map_err(FlushError::Counts)?
        };
        self.retain_held(consumer, taken);
        let batches: Vec<&Batch> = taken.iter().flat_map(|t| t.batches.iter()).collect();
        self.store
            .write_touches(&batches)
            .await
            .map_err(FlushError::Touches)?;
        self.store
            .write_user_touches(&batches)
            .await
            .map_err(FlushError::Touches)?;
        self.retain_held(consumer, taken);
        let batches: Vec<&Batch> = taken.iter().flat_map(|t| t.batches.iter()).collect();
        let letters: Vec<(i32, &DeadLetter)> = batches
            .iter()
            .flat_map(|batch| batch.dead_letters.iter().map(|l| (batch.partition, l)))
            .collect();
        let results = join_all(
            letters
                .iter()
                .map(|(partition, letter)| self.send_dead_letter(*partition, letter, None)),
        )
        .await;
        // A dead letter is its message plus four headers: a message the broker took into
        // `plays` just under its size limit can be refused from `<topic>.dlq`. Resent with its
        // payload cut to `DEAD_LETTER_MAX_PAYLOAD` bytes and its full size in a header, so that
        // the partition moves on; the full message stays in `plays` (and in the archive).
        let too_large: Vec<(i32, &DeadLetter)> = letters
            .iter()
            .zip(&results)
            .filter(|(_, result)| {
                matches!(
                    result,
                    Err((
                        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                        _
                    ))
                )
            })
            .map(|(letter, _)| *letter)
            .collect();
        let retries = too_large.iter().map(|(partition, letter)| {
            self.send_dead_letter(*partition, letter, Some(DEAD_LETTER_MAX_PAYLOAD))
        });
        let retried = join_all(retries).await;
        let dead_letters = results.len();
        for result in results {
            match result {
                Ok(_)
                | Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                }
                Err((error, _)) => return Err(FlushError::DeadLetters(error)),
            }
        }
        for ((partition, letter), result) in too_large.iter().zip(retried) {
            match result {
                Ok(_) => {}
                // Even the cut letter is refused (a broker limit under 64 KiB): the partition
                // must not stall for it; the message stays in `plays` and the archive.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    events::dead_letter_dropped(*partition, letter.offset);
                }
                Err((error, _)) => return Err(FlushError::DeadLetters(error)),
            }
        }
        Ok((rows, dead_letters))
    }

    /// Sends one dead letter: its key and payload (cut to `cut_to` bytes, with the original
    /// size in a `truncated_from_bytes` header, when given) and where it came from.
    async fn send_dead_letter(
        &self,
        partition: i32,
        letter: &DeadLetter,
        cut_to: Option<usize>,
    ) -> OwnedDeliveryResult {
        let partition = partition.to_string();
        let offset = letter.offset.to_string();
        let payload = letter.payload.as_deref();
        let original_len = payload.map_or(0, <[u8]>::len).to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "reason",
                value: Some(letter.reason.as_str()),
            })
            .insert(Header {
                key: "source_topic",
                value: Some(self.topic.as_str()),
            })
            .insert(Header {
                key: "source_partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "source_offset",
                value: Some(offset.as_str()),
            });
        if cut_to.is_some() {
            headers = headers.insert(Header {
                key: "truncated_from_bytes",
                value: Some(original_len.as_str()),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.dlq_topic).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = payload {
            let len = cut_to.map_or(payload.len(), |cut| cut.min(payload.len()));
            record = record.payload(&payload[..len]);
        }
        self.producer.send(record, Duration::from_secs(30)).await
    }

    /// Step 5: commits the partitions still held. The core lock is held across the commit so
    /// that a revoke cannot give a partition up between the check and the commit: once the
    /// revoke has given it up, no commit of this flush for it can start or still be running.
    fn commit<C: Consumer<Worker>>(&self, consumer: &C, taken: &mut Vec<Taken>) {
        let core = self.core();
        core.retain_held(taken, consumer.assignment_lost());
        let mut offsets = TopicPartitionList::new();
        for t in taken.iter() {
            if let Some(last) = t.batches.last() {
                let offset = Offset::Offset(last.end_offset as i64);
                if let Err(error) = offsets.add_partition_offset(&self.topic, t.partition, offset) {
                    events::commit_failed(&error);
                }
            }
        }
        if offsets.count() == 0 {
            return;
        }
        if let Err(error) = consumer.commit(&offsets, CommitMode::Sync) {
            events::commit_failed(&error);
        }
        drop(core);
    }
}

impl ClientContext for Worker {
    fn stats(&self, statistics: Statistics) {
        if let Some(topic) = statistics.topics.get(&self.topic) {
            for (&partition, stats) in &topic.partitions {
                if partition >= 0 && stats.consumer_lag >= 0 {
                    events::consumer_lag(partition, stats.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Worker {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let revoked: Vec<i32> = list
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        if consumer.assignment_lost() {
            // The group gave these partitions away already (this member missed its session or
            // `max.poll.interval.ms`): their new owner may be counting from the committed offset.
            // Nothing of them is flushed or committed; the state goes and the new owner replays
            // whatever intent was recorded. A flush in flight sees the loss and stops too.
            self.core().give_up(&revoked);
            tracing::warn!(partitions = ?revoked, "assignment lost: partitions dropped unflushed");
            events::partitions_released(&revoked, false);
            return;
        }
        // The callback runs inside `recv()` on the loop's task: block this thread (not the
        // runtime) until a background flush in flight has finished (the flush lock, at most
        // `handover_wait`) and the revoked partitions are flushed and committed; then give them
        // up and wait until no intent insert of theirs can still be applied by the server.
        let flushed = tokio::task::block_in_place(|| {
            self.handle.block_on(async {
                let (guard, flushed) =
                    match tokio::time::timeout(self.handover_wait, self.flush_lock.lock()).await {
                        Ok(guard) => {
                            let result = self.flush_locked(consumer, Some(&revoked)).await;
                            (Some(guard), result.is_ok())
                        }
                        // A flush stalled past the wait keeps the lock: the partitions are
                        // fenced instead, so it writes, commits and restores nothing more of them.
                        Err(_) => (None, false),
                    };
                // Whatever happened, the state goes: the next owner resumes from the committed
                // offset and replays any recorded intent exactly.
                let pending = {
                    let mut core = self.core();
                    core.give_up(&revoked);
                    core.intent_pending_until
                };
                if let Some(until) = pending {
                    // An intent insert sent before the fence and not answered: the server
                    // refuses it after its deadline, which has passed at `until`.
                    tokio::time::sleep_until(until.into()).await;
                }
                drop(guard);
                flushed
            })
        });
        events::partitions_released(&revoked, flushed);
    }
}

/// Runs an aggregator until `shutdown` fires; flushes and commits before returning.
pub async fn run(args: AggregatorArgs, shutdown: CancellationToken) -> Result<(), AggregatorError> {
    let worker = Worker {
        core: Mutex::new(Core::default()),
        flush_lock: tokio::sync::Mutex::new(()),
        in_flight_bytes: AtomicU64::new(0),
        store: Store::new(topk::olap::client(&args.clickhouse), &args.kafka.topic)
            .with_timeout(args.clickhouse_timeout),
        producer: topk::kafka::producer(&args.kafka.brokers)?,
        topic: args.kafka.topic.clone(),
        dlq_topic: args.kafka.dlq_topic(),
        handle: Handle::current(),
        test_pause_before_commit: args.test_pause_before_commit,
        validator: args.rules.validator(),
        dedup_window_ms: args.rules.dedup_window_ms(),
        brokers: args.kafka.brokers.clone(),
        group: args.group.clone(),
        handover_wait: args.clickhouse_timeout * 2,
        intent_budget_secs: intent_budget_secs(args.clickhouse_timeout, args.kafka_session_timeout),
    };
    let mut config =
        topk::kafka::member_config(&args.kafka.brokers, &args.group, args.kafka_session_timeout);
    config.set("statistics.interval.ms", "5000");
    let consumer: StreamConsumer<Worker> = topk::kafka::consumer_with_context(&config, worker)?;
    // Shared with the background flush task, which commits through it.
    let consumer = Arc::new(consumer);
    consumer
        .subscribe(&[&args.kafka.topic])
        .map_err(|source| AggregatorError::Subscribe {
            topic: args.kafka.topic.clone(),
            source,
        })?;
    tracing::info!(topic = %args.kafka.topic, group = %args.group, "aggregator started");

    let mut flush_tick = tokio::time::interval(args.flush_interval);
    flush_tick.tick().await;
    let mut paused = false;
    let mut processed: u64 = 0;
    let mut dedup_warned = false;
    let mut retry_at: Option<tokio::time::Instant> = None;
    // The flush of the timer runs in a task of its own while the loop goes on consuming: its
    // ClickHouse round trips then overlap the parsing of the next messages. One at a time.
    let mut background: Option<JoinHandle<Result<(), FlushError>>> = None;

    loop {
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            result = async { background.as_mut().expect("guarded").await }, if background.is_some() => {
                background = None;
                flushed(&consumer, joined(result), &mut paused, &mut retry_at, args.max_state_bytes);
            }
            _ = retry, if background.is_none() => {
                retry_at = None;
                background = Some(spawn_flush(&consumer));
            }
            _ = flush_tick.tick(), if background.is_none() && retry_at.is_none() => {
                background = Some(spawn_flush(&consumer));
            }
            received = consumer.recv() => {
                // Drain what is already fetched in one go (up to a burst), so the select and
                // its timers run once per burst rather than once per message.
                let mut next = Some(received);
                let mut burst = 0;
                // Counted per burst: a metrics call per message showed in the profile.
                let (mut consumed, mut counted) = (0, 0);
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
                    let offset = u64::try_from(message.offset()).unwrap_or(0);
                    // One lock per message: a partition not held yet is resumed, then processed.
                    let mut processed_now = consumer.context().core().process(partition, view(&message));
                    if processed_now.is_none() {
                        let Some(state) = resume_partition(consumer.context(), partition, offset, &shutdown).await else {
                            stopping = true;
                            break;
                        };
                        let mut core = consumer.context().core();
                        core.hold(partition, state);
                        processed_now = core.process(partition, view(&message));
                    }
                    let Some((outcome, bytes, flushable)) = processed_now else { break };
                    let bytes = bytes + consumer.context().in_flight_bytes.load(Ordering::Relaxed);
                    consumed += 1;
                    match outcome {
                        Outcome::Counted => counted += 1,
                        Outcome::Duplicate => events::duplicate(partition, offset),
                        Outcome::DeadLetter(reason) => events::dead_letter(partition, offset, reason),
                    }
                    processed += 1;
                    if processed % 256 == 0 {
                        events::state_bytes(bytes);
                    }
                    // Flushing only helps when it frees a good part of the cap; the dedup
                    // memory cannot be flushed (see ARCHITECTURE.md, "Memory").
                    if bytes >= args.max_state_bytes {
                        if let Some(handle) = background.take() {
                            // Whatever it frees decides what comes next.
                            let result = joined(handle.await);
                            flushed(&consumer, result, &mut paused, &mut retry_at, args.max_state_bytes);
                        }
                        if retry_at.is_some() {
                            // A flush is already failing: stop taking more until it succeeds.
                            set_paused(&consumer, &mut paused, true, bytes);
                        } else if flushable >= args.max_state_bytes / 8 {
                            flush_now(&consumer, &mut paused, &mut retry_at, args.max_state_bytes).await;
                        } else if !dedup_warned {
                            dedup_warned = true;
                            tracing::warn!(bytes, flushable, "dedup memory alone fills --max-state-bytes; raise the cap");
                        }
                    }
                    burst += 1;
                    if burst < 1_024 && !paused {
                        next = consumer.recv().now_or_never();
                    }
                }
                events::consumed(consumed);
                events::counted(counted);
                if stopping {
                    break;
                }
                // rdkafka's `recv()` is ready whenever messages are buffered and is outside
                // tokio's cooperative budget: without a yield, a busy loop would starve the
                // background flush (spawned into this worker's LIFO slot) until the topic ran dry.
                tokio::task::yield_now().await;
            }
        }
    }

    // Shutdown: finish the flush in flight, flush and commit everything, retrying until the
    // deadline.
    let deadline = tokio::time::Instant::now() + args.shutdown_timeout;
    if let Some(handle) = background.take() {
        if let Err(error) = joined(handle.await) {
            events::flush_failed(&error);
        }
    }
    let mut done = false;
    while tokio::time::Instant::now() < deadline {
        match consumer.context().flush(&*consumer, None).await {
            Ok(()) => {
                done = true;
                break;
            }
            Err(error) => {
                events::flush_failed(&error);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    // Leaving the group flushes nothing more: the state is empty, or it is abandoned.
    {
        let mut core = consumer.context().core();
        let held: Vec<i32> = core.partitions.keys().copied().collect();
        core.give_up(&held);
    }
    consumer.unsubscribe();
    drop(consumer);
    if done {
        tracing::info!("aggregator stopped after its final flush");
        Ok(())
    } else {
        Err(AggregatorError::FinalFlush)
    }
}

/// Whole seconds an intent insert may take to be applied by the server: the request deadline,
/// and at most half the session timeout, so that a member evicted for a missed session has its
/// last intents settled (applied or refused) well before its partitions' next owner resumes.
fn intent_budget_secs(request_timeout: Duration, session_timeout: Duration) -> u32 {
    let budget = request_timeout.min(session_timeout / 2);
    u32::try_from(budget.as_secs() + u64::from(budget.subsec_nanos() > 0))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Starts a flush of every partition in a task of its own.
fn spawn_flush(consumer: &Arc<StreamConsumer<Worker>>) -> JoinHandle<Result<(), FlushError>> {
    let consumer = Arc::clone(consumer);
    tokio::spawn(async move { consumer.context().flush(&*consumer, None).await })
}

/// A background flush's result; a panic in it is a failed flush (its batches stay in the
/// flush's hands and are lost to this process, so the next owner replays them).
fn joined(result: Result<Result<(), FlushError>, JoinError>) -> Result<(), FlushError> {
    result.unwrap_or_else(|error| Err(FlushError::Panicked(error.to_string())))
}

/// One flush attempt from the loop, with backpressure: when the state is at its cap and the
/// flush fails, the assigned partitions are paused until a retry succeeds.
async fn flush_now(
    consumer: &StreamConsumer<Worker>,
    paused: &mut bool,
    retry_at: &mut Option<tokio::time::Instant>,
    max_state_bytes: u64,
) {
    let result = consumer.context().flush(consumer, None).await;
    flushed(consumer, result, paused, retry_at, max_state_bytes);
}

/// What the loop does after a flush: retry timer and backpressure.
fn flushed(
    consumer: &StreamConsumer<Worker>,
    result: Result<(), FlushError>,
    paused: &mut bool,
    retry_at: &mut Option<tokio::time::Instant>,
    max_state_bytes: u64,
) {
    let bytes = consumer.context().state_bytes();
    events::state_bytes(bytes);
    match result {
        Ok(()) => {
            *retry_at = None;
            set_paused(consumer, paused, false, bytes);
        }
        Err(error) => {
            events::flush_failed(&error);
            *retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            if bytes >= max_state_bytes {
                set_paused(consumer, paused, true, bytes);
            }
        }
    }
}

/// Pauses or resumes fetching on every assigned partition (backpressure).
fn set_paused(consumer: &StreamConsumer<Worker>, paused: &mut bool, pause: bool, bytes: u64) {
    if *paused == pause {
        return;
    }
    if let Err(error) = topk::kafka::pause_assignment(consumer, pause) {
        tracing::warn!(%error, pause, "cannot change the paused state of the assignment");
    }
    *paused = pause;
    events::backpressure(pause, bytes);
}

/// Builds the state of a partition the first time one of its messages arrives at `offset`:
/// reads the recorded intents and rebuilds the dedup memory. Retries until it succeeds or the
/// worker shuts down (`None`): counting without knowing the intents could break exactly-once.
async fn resume_partition(
    worker: &Worker,
    partition: i32,
    offset: u64,
    shutdown: &CancellationToken,
) -> Option<PartitionState> {
    loop {
        match try_resume(worker, partition, offset).await {
            Ok(state) => return Some(state),
            Err(error) => {
                tracing::warn!(partition, offset, %error, "cannot resume partition yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

async fn try_resume(
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
fn view<'a>(message: &'a BorrowedMessage<'_>) -> Message<'a> {
    Message {
        offset: u64::try_from(message.offset()).unwrap_or(0),
        timestamp: message.timestamp().to_millis(),
        key: message.key(),
        payload: message.payload(),
    }
}
