//! Forced cuts: the ranges a previous owner of a partition recorded (the aggregator's flush
//! intents, the archiver's objects) from the offset the partition resumes at. A batch that
//! starts where a recorded range starts must end where it ended, so that the rewrite has the
//! same identity and the same content; ranges the log has moved past are skipped.

use std::collections::VecDeque;

/// A recorded offset range of one partition.
pub trait Recorded {
    /// Its first offset.
    fn first(&self) -> u64;
}

/// The recorded ranges still ahead of a resumed partition, in offset order.
#[derive(Debug, Clone)]
pub struct Cuts<T> {
    ahead: VecDeque<T>,
}

impl<T> Default for Cuts<T> {
    fn default() -> Self {
        Cuts {
            ahead: VecDeque::new(),
        }
    }
}

impl<T: Recorded> Cuts<T> {
    /// The ranges recorded from the resume offset on, sorted by first offset.
    pub fn new(recorded: impl Into<VecDeque<T>>) -> Self {
        Cuts {
            ahead: recorded.into(),
        }
    }

    /// The recorded range starting exactly at `offset`, where a batch opens; ranges starting
    /// before it are passed for good.
    pub fn take_starting_at(&mut self, offset: u64) -> Option<T> {
        while let Some(front) = self.ahead.front() {
            if front.first() < offset {
                self.ahead.pop_front();
                continue;
            }
            return if front.first() == offset {
                self.ahead.pop_front()
            } else {
                None
            };
        }
        None
    }

    /// Forgets every range ahead (they belong to another history of the topic).
    pub fn clear(&mut self) {
        self.ahead.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Recorded for (u64, u64) {
        fn first(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn a_cut_is_taken_only_where_it_starts_and_passed_ranges_go() {
        let mut cuts = Cuts::new(vec![(10, 20), (20, 30), (40, 50)]);
        // Nothing starts at 5, and nothing ahead is passed by it.
        assert_eq!(cuts.take_starting_at(5), None);
        assert_eq!(cuts.take_starting_at(10), Some((10, 20)));
        // 20..30 was cut across (a batch opened at 25): passed for good.
        assert_eq!(cuts.take_starting_at(25), None);
        assert_eq!(cuts.take_starting_at(20), None);
        assert_eq!(cuts.take_starting_at(40), Some((40, 50)));
        assert_eq!(cuts.take_starting_at(60), None);
        // Another history of the topic: what is ahead is forgotten.
        let mut cuts = Cuts::new(vec![(10, 20)]);
        cuts.clear();
        assert_eq!(cuts.take_starting_at(10), None);
    }
}
