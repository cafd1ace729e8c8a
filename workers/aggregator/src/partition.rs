//! The state of one assigned partition: the open batch, the sealed batches waiting to be
//! flushed, the dedup memory and the recorded intents still to replay. Pure logic, no I/O.

use std::collections::VecDeque;

use topk::event::Validator;

use crate::batch::{Batch, DeadLetter};
use crate::dedup::{DedupMemory, Sighting};

/// A flush intent read back from `flush_log`: a batch some worker started to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    pub start_offset: u64,
    pub end_offset: u64,
    pub first_ts: i64,
    pub max_ts: i64,
    pub dedup_from: u64,
    pub dedup_from_max_ts: i64,
}

/// One message as the partition state sees it.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub offset: u64,
    /// Kafka message timestamp, when the broker gave one.
    pub timestamp: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

/// What processing one message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Counted,
    Duplicate,
    DeadLetter(topk::event::Rejection),
}

/// An assigned partition.
#[derive(Debug)]
pub struct PartitionState {
    pub partition: i32,
    validator: Validator,
    /// Effective time: running maximum of message timestamps.
    max_ts: i64,
    dedup: DedupMemory,
    open: Option<Batch>,
    sealed: VecDeque<Batch>,
    /// Intents recorded by an earlier owner that start at or after the resume offset.
    replay: VecDeque<Intent>,
    /// Cells of the last sealed batch: the next one starts with that capacity instead of
    /// rehashing its way up (growth showed in the ingest profile).
    last_cells: usize,
}

impl PartitionState {
    /// State for a partition resumed at the offset where `resume` (the intent that ended there,
    /// if any) leaves it. `replay` are the intents starting at or after the resume offset.
    pub fn new(
        partition: i32,
        validator: Validator,
        dedup_window_ms: i64,
        resume: Option<&Intent>,
        replay: Vec<Intent>,
    ) -> Self {
        PartitionState {
            partition,
            validator,
            max_ts: resume.map_or(i64::MIN, |intent| intent.dedup_from_max_ts),
            dedup: DedupMemory::new(dedup_window_ms),
            open: None,
            sealed: VecDeque::new(),
            replay: replay.into(),
            last_cells: 0,
        }
    }

    /// Feeds a message that precedes the resume offset into the dedup memory only (rebuilding
    /// the memory exactly as it was when the previous owner committed).
    pub fn remember(&mut self, message: Message<'_>) {
        let at = self.advance_clock(message.timestamp);
        if let Some(payload) = message.payload {
            if let Ok(event) = self
                .validator
                .validate_borrowed(payload, at_or(message.timestamp, at))
            {
                self.dedup.observe(&event.event_id, message.offset, at);
            }
        }
    }

    /// Sets the effective time reached by the previous owner (after [`Self::remember`]).
    pub fn resume_clock(&mut self, max_ts: i64) {
        self.max_ts = self.max_ts.max(max_ts);
    }

    fn advance_clock(&mut self, timestamp: Option<i64>) -> i64 {
        if let Some(ts) = timestamp {
            self.max_ts = self.max_ts.max(ts);
        }
        self.max_ts
    }

    /// Processes the next message of the partition.
    pub fn process(&mut self, message: Message<'_>) -> Outcome {
        let first_ts = message.timestamp.unwrap_or(self.max_ts.max(0));
        if self.open.is_none() {
            let forced_end = self.take_intent_starting_at(message.offset, first_ts);
            let mut batch = Batch::open(self.partition, message.offset, first_ts, forced_end);
            batch.counts.reserve(self.last_cells);
            self.open = Some(batch);
        }
        let at = self.advance_clock(message.timestamp);
        let produced_at = at_or(message.timestamp, at);
        let outcome = match message
            .payload
            .map(|p| self.validator.validate_borrowed(p, produced_at))
        {
            Some(Ok(event)) => match self.dedup.observe(&event.event_id, message.offset, at) {
                Sighting::Duplicate => Outcome::Duplicate,
                Sighting::First => {
                    let batch = self.open.as_mut().expect("opened above");
                    *batch
                        .counts
                        .entry((event.user_id, event.song_id, event.minute()))
                        .or_insert(0) += 1;
                    batch.counted += 1;
                    Outcome::Counted
                }
            },
            Some(Err(reason)) => Outcome::DeadLetter(reason),
            None => Outcome::DeadLetter(topk::event::Rejection::InvalidJson),
        };
        let batch = self.open.as_mut().expect("opened above");
        if let Outcome::DeadLetter(reason) = outcome {
            batch.push_dead_letter(DeadLetter {
                offset: message.offset,
                key: message.key.map(<[u8]>::to_vec),
                payload: message.payload.map(<[u8]>::to_vec),
                reason,
            });
        }
        batch.end_offset = message.offset + 1;
        batch.max_ts = at;
        if batch.forced_end.is_some_and(|end| batch.end_offset >= end) {
            self.seal();
        }
        outcome
    }

