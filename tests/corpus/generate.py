#!/usr/bin/env python3
"""Writes tests/corpus/malformed/<reason>/<case>.bin: malformed play events, each the exact bytes
of one Kafka message value, in a directory named after the dead-letter reason the aggregator must
give it. Kept in git (the files are the corpus; this script only documents how they were made
and regenerates them: `python3 tests/corpus/generate.py`).

Every time-dependent case is relative to CORPUS_NOW_MS, which tests/malformed_corpus.rs sets as
the Kafka timestamp of every message: validation depends only on the message, so the corpus is
byte-exact and needs no templating. The two 1 MiB cases are built by the test itself (see
`big_cases` there) instead of being checked in.
"""
import json
import os
import shutil

CORPUS_NOW_MS = 1_764_432_000_000  # 2025-11-29T16:00:00Z
MAX_FUTURE_MS = 5 * 60 * 1000
RETENTION_MS = (7 * 24 * 60 + 24 * 60) * 60_000  # the window plus one day

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "malformed")


def obj(event_id='"e"', user_id="1", song_id="2", timestamp=str(CORPUS_NOW_MS), extra=""):
    """A play with raw JSON text for each field (None: the field is left out)."""
    fields = [("event_id", event_id), ("user_id", user_id), ("song_id", song_id), ("timestamp", timestamp)]
    body = ",".join(f'"{k}":{v}' for k, v in fields if v is not None)
    return "{" + body + extra + "}"


VALID = obj()

CASES = {
    "invalid_json": {
        "empty": b"",
        "not_json": "not json at all",
        "truncated_in_key": VALID[:40],
        "truncated_before_close": VALID[:-1],
        "truncated_in_string": '{"event_id":"abc',
        "top_level_array": "[" + VALID + "]",
        "top_level_string": json.dumps(VALID),
        "top_level_number": "42",
        "top_level_null": "null",
        "non_utf8_bytes": b"\xff\xfe\xfd\x00\x80",
        "non_utf8_in_event_id": VALID.replace('"e"', '"e\xff"').encode("latin-1"),
        "utf8_bom": b"\xef\xbb\xbf" + VALID.encode(),
        "trailing_garbage": VALID + "}",
        "two_objects": VALID + VALID,
        "nested_junk_10k_deep": "[" * 10_000 + "]" * 10_000,
        # Deeper than serde_json's recursion limit (128), so not even the slow path can read the
        # value. (The same nesting in an unknown extra field is skipped and the play accepted.)
        "event_id_nested_200_deep": obj(event_id='{"a":' * 200 + "1" + "}" * 200),
        "duplicate_user_id": obj(extra=',"user_id":3'),
        "nul_bytes": b"\x00\x00\x00\x00",
        "js_comment": "{/* c */" + VALID[1:],
        "single_quotes": VALID.replace('"', "'"),
        "nan_timestamp": obj(timestamp="NaN"),
        "number_out_of_f64_range": obj(user_id="1e400"),
        "unquoted_key": VALID.replace('"song_id"', "song_id"),
    },
    "missing_field": {
        "empty_object": "{}",
        "no_song_id": obj(song_id=None),
        "no_timestamp": obj(timestamp=None),
        "no_event_id": obj(event_id=None),
        "null_user_id": obj(user_id="null"),
        "all_null": obj(event_id="null", user_id="null", song_id="null", timestamp="null"),
        "camel_case_names": '{"eventId":"e","userId":1,"songId":2,"timestamp":%d}' % CORPUS_NOW_MS,
        "fields_nested_in_data": '{"data":' + VALID + "}",
        "missing_wins_over_bad_types": obj(event_id="7", user_id="-1", song_id=None),
    },
    "bad_id": {
        "negative_user_id": obj(user_id="-5"),
        "negative_song_id": obj(song_id="-1"),
        "string_user_id": obj(user_id='"1"'),
        "float_user_id": obj(user_id="1.5"),
        "exponent_song_id": obj(song_id="1e3"),
        "u64_max_plus_one": obj(user_id="18446744073709551616"),
        "huge_integer": obj(song_id="9" * 40),
        "bool_user_id": obj(user_id="true"),
        "object_song_id": obj(song_id='{"id":1}'),
        "array_user_id": obj(user_id="[1]"),
    },
    "bad_event_id": {
        "empty": obj(event_id='""'),
        "129_bytes": obj(event_id=json.dumps("x" * 129)),
        "129_bytes_in_43_chars": obj(event_id='"' + "\u20ac" * 43 + '"').encode("utf-8"),
        "number": obj(event_id="7"),
        "array": obj(event_id='["e"]'),
        "object": obj(event_id='{"id":"e"}'),
        "bool": obj(event_id="false"),
        "bad_id_too_event_id_first": obj(event_id="7", user_id="-1"),
    },
    "bad_timestamp": {
        "word": obj(timestamp='"yesterday"'),
        "float": obj(timestamp="1764432000000.5"),
        "negative": obj(timestamp="-5"),
        "bool": obj(timestamp="true"),
        "object": obj(timestamp='{"ms":1}'),
        "rfc3339_without_offset": obj(timestamp='"2025-11-29T16:00:00"'),
        "date_only": obj(timestamp='"2025-11-29"'),
        "impossible_date": obj(timestamp='"2025-13-45T99:00:00Z"'),
        "seconds_as_string": obj(timestamp='"1764432000"'),
        "u64_max": obj(timestamp="18446744073709551615"),
        "beyond_u64": obj(timestamp="9" * 30),
        "empty_string": obj(timestamp='""'),
    },
    "future_timestamp": {
        "one_ms_past_the_bound": obj(timestamp=str(CORPUS_NOW_MS + MAX_FUTURE_MS + 1)),
        "one_hour_ahead": obj(timestamp=str(CORPUS_NOW_MS + 3_600_000)),
        "rfc3339_one_hour_ahead": obj(timestamp='"2025-11-29T17:00:00Z"'),
        "year_2100": obj(timestamp="4102444800000"),
        "i64_max": obj(timestamp="9223372036854775807"),
        "seconds_mistaken_for_ms_future": obj(timestamp=str(CORPUS_NOW_MS * 1000)),
    },
    "too_old": {
        "one_ms_past_retention": obj(timestamp=str(CORPUS_NOW_MS - RETENTION_MS - 1)),
        "epoch_zero": obj(timestamp="0"),
        "rfc3339_epoch": obj(timestamp='"1970-01-01T00:00:00Z"'),
        "seconds_instead_of_ms": obj(timestamp=str(CORPUS_NOW_MS // 1000)),
        "last_year": obj(timestamp='"2024-11-29T16:00:00+01:00"'),
    },
}


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    for reason, cases in CASES.items():
        os.makedirs(os.path.join(ROOT, reason))
        for name, payload in cases.items():
            data = payload if isinstance(payload, bytes) else payload.encode("utf-8")
            with open(os.path.join(ROOT, reason, name + ".bin"), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
