//! One refresh: recompute a set of users' answers with the batch query, store them with the
//! guarded script and schedule when each next changes in the ageing index. [`Refresh::users`]
//! is shared by the refresher's cycles and the warm-up.

use std::collections::HashMap;

use futures::{SinkExt, StreamExt};
use topk::cache::{self, Answer, Outcome, Redis, Target};
use topk::olap::Olap;
use topk::query::{Computed, TopQuery};
use topk::window::{MAX_LIMIT, Window};

use crate::ageing::Ageing;
use crate::{RefreshError, RefreshSettings, events};

/// What a refresh of a set of users did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Answers stored.
    pub written: u64,
    /// Answers that were already stored (same fingerprint): renewed, songs left as they were.
    pub unchanged: u64,
    /// Empty answers: keys deleted (a tombstone guards the version until it expires).
    pub emptied: u64,
    /// Refused by the guard: a newer computation was already stored.
    pub refused: u64,
    /// Users whose chunk failed (ClickHouse or Redis error); they are retried.
    pub failed: Vec<u64>,
}

impl Refreshed {
    fn add(&mut self, other: Refreshed) {
        self.written += other.written;
        self.unchanged += other.unchanged;
        self.emptied += other.emptied;
        self.refused += other.refused;
        self.failed.extend(other.failed);
    }

    /// Users whose answer was computed and offered to Redis.
    pub fn done(&self) -> u64 {
        self.written + self.unchanged + self.emptied + self.refused
    }
}

/// Everything a refresh needs.
#[derive(Debug, Clone)]
pub struct Refresh {
    pub query: TopQuery,
    pub redis: Redis,
    pub target: Target,
    pub ageing: Ageing,
    pub batch_size: usize,
    pub concurrency: usize,
}

impl Refresh {
    /// A refresh storing under `prefix`, scheduling in the ageing index of a touches topic of
    /// `partitions` partitions.
    pub fn new(
        olap: impl Into<Olap>,
        redis: Redis,
        prefix: &str,
        partitions: u32,
        settings: &RefreshSettings,
    ) -> Self {
        Refresh {
            query: TopQuery::new(olap),
            redis,
            target: Target::new(prefix, &settings.cache),
            ageing: Ageing::new(prefix, partitions),
            batch_size: settings.batch_size.max(1),
            concurrency: settings.concurrency.max(1),
        }
    }

    /// Recomputes `users` over `window` as of `computed_at_ms` (the clock read before any query,
    /// so the version never claims more than the data it was computed from): chunks of
    /// `batch_size` users per ClickHouse query, `concurrency` chunks in flight. A failed chunk
    /// is logged and its users returned in `failed`; the others go on.
    ///
    /// Computing and storing are two stages that overlap: while Redis stores the answers of one
    /// chunk, ClickHouse already computes the next ones. Each stage is busy on its own core;
    /// run one after the other (as before), a cycle took the sum of both.
    pub async fn users(&self, users: &[u64], window: Window, computed_at_ms: i64) -> Refreshed {
        let mut total = Refreshed::default();
        if users.is_empty() {
            return total;
        }
        let conn = match self.redis.get().await {
            Ok(mut conn) => match cache::load_replace_top(&mut conn).await {
                Ok(()) => conn,
                Err(error) => {
                    events::chunk_failed(users.len(), &RefreshError::Redis(error));
                    total.failed = users.to_vec();
                    return total;
                }
            },
            Err(error) => {
                events::chunk_failed(users.len(), &RefreshError::Cache(error));
                total.failed = users.to_vec();
                return total;
            }
        };
        // At most `concurrency` computed chunks wait for Redis: memory stays bounded.
        let (mut computed_tx, computed_rx) = futures::channel::mpsc::channel(self.concurrency);
        let compute = async move {
            let mut computing = futures::stream::iter(users.chunks(self.batch_size))
                .map(|chunk| async move {
                    // Every answer keeps MAX_LIMIT songs, so the API answers any limit from the
                    // cache.
                    let answers = self.query.answers_for_users(chunk, window, MAX_LIMIT).await;
                    (chunk, answers)
                })
                .buffer_unordered(self.concurrency);
            while let Some(computed) = computing.next().await {
                if computed_tx.send(computed).await.is_err() {
                    break;
                }
            }
        };
        let store = computed_rx
            .map(|(chunk, answers)| {
                let conn = &conn;
                async move {
                    let stored = match answers {
                        Ok(answers) => self
                            .store(conn, chunk, &answers, window, computed_at_ms)
                            .await
                            .map_err(RefreshError::from),
                        Err(error) => Err(RefreshError::from(error)),
                    };
                    stored.unwrap_or_else(|error| {
                        events::chunk_failed(chunk.len(), &error);
                        Refreshed {
                            failed: chunk.to_vec(),
                            ..Refreshed::default()
                        }
                    })
                }
            })
            .buffer_unordered(self.concurrency)
            .for_each(|done| {
                total.add(done);
                std::future::ready(())
            });
        futures::join!(compute, store);
        total
    }

    /// Stores the computed answers of `users` (every user of the chunk: one without plays in
    /// the window gets the empty answer), then schedules them. An answer stored but not
    /// scheduled is recomputed when the chunk is retried.
    async fn store(
        &self,
        conn: &topk::cache::Conn,
        users: &[u64],
        computed: &HashMap<u64, Computed>,
        window: Window,
        computed_at_ms: i64,
    ) -> Result<Refreshed, redis::RedisError> {
        let answers: Vec<Answer<'_>> = users
            .iter()
            .map(|user_id| Answer {
                user_id: *user_id,
                songs: computed.get(user_id).map_or(&[], |c| c.songs.as_slice()),
            })
            .collect();
        let outcomes =
            cache::replace_all(conn, &self.target, &answers, window, computed_at_ms).await?;
        let schedule: Vec<(u64, Option<u32>)> = users
            .iter()
            .map(|user_id| (*user_id, computed.get(user_id).and_then(|c| c.changes_at)))
            .collect();
        self.ageing
            .schedule(conn, &schedule, computed_at_ms)
            .await?;
        let mut done = Refreshed::default();
        for outcome in outcomes {
            match outcome {
                Outcome::Written => done.written += 1,
                Outcome::Unchanged => done.unchanged += 1,
                Outcome::Emptied => done.emptied += 1,
                Outcome::Refused => done.refused += 1,
            }
        }
        Ok(done)
    }
}
