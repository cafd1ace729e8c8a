//! The play-event contract: JSON values on the `plays` topic, keyed by the user id.
//!
//! ```json
//! {"event_id": "5f0c…", "user_id": 42, "song_id": 7, "timestamp": 1764432000123}
//! ```
//!
//! `timestamp` is integer milliseconds since the Unix epoch or an RFC 3339 string. Validation is
//! a pure function of the message (its bytes and its Kafka timestamp), never of the wall clock:
//! a replay after a crash must take exactly the decisions of the first run.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Longest accepted `event_id`, in bytes.
pub const MAX_EVENT_ID_BYTES: usize = 128;
/// How far past its Kafka timestamp an event's own timestamp may lie. Relative to the message's
/// own timestamp, not to the aggregator's partition clock: a play arriving after the partition
/// was quiet for longer than this looks, on arrival, exactly like one from a producer whose
/// clock runs ahead, and judging it against a clock that has not seen it yet would dead-letter
/// honest plays (ARCHITECTURE.md, "Duplicates"). With CreateTime the bound is therefore only as
/// good as the producer's clock; a topic with LogAppendTime makes it the broker's.
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1000;
/// Last millisecond whose minute fits the u32 seconds of [`PlayEvent::minute`] (and of
/// ClickHouse's `DateTime`): 2106-02-07T06:28:15.999Z.
pub const LAST_BUCKETABLE_MS: i64 = u32::MAX as i64 * 1000 + 999;
/// One minute in milliseconds.
pub const MINUTE_MS: i64 = 60_000;
/// The window: 10,080 one-minute buckets (7 days).
pub const WINDOW_MINUTES: i64 = 7 * 24 * 60;

/// A valid play.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayEvent {
    pub event_id: String,
    pub user_id: u64,
    pub song_id: u64,
    /// When the play happened, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

impl PlayEvent {
    /// Start of the event's own UTC minute, in seconds since the epoch.
    pub fn minute(&self) -> u32 {
        minute_of(self.timestamp_ms)
    }

    /// The contract's JSON encoding (timestamp in milliseconds).
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "event_id": self.event_id,
            "user_id": self.user_id,
            "song_id": self.song_id,
            "timestamp": self.timestamp_ms,
        })
        .to_string()
    }
}

/// A valid event whose event_id may still borrow from the payload it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidEvent<'a> {
    pub event_id: Cow<'a, str>,
    pub user_id: u64,
    pub song_id: u64,
    pub timestamp_ms: i64,
}

impl ValidEvent<'_> {
    /// Start of the event's own UTC minute, in seconds since the epoch.
    pub fn minute(&self) -> u32 {
        minute_of(self.timestamp_ms)
    }

    pub fn into_owned(self) -> PlayEvent {
        PlayEvent {
            event_id: self.event_id.into_owned(),
            user_id: self.user_id,
            song_id: self.song_id,
            timestamp_ms: self.timestamp_ms,
        }
    }
}

/// Start of the UTC minute containing `timestamp_ms`, in seconds since the epoch.
pub fn minute_of(timestamp_ms: i64) -> u32 {
    let minute_ms = timestamp_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
    u32::try_from(minute_ms / 1000).unwrap_or(0)
}

/// Why an event was not counted; the value of the `reason` header on the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The value is not a JSON object.
    InvalidJson,
    /// A required field is absent or null.
    MissingField,
    /// `user_id` or `song_id` is not an unsigned 64-bit integer.
    BadId,
    /// `event_id` is not a non-empty string of at most 128 bytes.
    BadEventId,
    /// `timestamp` is neither integer milliseconds nor an RFC 3339 string.
    BadTimestamp,
    /// `timestamp` lies more than 5 minutes after the message was produced.
    FutureTimestamp,
    /// `timestamp` is older than the retention when the message was produced.
    TooOld,
}

impl Rejection {
    pub const ALL: [Rejection; 7] = [
        Rejection::InvalidJson,
        Rejection::MissingField,
        Rejection::BadId,
        Rejection::BadEventId,
        Rejection::BadTimestamp,
        Rejection::FutureTimestamp,
        Rejection::TooOld,
    ];

    /// Stable snake_case name, used as DLQ header value and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::InvalidJson => "invalid_json",
            Rejection::MissingField => "missing_field",
            Rejection::BadId => "bad_id",
            Rejection::BadEventId => "bad_event_id",
            Rejection::BadTimestamp => "bad_timestamp",
            Rejection::FutureTimestamp => "future_timestamp",
            Rejection::TooOld => "too_old",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decides whether a message's value is a countable play.
#[derive(Debug, Clone, Copy)]
pub struct Validator {
    /// Events older than this (relative to the message's Kafka timestamp) are `too_old`.
    pub retention_ms: i64,
}

impl Default for Validator {
    fn default() -> Self {
        // The window plus one day: late plays for the oldest minute of the window still count.
        Validator {
            retention_ms: (WINDOW_MINUTES + 24 * 60) * MINUTE_MS,
        }
    }
}

/// The fast path: a well-formed event deserialises straight into this.
#[derive(Deserialize)]
struct WireEvent<'a> {
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    user_id: u64,
    song_id: u64,
    #[serde(borrow)]
    timestamp: WireTimestamp<'a>,
}

