//! One refresh: recompute a set of users' answers with the batch query and store them with the
//! guarded script. [`Refresh::users`] is shared by the refresher's cycles and the warm-up;
//! [`Refresher`] keeps the cursors that say which users changed since its previous cycle.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use clickhouse::Client;
use futures::{SinkExt, StreamExt};
use topk::cache::{self, Answer, Outcome, Redis, Target};
use topk::clock::Clock;
use topk::query::TopQuery;
use topk::window::{MAX_LIMIT, RankedSong, Window};

use crate::{RefreshError, RefreshSettings, changes, events};

/// What a refresh of a set of users did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Answers stored.
    pub written: u64,
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
        self.emptied += other.emptied;
        self.refused += other.refused;
        self.failed.extend(other.failed);
    }

    /// Users whose answer was computed and offered to Redis.
    pub fn done(&self) -> u64 {
        self.written + self.emptied + self.refused
    }
}

/// Everything a refresh needs.
#[derive(Debug, Clone)]
pub struct Refresh {
    pub query: TopQuery,
    pub redis: Redis,
    pub target: Target,
    pub batch_size: usize,
    pub concurrency: usize,
}

impl Refresh {
    pub fn new(client: Client, redis: Redis, prefix: &str, settings: &RefreshSettings) -> Self {
        Refresh {
            query: TopQuery::new(client),
            redis,
            target: Target::new(prefix, &settings.cache),
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
                    let answers = self.query.top_for_users(chunk, window, MAX_LIMIT).await;
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
    /// the window gets the empty answer).
    async fn store(
        &self,
        conn: &topk::cache::Conn,
        users: &[u64],
        answers: &HashMap<u64, Vec<RankedSong>>,
        window: Window,
        computed_at_ms: i64,
    ) -> Result<Refreshed, redis::RedisError> {
        let answers: Vec<Answer<'_>> = users
            .iter()
            .map(|user_id| Answer {
                user_id: *user_id,
                songs: answers.get(user_id).map_or(&[], Vec::as_slice),
            })
            .collect();
        let outcomes =
            cache::replace_all(conn, &self.target, &answers, window, computed_at_ms).await?;
        let mut done = Refreshed::default();
        for outcome in outcomes {
            match outcome {
                Outcome::Written => done.written += 1,
                Outcome::Emptied => done.emptied += 1,
                Outcome::Refused => done.refused += 1,
            }
        }
        Ok(done)
    }
}

/// What one refresher cycle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleReport {
    pub window: Window,
    pub computed_at_ms: i64,
    /// Users recomputed: touched since the previous cycle, in minutes that left or entered the
    /// window, or left over from a failed chunk.
    pub users: usize,
    pub refreshed: Refreshed,
}

/// The refresher's state between cycles. Several refreshers may run at once: each keeps its own
/// cursors, and the guard in the script makes their writes commute.
#[derive(Debug)]
pub struct Refresher {
    refresh: Refresh,
    client: Client,
    touch_margin: Duration,
    catch_up: Duration,
    /// Server time of the previous touched-users read.
    touch_cursor: Option<u32>,
    /// The window of the previous cycle.
    window: Option<Window>,
    /// Users of failed chunks, retried next cycle.
    pending: BTreeSet<u64>,
}

impl Refresher {
    pub fn new(client: Client, redis: Redis, prefix: &str, settings: &RefreshSettings) -> Self {
        Refresher {
            refresh: Refresh::new(client.clone(), redis, prefix, settings),
            client,
            touch_margin: settings.touch_margin,
            catch_up: settings.catch_up,
            touch_cursor: None,
            window: None,
            pending: BTreeSet::new(),
        }
    }

    /// One cycle: find the users whose answer may have changed and recompute them. The cursors
    /// move only once the changed users are known, and the users of failed chunks are kept for
    /// the next cycle, so a ClickHouse or Redis failure delays answers but loses none.
    ///
    /// The first cycle of a process has no previous cursors: it looks back `catch_up` (touches
    /// and window movement). After a longer outage, run `topk warmup`.
    pub async fn cycle(&mut self, clock: &dyn Clock) -> Result<CycleReport, RefreshError> {
        let started = Instant::now();
        let computed_at_ms = clock.now_ms();
        let window = Window::at(computed_at_ms);
        let catch_up = u32::try_from(self.catch_up.as_secs()).unwrap_or(u32::MAX);
        let margin = u32::try_from(self.touch_margin.as_secs()).unwrap_or(u32::MAX);

        let server_now = changes::server_now(&self.client).await?;
        let since = self
            .touch_cursor
            .map_or(server_now.saturating_sub(catch_up), |c| {
                c.saturating_sub(margin)
            });
        let touched = changes::touched_since(&self.client, since).await?;
        let previous = self.window.unwrap_or(Window {
            start: window.start.saturating_sub(catch_up),
            end: window.end.saturating_sub(catch_up),
        });
        let moved = changes::moved(&self.client, previous, window).await?;

        let mut users = std::mem::take(&mut self.pending);
        users.extend(touched);
        users.extend(moved);
        self.touch_cursor = Some(server_now);
        if self.window.is_none_or(|w| w.start < window.start) {
            self.window = Some(window);
        }

        let users: Vec<u64> = users.into_iter().collect();
        let refreshed = self.refresh.users(&users, window, computed_at_ms).await;
        self.pending.extend(refreshed.failed.iter().copied());
        let report = CycleReport {
            window,
            computed_at_ms,
            users: users.len(),
            refreshed,
        };
        events::cycle_done(&report, started.elapsed());
        Ok(report)
    }

    /// Users waiting for a retry after a failed chunk.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}
