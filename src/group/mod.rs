//! The consumer-group member kit: what every role that consumes `plays` as a member of a Kafka
//! consumer group shares (membership, bursts, pause/backpressure, resume and retry until
//! shutdown, the drain at shutdown, revoked partitions, commits, forced cuts), so that each role
//! keeps only its own state machine and sink.
//!
//! A role implements [`Role`]; [`run`] drives it. The loop is one task: it races shutdown, the
//! role's own timers ([`Role::wake`]) and the consumer, and drains up to [`BURST`] already-fetched
//! messages per turn. The rebalance callback (the role's `ConsumerContext`) runs inside `recv()`
//! on this same task, so whatever the role does between two `recv()` calls never overlaps it.
//!
//! - [`cuts`]: the recorded ranges a resumed partition must cut its batches at again.

pub mod cuts;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::MemberArgs;
use crate::kafka::KafkaClientError;
use crate::telemetry::Chain;

/// Messages handled per turn of the loop at most: the select and its timers run once per burst
/// rather than once per message.
pub const BURST: usize = 1_024;

/// How long a failed step (a flush, an upload, a resume) waits before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Pause between two attempts of the final drain at shutdown.
const DRAIN_RETRY_AFTER: Duration = Duration::from_millis(500);

/// Errors that stop a group member.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error(transparent)]
    Kafka(#[from] KafkaClientError),
    #[error("cannot subscribe to {topic}")]
    Subscribe {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error(
        "the final {what} did not succeed within the shutdown timeout; the next owner re-reads the uncommitted offsets"
    )]
    Unfinished { what: &'static str },
    /// The ClickHouse cluster is not the one `--clickhouse-shard-urls` describes.
    #[error(transparent)]
    Layout(#[from] crate::olap::LayoutError),
}

/// What the loop does after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on with the burst.
    Continue,
    /// End this burst (the next turn goes on as usual).
    EndBurst,
    /// Stop the loop: shutdown fired while the role waited.
    Stop,
}

/// One role of a consumer group: its state machine and its sink.
pub trait Role {
    /// The consumer's context: the state the rebalance callback shares with the loop.
    type Context: ConsumerContext + 'static;
    /// What the role's own timers report.
    type Wake;
    /// Why one attempt of the final drain failed.
    type Error: std::error::Error;

    /// In logs: "aggregator", "archiver".
    const NAME: &'static str;
    /// What the final drain does, in the error when it does not finish: "flush", "upload".
    const DRAIN: &'static str;

    /// The role's own timers (flush interval, retries, a flush in flight), raced with messages
    /// after shutdown and before them. Dropped when a message or shutdown comes first, so it
    /// must be cancel-safe.
    fn wake(&mut self) -> impl Future<Output = Self::Wake>;
    /// Handles what [`Role::wake`] reported.
    fn on_wake(
        &mut self,
        member: &mut Member<Self::Context>,
        wake: Self::Wake,
    ) -> impl Future<Output = ()>;
    /// Handles one message (resuming its partition first when it is not held yet).
    fn on_message(
        &mut self,
        member: &mut Member<Self::Context>,
        message: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Flow>;
    /// After each burst of messages.
    fn end_burst(&mut self, _member: &mut Member<Self::Context>) {}
    /// After each turn of the loop (a wake or a burst), outside `recv()`.
    fn after_turn(&mut self, _member: &mut Member<Self::Context>) -> impl Future<Output = ()> {
        async {}
    }
    /// At shutdown, before the drain: finish what is in flight, cut what is open.
    fn settle(&mut self, member: &mut Member<Self::Context>) -> impl Future<Output = ()>;
    /// One attempt to make everything held durable and commit it; retried until the shutdown
    /// timeout.
    fn drain(
        &mut self,
        member: &mut Member<Self::Context>,
    ) -> impl Future<Output = Result<(), Self::Error>>;
    /// A failed drain attempt (to log it).
    fn drain_failed(&mut self, _error: &Self::Error) {}
    /// Before leaving the group: forget the partitions (nothing more is written or committed).
    fn leave(&mut self, member: &mut Member<Self::Context>);
}

/// A member of a consumer group: the consumer (shared with tasks a role spawns) and whether its
/// assignment is paused.
pub struct Member<C: ConsumerContext + 'static> {
    consumer: Arc<StreamConsumer<C>>,
    topic: String,
    group: String,
    paused: bool,
}

impl<C: ConsumerContext + 'static> Member<C> {
    /// Joins `group` on `topic` with `context` as the consumer's context; `configure` adds the
    /// role's own client settings to the member settings ([`crate::kafka::member_config`]).
    pub fn join(
        brokers: &str,
        group: &str,
        topic: &str,
        args: &MemberArgs,
        configure: impl FnOnce(&mut ClientConfig),
        context: C,
    ) -> Result<Self, MemberError> {
        let mut config = crate::kafka::member_config(brokers, group, args.kafka_session_timeout);
        configure(&mut config);
        let consumer: StreamConsumer<C> = crate::kafka::consumer_with_context(&config, context)?;
        consumer
            .subscribe(&[topic])
            .map_err(|source| MemberError::Subscribe {
                topic: topic.to_owned(),
                source,
            })?;
        Ok(Member {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            group: group.to_owned(),
            paused: false,
        })
    }

    /// The consumer, for a task of the role's own (e.g. a flush that commits).
    pub fn consumer(&self) -> &Arc<StreamConsumer<C>> {
        &self.consumer
    }

    /// The consumer's context.
    pub fn context(&self) -> &C {
        self.consumer.context()
    }

    /// Pauses or resumes fetching on every assigned partition (backpressure). librdkafka drops
    /// what it prefetched for paused partitions and fetches again from the consumed position on
    /// resume. Returns whether the state changed.
    pub fn set_paused(&mut self, pause: bool) -> bool {
        if self.paused == pause {
            return false;
        }
        if let Err(error) = crate::kafka::pause_assignment(&*self.consumer, pause) {
            tracing::warn!(error = %Chain(&error), pause, "cannot change the paused state of the assignment");
        }
        self.paused = pause;
        true
    }

    /// Commits `next` offsets (the first offset not done) of the member's topic.
    pub fn commit(&self, next: impl IntoIterator<Item = (i32, u64)>) -> Result<(), KafkaError> {
        commit(&*self.consumer, &self.topic, next)
    }
}