/// Epoch milliseconds or RFC 3339 text. Deserialised by hand: serde's `untagged` buffers every
/// value into its generic `Content` first, which showed in the ingest profile.
enum WireTimestamp<'a> {
    Millis(i64),
    Text(Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for WireTimestamp<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = WireTimestamp<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("epoch milliseconds (an integer) or an RFC 3339 string")
            }
            fn visit_i64<E: serde::de::Error>(self, ms: i64) -> Result<Self::Value, E> {
                Ok(WireTimestamp::Millis(ms))
            }
            fn visit_u64<E: serde::de::Error>(self, ms: u64) -> Result<Self::Value, E> {
                i64::try_from(ms)
                    .map(WireTimestamp::Millis)
                    .map_err(|_| E::custom("timestamp out of range"))
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                text: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(WireTimestamp::Text(Cow::Borrowed(text)))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(WireTimestamp::Text(Cow::Owned(text.to_owned())))
            }
        }
        deserializer.deserialize_any(Visitor(std::marker::PhantomData))
    }
}

impl Validator {
    /// Validates `payload`, produced at `produced_at_ms` (the Kafka message timestamp).
    pub fn validate(&self, payload: &[u8], produced_at_ms: i64) -> Result<PlayEvent, Rejection> {
        self.validate_borrowed(payload, produced_at_ms)
            .map(ValidEvent::into_owned)
    }

    /// [`Validator::validate`] without copying the event_id out of `payload` (the aggregator's
    /// hot path only hashes it: one allocation less per message).
    pub fn validate_borrowed<'a>(
        &self,
        payload: &'a [u8],
        produced_at_ms: i64,
    ) -> Result<ValidEvent<'a>, Rejection> {
        // The contract is a JSON object: serde's derived struct would also read an array of the
        // four fields. And the whole value must be UTF-8: serde_json skips an unknown field's
        // string without checking it. (Both found by the `event` fuzz target.)
        if payload.trim_ascii_start().first() != Some(&b'{') {
            return Err(Rejection::InvalidJson);
        }
        let Ok(text) = std::str::from_utf8(payload) else {
            return Err(Rejection::InvalidJson);
        };
        let event = match serde_json::from_str::<WireEvent<'_>>(text) {
            Ok(wire) => {
                let timestamp_ms = match wire.timestamp {
                    WireTimestamp::Millis(ms) => ms,
                    WireTimestamp::Text(text) => parse_rfc3339_ms(&text)?,
                };
                ValidEvent {
                    event_id: wire.event_id,
                    user_id: wire.user_id,
                    song_id: wire.song_id,
                    timestamp_ms,
                }
            }
            Err(_) => return Err(classify_malformed(payload)),
        };
        if event.event_id.is_empty() || event.event_id.len() > MAX_EVENT_ID_BYTES {
            return Err(Rejection::BadEventId);
        }
        if event.timestamp_ms < 0 {
            return Err(Rejection::BadTimestamp);
        }
        if event.timestamp_ms > produced_at_ms.saturating_add(MAX_FUTURE_MS) {
            return Err(Rejection::FutureTimestamp);
        }
        if event.timestamp_ms < produced_at_ms.saturating_sub(self.retention_ms) {
            return Err(Rejection::TooOld);
        }
        // A minute is u32 seconds (as ClickHouse's `DateTime`): past 2106-02-07 it would wrap to
        // 1970. Only reachable when the message's Kafka timestamp is that late too.
        if event.timestamp_ms > LAST_BUCKETABLE_MS {
            return Err(Rejection::BadTimestamp);
        }
        Ok(event)
    }
}

fn parse_rfc3339_ms(text: &str) -> Result<i64, Rejection> {
    let at = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| Rejection::BadTimestamp)?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| Rejection::BadTimestamp)
}

