//! The aggregator as a consumer-group role (`topk::group`): receive, count, flush in the
//! background every `--flush-interval`, flush early at `--max-state-bytes`, pause while flushes
//! fail at the cap.
//!
//! All partition state lives in the consumer's context ([`Worker`]) so that the rebalance
//! callback, which librdkafka runs inside `recv()` on the loop's task, can flush it
//! synchronously before the partitions go to another worker (`rebalance`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::FutureProducer;
use tokio::runtime::Handle;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Interval;
use tokio_util::sync::CancellationToken;

use topk::counting::partition::Outcome;
use topk::event::Validator;
use topk::group::{self, Flow, Member, MemberError, Retry, Role};

use crate::AggregatorArgs;
use crate::events;
use crate::flush::FlushError;
use crate::held::Core;
use crate::resume::{try_resume, view};
use crate::store::Store;

/// Errors that stop the aggregator.
pub type AggregatorError = MemberError;

/// Everything the loop, the background flush and the rebalance callback share.
pub(crate) struct Worker {
    pub(crate) core: Mutex<Core>,
    /// Held for the whole of a flush (seal to commit): flushes of the loop's background task,
    /// of the rebalance callback and of shutdown run one at a time, in offset order.
    pub(crate) flush_lock: tokio::sync::Mutex<()>,
    /// Bytes of the batches a flush has taken out of `core` and not yet released; they still
    /// count against `--max-state-bytes`.
    pub(crate) in_flight_bytes: AtomicU64,
    pub(crate) store: Store,
    pub(crate) producer: FutureProducer,
    pub(crate) topic: String,
    pub(crate) dlq_topic: String,
    pub(crate) touches_topic: String,
    pub(crate) handle: Handle,
    pub(crate) test_pause_before_commit: Option<Duration>,
    pub(crate) validator: Validator,
    pub(crate) dedup_window_ms: i64,
    pub(crate) brokers: String,
    pub(crate) group: String,
    /// How long a revoke waits for a flush in flight before it fences the partitions anyway
    /// (twice the ClickHouse request deadline, so a flush stalled in one request has ended).
    pub(crate) handover_wait: Duration,
    /// Whole seconds (server clock) an intent insert may take to be applied (see
    /// `Worker::write_intents`).
    pub(crate) intent_budget_secs: u32,
}

type AggregatorConsumer = StreamConsumer<Worker>;

/// The loop's side of the aggregator: its timers, the flush in flight and the burst counters.
struct Aggregating {
    flush_tick: Interval,
    retry: Retry,
    /// The flush of the timer runs in a task of its own while the loop goes on consuming: its
    /// ClickHouse round trips then overlap the parsing of the next messages. One at a time.
    background: Option<JoinHandle<Result<(), FlushError>>>,
    max_state_bytes: u64,
    processed: u64,
    dedup_warned: bool,
    /// Counted per burst: a metrics call per message showed in the profile.
    consumed: u64,
    counted: u64,
}

/// What woke the aggregator's loop.
enum Wake {
    Flushed(Result<(), FlushError>),
    Retry,
    Tick,
}

impl Aggregating {
    /// What the loop does after a flush: retry timer and backpressure (when the state is at its
    /// cap and the flush failed, the assigned partitions are paused until a retry succeeds).
    fn flushed(&mut self, member: &mut Member<Worker>, result: Result<(), FlushError>) {
        let bytes = member.context().state_bytes();
        events::state_bytes(bytes);
        match result {
            Ok(()) => {
                self.retry.succeeded();
                backpressure(member, false, bytes);
            }
            Err(error) => {
                events::flush_failed(&error);
                self.retry.failed();
                if bytes >= self.max_state_bytes {
                    backpressure(member, true, bytes);
                }
            }
        }
    }

    /// At the cap: wait for the flush in flight (whatever it frees decides what comes next),
    /// then flush now, or pause while flushes fail. Flushing only helps when it frees a good
    /// part of the cap; the dedup memory cannot be flushed (ARCHITECTURE.md, "Memory").
    async fn at_cap(&mut self, member: &mut Member<Worker>, bytes: u64, flushable: u64) {
        if let Some(handle) = self.background.take() {
            let result = joined(handle.await);
            self.flushed(member, result);
        }
        if self.retry.pending() {
            // A flush is already failing: stop taking more until it succeeds.
            backpressure(member, true, bytes);
        } else if flushable >= self.max_state_bytes / 8 {
            let result = member.context().flush(&**member.consumer(), None).await;
            self.flushed(member, result);
        } else if !self.dedup_warned {
            self.dedup_warned = true;
            tracing::warn!(
                bytes,
                flushable,
                "dedup memory alone fills --max-state-bytes; raise the cap"
            );
        }
    }
}

impl Role for Aggregating {
    type Context = Worker;
    type Wake = Wake;
    type Error = FlushError;
    const NAME: &'static str = "aggregator";
    const DRAIN: &'static str = "flush";

    async fn wake(&mut self) -> Wake {
        let (retry, background) = (&self.retry, &mut self.background);
        let flushing = background.is_some();
        tokio::select! {
            biased;
            result = async { background.as_mut().expect("guarded").await }, if flushing => {
                Wake::Flushed(joined(result))
            }
            () = retry.due(), if !flushing => Wake::Retry,
            _ = self.flush_tick.tick(), if !flushing && !retry.pending() => Wake::Tick,
        }
    }

