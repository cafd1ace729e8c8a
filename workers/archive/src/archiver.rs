//! The archiver's consumer loop: every message of `plays` as received, in compressed objects
//! whose names are their offset ranges; offsets committed only after the upload succeeded.
//!
//! Uploads run on the loop's own task, between two `recv()` calls, and librdkafka runs the
//! rebalance callback only inside `recv()`. So no upload is ever in flight when partitions are
//! revoked, and the next owner cannot race a put of this worker (see ARCHITECTURE.md,
//! "The raw event archive").

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::join_all;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message as _};
use tokio::time::Interval;
use tokio_util::sync::CancellationToken;

use topk::group::cuts::{Cuts, Recorded};
use topk::group::{self, Flow, Member, MemberError, Retry, Role};

use crate::ArchiveArgs;
use crate::events;
use crate::layout::ObjectName;
use crate::record::{self, Record};
use crate::store::{self, StoreError};

/// Errors that stop the archiver.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Member(#[from] MemberError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Some upload of a round failed (each failure is logged where it happens); its batch stays
/// first in line and is retried.
#[derive(Debug, thiserror::Error)]
#[error("an upload failed; its batch is kept and retried")]
pub struct UploadFailed;

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
    existing: Cuts<ObjectName>,
}

impl PartitionArchive {
    /// Adds a message; returns whether a batch was sealed.
    fn push(&mut self, partition: i32, record: &Record, args: &ArchiveArgs) -> bool {
        if self.open.is_none() {
            let forced_last = self
                .existing
                .take_starting_at(record.offset)
                .map(|n| n.last);
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
        group::lock(&self.partitions)
    }
}

impl ClientContext for Archiver {}

impl ConsumerContext for Archiver {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Some(revoked) = group::revoked(rebalance, &self.topic) else {
            return;
        };
        // No upload is in flight here (uploads never overlap `recv()`), so dropping is safe:
        // whatever was not committed is re-read by the next owner, which rewrites any object
        // already put under the same name.
        let mut partitions = self.partitions();
        let dropped = revoked
            .iter()
            .filter_map(|p| partitions.remove(p))
            .map(|state| state.messages())
            .sum();
        events::partitions_released(&revoked, dropped);
    }
}

impl Recorded for ObjectName {
    fn first(&self) -> u64 {
        self.first
    }
}

/// The archiver's loop side: its timer, its store and whether an upload is due.
struct Archiving {
    args: ArchiveArgs,
    store: Arc<dyn ObjectStore>,
    /// Ticks often enough that a batch is cut close to its age limit.
    tick: Interval,
    retry: Retry,
    upload_due: bool,
}

impl Archiving {
    /// One upload round from the loop, with backpressure: while uploads fail, fetching pauses.
    async fn upload_now(&mut self, member: &mut Member<Archiver>) {
        match upload(member, self.store.as_ref(), &self.args).await {
            Ok(()) => {
                self.retry.succeeded();
                if member.set_paused(false) {
                    events::backpressure(false);
                }
            }
            Err(UploadFailed) => {
                self.retry.failed();
                if member.set_paused(true) {
                    events::backpressure(true);
                }
            }
        }
    }
}

impl Role for Archiving {
    type Context = Archiver;
    type Wake = ();
    type Error = UploadFailed;
    const NAME: &'static str = "archiver";
    const DRAIN: &'static str = "upload";

    async fn wake(&mut self) {
        self.tick.tick().await;
    }

    async fn on_wake(&mut self, member: &mut Member<Archiver>, (): ()) {
        let mut partitions = member.context().partitions();
        for (&p, state) in partitions.iter_mut() {
            if state
                .open
                .as_ref()
                .is_some_and(|o| o.opened.elapsed() >= self.args.flush_interval)
            {
                state.seal(p);
            }
        }
        self.upload_due = partitions.values().any(|s| !s.sealed.is_empty());
    }