/// Runs `role` as `member` until `shutdown` fires, then drains it (retrying until
/// `args.shutdown_timeout`) and leaves the group.
pub async fn run<R: Role>(
    role: &mut R,
    mut member: Member<R::Context>,
    args: &MemberArgs,
    shutdown: &CancellationToken,
) -> Result<(), MemberError> {
    tracing::info!(topic = %member.topic, group = %member.group, "{} started", R::NAME);
    // Messages borrow the consumer; the role gets the member mutably beside them.
    let consumer = Arc::clone(&member.consumer);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            wake = role.wake() => role.on_wake(&mut member, wake).await,
            received = consumer.recv() => {
                let mut next = Some(received);
                let mut burst = 0;
                let mut flow = Flow::Continue;
                while let Some(received) = next.take() {
                    let message = match received {
                        Ok(message) => message,
                        Err(error) => {
                            tracing::warn!(error = %Chain(&error), "consumer error");
                            break;
                        }
                    };
                    flow = role.on_message(&mut member, &message, shutdown).await;
                    if flow != Flow::Continue {
                        break;
                    }
                    burst += 1;
                    if burst < BURST && !member.paused {
                        next = consumer.recv().now_or_never();
                    }
                }
                role.end_burst(&mut member);
                if flow == Flow::Stop {
                    break;
                }
                // rdkafka's `recv()` is ready whenever messages are buffered and is outside
                // tokio's cooperative budget: without a yield, a busy loop would starve tasks
                // the role spawned onto this worker (a background flush) until the topic ran dry.
                tokio::task::yield_now().await;
            }
        }
        role.after_turn(&mut member).await;
    }

    let deadline = tokio::time::Instant::now() + args.shutdown_timeout;
    role.settle(&mut member).await;
    let mut done = false;
    while tokio::time::Instant::now() < deadline {
        match role.drain(&mut member).await {
            Ok(()) => {
                done = true;
                break;
            }
            Err(error) => {
                role.drain_failed(&error);
                tokio::time::sleep(DRAIN_RETRY_AFTER).await;
            }
        }
    }
    // Leaving the group flushes nothing more: the state is empty, or it is abandoned.
    role.leave(&mut member);
    member.consumer.unsubscribe();
    drop(consumer);
    drop(member);
    if done {
        tracing::info!("{} stopped after its final {}", R::NAME, R::DRAIN);
        Ok(())
    } else {
        Err(MemberError::Unfinished { what: R::DRAIN })
    }
}