    async fn on_wake(&mut self, member: &mut Member<Worker>, wake: Wake) {
        match wake {
            Wake::Flushed(result) => {
                self.background = None;
                self.flushed(member, result);
            }
            Wake::Retry => {
                self.retry.succeeded();
                self.background = Some(spawn_flush(member.consumer()));
            }
            Wake::Tick => self.background = Some(spawn_flush(member.consumer())),
        }
    }

    async fn on_message(
        &mut self,
        member: &mut Member<Worker>,
        message: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> Flow {
        let partition = message.partition();
        let offset = u64::try_from(message.offset()).unwrap_or(0);
        let worker = member.context();
        // One lock per message: a partition not held yet is resumed, then processed.
        let mut processed = worker.core().process(partition, view(message));
        if processed.is_none() {
            let Some(state) = group::resume(partition, offset, shutdown, || {
                try_resume(worker, partition, offset)
            })
            .await
            else {
                return Flow::Stop;
            };
            let mut core = worker.core();
            core.hold(partition, state);
            processed = core.process(partition, view(message));
        }
        let Some((outcome, bytes, flushable)) = processed else {
            return Flow::EndBurst;
        };
        let bytes = bytes + worker.in_flight_bytes.load(Ordering::Relaxed);
        self.consumed += 1;
        match outcome {
            Outcome::Counted => self.counted += 1,
            Outcome::Duplicate => events::duplicate(partition, offset),
            Outcome::DeadLetter(reason) => events::dead_letter(partition, offset, reason),
        }
        self.processed += 1;
        if self.processed % 256 == 0 {
            events::state_bytes(bytes);
        }
        if bytes >= self.max_state_bytes {
            self.at_cap(member, bytes, flushable).await;
        }
        Flow::Continue
    }

    fn end_burst(&mut self, _member: &mut Member<Worker>) {
        events::consumed(std::mem::take(&mut self.consumed));
        events::counted(std::mem::take(&mut self.counted));
    }

    /// Finishes the flush in flight.
    async fn settle(&mut self, _member: &mut Member<Worker>) {
        if let Some(handle) = self.background.take() {
            if let Err(error) = joined(handle.await) {
                events::flush_failed(&error);
            }
        }
    }

    async fn drain(&mut self, member: &mut Member<Worker>) -> Result<(), FlushError> {
        member.context().flush(&**member.consumer(), None).await
    }

    fn drain_failed(&mut self, error: &FlushError) {
        events::flush_failed(error);
    }

    fn leave(&mut self, member: &mut Member<Worker>) {
        let mut core = member.context().core();
        let held: Vec<i32> = core.partitions.keys().copied().collect();
        core.give_up(&held);
    }
}

/// Runs an aggregator until `shutdown` fires; flushes and commits before returning.
pub async fn run(args: AggregatorArgs, shutdown: CancellationToken) -> Result<(), AggregatorError> {
    let worker = Worker {
        core: Mutex::new(Core::default()),
        flush_lock: tokio::sync::Mutex::new(()),
        in_flight_bytes: AtomicU64::new(0),
        store: Store::new(
            topk::olap::Olap::connect(&args.clickhouse).await?,
            &args.kafka.topic,
        )
        .with_timeout(args.clickhouse_timeout),
        producer: topk::kafka::producer(&args.kafka.brokers)?,
        topic: args.kafka.topic.clone(),
        dlq_topic: args.kafka.dlq_topic(),
        touches_topic: args.kafka.touches_topic(),
        handle: Handle::current(),
        test_pause_before_commit: args.member.test_pause_before_commit,
        validator: args.rules.validator(),
        dedup_window_ms: args.rules.dedup_window_ms(),
        brokers: args.kafka.brokers.clone(),
        group: args.group.clone(),
        handover_wait: args.clickhouse_timeout * 2,
        intent_budget_secs: intent_budget_secs(
            args.clickhouse_timeout,
            args.member.kafka_session_timeout,
        ),
    };
    let member = Member::join(
        &args.kafka.brokers,
        &args.group,
        &args.kafka.topic,
        &args.member,
        |config| {
            config.set("statistics.interval.ms", "5000");
        },
        worker,
    )?;
    let mut flush_tick = tokio::time::interval(args.flush_interval);
    flush_tick.tick().await;
    let mut role = Aggregating {
        flush_tick,
        retry: Retry::default(),
        background: None,
        max_state_bytes: args.max_state_bytes,
        processed: 0,
        dedup_warned: false,
        consumed: 0,
        counted: 0,
    };
    group::run(&mut role, member, &args.member, &shutdown).await
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
fn spawn_flush(consumer: &Arc<AggregatorConsumer>) -> JoinHandle<Result<(), FlushError>> {
    let consumer = Arc::clone(consumer);
    tokio::spawn(async move { consumer.context().flush(&*consumer, None).await })
}

/// A background flush's result; a panic in it is a failed flush (its batches stay in the
/// flush's hands and are lost to this process, so the next owner replays them).
fn joined(result: Result<Result<(), FlushError>, JoinError>) -> Result<(), FlushError> {
    result.unwrap_or_else(|error| Err(FlushError::Panicked(error.to_string())))
}

/// Pauses or resumes fetching on every assigned partition (backpressure).
fn backpressure(member: &mut Member<Worker>, pause: bool, bytes: u64) {
    if member.set_paused(pause) {
        events::backpressure(pause, bytes);
    }
}
