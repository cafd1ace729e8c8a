//! The play-event validator (`topk::event`) on arbitrary bytes.
//!
//! Input: 8 bytes of Kafka timestamp (little-endian i64 milliseconds, the validator's "now"),
//! then the message value. Shorter inputs are a value alone, produced at a fixed instant.
//!
//! Properties: `validate` never panics, whatever the bytes; an accepted event is what the
//! contract (docs/contracts.md, "Play event"; `src/event.rs`) says a countable play is, checked
//! against an independent reading of the same bytes with `serde_json::Value`; and its own JSON
//! encoding is accepted as the same event (what the aggregator counts is what the payload said).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use topk::event::{MAX_EVENT_ID_BYTES, MAX_FUTURE_MS, MINUTE_MS, PlayEvent, Validator, minute_of};

/// 2025-11-29T16:00:00.123Z, for inputs too short to carry a timestamp.
const DEFAULT_PRODUCED_AT_MS: i64 = 1_764_432_000_123;

/// Last millisecond whose minute fits the `u32` seconds of `PlayEvent::minute` (and of
/// ClickHouse's `DateTime`): 2106-02-07T06:28:15.999Z.
const LAST_BUCKETABLE_MS: i64 = u32::MAX as i64 * 1000 + 999;

/// Found by this target and fixed: serde derives accept a JSON array for a struct, so the
/// validator accepted `["a",42,7,1764432000123]` as a play (regression test
/// `a_json_array_is_not_a_play` in tests/malformed_corpus.rs).
const REFUSES_ARRAYS: bool = true;

/// Found by this target and fixed: the minute of an event past 2106 does not fit the u32
/// seconds of `PlayEvent::minute`, which answered 0 (1970), and the validator accepted such an
/// event when the message's Kafka timestamp (set by the producer) was past 2106 too (regression
/// test `an_event_past_2106_is_not_bucketed_in_1970`). Kafka timestamps now range freely.
const REFUSES_UNBUCKETABLE: bool = true;

fuzz_target!(|data: &[u8]| {
    let (produced_at_ms, payload) = match data.split_first_chunk::<8>() {
        Some((ts, rest)) => (i64::from_le_bytes(*ts), rest),
        None => (DEFAULT_PRODUCED_AT_MS, data),
    };
    let produced_at_ms = if REFUSES_UNBUCKETABLE {
        produced_at_ms
    } else {
        produced_at_ms.min(LAST_BUCKETABLE_MS - MAX_FUTURE_MS)
    };
    let validator = Validator::default();
    let Ok(event) = validator.validate(payload, produced_at_ms) else {
        // Any rejection is a fine answer for garbage; the reason's precision is checked by the
        // unit tests and the malformed-event corpus (tests/malformed_corpus.rs).
        return;
    };
    check_accepted(&validator, payload, produced_at_ms, &event);
});

/// The contract's four fields, each as whatever JSON value it holds.
#[derive(serde::Deserialize)]
struct Fields {
    event_id: Option<Value>,
    user_id: Option<Value>,
    song_id: Option<Value>,
    timestamp: Option<Value>,
}

fn check_accepted(validator: &Validator, payload: &[u8], produced_at_ms: i64, event: &PlayEvent) {
    // The event id: a non-empty string of at most 128 bytes.
    assert!(!event.event_id.is_empty());
    assert!(event.event_id.len() <= MAX_EVENT_ID_BYTES);

    // The time bounds, relative to the message's own Kafka timestamp.
    assert!(event.timestamp_ms >= 0, "negative timestamp accepted");
    assert!(event.timestamp_ms <= produced_at_ms.saturating_add(MAX_FUTURE_MS));
    assert!(event.timestamp_ms >= produced_at_ms.saturating_sub(validator.retention_ms));

    // The bucket: the UTC minute containing the timestamp.
    let minute_ms = i64::from(event.minute()) * 1000;
    assert!(
        minute_ms <= event.timestamp_ms && event.timestamp_ms < minute_ms + MINUTE_MS,
        "timestamp {} bucketed at minute {}",
        event.timestamp_ms,
        event.minute()
    );
    assert_eq!(minute_ms % MINUTE_MS, 0);
    assert_eq!(event.minute(), minute_of(event.timestamp_ms));

    // An independent reading of the same bytes agrees on every field: the payload is a JSON
    // object whose four fields, each read as a JSON value, are what the validator returned.
    // Unknown fields are skipped as the validator skips them. Found by this target and fixed:
    // serde_json skips unknown fields without checking the UTF-8 of their strings, so a value
    // with invalid UTF-8 inside an unknown field was accepted although it is not JSON (seed
    // `accepted_non_utf8_in_unknown_field`); an accepted payload is now always UTF-8.
    assert!(std::str::from_utf8(payload).is_ok(), "accepted a payload that is not UTF-8");
    if REFUSES_ARRAYS {
        assert_eq!(
            payload.trim_ascii_start().first(),
            Some(&b'{'),
            "accepted a value that is not a JSON object"
        );
    }
    let Ok(fields) = serde_json::from_slice::<Fields>(payload) else {
        panic!("accepted a value that is not a JSON object");
    };
    assert_eq!(
        fields.event_id.as_ref().and_then(Value::as_str),
        Some(event.event_id.as_str())
    );
    assert_eq!(
        fields.user_id.as_ref().and_then(Value::as_u64),
        Some(event.user_id)
    );
    assert_eq!(
        fields.song_id.as_ref().and_then(Value::as_u64),
        Some(event.song_id)
    );
    let timestamp_ms = match &fields.timestamp {
        Some(Value::Number(n)) => n.as_i64().expect("an integer timestamp"),
        Some(Value::String(text)) => {
            let at = OffsetDateTime::parse(text, &Rfc3339).expect("an RFC 3339 timestamp");
            i64::try_from(at.unix_timestamp_nanos() / 1_000_000).expect("milliseconds fit i64")
        }
        other => panic!("accepted timestamp {other:?}"),
    };
    assert_eq!(timestamp_ms, event.timestamp_ms);

    // Round trip: the contract's encoding of the event is the same event.
    assert_eq!(
        validator.validate(event.to_json().as_bytes(), produced_at_ms),
        Ok(event.clone())
    );
}
