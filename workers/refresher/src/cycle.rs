//! The refresher's cycle over the touches partitions it owns: recompute the users touched since
//! the partitions' last commit, the users the ageing index says are due, the users of failed
//! chunks, and a page of a partition being caught up; say which partitions are settled (every
//! one of their users is done), so that their touches can be committed.
//!
//! The engine knows nothing of Kafka: the consumer-group role ([`crate::member`]) hands it the
//! partitions and their touches, and the tests hand them directly, with an injected clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use topk::clock::Clock;
use topk::window::Window;

use topk::olap::Olap;

use crate::changes::{self, UserShard};
use crate::refresh::{Refresh, Refreshed};
use crate::{RefreshError, RefreshSettings, events};

/// Due users read per partition and cycle at most: after an outage, the backlog is worked off
/// over several cycles instead of in one unbounded read.
const MAX_DUE_PER_PARTITION: usize = 200_000;

/// What one refresher cycle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleReport {
    pub window: Window,
    pub computed_at_ms: i64,
    /// Users recomputed: touched, due in the ageing index, left over from a failed chunk, or
    /// paged by a catch-up.
    pub users: usize,
    /// Of them, due in the ageing index.
    pub due: usize,
    pub refreshed: Refreshed,
    /// Owned partitions whose users are all done: their touches may be committed.
    pub settled: Vec<i32>,
}

/// A partition whose touches were lost (retention, a new group): its users are paged from
/// ClickHouse, `after` the last one done.
#[derive(Debug, Clone, Default)]
struct CatchUp {
    after: Option<u64>,
}

/// The refresher's state between cycles, per owned partition.
#[derive(Debug)]
pub struct Refresher {
    refresh: Refresh,
    olap: Olap,
    catch_up_page: usize,
    /// Users of failed chunks, retried next cycle.
    pending: BTreeMap<i32, BTreeSet<u64>>,
    catching_up: BTreeMap<i32, CatchUp>,
}

impl Refresher {
    /// A refresher storing under `prefix`, over a touches topic of `partitions` partitions.
    pub fn new(
        olap: impl Into<Olap>,
        redis: topk::cache::Redis,
        prefix: &str,
        partitions: u32,
        settings: &RefreshSettings,
    ) -> Self {
        let olap = olap.into();
        Refresher {
            refresh: Refresh::new(olap.clone(), redis, prefix, partitions, settings),
            olap,
            catch_up_page: settings.catch_up_page,
            pending: BTreeMap::new(),
            catching_up: BTreeMap::new(),
        }
    }

    /// The refresh it runs (its query, Redis and ageing index).
    pub fn refresh(&self) -> &Refresh {
        &self.refresh
    }

    /// Partition `partition` lost touches: page its users with plays in the window over the
    /// next cycles, and keep it unsettled until the last page is done.
    pub fn catch_up(&mut self, partition: i32) {
        self.catching_up.entry(partition).or_default();
    }

    /// Whether `partition` is still being caught up.
    pub fn catching_up(&self, partition: i32) -> bool {
        self.catching_up.contains_key(&partition)
    }

    /// Forgets revoked partitions: their next owner re-reads what was not committed.
    pub fn forget(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.pending.remove(p);
            self.catching_up.remove(p);
        }
    }

    /// One cycle over `owned` partitions with the users `touched` on each since its last commit.
    /// Reading the due users fails the whole cycle (nothing is done, nothing settles); a failed
    /// chunk keeps its users pending, and their partitions unsettled, for the next cycle.
    pub async fn cycle(
        &mut self,
        clock: &dyn Clock,
        owned: &[i32],
        touched: &BTreeMap<i32, BTreeSet<u64>>,
    ) -> Result<CycleReport, RefreshError> {
        let started = Instant::now();
        let computed_at_ms = clock.now_ms();
        let window = Window::at(computed_at_ms);
        let now_secs = u32::try_from(computed_at_ms.div_euclid(1000)).unwrap_or(u32::MAX);
        let ageing = &self.refresh.ageing;

        let mut users: BTreeSet<u64> = BTreeSet::new();
        let mut due_count = 0;
        let mut conn = self.refresh.redis.get().await?;
        for &p in owned {
            let due = ageing
                .due(&mut conn, p, now_secs, MAX_DUE_PER_PARTITION)
                .await?;
            due_count += due.len();
            users.extend(due);
            users.extend(touched.get(&p).into_iter().flatten());
            users.extend(self.pending.get(&p).into_iter().flatten());
        }
        // A page of each partition being caught up; the last (short) page ends its catch-up.
        let mut caught_up = Vec::new();
        for (&p, state) in self.catching_up.iter_mut() {
            if !owned.contains(&p) {
                continue;
            }
            let shard = UserShard {
                index: p,
                of: ageing.partitions,
            };
            let page = changes::users_page(
                &self.olap,
                window,
                Some(shard),
                state.after,
                self.catch_up_page,
            )
            .await?;
            if page.len() < self.catch_up_page {
                caught_up.push(p);
            }
            state.after = page.last().copied().or(state.after);
            users.extend(page);
        }

        let list: Vec<u64> = users.into_iter().collect();
        let refreshed = self.refresh.users(&list, window, computed_at_ms).await;
        for p in owned {
            self.pending.remove(p);
        }
        for &user in &refreshed.failed {
            self.pending
                .entry(ageing.partition_of(user))
                .or_default()
                .insert(user);
        }
        for p in caught_up {
            events::caught_up(p);
            self.catching_up.remove(&p);
        }
        let settled = owned
            .iter()
            .copied()
            .filter(|p| !self.pending.contains_key(p) && !self.catching_up.contains_key(p))
            .collect();
        let report = CycleReport {
            window,
            computed_at_ms,
            users: list.len(),
            due: due_count,
            refreshed,
            settled,
        };
        events::cycle_done(&report, started.elapsed());
        Ok(report)
    }

    /// Users waiting for a retry after a failed chunk.
    pub fn pending(&self) -> usize {
        self.pending.values().map(BTreeSet::len).sum()
    }
}