    async fn on_message(
        &mut self,
        member: &mut Member<Archiver>,
        message: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> Flow {
        let partition = message.partition();
        let record = Record::new(
            partition,
            u64::try_from(message.offset()).unwrap_or(0),
            message.timestamp().to_millis(),
            message.key(),
            message.payload(),
        );
        let known = member.context().partitions().contains_key(&partition);
        if !known {
            let (store, topic) = (self.store.as_ref(), self.args.kafka.topic.as_str());
            let Some(state) = group::resume(partition, record.offset, shutdown, || {
                resume_partition(store, topic, partition, record.offset)
            })
            .await
            else {
                return Flow::Stop;
            };
            member.context().partitions().insert(partition, state);
        }
        if let Some(state) = member.context().partitions().get_mut(&partition) {
            self.upload_due |= state.push(partition, &record, &self.args);
        }
        Flow::Continue
    }

    async fn after_turn(&mut self, member: &mut Member<Archiver>) {
        if std::mem::take(&mut self.upload_due) && !self.retry.waiting() {
            self.upload_now(member).await;
        }
    }

    /// Cuts what is open. A batch that must still grow to an existing object's end is left to
    /// the next owner.
    async fn settle(&mut self, member: &mut Member<Archiver>) {
        for (&p, state) in member.context().partitions().iter_mut() {
            state.seal(p);
        }
    }

    async fn drain(&mut self, member: &mut Member<Archiver>) -> Result<(), UploadFailed> {
        upload(member, self.store.as_ref(), &self.args).await
    }

    fn leave(&mut self, member: &mut Member<Archiver>) {
        member.context().partitions().clear();
    }
}

/// Runs an archiver until `shutdown` fires; uploads and commits what it holds before returning.
pub async fn run(args: ArchiveArgs, shutdown: CancellationToken) -> Result<(), ArchiveError> {
    let store = store::open(&args.store)?;
    let context = Archiver {
        partitions: Mutex::new(HashMap::new()),
        topic: args.kafka.topic.clone(),
    };
    let member = Member::join(
        &args.kafka.brokers,
        &args.group,
        &args.kafka.topic,
        &args.member,
        |_| {},
        context,
    )?;
    let tick = tokio::time::interval(
        args.flush_interval
            .clamp(Duration::from_millis(50), Duration::from_secs(1)),
    );
    let member_args = args.member.clone();
    let mut role = Archiving {
        args,
        store,
        tick,
        retry: Retry::default(),
        upload_due: false,
    };
    group::run(&mut role, member, &member_args, &shutdown).await?;
    Ok(())
}

/// Uploads every sealed batch (partitions in parallel, each partition's in offset order) and
/// commits after each round of successful puts. `Err` when some upload failed: its batch stays
/// first in line, so a partition's offsets are never committed past an object not written.
async fn upload(
    member: &Member<Archiver>,
    store: &dyn ObjectStore,
    args: &ArchiveArgs,
) -> Result<(), UploadFailed> {
    let topic = &args.kafka.topic;
    loop {
        let round: Vec<SealedBatch> = member
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
        let mut next = Vec::new();
        let mut failed = false;
        {
            let mut partitions = member.context().partitions();
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
                        next.push((batch.name.partition, batch.name.last + 1));
                    }
                    Err(error) => {
                        events::upload_failed(&batch.name, &error);
                        failed = true;
                    }
                }
            }
        }
        if let Some(pause) = args.member.test_pause_before_commit {
            tokio::time::sleep(pause).await;
        }
        if let Err(error) = member.commit(next) {
            events::commit_failed(&error);
        }
        if failed {
            return Err(UploadFailed);
        }
    }
}

/// State of a partition whose first message arrived at `offset` (the committed offset): the
/// objects already in the store from there on, whose ranges the next batches must reproduce.
async fn resume_partition(
    store: &dyn ObjectStore,
    topic: &str,
    partition: i32,
    offset: u64,
) -> Result<PartitionArchive, object_store::Error> {
    let existing = store::list_from(store, topic, partition, offset).await?;
    events::partition_resumed(partition, offset, existing.len());
    Ok(PartitionArchive {
        existing: Cuts::new(existing),
        ..PartitionArchive::default()
    })
}
