//! The state of one assigned partition: the open batch, the sealed batches waiting to be
//! flushed, the dedup memory and the recorded intents still to replay. Pure logic, no I/O.

use std::collections::VecDeque;

use crate::event::Validator;
use crate::group::cuts::{Cuts, Recorded};

use crate::counting::batch::{Batch, DeadLetter, Rules};
use crate::counting::dedup::{DedupMemory, Sighting};

/// A flush intent read back from `flush_log`: a batch some worker started to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    pub start_offset: u64,
    pub end_offset: u64,
    pub first_ts: i64,
    pub max_ts: i64,
    pub dedup_from: u64,
    pub dedup_from_max_ts: i64,
    /// The rules the batch was decided with; `None` for an intent recorded before they were
    /// (replayed with the configured rules: the best that can be done for it).
    pub rules: Option<Rules>,
}

impl Recorded for Intent {
    fn first(&self) -> u64 {
        self.start_offset
    }
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
    DeadLetter(crate::event::Rejection),
}

/// An assigned partition.
#[derive(Debug)]
pub struct PartitionState {
    pub partition: i32,
    /// The validator of the batch being built (its retention is that batch's rules).
    validator: Validator,
    /// The configured rules (`--dedup-window`, `--retention`): those of every batch that does
    /// not replay an intent recording others.
    configured: Rules,
    /// The partition's clock ("effective time", see [`PartitionState::advance_clock`]);
    /// `i64::MIN` until two timestamps confirmed a time.
    max_ts: i64,
    /// Kafka timestamp of the previous message, the witness the next one is checked against
    /// (`None` at the start of a state or after a message without one).
    last_ts: Option<i64>,
    dedup: DedupMemory,
    open: Option<Batch>,
    sealed: VecDeque<Batch>,
    /// Intents recorded by an earlier owner that start at or after the resume offset.
    replay: Cuts<Intent>,
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
        let configured = Rules {
            dedup_window_ms,
            retention_ms: validator.retention_ms,
        };
        let mut state = PartitionState {
            partition,
            validator,
            configured,
            max_ts: resume.map_or(i64::MIN, |intent| intent.dedup_from_max_ts),
            last_ts: None,
            dedup: DedupMemory::new(dedup_window_ms),
            open: None,
            sealed: VecDeque::new(),
            replay: Cuts::new(replay),
            last_cells: 0,
        };
        // The dedup memory at the resume offset is rebuilt as the batch that ended there left
        // it: with that batch's rules.
        state.apply(resume.and_then(|intent| intent.rules).unwrap_or(configured));
        state
    }

    /// Decides from now on with `rules`.
    fn apply(&mut self, rules: Rules) {
        self.validator.retention_ms = rules.retention_ms;
        self.dedup.set_window_ms(rules.dedup_window_ms);
    }

    /// Feeds a message that precedes the resume offset into the dedup memory only (rebuilding
    /// the memory exactly as it was when the previous owner committed).
    ///
    /// The re-read starts at the recorded `dedup_from` with the clock at the recorded date of
    /// that message's sighting (`dedup_from_max_ts`), which is the clock after the message
    /// following it. The first message re-read has no witness before it, so it moves nothing;
    /// from the second on, every clock value and every date is the first pass's.
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

    /// The partition's clock, the "now" of every dedup decision, after a message stamped
    /// `timestamp`. Kafka's CreateTime is the producer's clock, so no single message is trusted
    /// to move it: the clock moves to the *earlier* of this message's timestamp and the previous
    /// message's, and never backwards. One message stamped ahead, by minutes, days or a
    /// microsecond timestamp, moves it not at all (the next honest message is earlier than it);
    /// honest traffic moves it, lagging at most one message. The previous message's sighting
    /// is dated by the clock this gives (see `dedup`). A pure function of the log, so a replay
    /// and the backfill compute the same clock (ARCHITECTURE.md, "Duplicates").
    fn advance_clock(&mut self, timestamp: Option<i64>) -> i64 {
        if let (Some(ts), Some(previous)) = (timestamp, self.last_ts) {
            self.max_ts = self.max_ts.max(ts.min(previous));
        }
        self.last_ts = timestamp;
        self.dedup.settle(self.max_ts);
        self.max_ts
    }

    /// Processes the next message of the partition.
    pub fn process(&mut self, message: Message<'_>) -> Outcome {
        let first_ts = message.timestamp.unwrap_or(self.max_ts.max(0));
        if self.open.is_none() {
            let (forced_end, recorded) = self
                .take_intent_starting_at(message.offset, first_ts)
                .map_or((None, None), |(end, rules)| (Some(end), rules));
            // A replayed batch decides with the rules its intent recorded, whatever the flags of
            // this process: the same rows under the same batch id.
            let rules = recorded.unwrap_or(self.configured);
            self.apply(rules);
            let mut batch = Batch::open(self.partition, message.offset, first_ts, forced_end);
            batch.rules = rules;
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
            None => Outcome::DeadLetter(crate::event::Rejection::InvalidJson),
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

    /// The forced end (and recorded rules) of the batch starting at `offset`, when an intent
    /// recorded it. An intent from another incarnation of the topic (different first timestamp)
    /// ends the replay.
    fn take_intent_starting_at(
        &mut self,
        offset: u64,
        first_ts: i64,
    ) -> Option<(u64, Option<Rules>)> {
        let intent = self.replay.take_starting_at(offset)?;
        if intent.first_ts == first_ts {
            return Some((intent.end_offset, intent.rules));
        }
        tracing::warn!(
            partition = self.partition,
            offset,
            "recorded intent belongs to another incarnation of the topic; ignoring intents"
        );
        self.replay.clear();
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
        // With nothing left in the window the re-read still takes the batch's last message:
        // the clock's next step needs its timestamp as the witness.
        let (dedup_from, dedup_from_max_ts) = self
            .dedup
            .rebuild_point(batch.max_ts)
            .unwrap_or((batch.end_offset - 1, batch.max_ts));
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
    use crate::event::{PlayEvent, Rejection};

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
            rules: None,
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
            rules: None,
        };
        let mut p = PartitionState::new(0, Validator::default(), WINDOW, None, vec![intent]);
        let e = play("x", 1, 1, T0);
        p.process(msg(0, T0, &e));
        assert!(!p.replaying());
        assert!(p.seal());
    }

    #[test]
    fn a_replay_decides_with_the_recorded_rules_and_new_batches_with_the_flags() {
        // Recorded with a 10-minute window: the second sighting of "x", 5 s later, was a
        // duplicate. Replayed by a worker configured with 1 s, it must still be one.
        let recorded = Rules {
            dedup_window_ms: WINDOW,
            retention_ms: Validator::default().retention_ms,
        };
        let intent = Intent {
            start_offset: 0,
            end_offset: 2,
            first_ts: T0,
            max_ts: T0 + 5_000,
            dedup_from: 0,
            dedup_from_max_ts: T0,
            rules: Some(recorded),
        };
        let mut p = PartitionState::new(0, Validator::default(), 1_000, None, vec![intent]);
        let x = play("x", 1, 1, T0);
        assert_eq!(p.process(msg(0, T0, &x)), Outcome::Counted);
        assert_eq!(p.process(msg(1, T0 + 5_000, &x)), Outcome::Duplicate);
        assert_eq!(p.sealed()[0].rules, recorded);
        // The next batch is new: the configured 1 s window decides it. (Another message first:
        // the partition's clock only takes a timestamp once the next message confirms it.)
        assert_eq!(
            p.process(msg(2, T0 + 10_000, &play("y", 1, 2, T0))),
            Outcome::Counted
        );
        assert_eq!(p.process(msg(3, T0 + 10_000, &x)), Outcome::Counted);
        p.seal();
        assert_eq!(p.sealed()[1].rules.dedup_window_ms, 1_000);
    }

    /// The clock reached after the messages so far: the date recorded for a resume at the end.
    fn clock(p: &mut PartitionState) -> i64 {
        assert!(p.seal());
        p.take_sealed().pop().expect("sealed").max_ts
    }

    #[test]
    fn one_message_stamped_ahead_moves_no_clock() {
        // A producer whose clock runs 20 minutes ahead sends one message between a play and
        // its retry 9 minutes later: the retry is inside the 10-minute window of the partition's
        // time, so it is a duplicate (with the running maximum it was counted twice).
        let mut p = fresh();
        let a = play("a", 1, 7, T0);
        let other = play("b", 2, 8, T0);
        assert_eq!(p.process(msg(0, T0, &a)), Outcome::Counted);
        assert_eq!(
            p.process(msg(1, T0 + 20 * 60_000, &other)),
            Outcome::Counted
        );
        assert_eq!(p.process(msg(2, T0 + 9 * 60_000, &a)), Outcome::Duplicate);
        // The clock is the earlier of the last two timestamps, never the skewed one.
        assert_eq!(clock(&mut p), T0 + 9 * 60_000);
    }

    #[test]
    fn far_future_and_microsecond_stamps_do_not_stop_eviction() {
        // 10 s window, one play a second; among them one message stamped three days ahead and
        // one stamped in microseconds. The memory stays the last 12 sightings (the window plus
        // the newest, whose date waits for the next message), as if they were not there.
        let window = 10_000;
        let mut p = PartitionState::new(0, Validator::default(), window, None, Vec::new());
        let mut offset = 0;
        for i in 0..2_000i64 {
            let ts = T0 + i * 1_000;
            let e = play(&format!("e{i}"), 1, 1, ts);
            assert_eq!(p.process(msg(offset, ts, &e)), Outcome::Counted);
            offset += 1;
            let skewed = match i {
                500 => Some(ts + 3 * 24 * 3_600_000),
                1_000 => Some(ts * 1_000),
                _ => None,
            };
            if let Some(kafka_ts) = skewed {
                // The play itself is honest: counted when its message's own timestamp admits it
                // (three days ahead), too old for a microsecond one.
                let expected = if i == 500 {
                    Outcome::Counted
                } else {
                    Outcome::DeadLetter(Rejection::TooOld)
                };
                let e = play(&format!("s{i}"), 2, 2, ts);
                assert_eq!(p.process(msg(offset, kafka_ts, &e)), expected);
                offset += 1;
            }
        }
        assert_eq!(p.dedup_bytes(), 12 * crate::counting::dedup::BYTES_PER_ID);
        // The clock lags the newest message by one: it is its predecessor's timestamp.
        assert_eq!(clock(&mut p), T0 + 1_998 * 1_000);
    }

    #[test]
    fn the_first_message_of_a_partition_does_not_set_the_clock_alone() {
        // The very first message of a partition (no intent, nothing before it) stamped in
        // microseconds: the clock waits for a second timestamp, then takes the earlier one.
        let window = 10_000;
        let mut p = PartitionState::new(0, Validator::default(), window, None, Vec::new());
        let first = play("first", 1, 1, T0);
        // Relative to its own (microsecond) Kafka timestamp the play is older than retention.
        assert_eq!(
            p.process(msg(0, T0 * 1_000, &first)),
            Outcome::DeadLetter(Rejection::TooOld)
        );
        for i in 1..100i64 {
            let ts = T0 + i * 1_000;
            assert_eq!(
                p.process(msg(i as u64, ts, &play(&format!("e{i}"), 1, 1, ts))),
                Outcome::Counted
            );
        }
        assert_eq!(p.dedup_bytes(), 12 * crate::counting::dedup::BYTES_PER_ID);
        assert_eq!(clock(&mut p), T0 + 98 * 1_000);
    }

    #[test]
    fn a_retry_of_the_first_play_after_a_quiet_hour_is_a_duplicate() {
        // After an hour without messages the first play cannot be confirmed at once (the clock
        // still shows the time before the pause when it arrives); its sighting is dated when
        // the next message confirms its time, so its retry 9 minutes later is still caught.
        let mut p = fresh();
        let hour = 3_600_000;
        assert_eq!(
            p.process(msg(0, T0, &play("a", 1, 1, T0))),
            Outcome::Counted
        );
        let b = play("b", 1, 2, T0 + hour);
        assert_eq!(p.process(msg(1, T0 + hour, &b)), Outcome::Counted);
        assert_eq!(
            p.process(msg(2, T0 + hour + 9 * 60_000, &b)),
            Outcome::Duplicate
        );
        assert_eq!(clock(&mut p), T0 + hour);
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
                rules: Some(batch.rules),
            }
        }

        /// The first owner: processes all of `log`, sealing after each offset `cuts` picks and
        /// at the end; its sealed batches.
        fn first_owner(log: &[(i64, Vec<u8>)], cuts: &[Index]) -> Vec<Batch> {
            let cut_after: std::collections::BTreeSet<usize> =
                cuts.iter().map(|i| i.index(log.len())).collect();
            let mut first =
                PartitionState::new(0, Validator::default(), DEDUP_WINDOW, None, Vec::new());
            for (offset, (ts, payload)) in log.iter().enumerate() {
                first.process(msg(offset as u64, *ts, payload));
                if cut_after.contains(&offset) {
                    first.seal();
                }
            }
            first.seal();
            first.take_sealed()
        }

        /// The first owner crashes after committing `batches[..k]`, every intent recorded: the
        /// committed offset, the intent the next owner resumes from and the ones it replays.
        fn crash_after(batches: &[Batch], k: usize) -> (u64, Option<Intent>, Vec<Intent>) {
            let committed = if k == 0 { 0 } else { batches[k - 1].end_offset };
            let resume = (k > 0).then(|| intent(&batches[k - 1]));
            let replay = batches[k..].iter().map(intent).collect();
            (committed, resume, replay)
        }

        /// The next owner: rebuilds dedup memory and clock from the resume intent, replays the
        /// recorded intents and reads `log` on from `committed`; its sealed batches.
        fn next_owner(
            log: &[(i64, Vec<u8>)],
            validator: Validator,
            window: i64,
            committed: u64,
            resume: Option<Intent>,
            replay: Vec<Intent>,
        ) -> Vec<Batch> {
            let mut next = PartitionState::new(0, validator, window, resume.as_ref(), replay);
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
            next.take_sealed()
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
                // The next owner may run with other flags (`--dedup-window`, `--retention`):
                // the replayed batches must not notice.
                next_window in prop::sample::select(vec![DEDUP_WINDOW, 1_000, 10 * DEDUP_WINDOW]),
                next_retention_minutes in prop::sample::select(vec![0i64, 5, 8 * 24 * 60]),
            ) {
                let log = messages(&specs);
                let batches = first_owner(&log, &cuts);
                prop_assert!(!batches.is_empty());

                // It crashes after committing batch k-1; every intent was recorded.
                let k = crash.index(batches.len() + 1);
                let (committed, resume, replay) = crash_after(&batches, k);

                let next_validator = if next_retention_minutes == 0 {
                    Validator::default()
                } else {
                    Validator { retention_ms: next_retention_minutes * 60_000 }
                };
                let rebuilt = next_owner(&log, next_validator, next_window, committed, resume, replay);
                prop_assert_eq!(rebuilt, batches[k..].to_vec());
            }
        }

        /// How a message's Kafka timestamp departs from the partition's honest time.
        #[derive(Debug, Clone, Copy)]
        enum Skew {
            None,
            /// A producer clock minutes or days ahead (or behind).
            By(i64),
            /// Microseconds where milliseconds were meant.
            Micros,
            /// The partition was quiet this long before the message (honest).
            Pause(i64),
        }

        fn skew() -> impl Strategy<Value = Skew> {
            prop_oneof![
                6 => Just(Skew::None),
                1 => prop::sample::select(vec![20 * 60_000, 3 * 86_400_000, -20 * 60_000])
                    .prop_map(Skew::By),
                1 => Just(Skew::Micros),
                1 => prop::sample::select(vec![5 * 60_000, 3_600_000]).prop_map(Skew::Pause),
            ]
        }

        proptest! {
            /// The same property on logs with producer clocks ahead and behind, microsecond
            /// timestamps and quiet spells: the clock, and so every dedup decision, is rebuilt
            /// exactly by a resume wherever the crash falls.
            #[test]
            fn resuming_with_skewed_producer_clocks_rebuilds_identical_batches(
                specs in prop::collection::vec(
                    (prop::bool::weighted(0.05), 1u64..3, 0u16..20, 0i64..40_000, skew()),
                    1..150,
                ),
                cuts in prop::collection::vec(any::<Index>(), 0..8),
                crash in any::<Index>(),
            ) {
                let mut honest = T0;
                let log: Vec<(i64, Vec<u8>)> = specs
                    .iter()
                    .map(|&(bad, user, id, step, skew)| {
                        honest += step;
                        let kafka_ts = match skew {
                            Skew::None => honest,
                            Skew::By(ms) => honest + ms,
                            Skew::Micros => honest * 1_000,
                            Skew::Pause(ms) => {
                                honest += ms;
                                honest
                            }
                        };
                        let payload = if bad {
                            b"{broken".to_vec()
                        } else {
                            // Retries (same id) carry the same play; its time is the honest one.
                            play(&format!("e{id}"), user, 1, T0 + i64::from(id) * 1_000)
                        };
                        (kafka_ts, payload)
                    })
                    .collect();
                let batches = first_owner(&log, &cuts);
                prop_assert!(!batches.is_empty());

                let k = crash.index(batches.len() + 1);
                let (committed, resume, replay) = crash_after(&batches, k);
                if let Some(resume) = &resume {
                    prop_assert!(resume.dedup_from < committed, "a resume always re-reads");
                }
                let rebuilt = next_owner(&log, Validator::default(), DEDUP_WINDOW, committed, resume, replay);
                prop_assert_eq!(rebuilt, batches[k..].to_vec());
            }
        }
    }
}