/// Commits `next` offsets of `topic` through any consumer of the group (the loop's, or the one
/// the rebalance callback is handed).
pub fn commit<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topic: &str,
    next: impl IntoIterator<Item = (i32, u64)>,
) -> Result<(), KafkaError> {
    let mut offsets = TopicPartitionList::new();
    for (partition, offset) in next {
        let offset = Offset::Offset(i64::try_from(offset).unwrap_or(i64::MAX));
        offsets.add_partition_offset(topic, partition, offset)?;
    }
    if offsets.count() == 0 {
        return Ok(());
    }
    consumer.commit(&offsets, CommitMode::Sync)
}

/// The partitions of `topic` a rebalance revokes (`None` for an assignment).
pub fn revoked(rebalance: &Rebalance<'_>, topic: &str) -> Option<Vec<i32>> {
    let Rebalance::Revoke(list) = rebalance else {
        return None;
    };
    Some(
        list.elements_for_topic(topic)
            .iter()
            .map(|e| e.partition())
            .collect(),
    )
}

/// Locks state shared with the rebalance callback. A panic while holding the lock aborts the
/// role's protocol anyway (what is not committed is re-read by the next owner), so a poisoned
/// lock is taken as it is.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Builds the state of a partition whose first message arrived at `offset`, retrying every
/// [`RETRY_AFTER`] until it succeeds or `shutdown` fires (`None`): a role must not handle a
/// partition's messages without what its resume reads (intents, existing objects).
pub async fn resume<T, E: std::error::Error, F: Future<Output = Result<T, E>>>(
    partition: i32,
    offset: u64,
    shutdown: &CancellationToken,
    mut attempt: impl FnMut() -> F,
) -> Option<T> {
    loop {
        match attempt().await {
            Ok(state) => return Some(state),
            Err(error) => {
                tracing::warn!(partition, offset, error = %Chain(&error), "cannot resume partition yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                }
            }
        }
    }
}

/// When a failed step is tried again: [`RETRY_AFTER`] after its last failure.
#[derive(Debug, Default)]
pub struct Retry {
    at: Option<tokio::time::Instant>,
}

impl Retry {
    /// The step failed: try again after [`RETRY_AFTER`].
    pub fn failed(&mut self) {
        self.at = Some(tokio::time::Instant::now() + RETRY_AFTER);
    }

    /// The step succeeded: no retry is pending.
    pub fn succeeded(&mut self) {
        self.at = None;
    }

    /// Whether the last attempt failed (a retry is pending).
    pub fn pending(&self) -> bool {
        self.at.is_some()
    }

    /// Whether a retry is pending and not due yet.
    pub fn waiting(&self) -> bool {
        self.at.is_some_and(|at| tokio::time::Instant::now() < at)
    }

    /// Ready when a pending retry is due; never when none is pending.
    pub async fn due(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}