    /// The forced end of the batch starting at `offset`, when an intent recorded it. An intent
    /// from another incarnation of the topic (different first timestamp) ends the replay.
    fn take_intent_starting_at(&mut self, offset: u64, first_ts: i64) -> Option<u64> {
        while let Some(intent) = self.replay.front() {
            if intent.start_offset < offset {
                self.replay.pop_front();
                continue;
            }
            if intent.start_offset == offset && intent.first_ts == first_ts {
                let intent = self.replay.pop_front().expect("front exists");
                return Some(intent.end_offset);
            }
            if intent.start_offset == offset {
                tracing::warn!(
                    partition = self.partition,
                    offset,
                    "recorded intent belongs to another incarnation of the topic; ignoring intents"
                );
                self.replay.clear();
            }
            return None;
        }
        None
    }

    /// Closes the open batch unless it must still grow to a recorded end. Returns whether a
    /// batch was sealed.
    pub fn seal(&mut self) -> bool {
        let Some(batch) = self.open.as_ref() else {
            return false;
        };
        if batch.is_empty() || batch.forced_end.is_some_and(|end| batch.end_offset < end) {
            return false;
        }
        let mut batch = self.open.take().expect("checked above");
        // Once sealed, a batch is content only: whether it was replayed must not show.
        batch.forced_end = None;
        let (dedup_from, dedup_from_max_ts) = self
            .dedup
            .rebuild_point(batch.max_ts)
            .unwrap_or((batch.end_offset, batch.max_ts));
        self.last_cells = batch.counts.len();
        batch.dedup_from = dedup_from;
        batch.dedup_from_max_ts = dedup_from_max_ts;
        self.sealed.push_back(batch);
        true
    }

    /// Sealed batches, oldest first.
    pub fn sealed(&self) -> &VecDeque<Batch> {
        &self.sealed
    }

    /// Takes the sealed batches out for a flush.
    pub fn take_sealed(&mut self) -> Vec<Batch> {
        self.sealed.drain(..).collect()
    }

    /// Puts batches back after a failed flush, in front of any sealed since.
    pub fn restore_sealed(&mut self, batches: Vec<Batch>) {
        for batch in batches.into_iter().rev() {
            self.sealed.push_front(batch);
        }
    }

    /// Whether an open batch is waiting for more messages to reach a recorded end.
    pub fn replaying(&self) -> bool {
        self.open.as_ref().is_some_and(|b| b.forced_end.is_some())
    }

    /// Estimated heap bytes: batches plus dedup memory.
    pub fn bytes(&self) -> u64 {
        self.flushable_bytes() + self.dedup_bytes()
    }

    /// Bytes of the dedup memory (not freed by a flush).
    pub fn dedup_bytes(&self) -> u64 {
        self.dedup.bytes()
    }

    /// Bytes a flush can free (everything but the dedup memory).
    pub fn flushable_bytes(&self) -> u64 {
        self.open
            .iter()
            .chain(self.sealed.iter())
            .map(Batch::bytes)
            .sum()
    }
}

fn at_or(timestamp: Option<i64>, effective: i64) -> i64 {
    timestamp.unwrap_or(effective)
}

#[cfg(test)]
mod tests {
    use super::*;
    use topk::event::{PlayEvent, Rejection};

    fn play(id: &str, user: u64, song: u64, ts: i64) -> Vec<u8> {
        PlayEvent {
            event_id: id.into(),
            user_id: user,
            song_id: song,
            timestamp_ms: ts,
        }
        .to_json()
        .into_bytes()
    }