/// The slow path, only for values the fast path refused: find the most precise reason.
fn classify_malformed(payload: &[u8]) -> Rejection {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(payload) else {
        return Rejection::InvalidJson;
    };
    let present = |name: &str| fields.get(name).filter(|v| !v.is_null());
    let (Some(event_id), Some(user_id), Some(song_id), Some(timestamp)) = (
        present("event_id"),
        present("user_id"),
        present("song_id"),
        present("timestamp"),
    ) else {
        return Rejection::MissingField;
    };
    if !event_id.is_string() {
        return Rejection::BadEventId;
    }
    if user_id.as_u64().is_none() || song_id.as_u64().is_none() {
        return Rejection::BadId;
    }
    match timestamp {
        Value::String(text) if parse_rfc3339_ms(text).is_ok() => {}
        Value::Number(n) if n.as_i64().is_some() => {}
        _ => return Rejection::BadTimestamp,
    }
    // Every field is individually fine, yet the fast path failed: treat as malformed JSON.
    Rejection::InvalidJson
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_432_000_123;

    fn check(payload: &str) -> Result<PlayEvent, Rejection> {
        Validator::default().validate(payload.as_bytes(), NOW)
    }

    #[test]
    fn accepts_millis_and_rfc3339() {
        let e = check(r#"{"event_id":"a","user_id":42,"song_id":7,"timestamp":1764432000123}"#);
        assert_eq!(
            e,
            Ok(PlayEvent {
                event_id: "a".into(),
                user_id: 42,
                song_id: 7,
                timestamp_ms: NOW
            })
        );
        let e = check(
            r#"{"event_id":"b","user_id":1,"song_id":2,"timestamp":"2025-11-29T16:00:00.123Z"}"#,
        )
        .unwrap();
        assert_eq!(e.timestamp_ms, NOW);
        assert_eq!(e.minute(), 1_764_432_000);
    }

    #[test]
    fn accepts_unknown_extra_fields_and_max_ids() {
        let e = check(&format!(
            r#"{{"event_id":"{}","user_id":18446744073709551615,"song_id":0,"timestamp":{NOW},"client":"ios"}}"#,
            "x".repeat(128)
        ))
        .unwrap();
        assert_eq!(e.user_id, u64::MAX);
    }

    #[test]
    fn rejects_with_precise_reasons() {
        let cases = [
            ("not json", Rejection::InvalidJson),
            ("[1,2]", Rejection::InvalidJson),
            (
                r#"{"event_id":"a","user_id":1,"song_id":2}"#,
                Rejection::MissingField,
            ),
            (
                r#"{"event_id":null,"user_id":1,"song_id":2,"timestamp":1}"#,
                Rejection::MissingField,
            ),
            (
                r#"{"event_id":"a","user_id":-1,"song_id":2,"timestamp":1}"#,
                Rejection::BadId,
            ),
            (
                r#"{"event_id":"a","user_id":"1","song_id":2,"timestamp":1}"#,
                Rejection::BadId,
            ),
            (
                r#"{"event_id":"a","user_id":1.5,"song_id":2,"timestamp":1}"#,
                Rejection::BadId,
            ),
            (
                r#"{"event_id":"","user_id":1,"song_id":2,"timestamp":1}"#,
                Rejection::BadEventId,
            ),
            (
                r#"{"event_id":7,"user_id":1,"song_id":2,"timestamp":1}"#,
                Rejection::BadEventId,
            ),
            (
                r#"{"event_id":"a","user_id":1,"song_id":2,"timestamp":"yesterday"}"#,
                Rejection::BadTimestamp,
            ),
            (
                r#"{"event_id":"a","user_id":1,"song_id":2,"timestamp":1.5}"#,
                Rejection::BadTimestamp,
            ),
            (
                r#"{"event_id":"a","user_id":1,"song_id":2,"timestamp":-5}"#,
                Rejection::BadTimestamp,
            ),
        ];
        for (payload, reason) in cases {
            assert_eq!(check(payload), Err(reason), "{payload}");
        }
        let long_id = format!(
            r#"{{"event_id":"{}","user_id":1,"song_id":2,"timestamp":{NOW}}}"#,
            "x".repeat(129)
        );
        assert_eq!(check(&long_id), Err(Rejection::BadEventId));
    }

    #[test]
    fn time_bounds_are_relative_to_the_message_timestamp() {
        let at =
            |ts: i64| format!(r#"{{"event_id":"a","user_id":1,"song_id":2,"timestamp":{ts}}}"#);
        let v = Validator::default();
        assert!(check(&at(NOW + MAX_FUTURE_MS)).is_ok());
        assert_eq!(
            check(&at(NOW + MAX_FUTURE_MS + 1)),
            Err(Rejection::FutureTimestamp)
        );
        assert!(check(&at(NOW - v.retention_ms)).is_ok());
        assert_eq!(check(&at(NOW - v.retention_ms - 1)), Err(Rejection::TooOld));
    }

    #[test]
    fn minute_buckets_floor_to_utc_minutes() {
        assert_eq!(minute_of(0), 0);
        assert_eq!(minute_of(59_999), 0);
        assert_eq!(minute_of(60_000), 60);
        assert_eq!(minute_of(1_764_432_059_999), 1_764_432_000);
    }

    #[test]
    fn to_json_round_trips() {
        let e = PlayEvent {
            event_id: "z".into(),
            user_id: 9,
            song_id: 3,
            timestamp_ms: NOW,
        };
        assert_eq!(
            Validator::default().validate(e.to_json().as_bytes(), NOW),
            Ok(e)
        );
    }
}
