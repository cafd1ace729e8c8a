//! The archive's content: one JSON line per Kafka message, exactly as received, in zstd-compressed
//! NDJSON objects.
//!
//! ```json
//! {"partition":3,"offset":1200,"timestamp":1764432000123,"key":"42","value":"{\"event_id\":…}"}
//! ```
//!
//! `key` and `value` hold the bytes as a JSON string when they are valid UTF-8, otherwise they are
//! absent and `key_b64` / `value_b64` hold them in standard base64; a missing key or value (a
//! tombstone) has neither. The encoding is a pure function of the messages (field order fixed,
//! no clock, fixed compression level), so re-archiving an offset range after a crash produces the
//! same bytes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

/// zstd level of every object: fixed, so a rewrite of a range is byte-identical.
const ZSTD_LEVEL: i32 = 3;

/// One archived Kafka message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub partition: i32,
    pub offset: u64,
    /// The broker's message timestamp in milliseconds, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_b64: Option<String>,
}

/// Why an object cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a zstd stream")]
    Zstd(#[source] std::io::Error),
    #[error("line {line}")]
    Line {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("line {line}: bad base64")]
    Base64 {
        line: usize,
        #[source]
        source: base64::DecodeError,
    },
}

fn text_or_b64(bytes: Option<&[u8]>) -> (Option<String>, Option<String>) {
    match bytes {
        None => (None, None),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (None, Some(BASE64.encode(bytes))),
        },
    }
}

fn bytes_of(
    text: &Option<String>,
    b64: &Option<String>,
) -> Result<Option<Vec<u8>>, base64::DecodeError> {
    match (text, b64) {
        (Some(text), _) => Ok(Some(text.as_bytes().to_vec())),
        (None, Some(b64)) => BASE64.decode(b64).map(Some),
        (None, None) => Ok(None),
    }
}

impl Record {
    pub fn new(
        partition: i32,
        offset: u64,
        timestamp: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Self {
        let (key, key_b64) = text_or_b64(key);
        let (value, value_b64) = text_or_b64(value);
        Record {
            partition,
            offset,
            timestamp,
            key,
            key_b64,
            value,
            value_b64,
        }
    }

    /// The key's bytes as received.
    pub fn key_bytes(&self) -> Result<Option<Vec<u8>>, base64::DecodeError> {
        bytes_of(&self.key, &self.key_b64)
    }

    /// The value's bytes as received.
    pub fn value_bytes(&self) -> Result<Option<Vec<u8>>, base64::DecodeError> {
        bytes_of(&self.value, &self.value_b64)
    }

    /// Appends the record's line (with its newline) to `out`.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        // Serialising a struct of strings and integers into a Vec cannot fail.
        serde_json::to_writer(&mut *out, self).expect("a record serialises");
        out.push(b'\n');
    }
}

/// Compresses NDJSON lines into an object body.
pub fn compress(lines: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(lines, ZSTD_LEVEL).expect("zstd compresses in memory")
}

/// Decodes an object body into its records, in the order they were written.
pub fn decode(body: &[u8]) -> Result<Vec<Record>, DecodeError> {
    let lines = zstd::decode_all(body).map_err(DecodeError::Zstd)?;
    lines
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .enumerate()
        .map(|(i, line)| {
            let record: Record =
                serde_json::from_slice(line).map_err(|source| DecodeError::Line {
                    line: i + 1,
                    source,
                })?;
            // Reject bad base64 here, so every record handed out has readable bytes.
            record
                .key_bytes()
                .and(record.value_bytes())
                .map_err(|source| DecodeError::Base64 {
                    line: i + 1,
                    source,
                })?;
            Ok(record)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_exactly_whatever_they_are() {
        type KeyValue<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);
        let cases: [KeyValue<'_>; 4] = [
            (Some(b"42"), Some(br#"{"event_id":"a"}"#)),
            (None, None),
            (Some(&[0xff, 0x00, 0x80]), Some(b"not json \n with newline")),
            (Some(b""), Some(&[0xc3, 0x28])),
        ];
        let mut lines = Vec::new();
        for (i, (key, value)) in cases.iter().enumerate() {
            Record::new(1, i as u64, Some(7), *key, *value).write_line(&mut lines);
        }
        let records = decode(&compress(&lines)).unwrap();
        assert_eq!(records.len(), cases.len());
        for (record, (key, value)) in records.iter().zip(cases) {
            assert_eq!(record.key_bytes().unwrap().as_deref(), key);
            assert_eq!(record.value_bytes().unwrap().as_deref(), value);
        }
        assert_eq!(records[2].key_b64.as_deref(), Some("/wCA"));
    }

    #[test]
    fn encoding_is_deterministic() {
        let encode = || {
            let mut lines = Vec::new();
            for offset in 0..1_000u64 {
                Record::new(0, offset, Some(offset as i64), Some(b"k"), Some(b"v"))
                    .write_line(&mut lines);
            }
            compress(&lines)
        };
        assert_eq!(encode(), encode());
    }
}