    fn msg(offset: u64, ts: i64, payload: &[u8]) -> Message<'_> {
        Message {
            offset,
            timestamp: Some(ts),
            key: None,
            payload: Some(payload),
        }
    }

    const T0: i64 = 1_764_432_000_000;
    const WINDOW: i64 = 600_000;

    fn fresh() -> PartitionState {
        PartitionState::new(0, Validator::default(), WINDOW, None, Vec::new())
    }

    #[test]
    fn counts_dedups_and_dead_letters() {
        let mut p = fresh();
        let a = play("a", 1, 7, T0);
        let b = play("b", 1, 7, T0 + 61_000);
        assert_eq!(p.process(msg(0, T0, &a)), Outcome::Counted);
        assert_eq!(p.process(msg(1, T0 + 1, &a)), Outcome::Duplicate);
        assert_eq!(
            p.process(msg(2, T0 + 2, b"nope")),
            Outcome::DeadLetter(Rejection::InvalidJson)
        );
        assert_eq!(p.process(msg(3, T0 + 3, &b)), Outcome::Counted);
        assert!(p.seal());
        let batch = &p.sealed()[0];
        assert_eq!((batch.start_offset, batch.end_offset), (0, 4));
        assert_eq!(batch.counted, 2);
        assert_eq!(batch.counts.get(&(1, 7, (T0 / 1000) as u32)), Some(&1));
        assert_eq!(batch.counts.get(&(1, 7, (T0 / 1000) as u32 + 60)), Some(&1));
        assert_eq!(batch.dead_letters.len(), 1);
        assert_eq!(batch.dead_letters[0].offset, 2);
        assert_eq!((batch.dedup_from, batch.dedup_from_max_ts), (0, T0));
    }

    #[test]
    fn a_recorded_intent_forces_the_batch_end() {
        let intent = Intent {
            start_offset: 5,
            end_offset: 8,
            first_ts: T0,
            max_ts: T0,
            dedup_from: 5,
            dedup_from_max_ts: T0,
        };
        let mut p = PartitionState::new(0, Validator::default(), WINDOW, None, vec![intent]);
        let e = play("x", 1, 1, T0);
        p.process(msg(5, T0, &e));
        assert!(!p.seal(), "must not seal before the recorded end");
        assert!(p.replaying());
        p.process(msg(6, T0, &e));
        p.process(msg(7, T0, &e));
        // Reaching the recorded end seals by itself.
        assert_eq!(p.sealed().len(), 1);
        assert_eq!(p.sealed()[0].end_offset, 8);
        assert!(!p.replaying());
    }

    #[test]
    fn an_intent_of_another_topic_incarnation_is_ignored() {
        let intent = Intent {
            start_offset: 0,
            end_offset: 100,
            first_ts: 1,
            max_ts: 1,
            dedup_from: 0,
            dedup_from_max_ts: 1,
        };
        let mut p = PartitionState::new(0, Validator::default(), WINDOW, None, vec![intent]);
        let e = play("x", 1, 1, T0);
        p.process(msg(0, T0, &e));
        assert!(!p.replaying());
        assert!(p.seal());
    }

    mod replay {
        //! The property the exactly-once protocol rests on: after a crash at any batch boundary,
        //! a new owner that resumes from the recorded intents rebuilds batches identical to the
        //! ones the first owner built (same ranges, same counts, same dead letters, same dedup
        //! rebuild points), whatever the traffic: duplicates, malformed messages, timestamps
        //! that go backwards.
        use super::*;
        use proptest::prelude::*;
        use proptest::sample::Index;

        const DEDUP_WINDOW: i64 = 60_000;

        /// (malformed?, user, song, minutes late, event id, Kafka timestamp step)
        type Spec = (bool, u64, u64, i64, u16, i64);

        fn messages(specs: &[Spec]) -> Vec<(i64, Vec<u8>)> {
            let mut ts = T0;
            specs
                .iter()
                .map(|&(bad, user, song, late, id, step)| {
                    ts += step;
                    let payload = if bad {
                        b"{broken".to_vec()
                    } else {
                        play(&format!("e{id}"), user, song, ts - late * 60_000)
                    };
                    (ts, payload)
                })
                .collect()
        }

        fn intent(batch: &Batch) -> Intent {
            Intent {
                start_offset: batch.start_offset,
                end_offset: batch.end_offset,
                first_ts: batch.first_ts,
                max_ts: batch.max_ts,
                dedup_from: batch.dedup_from,
                dedup_from_max_ts: batch.dedup_from_max_ts,
            }
        }

        proptest! {
            #[test]
            fn resuming_from_intents_rebuilds_identical_batches(
                specs in prop::collection::vec(
                    (prop::bool::weighted(0.1), 1u64..4, 1u64..4, 0i64..20, 0u16..30, -30_000i64..90_000),
                    1..150,
                ),
                cuts in prop::collection::vec(any::<Index>(), 0..8),
                crash in any::<Index>(),
            ) {
                let log = messages(&specs);
                let cut_after: std::collections::BTreeSet<usize> =
                    cuts.iter().map(|i| i.index(log.len())).collect();

                // The first owner: processes everything, sealing at the cuts.
                let mut first = PartitionState::new(0, Validator::default(), DEDUP_WINDOW, None, Vec::new());
                for (offset, (ts, payload)) in log.iter().enumerate() {
                    first.process(msg(offset as u64, *ts, payload));
                    if cut_after.contains(&offset) {
                        first.seal();
                    }
                }
                first.seal();
                let batches = first.take_sealed();
                prop_assert!(!batches.is_empty());

                // It crashes after committing batch k-1; every intent was recorded.
                let k = crash.index(batches.len() + 1);
                let committed = if k == 0 { 0 } else { batches[k - 1].end_offset };
                let resume = (k > 0).then(|| intent(&batches[k - 1]));
                let replay: Vec<Intent> = batches[k..].iter().map(intent).collect();

                // The next owner: rebuilds dedup memory from the resume intent, then replays.
                let mut next = PartitionState::new(0, Validator::default(), DEDUP_WINDOW, resume.as_ref(), replay);
                if let Some(resume) = resume {
                    for offset in resume.dedup_from..committed {
                        let (ts, payload) = &log[offset as usize];
                        next.remember(msg(offset, *ts, payload));
                    }
                    next.resume_clock(resume.max_ts);
                }
                for (offset, (ts, payload)) in log.iter().enumerate().skip(committed as usize) {
                    next.process(msg(offset as u64, *ts, payload));
                }
                next.seal();
                prop_assert_eq!(next.take_sealed(), batches[k..].to_vec());
            }
        }
    }
}
