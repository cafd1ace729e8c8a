//! Object names: `<topic>/p=<partition>/<first>-<last>-t<max_ts>.ndjson.zst`.
//!
//! `first` and `last` are the first and last offsets the object holds (20 digits, zero-padded, so
//! that lexicographic order is offset order and a listing can start at an offset); `max_ts` is
//! the greatest broker timestamp inside (lets a backfill skip objects that cannot matter without
//! downloading them). The name is a function of the offset range alone (the log below the high
//! watermark is immutable), so a range archived twice lands on the same name.

use object_store::path::Path;

/// Suffix of every archive object.
pub const SUFFIX: &str = ".ndjson.zst";

/// The identity of one archive object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub partition: i32,
    pub first: u64,
    pub last: u64,
    pub max_ts: i64,
}

/// Folder of a topic's objects.
pub fn topic_dir(topic: &str) -> Path {
    Path::from(topic)
}

/// Folder of one partition's objects.
pub fn partition_dir(topic: &str, partition: i32) -> Path {
    Path::from(format!("{topic}/p={partition}"))
}

/// Listing offset that returns exactly the objects of `partition` whose first offset is at
/// least `offset`: `list_with_offset` returns names strictly greater than this one, and it is a
/// proper prefix of the names starting at `offset` while every earlier start sorts below it.
pub fn listing_offset(topic: &str, partition: i32, offset: u64) -> Path {
    Path::from(format!("{topic}/p={partition}/{offset:020}"))
}

impl ObjectName {
    pub fn path(&self, topic: &str) -> Path {
        Path::from(format!(
            "{topic}/p={}/{:020}-{:020}-t{}{SUFFIX}",
            self.partition,
            self.first,
            self.last,
            self.max_ts.max(0)
        ))
    }

    /// Parses an object's path; `None` for anything that is not an archive object.
    pub fn parse(path: &Path) -> Option<ObjectName> {
        let mut parts = path.parts().collect::<Vec<_>>().into_iter().rev();
        let file = parts.next()?;
        let dir = parts.next()?;
        let partition = dir.as_ref().strip_prefix("p=")?.parse().ok()?;
        let stem = file.as_ref().strip_suffix(SUFFIX)?;
        let mut fields = stem.splitn(3, '-');
        let first = fields.next()?.parse().ok()?;
        let last = fields.next()?.parse().ok()?;
        let max_ts = fields.next()?.strip_prefix('t')?.parse().ok()?;
        (first <= last).then_some(ObjectName {
            partition,
            first,
            last,
            max_ts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_by_offset() {
        let a = ObjectName {
            partition: 3,
            first: 9,
            last: 120,
            max_ts: 1_764_432_000_123,
        };
        let path = a.path("plays");
        assert_eq!(
            path.as_ref(),
            "plays/p=3/00000000000000000009-00000000000000000120-t1764432000123.ndjson.zst"
        );
        assert_eq!(ObjectName::parse(&path), Some(a));
        let b = ObjectName {
            first: 121,
            last: 121,
            ..a
        };
        assert!(a.path("plays") < b.path("plays"));
        assert_eq!(ObjectName::parse(&Path::from("plays/p=3/x.json")), None);
        assert!(listing_offset("plays", 3, 9) < a.path("plays"));
        assert!(listing_offset("plays", 3, 10) > a.path("plays"));
    }
}
