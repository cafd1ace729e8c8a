//! Duplicate detection over the partition's log, deterministic so that a replay decides
//! exactly as the first run did.
//!
//! Time here is the partition's *effective time*: the running maximum of Kafka message
//! timestamps, so it never goes backwards even when producers' clocks disagree. A valid event
//! is a duplicate when an earlier valid message of the same partition carried the same
//! `event_id` at an effective time no more than `window_ms` before its own.
//!
//! Ids are kept as 128-bit XXH3 fingerprints (16 bytes each, whatever the id's length); a
//! collision would need ~2^64 ids in memory at once. The map itself uses foldhash (fast, seeded
//! per process): the hot path hashes every event twice, so SipHash's cost showed.

use std::collections::{HashMap, VecDeque};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Bytes one remembered id costs, counted against `--max-state-bytes`.
pub const BYTES_PER_ID: u64 = 80;

/// The ids seen within the last `window_ms` of effective time.
#[derive(Debug)]
pub struct DedupMemory {
    window_ms: i64,
    /// Latest effective time each id was seen at.
    latest: FastMap<u128, i64>,
    /// Every sighting, oldest first: (effective time, offset, id). Effective time is
    /// non-decreasing along the log, so eviction is a pop from the front.
    sightings: VecDeque<(i64, u64, u128)>,
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
        }
    }

    /// Records `event_id` seen at `offset` with effective time `at` and says whether it was
    /// seen within the window before.
    pub fn observe(&mut self, event_id: &str, offset: u64, at: i64) -> Sighting {
        self.evict(at);
        let id = id_hash(event_id);
        let seen = self.latest.insert(id, at);
        self.sightings.push_back((at, offset, id));
        match seen {
            Some(previous) if at - previous <= self.window_ms => Sighting::Duplicate,
            _ => Sighting::First,
        }
    }

    /// Forgets sightings that can no longer matter once effective time reaches `now`.
    fn evict(&mut self, now: i64) {
        while let Some(&(at, _, id)) = self.sightings.front() {
            if now - at <= self.window_ms {
                break;
            }
            self.sightings.pop_front();
            if self.latest.get(&id) == Some(&at) {
                self.latest.remove(&id);
            }
        }
    }

    /// Where a restarted worker must start re-reading the log to rebuild this memory as of
    /// effective time `now`: the offset and effective time of the oldest sighting still inside
    /// the window, or `None` when nothing is.
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
