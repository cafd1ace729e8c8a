//! The flush protocol (ARCHITECTURE.md, "Exactly-once flush protocol"): seal, intents with a
//! server-side write deadline, counts, touches, dead letters, commit; every step keeps only the
//! partitions still held in the generation the flush took them from ("Fencing").

use std::sync::MutexGuard;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;

use topk::counting::batch::Batch;
use topk::group;

use crate::events;
use crate::held::{Core, Taken};
use crate::store::touched_users;
use crate::worker::Worker;

/// Why a flush failed (the batches are kept and retried).
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("writing flush intents")]
    Intents(#[source] clickhouse::error::Error),
    #[error("writing counts")]
    Counts(#[source] clickhouse::error::Error),
    #[error("recording the days and users a flush touched")]
    Touches(#[source] clickhouse::error::Error),
    #[error("publishing the users a flush touched")]
    PublishTouches(#[source] topk::touches::TouchError),
    #[error("producing to the dead-letter topic")]
    DeadLetters(#[source] KafkaError),
    #[error("the flush task panicked: {0}")]
    Panicked(String),
}

impl Worker {
    pub(crate) fn core(&self) -> MutexGuard<'_, Core> {
        group::lock(&self.core)
    }

    /// State bytes held, including the batches of a flush in flight.
    pub(crate) fn state_bytes(&self) -> u64 {
        self.core().bytes() + self.in_flight_bytes.load(Ordering::Relaxed)
    }

    /// Seals and flushes the batches of `only` (all partitions when `None`): intents, counts,
    /// dead letters, then the offset commit. On failure the batches are put back.
    pub(crate) async fn flush<C: Consumer<Worker>>(
        &self,
        consumer: &C,
        only: Option<&[i32]>,
    ) -> Result<(), FlushError> {
        let _one_at_a_time = self.flush_lock.lock().await;
        self.flush_locked(consumer, only).await
    }

    /// [`Worker::flush`] for a caller that holds `flush_lock`.
    pub(crate) async fn flush_locked<C: Consumer<Worker>>(
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
        let users = touched_users(&batches);
        // After the counts are acknowledged (visible): a refresher that reads a touch finds
        // its counts. Before the commit: a crash replays the range and publishes them again.
        topk::touches::publish(&self.producer, &self.touches_topic, &users)
            .await
            .map_err(FlushError::PublishTouches)?;
        self.retain_held(consumer, taken);
        let batches: Vec<&Batch> = taken.iter().flat_map(|t| t.batches.iter()).collect();
        let dead_letters = self.produce_dead_letters(&batches).await?;
        Ok((rows, dead_letters))
    }

    /// Step 5: commits the partitions still held. The core lock is held across the commit so
    /// that a revoke cannot give a partition up between the check and the commit: once the
    /// revoke has given it up, no commit of this flush for it can start or still be running.
    fn commit<C: Consumer<Worker>>(&self, consumer: &C, taken: &mut Vec<Taken>) {
        let core = self.core();
        core.retain_held(taken, consumer.assignment_lost());
        let next = taken
            .iter()
            .filter_map(|t| t.batches.last().map(|last| (t.partition, last.end_offset)));
        if let Err(error) = group::commit(consumer, &self.topic, next) {
            events::commit_failed(&error);
        }
        drop(core);
    }
}
