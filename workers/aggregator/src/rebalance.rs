//! The consumer's callbacks: statistics (consumer lag) and the rebalance. A revoke flushes the
//! revoked partitions and fences them before the group hands them to another worker; a lost
//! assignment drops them unflushed (ARCHITECTURE.md, "Fencing").

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;

use topk::group;

use crate::events;
use crate::worker::Worker;

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
        let Some(revoked) = group::revoked(rebalance, &self.topic) else {
            return;
        };
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
