//! The partitions an aggregator holds: their state, their ownership generation (fencing) and
//! the bytes they take (`--max-state-bytes`), kept current per message.

use std::collections::HashMap;
use std::time::Instant;

use topk::counting::batch::Batch;
use topk::counting::partition::{Message, Outcome, PartitionState};

#[derive(Default)]
pub(crate) struct Core {
    pub(crate) partitions: HashMap<i32, PartitionState>,
    /// Ownership generation of each held partition: a new number each time it is resumed. A
    /// flush writes and commits a partition's batches only while the partition is still held in
    /// the generation it took them from, and puts them back only into that generation (fencing:
    /// a flush that outlives its partitions writes nothing more of them).
    pub(crate) generations: HashMap<i32, u64>,
    next_generation: u64,
    /// Until when (this host's monotonic clock) an intent insert already sent may still be
    /// applied by the server; `None` when none is unsettled. A revoke lets its partitions go only
    /// after this instant, so no intent of theirs can land after the handover.
    pub(crate) intent_pending_until: Option<Instant>,
    /// Bytes of all partitions' state, and the part of it a flush can free: kept current by
    /// [`Core::process`] per message and recounted by [`Core::recount`] after anything else
    /// changes the partitions, so the per-message cap check does not walk every partition.
    bytes: u64,
    flushable: u64,
}

impl Core {
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Recounts the sizes after partitions were added, removed, flushed or restored.
    pub(crate) fn recount(&mut self) {
        (self.bytes, self.flushable) =
            self.partitions
                .values()
                .fold((0, 0), |(all, flushable), state| {
                    let batches = state.flushable_bytes();
                    (all + batches + state.dedup_bytes(), flushable + batches)
                });
    }

    /// Holds a resumed partition in a generation of its own.
    pub(crate) fn hold(&mut self, partition: i32, state: PartitionState) {
        self.next_generation += 1;
        self.generations.insert(partition, self.next_generation);
        self.partitions.insert(partition, state);
        self.recount();
    }

    /// Gives partitions up: their state goes, and a flush holding batches of them (of the
    /// generation that ends here) writes, commits and restores nothing more of them.
    pub(crate) fn give_up(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.partitions.remove(p);
            self.generations.remove(p);
        }
        self.recount();
    }

    /// Keeps only the batches of partitions still held in the generation they were taken from;
    /// nothing at all once the consumer says the whole assignment is lost (the group gave it
    /// away; the revoke callback that follows gives the partitions up).
    pub(crate) fn retain_held(&self, taken: &mut Vec<Taken>, assignment_lost: bool) {
        if assignment_lost {
            taken.clear();
        }
        taken.retain(|t| self.generations.get(&t.partition) == Some(&t.generation));
    }

    /// Processes one message of a known partition, returning its outcome with the state bytes
    /// and the flushable bytes after it; `None` if the partition is not assigned.
    pub(crate) fn process(
        &mut self,
        partition: i32,
        message: Message<'_>,
    ) -> Option<(Outcome, u64, u64)> {
        let state = self.partitions.get_mut(&partition)?;
        let (batches, dedup) = (state.flushable_bytes(), state.dedup_bytes());
        let outcome = state.process(message);
        let (batches_now, dedup_now) = (state.flushable_bytes(), state.dedup_bytes());
        self.flushable = self.flushable + batches_now - batches;
        self.bytes = self.bytes + batches_now + dedup_now - batches - dedup;
        Some((outcome, self.bytes, self.flushable))
    }
}

/// The sealed batches of one partition a flush has taken out, and the generation they are of.
pub(crate) struct Taken {
    pub(crate) partition: i32,
    pub(crate) generation: u64,
    pub(crate) batches: Vec<Batch>,
}
