//! `topk refresh` as a member of the refreshers' consumer group on `<topic>.touches`: each
//! refresher owns some touches partitions, collects their touched users between cycles, runs a
//! cycle over them every `--refresh-interval` and commits a partition's touches once the cycle
//! settled it (every user it named recomputed, its answer stored and scheduled).
//!
//! Cycles run on the loop's own task ([`Role::on_wake`]) and the rebalance callback runs inside
//! `recv()` on the same task, so a cycle never overlaps a rebalance: partitions revoked while a
//! cycle ran are forgotten before the next one, and a cycle that raced a new owner's writes
//! loses to its newer versions in Redis (ARCHITECTURE.md, "The refresher").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message as _};
use tokio::time::Interval;
use tokio_util::sync::CancellationToken;
use topk::cache::Redis;
use topk::clock::SharedClock;
use topk::group::{self, Flow, Member, Role};
use topk::touches::{self, METADATA_TIMEOUT};

use crate::cycle::Refresher;
use crate::{RefreshError, RefresherArgs, events};

/// The touched users of one partition since its last commit, and the offset to commit next.
#[derive(Debug, Default)]
struct Touched {
    users: BTreeSet<u64>,
    next: Option<u64>,
}

#[derive(Debug, Default)]
struct TouchState {
    partitions: BTreeMap<i32, Touched>,
    /// Assigned, and not yet checked for touches lost before this member read them.
    unchecked: BTreeSet<i32>,
    /// Revoked since the last cycle: the engine forgets them.
    revoked: Vec<i32>,
}

/// The consumer's context: the touches collected between cycles, shared with the rebalance
/// callback.
struct Touches {
    topic: String,
    state: Mutex<TouchState>,
}

impl Touches {
    fn state(&self) -> MutexGuard<'_, TouchState> {
        group::lock(&self.state)
    }
}

impl ClientContext for Touches {}

impl ConsumerContext for Touches {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut state = self.state();
        match rebalance {
            Rebalance::Revoke(_) => {
                let revoked = group::revoked(rebalance, &self.topic).unwrap_or_default();
                // No cycle runs here: what was not committed is re-read by the next owner.
                let dropped = revoked
                    .iter()
                    .filter_map(|p| state.partitions.remove(p))
                    .map(|t| t.users.len())
                    .sum();
                for p in &revoked {
                    state.unchecked.remove(p);
                }
                events::partitions_released(&revoked, dropped);
                state.revoked.extend(revoked);
            }
            Rebalance::Assign(list) => {
                let assigned = list.elements_for_topic(&self.topic);
                state
                    .unchecked
                    .extend(assigned.iter().map(|e| e.partition()));
            }
            Rebalance::Error(_) => {}
        }
    }
}

/// The refresher's loop side: the engine, its clock and its timer.
struct Refreshing {
    refresher: Refresher,
    clock: SharedClock,
    tick: Interval,
    topic: String,
    /// Test hook (`--test-pause-before-commit`): the pause between a cycle's writes and its
    /// commit, where a crash test aims `kill -9`.
    pause_before_commit: Option<std::time::Duration>,
}

impl Refreshing {
    /// The partitions of the touches topic this member is assigned.
    fn owned(&self, member: &Member<Touches>) -> Vec<i32> {
        match member.consumer().assignment() {
            Ok(list) => list
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect(),
            Err(error) => {
                events::assignment_unknown(&error);
                Vec::new()
            }
        }
    }

    /// Checks newly assigned partitions for lost touches: a group that never committed on a
    /// partition, or whose committed offset the log no longer holds, never saw some touches,
    /// so the partition's users are caught up from ClickHouse. Returns the partitions still
    /// unchecked (Kafka did not answer): they are not committed until checked.
    async fn check_assigned(&mut self, member: &Member<Touches>, owned: &[i32]) -> Vec<i32> {
        let unchecked: Vec<i32> = {
            let state = member.context().state();
            owned
                .iter()
                .copied()
                .filter(|p| state.unchecked.contains(p))
                .collect()
        };
        if unchecked.is_empty() {
            return unchecked;
        }
        let consumer = Arc::clone(member.consumer());
        let (topic, asked) = (self.topic.clone(), unchecked.clone());
        let starts = topk::kafka::blocking(move || {
            topk::kafka::partition_starts(&*consumer, &topic, &asked, METADATA_TIMEOUT)
        })
        .await;
        let starts = match starts {
            Ok(starts) => starts,
            Err(error) => {
                events::starts_unknown(&unchecked, &error);
                return unchecked;
            }
        };
        let mut state = member.context().state();
        for (partition, (committed, low)) in starts {
            if committed.is_none_or(|c| c < low) {
                events::touches_lost(partition, committed, low);
                self.refresher.catch_up(partition);
            }
            state.unchecked.remove(&partition);
        }
        owned
            .iter()
            .copied()
            .filter(|p| state.unchecked.contains(p))
            .collect()
    }

