//! Duplicate detection over the partition's log, deterministic so that a replay decides
//! exactly as the first run did.
//!
//! Time here is the partition's clock (`PartitionState`): never backwards, and moved only by a
//! Kafka timestamp the next message confirms. A valid event is a duplicate when an earlier
//! valid message of the same partition carried the same `event_id` and its sighting is dated no
//! more than `window_ms` before the clock at the event.
//!
//! A sighting is dated by the clock *after the next message* ([`DedupMemory::settle`]). Dated
//! by the clock at its own message, the first play after a quiet spell would carry the time
//! before the pause (that clock cannot have confirmed the play's timestamp yet), and its retry
//! would find it already expired.
//!
//! Ids are kept as 128-bit XXH3 fingerprints (16 bytes each, whatever the id's length); a
//! collision would need ~2^64 ids in memory at once. The map itself uses foldhash (fast, seeded
//! per process): the hot path hashes every event twice, so SipHash's cost showed.

use std::collections::{HashMap, VecDeque};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Bytes one remembered id costs, counted against `--max-state-bytes`.
pub const BYTES_PER_ID: u64 = 80;

/// The ids seen within the last `window_ms` of the partition's clock.
#[derive(Debug)]
pub struct DedupMemory {
    window_ms: i64,
    /// Date of each id's latest sighting.
    latest: FastMap<u128, i64>,
    /// Every sighting, oldest first: (date, offset, id). Dates are non-decreasing along the
    /// log (the clock never goes backwards), so eviction is a pop from the front.
    sightings: VecDeque<(i64, u64, u128)>,
    /// Whether the newest sighting still waits for its date (the clock after the next
    /// message): it carries the clock at its own message until then.
    pending: bool,
}

/// Whether an event is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    First,
    Duplicate,
}

impl DedupMemory {
    pub fn new(window_ms: i64) -> Self {
        DedupMemory {
            window_ms,
            latest: FastMap::default(),
            sightings: VecDeque::new(),
            pending: false,
        }
    }

    /// Changes the window from the next sighting on (a replayed batch decides with the window
    /// its intent recorded; see `PartitionState::process`).
    pub fn set_window_ms(&mut self, window_ms: i64) {
        self.window_ms = window_ms;
    }

    /// Dates the newest sighting, if it still waits for it, with `now`: the clock after the
    /// message that follows it. Called for every message, before [`DedupMemory::observe`].
    pub fn settle(&mut self, now: i64) {
        if !std::mem::take(&mut self.pending) {
            return;
        }
        if let Some(newest) = self.sightings.back_mut() {
            // The newest sighting is its id's latest: nothing was seen after it.
            newest.0 = now;
            self.latest.insert(newest.2, now);
        }
    }

    /// Records `event_id` seen at `offset` with the clock at `at` and says whether it was
    /// seen within the window before. The sighting is dated by the next [`Self::settle`]
    /// (without one it keeps `at`).
    pub fn observe(&mut self, event_id: &str, offset: u64, at: i64) -> Sighting {
        self.evict(at);
        let id = id_hash(event_id);
        let seen = self.latest.insert(id, at);
        self.sightings.push_back((at, offset, id));
        self.pending = true;
        // Saturating: a partition's first sighting is dated `i64::MIN` when no timestamp ever
        // confirmed a time (messages without timestamps).
        match seen {
            Some(previous) if at.saturating_sub(previous) <= self.window_ms => Sighting::Duplicate,
            _ => Sighting::First,
        }
    }

    /// Forgets sightings that can no longer matter once the clock reaches `now`.
    fn evict(&mut self, now: i64) {
        while let Some(&(at, _, id)) = self.sightings.front() {
            if now.saturating_sub(at) <= self.window_ms {
                break;
            }
            self.sightings.pop_front();
            if self.latest.get(&id) == Some(&at) {
                self.latest.remove(&id);
            }
        }
    }

    /// Where a restarted worker must start re-reading the log to rebuild this memory as of
    /// clock `now`: the offset and date of the oldest sighting still inside the window, or
    /// `None` when nothing is. (A re-read starting there with the clock at that date rebuilds
    /// every later date exactly: see `PartitionState::remember`.)
    pub fn rebuild_point(&mut self, now: i64) -> Option<(u64, i64)> {
        self.evict(now);
        self.sightings.front().map(|&(at, offset, _)| (offset, at))
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.sightings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sightings.is_empty()
    }

    /// Estimated heap bytes.
    pub fn bytes(&self) -> u64 {
        self.sightings.len() as u64 * BYTES_PER_ID
    }
}

fn id_hash(event_id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(event_id.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_inside_the_window_only() {
        let mut memory = DedupMemory::new(1_000);
        assert_eq!(memory.observe("a", 0, 0), Sighting::First);
        assert_eq!(memory.observe("a", 1, 1_000), Sighting::Duplicate);
        // Seen again: the window restarts from the latest sighting.
        assert_eq!(memory.observe("a", 2, 2_000), Sighting::Duplicate);
        assert_eq!(memory.observe("a", 3, 3_001), Sighting::First);
        assert_eq!(memory.observe("b", 4, 3_001), Sighting::First);
    }

    #[test]
    fn a_sighting_is_dated_by_the_next_settle() {
        let mut memory = DedupMemory::new(1_000);
        assert_eq!(memory.observe("a", 0, 0), Sighting::First);
        // The next message brought the clock to 5 000: that is the sighting's date...
        memory.settle(5_000);
        // ...so a repeat at 5 900 is inside the window (dated by the clock at its own message, 0, it would not be).
        assert_eq!(memory.observe("a", 1, 5_900), Sighting::Duplicate);
        memory.settle(5_900);
        // A date is given once: later clocks do not move it.
        memory.settle(7_000);
        assert_eq!(memory.rebuild_point(7_000), None);
        assert_eq!(memory.observe("a", 2, 7_000), Sighting::First);
    }

    #[test]
    fn eviction_keeps_memory_bounded_by_the_window() {
        let mut memory = DedupMemory::new(10);
        for i in 0..1_000u64 {
            memory.observe(&i.to_string(), i, i as i64);
        }
        assert_eq!(memory.len(), 11);
        assert_eq!(memory.rebuild_point(999), Some((989, 989)));
        assert_eq!(memory.rebuild_point(2_000), None);
        assert!(memory.is_empty());
    }
}