    /// One cycle over the owned partitions, then the commits of the settled ones.
    async fn cycle(&mut self, member: &mut Member<Touches>) {
        let revoked = std::mem::take(&mut member.context().state().revoked);
        self.refresher.forget(&revoked);
        let owned = self.owned(member);
        events::owned(&owned);
        let unchecked = self.check_assigned(member, &owned).await;
        let touched: BTreeMap<i32, BTreeSet<u64>> = {
            let state = member.context().state();
            state
                .partitions
                .iter()
                .filter(|(p, _)| owned.contains(p))
                .map(|(&p, t)| (p, t.users.clone()))
                .collect()
        };
        let report = match self
            .refresher
            .cycle(self.clock.as_ref(), &owned, &touched)
            .await
        {
            Ok(report) => report,
            Err(error) => {
                events::cycle_failed(&error);
                return;
            }
        };
        let next: Vec<(i32, u64)> = {
            let mut state = member.context().state();
            report
                .settled
                .iter()
                .filter(|p| !unchecked.contains(p))
                .filter_map(|p| {
                    let touched = state.partitions.get_mut(p)?;
                    touched.users.clear();
                    touched.next.map(|next| (*p, next))
                })
                .collect()
        };
        if let Some(pause) = self.pause_before_commit {
            tokio::time::sleep(pause).await;
        }
        if let Err(error) = member.commit(next) {
            // The users are done; a later commit covers these offsets.
            events::commit_failed(&error);
        }
    }
}

impl Role for Refreshing {
    type Context = Touches;
    type Wake = ();
    type Error = std::convert::Infallible;
    const NAME: &'static str = "refresher";
    const DRAIN: &'static str = "commit";

    async fn wake(&mut self) {
        self.tick.tick().await;
    }

    async fn on_wake(&mut self, member: &mut Member<Touches>, (): ()) {
        self.cycle(member).await;
    }

    async fn on_message(
        &mut self,
        member: &mut Member<Touches>,
        message: &BorrowedMessage<'_>,
        _shutdown: &CancellationToken,
    ) -> Flow {
        let (partition, offset) = (message.partition(), message.offset());
        let offset = u64::try_from(offset).unwrap_or(0);
        let mut state = member.context().state();
        let touched = state.partitions.entry(partition).or_default();
        match touches::user_of(message.payload().unwrap_or_default()) {
            Ok(user) => {
                touched.users.insert(user);
            }
            Err(error) => events::bad_touch(partition, offset, &error),
        }
        touched.next = Some(offset + 1);
        Flow::Continue
    }

    /// Nothing is in flight between cycles.
    async fn settle(&mut self, _member: &mut Member<Touches>) {}

    /// What was touched since the last cycle is not committed: the next owner re-reads it.
    async fn drain(&mut self, _member: &mut Member<Touches>) -> Result<(), Self::Error> {
        Ok(())
    }

    fn leave(&mut self, member: &mut Member<Touches>) {
        let mut state = member.context().state();
        state.partitions.clear();
        state.unchecked.clear();
    }
}

/// The partition count of the touches topic, retried until Kafka answers or `shutdown` fires
/// (`None`).
async fn touch_partitions(
    member: &Member<Touches>,
    topic: &str,
    shutdown: &CancellationToken,
) -> Option<u32> {
    loop {
        let consumer = Arc::clone(member.consumer());
        let name = topic.to_owned();
        let metadata =
            topk::kafka::blocking(move || consumer.fetch_metadata(Some(&name), METADATA_TIMEOUT))
                .await;
        match touches::partitions_in(metadata, topic) {
            Ok(partitions) => return Some(partitions),
            Err(error) => {
                events::topic_unknown(&error);
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(group::RETRY_AFTER) => {}
                }
            }
        }
    }
}

/// Runs a refresher until `shutdown`. A failing ClickHouse or Redis is logged and retried at the
/// next cycle; the process never stops for it. Stopping in the middle of a cycle is safe: every
/// stored answer is complete and versioned, and nothing uncommitted is lost.
pub async fn run(
    args: RefresherArgs,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<(), RefreshError> {
    let topic = args.kafka.touches_topic();
    let context = Touches {
        topic: topic.clone(),
        state: Mutex::new(TouchState::default()),
    };
    let member = Member::join(
        &args.kafka.brokers,
        &args.group,
        &topic,
        &args.member,
        |_| {},
        context,
    )?;
    let Some(partitions) = touch_partitions(&member, &topic, &shutdown).await else {
        return Ok(());
    };
    let redis = Redis::connect(&args.redis)?;
    let olap = topk::olap::Olap::connect(&args.clickhouse)
        .await
        .map_err(topk::group::MemberError::from)?;
    let refresher = Refresher::new(olap, redis, &args.redis.prefix, partitions, &args.settings);
    let mut tick = tokio::time::interval(args.refresh_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut role = Refreshing {
        refresher,
        clock,
        tick,
        topic,
        pause_before_commit: args.member.test_pause_before_commit,
    };
    group::run(&mut role, member, &args.member, &shutdown).await?;
    Ok(())
}
